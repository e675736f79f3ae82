"""The benchmark scripts stay runnable: a tiny smoke run of each (the real runs are manual)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


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
         "--scenario", scenario, "--repeats", "1", "--runs", ",".join(runs), "--cache", "warm",
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


# ---------------------------------------------------------------- scenario adapter-roles
TARGET_NAMES = [f"model.layers.{layer}.self_attn.{m}.weight" for layer in (0, 1)
                for m in ("q_proj", "v_proj")]  # fmt: skip


def _state(folder):
    import glob

    from safetensors import safe_open

    state = {}
    for path in sorted(glob.glob(f"{folder}/*.safetensors")):
        with safe_open(path, "pt") as fp:
            state |= {name: (Path(path).name, fp.get_tensor(name)) for name in fp.keys()}  # noqa: SIM118
    return state


@pytest.fixture(scope="module")
def adapter_roles(tmp_path_factory):
    """The tiny adapter-roles build, as bench_merge builds it (a child process, a stamp)."""
    from bench_merge import SCENARIOS, SHAPES, build_models

    folder = tmp_path_factory.mktemp("adapter-roles") / "models"
    stamp = {"size": "tiny", "scenario": "adapter-roles", "repeat_blocks": True, "seed": 0}
    paths = build_models(folder, stamp, SHAPES["tiny"], SCENARIOS["adapter-roles"])
    return folder, stamp, paths


def test_disk_check_names_what_it_needs_and_what_is_free(monkeypatch, tmp_path):
    import shutil

    import bench_merge
    from bench_merge import ADAPTER_ROLE_RUNS, SCENARIOS, SHAPES, check_disk, disk_need

    need = disk_need(SHAPES["7b"], SCENARIOS["adapter-roles"], list(ADAPTER_ROLE_RUNS))
    assert round(need.models / 1e9, 1) == 27.0 and round(need.output / 1e9, 1) == 13.5
    free = shutil._ntuple_diskusage(100e9, 70e9, 30.1e9)
    monkeypatch.setattr(bench_merge.shutil, "disk_usage", lambda path: free)
    with pytest.raises(SystemExit) as stop:
        check_disk("--size 7b --scenario adapter-roles", need, tmp_path)
    assert str(stop.value) == (
        f"bench_merge: --size 7b --scenario adapter-roles needs 41.1 GB free in {tmp_path} "
        "(27.0 GB of models, 13.5 GB for one output, 0.7 GB margin); 30.1 GB free"
    )
    monkeypatch.setattr(bench_merge.shutil, "disk_usage", lambda path: free._replace(free=50e9))
    assert check_disk("x", need, tmp_path).endswith("; 50.0 GB free")
    kept = disk_need(SHAPES["7b"], SCENARIOS["adapter-roles"], ["linear"], reuse=True)
    assert kept.models == 0 and kept.output == need.output


def test_adapter_roles_build_holds_two_models_and_two_adapters(adapter_roles):
    import torch
    from bench_merge import SHAPES, kept_models

    folder, stamp, paths = adapter_roles
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == [
        "aligned", "finetuned_adapter", "safety_adapter", "unaligned"]  # fmt: skip
    assert set(paths) == {"aligned", "unaligned", "finetuned_adapter", "safety_adapter"}
    shape = SHAPES["tiny"]
    for role in ("aligned", "unaligned"):
        state = _state(paths[role])
        assert sum(t.numel() for _, t in state.values()) == shape.parameters()
        assert {t.dtype for _, t in state.values()} == {torch.bfloat16}
    for role in ("finetuned_adapter", "safety_adapter"):
        state = _state(paths[role])
        assert sorted(state) == sorted(
            f"base_model.model.{name.removesuffix('.weight')}.lora_{ab}.weight"
            for name in TARGET_NAMES for ab in "AB"
        )  # fmt: skip
        assert state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"][
            1].shape == (8, shape.hidden)  # fmt: skip
    # the stamp: the same build is reused, another one is not
    assert kept_models(folder, stamp) == paths
    assert kept_models(folder, {**stamp, "repeat_blocks": False}) is None
    assert kept_models(folder, {**stamp, "seed": 1}) is None


def test_repeat_blocks_repeats_values_under_each_layers_own_names(adapter_roles):
    import torch

    _folder, _stamp, paths = adapter_roles
    for role in paths:
        state = _state(paths[role])
        layer0 = {n: v for n, v in state.items() if ".layers.0." in n}
        assert layer0
        for name, (shard, tensor) in layer0.items():
            other_shard, other = state[name.replace(".layers.0.", ".layers.1.")]
            assert torch.equal(tensor, other), name
            if "adapter" not in role:
                assert shard != other_shard  # each layer in its own shard
    aligned, unaligned = _state(paths["aligned"]), _state(paths["unaligned"])
    assert not torch.equal(aligned[TARGET_NAMES[0]][1], unaligned[TARGET_NAMES[0]][1])


def test_read_needed_reads_exactly_the_target_tensors(adapter_roles):
    import torch
    from read_tensors import read_tensors

    _folder, _stamp, paths = adapter_roles
    for role in ("aligned", "unaligned"):
        pieces: dict[str, bytearray] = {}

        def sink(name, piece, pieces=pieces):
            pieces.setdefault(name, bytearray()).extend(piece)

        # a buffer smaller than a tensor: pieces are read in turn into the same buffer
        counts = read_tensors([paths[role]], ["*.q_proj.weight", "*.v_proj.weight"], sink=sink,
                              chunk=4096)  # fmt: skip
        state = _state(paths[role])
        assert sorted(pieces) == sorted(TARGET_NAMES)
        for name in TARGET_NAMES:
            expected = state[name][1].reshape(-1).view(torch.uint8).numpy().tobytes()
            assert bytes(pieces[name]) == expected, name
        assert counts["tensor_bytes"] == sum(len(p) for p in pieces.values())
        assert counts["tensors"] == len(TARGET_NAMES)
    adapter = f"{paths['safety_adapter']}/adapter_model.safetensors"
    whole: dict[str, bytearray] = {}
    counts = read_tensors([], ["*"], [adapter],
                          sink=lambda n, b: whole.setdefault(n, bytearray()).extend(b))  # fmt: skip
    assert bytes(whole[adapter]) == Path(adapter).read_bytes()
    assert counts == {"tensors": 0, "tensor_bytes": 0, "whole_bytes": Path(adapter).stat().st_size}


def test_page_cache_drop_says_how(tmp_path):
    from bench_merge import drop_page_cache

    inputs = [tmp_path / "a.safetensors"]
    inputs[0].write_bytes(b"x" * 4096)
    control = tmp_path / "drop_caches"
    assert drop_page_cache(inputs, "cold", drop_caches=str(control)) == "cold (drop_caches)"
    assert control.read_text() == "3\n"
    unwritable = str(tmp_path / "no-such-folder" / "drop_caches")
    assert drop_page_cache(inputs, "cold", drop_caches=unwritable) == "cold (fadvise)"
    assert drop_page_cache(inputs, "warm", drop_caches=str(control)) == "warm (not dropped)"
    control.unlink()
    assert drop_page_cache(inputs, "cold-inputs", drop_caches=str(control)) == "cold (fadvise)"
    assert not control.exists()  # only the inputs' pages, never every cached page


@pytest.mark.slow
def test_bench_merge_adapter_roles_end_to_end(tmp_path):
    """Every run of the scenario on the repeated-block tiny models: both commands read them."""
    results = tmp_path / "perf.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_merge.py"), "--size", "tiny",
         "--scenario", "adapter-roles", "--repeats", "1", "--cache", "warm", "--keep-models",
         "--work", str(tmp_path / "work"), "--results", str(results)],
        check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.stdout.startswith("bench_merge: --size tiny --scenario adapter-roles needs ")
    text = results.read_text()
    for run in ("io_floor", "read_needed", "linear", "adapters", "adapter_out", "startup"):
        assert f"| {run} | warm (not dropped) |" in text
    assert "| adapter_out | warm (not dropped) | " in text and "values repeat across blocks" in text
    for label in ("adapters wall / linear", "adapter_out work / read_needed wall",
                  "adapter_out wall / adapters wall", "adapter_out work / adapter_out wall",
                  "startup wall"):  # fmt: skip
        assert f"- {label}" in text
    row = next(line for line in text.splitlines() if line.startswith("| adapter_out |"))
    assert row.split("|")[4].strip() != "-"  # its own work time, from its report
    kept = sorted(p.name for p in (tmp_path / "work").iterdir())
    assert kept == ["models"]  # outputs deleted, models kept


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


def test_bench_rule_smoke(tmp_path):
    results = tmp_path / "rule.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_rule.py"), "--shapes", "tiny",
         "--repeats", "1", "--dense-repeats", "1", "--quiet-wait", "0", "--results", str(results)],
        check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    text = results.read_text()
    assert text in done.stdout
    for case in ("floor", "floor, fresh output", "gemms", "products", "factored kept",
                 "factored merged", "dense merged", "low-rank kept"):  # fmt: skip
        assert f"| {case} |" in text
    for target in ("factored kept / floor = ", "factored merged / floor, fresh output = ",
                   "dense kept / gemms = "):  # fmt: skip
        assert target in text
    assert "rho, factored" in text and "Machine:" in text and "bench_rule.py --shapes tiny" in text
