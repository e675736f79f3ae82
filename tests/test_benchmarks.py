"""The benchmark scripts stay runnable: a tiny smoke run of each (the real runs are manual)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("scenario", "runs"),
    [("qv", ("io_floor", "passthrough", "linear", "safemerge", "naive", "adapters",
             "adapter_out")),
     ("full", ("io_floor", "safemerge", "naive", "unchecked"))],
)  # fmt: skip
def test_bench_merge_smoke(scenario, runs, tmp_path):
    results = tmp_path / "perf.md"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_merge.py"), "--size", "tiny",
         "--scenario", scenario, "--repeats", "1", "--runs", ",".join(runs),
         "--work", str(tmp_path / "work"), "--results", str(results)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    text = results.read_text()
    for run in runs:
        assert f"| {run} |" in text
    assert "safemerge wall / naive dense-C" in text
    if scenario == "full":
        assert "safemerge wall / unchecked (what the output NaN/Inf check costs)" in text
    if scenario == "qv":
        assert "safemerge wall / linear" in text and "adapters max RSS / linear" in text
    assert not (tmp_path / "work").exists()


def test_synthetic_full_finetune_is_full_rank(tmp_path):
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from helpers import load_state
    from synthetic import SHAPES, build_synthetic_roles

    paths = build_synthetic_roles(str(tmp_path), SHAPES["tiny"], dtype=torch.float32,
                                  targets=("q_proj",), full_finetune=True)  # fmt: skip
    name = "model.layers.0.self_attn.q_proj.weight"
    delta = load_state(paths["finetuned"])[name] - load_state(paths["aligned"])[name]
    assert int(torch.linalg.matrix_rank(delta)) == min(delta.shape)


def test_synthetic_adapters_reproduce_the_finetuned_model(tmp_path):
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from synthetic import SHAPES, build_synthetic_roles

    from mergekit_safemerge.lora.read import LoraAdapter

    paths = build_synthetic_roles(str(tmp_path), SHAPES["tiny"], adapters=True, dtype=torch.float32)
    from helpers import load_state

    aligned, finetuned = load_state(paths["aligned"]), load_state(paths["finetuned"])
    adapter = LoraAdapter(paths["finetuned_adapter"])
    assert len(adapter.modules) == 2 * 2
    for name, weight in aligned.items():
        factors = adapter.factors(name)
        expected = finetuned[name]
        got = weight if factors is None else weight + factors.dense()
        assert torch.allclose(got, expected, atol=1e-6), name


@pytest.mark.slow
def test_startup_cost_smoke(tmp_path):
    results = tmp_path / "startup.md"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "startup_cost.py"), "--runs", "2",
         "--command-runs", "1", "--results", str(results)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    text = results.read_text()
    assert "## The registration hook" in text and "## Commands that merge nothing" in text
    for row in (
        "`safemerge --version`",
        "`safemerge report MERGE_OUT/`",
        "`python -c 'import torch'`",
    ):
        assert f"| {row}" in text
    assert "target: each command that merges nothing <= 1 s: " in text
