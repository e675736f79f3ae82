# Two entry points for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of this exact version is what these machines install offline; override as needed.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo miniature test test-fast lint

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[eval,test,train]"
	# bytecode for the start-up hook even where PYTHONDONTWRITEBYTECODE is set (docs/method.md)
	$(BIN)/python -m compileall -q mergekit_safemerge
	touch $@

setup: $(BIN)/.installed

# The miniature story in one command, in the paper's setting (benign fine-tune): the tiny trained
# Llama models shipped in benchmarks/miniature/models/, SafeMERGE and a control via the stock
# mergekit-yaml, per-matrix decisions, harmfulness and task accuracy before and after
# (docs/miniature.md#the-demo).
demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.miniature.demo

# The whole miniature reproduction, every model trained from scratch (cached in .demo/miniature/):
# writes benchmarks/miniature/RESULTS.md, miniature.png and results.json (docs/miniature.md).
miniature: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.miniature.run

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# Everyday work: the math, the decisions and the error paths; the end-to-end runs marked slow are left out.
test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check mergekit_safemerge tests benchmarks
	$(BIN)/ruff format --check mergekit_safemerge tests benchmarks
