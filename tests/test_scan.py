"""`safemerge scan` and the ranking selection modes through stock mergekit-yaml, on tiny models."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from helpers import BIN, load_state, oracle_state, run_mergekit_in_process, write_config

from mergekit_safemerge.cli import main as safemerge_main
from mergekit_safemerge.outputs.scan import PNG_WIDTH, SCAN_CSV, SCAN_JSON, SCAN_PNG

TARGETS = "q_proj,v_proj"


@pytest.fixture(scope="module")
def scanned(tiny_roles, tmp_path_factory):
    """The tiny 4-block Llama, its scan folder and the scan document."""
    tiny = tiny_roles("llama", 4)
    folder = tmp_path_factory.mktemp("scan")
    config = write_config(folder / "c.yml", tiny.paths, targets=TARGETS, threshold=0.5)
    out = folder / "scan-out"
    assert safemerge_main(["scan", config, "--out", str(out), "--quiet"]) == 0
    document = json.loads((out / SCAN_JSON).read_text())
    return tiny, out, document


def _rhos(document):
    return {m["name"]: m["rho"] for m in document["matrices"] if m["rho"] is not None}


def _oracle_rhos(tiny):
    """rho of every changed candidate from the float64 dense-C oracle, not from our code."""
    states = {role: load_state(path) for role, path in tiny.paths.items()}
    _, rhos = oracle_state(states, threshold=0.5, safety_weight=0.2, targets=("q_proj", "v_proj"))
    return rhos


def _expected_selection(rhos, mode, k, seed):
    """Each ranking mode as docs/scan.md defines it, written out independently."""
    names = sorted(rhos)
    if mode == "all":
        return set(names)
    if mode == "none":
        return set()
    if mode == "random_k":
        return set(random.Random(seed).sample(names, k))
    ordered = sorted(names, key=lambda n: (rhos[n], n), reverse=mode == "highest_k")
    return set(ordered[:k])


def test_scan_outputs_and_never_writes_weights(scanned):
    tiny, out, document = scanned
    assert sorted(os.listdir(out)) == sorted([SCAN_JSON, SCAN_CSV, SCAN_PNG])
    assert document["format"] == "safemerge-scan"
    assert document["summary"]["candidates"] == 4 * 2
    csv_lines = (out / SCAN_CSV).read_text().splitlines()
    assert csv_lines[0].startswith("name,module,block,rows,cols,rho,threshold,decision")
    assert len(csv_lines) == 1 + 8
    oracle = _oracle_rhos(tiny)
    assert set(_rhos(document)) == set(oracle)
    for m in document["matrices"]:
        assert m["rho"] == pytest.approx(oracle[m["name"]], rel=1e-4, abs=1e-6)
        assert m["decision"] == ("merged" if oracle[m["name"]] < 0.5 else "kept")


def test_png_is_a_valid_image(scanned):
    import matplotlib.image

    _, out, _ = scanned
    data = (out / SCAN_PNG).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(out / SCAN_PNG).shape[:2]
    assert width == PNG_WIDTH and height >= 500


def _document(blocks: int, unchanged=()):
    """A scan document of ``blocks`` blocks x 7 modules, rho spread over [0, 1]."""
    from mergekit_safemerge.core.records import KEPT, MatrixRecord
    from mergekit_safemerge.outputs.scan import build_scan

    modules = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    records = []
    for b in range(blocks):
        for j, module in enumerate(modules):
            rho = None if (b, module) in unchanged else ((b * 7 + j) * 0.37) % 1.0
            records.append(MatrixRecord(
                name=f"model.layers.{b}.mlp.{module}.weight", shape=(4, 4), rho=rho,
                decision=KEPT, reason="", delta_norm=0.0 if rho is None else 1.0, safety_norm=1.0,
                alignment_norm=1.0, delta_safety_cosine=0.0, criterion="dense", threshold=0.35,
                safety_weight=0.2, combine="linear", density=1.0,
            ))  # fmt: skip
    from mergekit_safemerge.core.settings import Settings

    return build_scan(records, Settings(threshold=0.35), {"aligned": "a"})


@pytest.mark.parametrize("blocks", [4, 32, 80])
def test_scan_picture_is_readable_from_4_to_80_blocks(blocks, tmp_path):
    import matplotlib.pyplot as plt

    from mergekit_safemerge.outputs.scan import plot_scan, scan_figure

    document = _document(blocks, unchanged={(1, "v_proj")})
    figure = scan_figure(document)
    figure.canvas.draw()
    heatmap = figure.axes[0]
    labels = [t for t in heatmap.get_xticklabels() if t.get_text()]
    boxes = [t.get_window_extent() for t in labels]
    assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:], strict=False)), "labels overlap"
    assert labels[0].get_text() == "0"
    assert int(labels[-1].get_text()) >= blocks - 1 - blocks // 16
    legend = [t.get_text() for t in heatmap.get_legend().get_texts()]
    assert "D = 0 (unchanged)" in legend and "merged" in legend
    colorbar = figure.axes[-1]
    assert any(line.get_ydata()[0] == 0.35 for line in colorbar.get_lines())  # the threshold
    plt.close(figure)
    plot_scan(document, str(tmp_path / "scan.png"))
    assert (tmp_path / "scan.png").stat().st_size > 10_000


def test_sweep_counts_equal_actual_merges(scanned, tmp_path):
    tiny, _, document = scanned
    rhos = sorted(_rhos(document).values())
    sweep = {row["threshold"]: row for row in document["sweep"]}
    # grid points, and a threshold exactly at a measured rho (strict <)
    for tau in (0.3, 0.6, 0.9, rhos[3]):
        config = write_config(tmp_path / f"t{tau}.yml", tiny.paths, targets=TARGETS, threshold=tau)
        out = tmp_path / f"merge-{tau}"
        result = run_mergekit_in_process(config, out)
        assert result.exit_code == 0, result.output
        report = json.loads((out / "safemerge_report.json").read_text())
        assert report["summary"]["merged"] == sweep[tau]["merged"], tau
        by_module = {m: c["merged"] for m, c in report["summary"]["by_module"].items()}
        assert by_module == sweep[tau]["by_module"]


@pytest.mark.parametrize(
    ("mode", "k"), [("lowest_k", 3), ("highest_k", 3), ("random_k", 3), ("all", 0), ("none", 0)]
)
def test_every_mode_through_stock_mergekit(mode, k, scanned, tmp_path):
    tiny, _, _ = scanned
    expected = _expected_selection(_oracle_rhos(tiny), mode, k, seed=11)
    parameters = {"targets": TARGETS, "select": mode, "seed": 11}
    if k:
        parameters["k"] = k
    config = write_config(tmp_path / "c.yml", tiny.paths, **parameters)
    out = tmp_path / "out"
    result = run_mergekit_in_process(config, out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "safemerge_report.json").read_text())
    merged = {m["name"] for m in report["matrices"] if m["decision"] == "merged"}
    assert merged == expected
    assert report["settings"]["select"] == mode
    assert (report["settings"]["k"], report["settings"]["seed"]) == (k, 11)
    state, finetuned = load_state(out), load_state(tiny.paths["finetuned"])
    changed = {n for n in finetuned if not torch.equal(state[n], finetuned[n])}
    assert changed == expected


def test_random_k_differs_across_seeds(scanned, tmp_path):
    tiny, _, _ = scanned
    picks = []
    for seed in (1, 2, 3, 4):
        config = write_config(tmp_path / f"s{seed}.yml", tiny.paths, targets=TARGETS,
                              select="random_k", k=3, seed=seed)  # fmt: skip
        out = tmp_path / f"out{seed}"
        assert run_mergekit_in_process(config, out).exit_code == 0
        report = json.loads((out / "safemerge_report.json").read_text())
        picks.append(frozenset(m["name"] for m in report["matrices"] if m["decision"] == "merged"))
    assert all(len(p) == 3 for p in picks) and len(set(picks)) > 1


def test_k_larger_than_changed_fails_cleanly(scanned, tmp_path):
    tiny, _, _ = scanned
    config = write_config(tmp_path / "c.yml", tiny.paths, targets=TARGETS, select="lowest_k", k=9)
    result = run_mergekit_in_process(config, tmp_path / "out")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "Error: safemerge: parameters.k = 9 for select lowest_k: need 1 <= k <= 8, "
        "the number of matrices the fine-tune changed"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"select": "lowest_k"}, "parameters.k: select lowest_k needs k >= 1"),
        ({"select": [{"filter": "mlp", "value": "all"}, {"value": "none"}]},
         "parameters.select: select applies to the whole merge"),
        ({"select": "best"}, "parameters.select: 'best' is not valid"),
    ],
)  # fmt: skip
def test_selection_settings_are_checked_before_loading(parameters, message, scanned, tmp_path):
    tiny, _, _ = scanned
    config = write_config(tmp_path / "c.yml", tiny.paths, **parameters)
    result = run_mergekit_in_process(config, tmp_path / "out")
    assert result.exit_code == 1
    assert message in result.output.strip().splitlines()[-1]


def test_scan_rejects_other_methods(tmp_path, capsys):
    config = tmp_path / "linear.yml"
    config.write_text("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n")
    assert safemerge_main(["scan", str(config), "--out", str(tmp_path / "s")]) == 1
    assert capsys.readouterr().err.strip() == (
        "Error: safemerge scan: merge_method: this is a 'linear' configuration, not 'safemerge'"
    )


@pytest.mark.slow
def test_scan_console_script(tiny_roles, tmp_path):
    import subprocess

    tiny = tiny_roles("qwen2")
    config = write_config(tmp_path / "c.yml", tiny.paths, targets=TARGETS)
    result = subprocess.run(
        [str(BIN / "safemerge"), "scan", config, "--out", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "threshold sweep" in result.stdout and "SafeMERGE scan" in result.stderr
    assert result.stdout.splitlines()[0].split() == ["block", "q_proj", "v_proj"]


# ---------------------------------------------------------------- mergekit's own Python API
def _python_api_roles(tiny) -> tuple[dict[str, dict], dict[str, str]]:
    states = {role: load_state(tiny.paths[role]) for role in ("aligned", "unaligned", "finetuned",
                                                              "safety")}  # fmt: skip
    return states, {role: role for role in ("unaligned", "finetuned", "safety")}


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "k"), [("lowest_k", 3), ("highest_k", 3), ("random_k", 3)])
def test_ranking_modes_through_mergekits_python_api_equal_mergekit_yaml(mode, k, scanned, tmp_path):
    """``merge_state_dicts`` without our run integration ranks over every tensor it is given and
    gives the tensors ``mergekit-yaml`` writes for the same recipe."""
    from mergekit.merge_methods.api import merge_state_dicts

    tiny, _, _ = scanned
    states, roles = _python_api_roles(tiny)
    parameters = {"targets": TARGETS, "select": mode, "k": k, "seed": 11}
    merged = merge_state_dicts(
        states, "safemerge", parameters={"role": roles, **parameters}, base="aligned"
    )
    config = write_config(tmp_path / "c.yml", tiny.paths, **parameters)
    result = run_mergekit_in_process(config, tmp_path / "out")
    assert result.exit_code == 0, result.output
    written = load_state(tmp_path / "out")
    assert set(written) <= set(merged)
    for name, tensor in written.items():
        assert torch.equal(merged[name], tensor), name
    expected = _expected_selection(_oracle_rhos(tiny), mode, k, seed=11)
    changed = {n for n in states["finetuned"] if not torch.equal(merged[n], states["finetuned"][n])}
    assert changed == expected


@pytest.mark.slow
def test_ranking_mode_in_mergekits_graph_without_the_run_integration_is_one_line(scanned):
    """mergekit's graph hands the method one tensor at a time: a ranking mode cannot be decided
    there, and says so instead of ranking each tensor alone."""
    from mergekit.merge_methods.base import TensorGroup

    from mergekit_safemerge.binding.method import SAFEMERGE
    from mergekit_safemerge.errors import SafeMergeError

    tiny, _, _ = scanned
    states, roles = _python_api_roles(tiny)
    name = "model.layers.0.self_attn.q_proj.weight"
    group = TensorGroup.from_tensors(
        [states[r][name] for r in ("aligned", "unaligned", "finetuned", "safety")],
        ids=["aligned", "unaligned", "finetuned", "safety"], base_index=0, name=name,
    )  # fmt: skip
    parameters = {"role": roles, "select": "lowest_k", "k": 1}
    bound = SAFEMERGE._bind_parameters((group,), parameters)
    with pytest.raises(SafeMergeError, match="needs SafeMERGE's run_merge integration"):
        SAFEMERGE._execute_resolved((group,), bound)
