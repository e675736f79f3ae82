"""Property test over recipe values and tensor corruptions (hypothesis, derandomized: seeded).

Every run of the stock ``mergekit-yaml`` either succeeds with a finite model and a complete report
that lists exactly the files in the output folder, or fails with one ``Error: safemerge:`` line
and leaves everything on disk exactly as it was.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import error_line, load_state, run_mergekit_in_process, tree_snapshot, write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

NUMBERS = st.one_of(
    st.floats(min_value=-0.5, max_value=1.5, allow_nan=False),
    st.sampled_from([0, 1, True, False, "0.5", [0.0, 1.0], float("nan")]),
)
PARAMETERS = st.fixed_dictionaries(
    {},
    optional={
        "threshold": NUMBERS,
        "safety_weight": NUMBERS,
        "combine": st.sampled_from(["linear", "dare_linear", "ties", "slerp", "authors_linear"]),
        "density": st.sampled_from([0, 0.5, 1, 1.2, "1"]),
        "select": st.sampled_from(["threshold", "lowest_k", "random_k", "all", "none", "best"]),
        "k": st.sampled_from([0, 1, 3, 100, True]),
        "targets": st.sampled_from(
            ["q_proj,v_proj", "", "q_proj", "q_prj", "a;b", ["q_proj", "v_proj"], "mlp.up_proj"]
        ),  # fmt: skip
    },
)
TENSORS = [
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.embed_tokens.weight",
    "model.norm.weight",
    "lm_head.weight",
]
CORRUPTIONS = st.one_of(
    st.none(),
    st.tuples(
        st.sampled_from(["aligned", "unaligned", "finetuned", "safety"]),
        st.sampled_from(TENSORS),
        st.sampled_from(["nan", "inf", "int32", "shape", "missing", "truncate"]),
    ),
)


OUTCOMES: list[int] = []  # exit codes of the examples run, for the coverage check below


def _corrupt(folder: str, tensor: str, how: str) -> None:
    path = os.path.join(folder, "model.safetensors")
    if how == "truncate":
        os.truncate(path, os.path.getsize(path) // 2)
        return
    state = load_file(path)
    if how == "nan":
        state[tensor].view(-1)[1] = float("nan")
    elif how == "inf":
        state[tensor].view(-1)[0] = float("-inf")
    elif how == "int32":
        state[tensor] = state[tensor].to(torch.int32)
    elif how == "shape":
        state[tensor] = state[tensor][:-1]
    elif how == "missing":
        state.pop(tensor)
    save_file(state, path, metadata={"format": "pt"})


@pytest.mark.slow
@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(parameters=PARAMETERS, corruption=CORRUPTIONS)
def test_every_run_succeeds_completely_or_fails_cleanly(parameters, corruption, tiny_roles):
    tiny = tiny_roles("llama")
    work = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        roles = dict(tiny.paths)
        if corruption is not None:
            role, tensor, how = corruption
            roles[role] = str(shutil.copytree(tiny.paths[role], work / role))
            _corrupt(roles[role], tensor, how)
        config = write_config(work / "c.yml", roles, **parameters)
        out = work / "out"
        before = tree_snapshot(work)
        result = run_mergekit_in_process(config, out)
        OUTCOMES.append(result.exit_code)
        if result.exit_code == 0:
            report = json.loads((out / "safemerge_report.json").read_text())
            assert sorted(os.listdir(out)) == sorted(report["files"])
            assert report["summary"]["candidates"] == len(report["matrices"])
            for name, tensor in load_state(out).items():
                assert bool(torch.isfinite(tensor).all()), name
            for m in report["matrices"]:
                assert m["rho"] is None or 0.0 <= m["rho"] <= 1.0
                assert m["decision"] in ("merged", "kept")
                assert math.isfinite(m["delta_norm"])
        else:
            assert result.exit_code == 1, result.output
            assert isinstance(result.exception, SystemExit), result.exception
            assert error_line(result.output).startswith("Error: safemerge: ")
            assert tree_snapshot(work) == before
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- recipes, not only values
RECIPES = st.fixed_dictionaries(
    {
        "select": st.sampled_from(["threshold", "lowest_k", "random_k", "none"]),
        "combine": st.sampled_from(["linear", "dare_linear"]),
        "mutation": st.sampled_from([None, None, "duplicate", "unknown top", "unknown model"]),
        "filter": st.sampled_from([None, "mlp", "mpl"]),
        "stored": st.sampled_from(["float32", "bfloat16"]),
        "shards": st.sampled_from([None, "inside", "outside"]),
    },
    optional={
        "threshold": st.sampled_from([0.3, 0.9]),
        "k": st.sampled_from([1, 2]),
        "seed": st.sampled_from([3]),
        "density": st.sampled_from([0.5]),
    },
)


def _recipe_text(roles: dict[str, str], recipe: dict) -> str:
    parameters = {"targets": "q_proj,v_proj", "select": recipe["select"],
                  "combine": recipe["combine"]}  # fmt: skip
    for key in ("threshold", "k", "seed", "density"):
        if key in recipe:
            parameters[key] = recipe[key]
    if recipe["filter"] is not None:
        parameters["safety_weight"] = [{"filter": recipe["filter"], "value": 0.5}, {"value": 0.2}]
    text = write_config_text(roles, parameters)
    if recipe["mutation"] == "duplicate":
        text += "  select: threshold\n"
    elif recipe["mutation"] == "unknown top":
        text = text.replace("dtype: float32", "dtype: float32\nout_dtpye: float32")
    elif recipe["mutation"] == "unknown model":
        text = text.replace("role: unaligned", "role: unaligned\n    paramters: {}", 1)
    return text


def write_config_text(roles: dict[str, str], parameters: dict) -> str:
    import yaml

    models = [{"model": roles[r], "parameters": {"role": r}}
              for r in ("unaligned", "finetuned", "safety")]  # fmt: skip
    head = yaml.safe_dump(
        {"merge_method": "safemerge", "base_model": roles["aligned"], "models": models,
         "dtype": "float32"}, sort_keys=False, default_flow_style=False,
    )  # fmt: skip
    body = yaml.safe_dump({"parameters": parameters}, sort_keys=False, default_flow_style=False)
    return head + body


def _store(folder: str, recipe: dict, aligned: str) -> None:
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    if recipe["stored"] == "bfloat16":
        state = {n: t.to(torch.bfloat16) for n, t in state.items()}
    os.remove(path)
    if recipe["shards"] is None:
        save_file(state, path, metadata={"format": "pt"})
        return
    names = sorted(state)
    save_file({n: state[n] for n in names[:4]}, os.path.join(folder, "a.safetensors"))
    save_file({n: state[n] for n in names[4:]}, os.path.join(folder, "b.safetensors"))
    weight_map = {n: ("a.safetensors" if i < 4 else "b.safetensors") for i, n in enumerate(names)}
    if recipe["shards"] == "outside":
        weight_map[names[0]] = os.path.relpath(os.path.join(aligned, "model.safetensors"), folder)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fp:
        json.dump({"metadata": {}, "weight_map": weight_map}, fp)


def _expected_warnings(recipe: dict) -> set[str]:
    select, written = recipe["select"], set(recipe)
    ignored = set()
    if "k" in written and select not in ("lowest_k", "random_k", "highest_k"):
        ignored.add("k")
    if "seed" in written and select != "random_k":
        ignored.add("seed")
    if "density" in written and recipe["combine"] not in ("dare_linear", "ties"):
        ignored.add("density")
    if "threshold" in written and select != "threshold":
        ignored.add("threshold")
    if select == "none":  # nothing is merged: how to merge has no effect
        ignored.add("combine")
        if recipe["filter"] is not None:
            ignored.add("safety_weight")
        ignored.discard("density")
        if "density" in written:
            ignored.add("density")
    return ignored


RECIPE_OUTCOMES: list[int] = []


@pytest.mark.slow
@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(recipe=RECIPES)
def test_exit_0_means_every_setting_took_effect(recipe, tiny_roles):
    """Duplicate or unknown keys, filters matching nothing and shards outside their model stop the
    run with one line; a success warns about exactly the written parameters without effect."""
    tiny = tiny_roles("llama")
    work = Path(tempfile.mkdtemp(prefix="fuzz-recipe-"))
    try:
        roles = dict(tiny.paths)
        roles["finetuned"] = str(shutil.copytree(tiny.paths["finetuned"], work / "finetuned"))
        _store(roles["finetuned"], recipe, roles["aligned"])
        config = work / "r.yml"
        config.write_text(_recipe_text(roles, recipe))
        before = tree_snapshot(work)
        result = run_mergekit_in_process(str(config), work / "out")
        RECIPE_OUTCOMES.append(result.exit_code)
        must_fail = (
            recipe["mutation"] is not None
            or recipe["filter"] == "mpl"
            or recipe["shards"] == "outside"
            or (recipe["select"] in ("lowest_k", "random_k") and "k" not in recipe)
        )
        if must_fail:
            assert result.exit_code == 1, (recipe, result.output)
            assert error_line(result.output).startswith("Error: safemerge: ")
            assert tree_snapshot(work) == before
            return
        assert result.exit_code == 0, (recipe, result.output)
        warned = {
            line.split("parameters.", 1)[1].split(":", 1)[0]
            for line in result.output.splitlines()
            if "has no effect here" in line
        }
        assert warned == _expected_warnings(recipe), (recipe, result.output)
        precision = "stored in different precisions" in result.output
        assert precision == (recipe["stored"] != "float32"), result.output
        report = json.loads((work / "out" / "safemerge_report.json").read_text())
        assert sorted(os.listdir(work / "out")) == sorted(report["files"])
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("outcomes", [OUTCOMES, RECIPE_OUTCOMES], ids=["values", "recipes"])
def test_the_property_tests_saw_both_outcomes(outcomes):
    """Guard against a generator that only ever produces failures (or only successes)."""
    if not outcomes:
        pytest.skip("the property test did not run in this session")
    assert outcomes.count(0) >= 5 and outcomes.count(1) >= 5, outcomes
