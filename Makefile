# Two entry points for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of this exact version is what these machines install offline; override as needed.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test lint

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	# bytecode for the start-up hook even where PYTHONDONTWRITEBYTECODE is set (docs/method.md)
	$(BIN)/python -m compileall -q mergekit_safemerge
	touch $@

setup: $(BIN)/.installed

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/safemerge demo-models .demo/models
	rm -rf out/demo
	HF_HUB_OFFLINE=1 $(BIN)/mergekit-yaml recipes/demo-safemerge.yml out/demo
	@echo "Merged model and safemerge_report.json: out/demo/"

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check mergekit_safemerge tests benchmarks
	$(BIN)/ruff format --check mergekit_safemerge tests benchmarks
