"""`safemerge scan` and the ranking selection modes through stock mergekit-yaml, on tiny models."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import BIN, load_state, run_mergekit_in_process, write_config

from mergekit_safemerge.cli import main as safemerge_main
from mergekit_safemerge.scan import PNG_SIZE, SCAN_CSV, SCAN_JSON, SCAN_PNG
from mergekit_safemerge.selection import select_matrices

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


def test_scan_outputs_and_never_writes_weights(scanned):
    tiny, out, document = scanned
    assert sorted(os.listdir(out)) == sorted([SCAN_JSON, SCAN_CSV, SCAN_PNG])
    assert document["format"] == "safemerge-scan"
    assert document["summary"]["candidates"] == 4 * 2
    csv_lines = (out / SCAN_CSV).read_text().splitlines()
    assert csv_lines[0].startswith("name,module,block,rows,cols,rho,threshold,decision")
    assert len(csv_lines) == 1 + 8
    for m in document["matrices"]:
        assert m["decision"] == ("merged" if m["rho"] < 0.5 else "kept")


def test_png_is_a_valid_image_of_the_expected_size(scanned):
    import matplotlib.image

    _, out, _ = scanned
    data = (out / SCAN_PNG).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(out / SCAN_PNG).shape[:2]
    assert (width, height) == PNG_SIZE


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
    tiny, _, document = scanned
    expected = set(select_matrices(_rhos(document), mode, k=k, seed=11))
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


def test_scan_rejects_other_methods(tmp_path):
    config = tmp_path / "linear.yml"
    config.write_text("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n")
    with pytest.raises(SystemExit, match="scan reads a safemerge configuration, not 'linear'"):
        safemerge_main(["scan", str(config), "--out", str(tmp_path / "s")])


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
