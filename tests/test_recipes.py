"""Every shipped recipe runs: the stock mergekit CLI on tiny stand-ins of the same architecture.

Each ``recipes/*.yml`` is mapped in :data:`SPECS` to a stand-in: the tiny architecture (Llama with
GQA, Qwen2 with q/k/v biases, Gemma2 with its extra norms and tied embeddings: the same model
classes and tensor names as the real models), the number of blocks and the targeted modules. The
test builds the tiny models and real PEFT LoRA adapters for the placeholders, rewrites only the
model ids and adapter paths of the recipe to those local folders, and runs the command written
in the recipe's header (``mergekit-yaml`` or ``mergekit-multi``) with its own flags and local
folders. A recipe without a spec fails :func:`test_every_recipe_has_a_stand_in`.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import make_lora_adapter
from helpers import load_state, run_mergekit

from mergekit_safemerge.demo.tiny_models import ROLE_FOLDERS, RoleModels, build_role_models
from mergekit_safemerge.outputs.report import REPORT_FILENAME

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
RECIPES_DOC = RECIPES.parent / "docs" / "recipes.md"
QV = ("q_proj", "v_proj")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# The real models of each family: Hub id -> (family, role).
HUB_IDS: dict[str, tuple[str, str]] = {
    "meta-llama/Llama-2-7b-chat-hf": ("llama2", "aligned"),
    "meta-llama/Llama-2-7b-hf": ("llama2", "unaligned"),
    "Qwen/Qwen2-7B-Instruct": ("qwen2", "aligned"),
    "Qwen/Qwen2-7B": ("qwen2", "unaligned"),
    "meta-llama/Llama-3.1-8B-Instruct": ("llama3.1", "aligned"),
    "meta-llama/Llama-3.1-8B": ("llama3.1", "unaligned"),
    "google/gemma-2-9b-it": ("gemma2", "aligned"),
    "google/gemma-2-9b": ("gemma2", "unaligned"),
}
# Tiny architecture of each family, and the transformers class of the real (and tiny) model.
FAMILY_ARCH = {"llama2": "llama", "llama3.1": "llama", "qwen2": "qwen2", "gemma2": "gemma2"}
ARCH_CLASS = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
}
# The user's inputs: placeholder -> a LoRA adapter on the aligned model (its seed) or a role folder.
LORA_SEEDS = {
    "path/to/your-task-lora": 11,
    "path/to/your-gsm8k-lora": 12,
    "path/to/your-pubmedqa-lora": 13,
    "path/to/your-safety-lora": 14,
}
FULL_FINETUNES = {
    "path/to/your-full-finetune": "finetuned",
    "path/to/your-full-safety-finetune": "safety",
}
DEMO_PREFIX = ".demo/models/"  # the demo recipe's folders, written by `safemerge demo-models`
MODEL_KEYS = ("model", "base_model")
# Options of the documented commands whose value is a folder; the test gives its own.
FOLDER_OPTIONS = ("--lora-merge-cache", "--intermediate-dir", "--out-path")


@dataclass(frozen=True)
class StandIn:
    """How a recipe is run on tiny models, and what its report must then say."""

    family: str  # a family of HUB_IDS, or "demo"
    layers: int  # transformer blocks of the stand-in
    modules: tuple[str, ...] = QV  # targeted modules: candidates = layers x len(modules)
    full: bool = False  # the fine-tuned and safety roles are full fine-tunes of every module
    thresholds: tuple[tuple[str, float], ...] = ()  # (tensor-name substring, threshold) filters
    same_as: str | None = None  # identical settings to this recipe, which is run instead

    @property
    def arch(self) -> str:
        return "llama" if self.family == "demo" else FAMILY_ARCH[self.family]


SPECS: dict[str, StandIn] = {
    "demo-safemerge.yml": StandIn("demo", 4),  # `safemerge demo-models` default: 4 blocks
    "llama-safemerge.yml": StandIn("llama2", 2, same_as="llama2-7b-chat-safemerge.yml"),
    "llama2-7b-chat-safemerge.yml": StandIn("llama2", 2),
    "qwen2-7b-instruct-safemerge.yml": StandIn("qwen2", 3),
    "llama3.1-8b-instruct-safemerge.yml": StandIn("llama3.1", 3),
    "gemma2-9b-it-safemerge.yml": StandIn("gemma2", 2),
    "full-finetune-safemerge.yml": StandIn("qwen2", 2, ALL_LINEAR, full=True),
    "attn-mlp-thresholds-safemerge.yml": StandIn(
        "llama3.1", 2, ALL_LINEAR, thresholds=(("self_attn", 0.35), ("mlp", 0.5))
    ),
    "multi-ties-then-safemerge.yml": StandIn("llama2", 2),
}


def discovered_recipes() -> list[str]:
    return sorted(p.name for p in RECIPES.iterdir() if p.suffix in (".yml", ".yaml"))


def load_documents(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((RECIPES / name).read_text()) if doc is not None]


def stage_names(documents: list[dict[str, Any]]) -> set[str]:
    """Names of mergekit-multi stages: later stages use them as model references."""
    return {doc["name"] for doc in documents if "name" in doc}


def model_references(node: Any) -> Iterator[str]:
    """Every string under a ``model:`` or ``base_model:`` key."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in MODEL_KEYS:
                if not isinstance(value, str):
                    raise TypeError(f"{key}: {value!r}: only string model references are mapped")
                yield value
            else:
                yield from model_references(value)
    elif isinstance(node, list):
        for item in node:
            yield from model_references(item)


def rewrite_reference(reference: str, local: dict[str, str], keep: set[str]) -> str:
    """``hub-id`` or ``hub-id+adapter`` -> local folders; names in ``keep`` stay as they are."""
    if reference in keep:
        return reference
    missing = [part for part in reference.split("+") if part not in local]
    if missing:
        raise KeyError(f"no stand-in for {', '.join(map(repr, missing))} in {reference!r}")
    return "+".join(local[part] for part in reference.split("+"))


def rewrite_models(node: Any, local: dict[str, str], keep: set[str]) -> Any:
    """A copy of a recipe document with each model reference rewritten, everything else kept."""
    if isinstance(node, dict):
        return {
            key: rewrite_reference(value, local, keep)
            if key in MODEL_KEYS
            else rewrite_models(value, local, keep)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [rewrite_models(item, local, keep) for item in node]
    return node


_COMMAND = re.compile(r"(mergekit-(?:yaml|multi)\s+recipes/\S+.*)$")
_ADAPTER_COMMAND = re.compile(r"(safemerge adapter\s+recipes/\S+.*)$")


def documented_adapter_command(name: str) -> list[str] | None:
    """The ``safemerge adapter`` line of the recipe's comments, if it has one."""
    lines = [line.lstrip("#").strip() for line in (RECIPES / name).read_text().splitlines()
             if line.startswith("#")]  # fmt: skip
    commands = [m.group(1) for line in lines if (m := _ADAPTER_COMMAND.search(line))]
    assert len(commands) <= 1, f"{name}: several adapter commands {commands}"
    if not commands:
        return None
    argv = shlex.split(commands[0])
    assert argv[2] == f"recipes/{name}", f"{name}: the adapter command runs {argv[2]}"
    return argv


def documented_command(name: str) -> list[str]:
    """The command line written in the recipe's comments (``\\`` continuations joined)."""
    comments = [
        line.lstrip("#").strip()
        for line in (RECIPES / name).read_text().splitlines()
        if line.startswith("#")
    ]
    text = "\n".join(comments).replace("\\\n", " ")
    commands = [m.group(1) for line in text.splitlines() if (m := _COMMAND.search(line))]
    assert len(commands) == 1, f"{name}: expected one documented command, found {commands}"
    argv = shlex.split(commands[0])
    assert argv[1] == f"recipes/{name}", f"{name}: the documented command runs {argv[1]}"
    return argv


def local_arguments(argv: list[str], folder: Path) -> list[str]:
    """The documented arguments after the config, with the test's own output and work folders."""
    arguments, rest = [], argv[2:]
    if argv[0] == "mergekit-yaml":
        assert rest and not rest[0].startswith("-"), f"no output folder in {argv}"
        arguments.append(str(folder / "out"))
        rest = rest[1:]
    values = iter(rest)
    for argument in values:
        arguments.append(argument)
        if argument in FOLDER_OPTIONS:
            next(values)
            arguments.append(str(folder / ("out" if argument == "--out-path" else argument[2:])))
    return arguments


def stand_in_models(
    spec: StandIn, references: set[str], folder: Path, tiny_roles: Callable[..., RoleModels]
) -> tuple[dict[str, str], RoleModels]:
    """Local folders for every part of the recipe's model references, built on demand."""
    if spec.family == "demo":
        from mergekit_safemerge.cli import main as safemerge_cli

        assert safemerge_cli(["demo-models", str(folder / "demo-models")]) == 0
        paths = {role: str(folder / "demo-models" / role) for role in ROLE_FOLDERS}
        roles = RoleModels(paths=paths, targets=QV, inside_fraction={})
    elif spec.full:
        roles = build_role_models(
            str(folder / "models"), spec.arch, num_layers=spec.layers, targets=spec.modules
        )
    else:
        roles = tiny_roles(spec.arch, spec.layers)

    local: dict[str, str] = {}
    for reference in sorted(references):
        parts = reference.split("+")
        for part in parts:
            if part in local:
                continue
            if part in HUB_IDS:
                family, role = HUB_IDS[part]
                assert family == spec.family, f"{part}: a {family} model in a {spec.family} recipe"
                local[part] = roles.paths[role]
            elif part in LORA_SEEDS:
                assert len(parts) == 2 and HUB_IDS.get(parts[0], ("", ""))[1] == "aligned", (
                    f"{reference}: a LoRA must be applied to the recipe's aligned model"
                )
                local[part] = make_lora_adapter(
                    roles.paths["aligned"],
                    str(folder / "lora" / part.rsplit("/", 1)[-1]),
                    seed=LORA_SEEDS[part],
                    targets=spec.modules,
                )
            elif part in FULL_FINETUNES:
                local[part] = roles.paths[FULL_FINETUNES[part]]
            elif spec.family == "demo" and part.startswith(DEMO_PREFIX):
                local[part] = roles.paths[part.removeprefix(DEMO_PREFIX)]
            else:
                pytest.fail(
                    f"no stand-in for the model reference {part!r}: add it to HUB_IDS, "
                    "LORA_SEEDS or FULL_FINETUNES in tests/test_recipes.py"
                )
    return local, roles


# ---------------------------------------------------------------- coverage and static checks
def test_every_recipe_has_a_stand_in() -> None:
    recipes = set(discovered_recipes())
    assert recipes, f"no recipes found in {RECIPES}"
    unmapped, stale = recipes - set(SPECS), set(SPECS) - recipes
    assert not unmapped, (
        f"recipes without a stand-in spec: {sorted(unmapped)}; add each to SPECS in "
        "tests/test_recipes.py so that the test runs it on tiny models"
    )
    assert not stale, f"SPECS names recipes that do not exist: {sorted(stale)}"
    for name, spec in SPECS.items():
        if spec.same_as:
            assert SPECS[spec.same_as].same_as is None, f"{name}: same_as must name a run recipe"


@pytest.mark.parametrize("name", discovered_recipes())
def test_recipe_is_well_formed(name: str) -> None:
    if name not in SPECS:
        pytest.fail(f"{name} has no stand-in spec in tests/test_recipes.py (see SPECS)")
    documents = load_documents(name)
    final = documents[-1]
    assert final["merge_method"] == "safemerge" and "name" not in final
    assert len(documents) == 1 + len(stage_names(documents))
    for document in documents:
        for scope in [document] + document.get("models", []):
            targets = (scope.get("parameters") or {}).get("targets")
            assert targets is None or isinstance(targets, str), (
                f"{name}: targets must be a comma-separated string (a list is a gradient)"
            )
    if SPECS[name].family == "demo":
        return  # the demo recipe has local folders and no placeholders
    lines = (RECIPES / name).read_text().splitlines()
    for line in lines:
        body = line.split("#", 1)[0].strip()
        if body and body != "---":
            assert " # " in line, f"{name}: every key has a comment: {line!r}"
        if "path/to/" in body:
            assert "# <-- REPLACE" in line, f"{name}: mark each placeholder: {line!r}"
    assert any("path/to/" in line for line in lines), f"{name}: no placeholder for your inputs"
    documented = " ".join(RECIPES_DOC.read_text().replace("\\\n", " ").split())
    assert " ".join(documented_command(name)) in documented, (
        f"docs/recipes.md does not list the command of {name} as its header writes it"
    )


@pytest.mark.parametrize(
    "name",
    [
        "llama-safemerge.yml",
        "llama2-7b-chat-safemerge.yml",
        "qwen2-7b-instruct-safemerge.yml",
        "llama3.1-8b-instruct-safemerge.yml",
        "gemma2-9b-it-safemerge.yml",
    ],
)
def test_model_recipes_say_how_to_get_an_adapter(name: str) -> None:
    assert documented_adapter_command(name) is not None


@pytest.mark.parametrize("name", sorted(n for n, s in SPECS.items() if s.same_as))
def test_alias_recipe_equals_its_original(name: str) -> None:
    original = SPECS[name].same_as
    assert load_documents(name) == load_documents(original)
    assert documented_command(name)[3:] == documented_command(original)[3:]
    assert documented_adapter_command(name)[4:] == documented_adapter_command(original)[4:]


# ---------------------------------------------------------------- real runs
@pytest.mark.slow
@pytest.mark.parametrize(
    "name", [n for n in discovered_recipes() if n not in SPECS or not SPECS[n].same_as]
)
def test_recipe_runs_on_tiny_stand_ins(
    name: str, tiny_roles: Callable[..., RoleModels], tmp_path: Path
) -> None:
    import transformers

    if name not in SPECS:
        pytest.fail(f"{name} has no stand-in spec in tests/test_recipes.py (see SPECS)")
    spec = SPECS[name]
    documents = load_documents(name)
    stages = stage_names(documents)
    references = {r for r in model_references(documents) if r not in stages}
    local, roles = stand_in_models(spec, references, tmp_path, tiny_roles)
    config = tmp_path / name
    config.write_text(
        yaml.safe_dump_all([rewrite_models(d, local, stages) for d in documents], sort_keys=False)
    )

    argv = documented_command(name)
    result = run_mergekit(str(config), *local_arguments(argv, tmp_path), command=argv[0])
    assert result.returncode == 0, result.stderr[-4000:]

    out = tmp_path / "out"
    report = json.loads((out / REPORT_FILENAME).read_text())
    summary = report["summary"]
    assert summary["candidates"] == spec.layers * len(spec.modules)
    assert summary["changed"] == summary["candidates"]  # every targeted matrix was fine-tuned
    assert set(summary["by_module"]) == set(spec.modules)
    for stage in stages:  # mergekit-multi fed the stage's output to SafeMERGE
        assert report["models"]["finetuned"] == str(tmp_path / "intermediate-dir" / stage)
        assert (tmp_path / "intermediate-dir" / stage / "config.json").is_file()

    for matrix in report["matrices"]:
        expected = next((v for f, v in spec.thresholds if f in matrix["name"]), None)
        if expected is not None:
            assert matrix["threshold"] == expected, matrix["name"]
        merged = matrix["rho"] is not None and matrix["rho"] < matrix["threshold"]
        assert matrix["decision"] == ("merged" if merged else "kept"), matrix["name"]
    if spec.thresholds:  # both groups present, each with its own threshold
        seen = {
            (group, m["threshold"])
            for m in report["matrices"]
            for group, _ in spec.thresholds
            if group in m["name"]
        }
        assert seen == set(spec.thresholds)

    adapter_argv = documented_adapter_command(name)
    if adapter_argv is not None:  # the LoRA recipes also say how to keep LoRA form
        import peft

        from mergekit_safemerge.cli import main as safemerge_cli

        lora_out = tmp_path / "out-lora"
        assert safemerge_cli(["adapter", str(config), str(lora_out), "--quiet"]) == 0
        lora_report = json.loads((lora_out / REPORT_FILENAME).read_text())
        assert [(m["name"], m["decision"]) for m in lora_report["matrices"]] == [
            (m["name"], m["decision"]) for m in report["matrices"]
        ]
        base = transformers.AutoModelForCausalLM.from_pretrained(roles.paths["aligned"])
        peft.PeftModel.from_pretrained(base, str(lora_out))  # loads as a plain PEFT LoRA

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == ARCH_CLASS[spec.arch]
    assert model.config.num_hidden_layers == spec.layers
    merged_state = load_state(out)
    assert set(merged_state) == set(load_state(roles.paths["aligned"]))  # same tensor names
    out_dtype = documents[-1].get("out_dtype") or documents[-1]["dtype"]
    assert {t.dtype for t in merged_state.values()} == {getattr(torch, out_dtype)}
