"""The report document, the model-card section, the terminal summary and ``safemerge report``."""

from __future__ import annotations

import json
import re

import pytest

from mergekit_safemerge.cli import main as safemerge_main
from mergekit_safemerge.core.records import KEPT, MERGED, MatrixRecord
from mergekit_safemerge.core.settings import Settings
from mergekit_safemerge.errors import SafeMergeError
from mergekit_safemerge.outputs.folder import write_json_atomic
from mergekit_safemerge.outputs.report import (
    REPORT_FILENAME,
    Report,
    model_card_section,
    read_report,
    summarize,
    terminal_summary,
)


def _record(block, module, rho, decision, v_norm=1.0):
    return MatrixRecord(
        name=f"model.layers.{block}.self_attn.{module}.weight",
        shape=(8, 8),
        rho=rho,
        threshold=0.35,
        decision=decision,
        reason="r",
        delta_norm=0.0 if rho is None else 1.0,
        safety_norm=1.0,
        alignment_norm=v_norm,
        delta_safety_cosine=0.1,
        criterion="dense" if rho is not None else "none",
        safety_weight=0.2,
        combine="linear",
        density=1.0,
    )


def write_report(report, folder):
    write_json_atomic(str(folder / REPORT_FILENAME), report.to_json())


def build_report(records, settings, models):
    return Report(Settings(**settings), models, records)


RECORDS = [
    _record(0, "q_proj", 0.1, MERGED),
    _record(0, "v_proj", 0.9, KEPT),
    _record(1, "q_proj", 0.5, KEPT),
    _record(1, "v_proj", None, KEPT),
    _record(10, "v_proj", 0.0, MERGED, v_norm=0.0),
]
SETTINGS = {"threshold": 0.35, "safety_weight": 0.2, "targets": "q_proj,v_proj"}
MODELS = {"aligned": "a", "unaligned": "u", "finetuned": "f", "safety": "s"}


def test_summary_counts():
    summary = summarize(RECORDS)
    assert (summary["candidates"], summary["changed"], summary["merged"]) == (5, 4, 2)
    assert summary["alignment_zero"] == 1
    assert summary["by_module"]["q_proj"] == {
        "candidates": 2,
        "changed": 2,
        "merged": 1,
        "rho_min": 0.1,
        "rho_median": 0.3,
        "rho_max": 0.5,
    }
    assert summary["by_module"]["v_proj"]["changed"] == 2


def test_report_document_and_files(tmp_path):
    report = build_report(RECORDS[::-1], SETTINGS, MODELS)
    document = report.to_json()
    assert [m["block"] for m in document["matrices"]] == [0, 0, 1, 1, 10]  # model order
    first = document["matrices"][0]
    for key in (
        "name", "shape", "rho", "threshold", "decision", "reason", "delta_norm", "safety_norm",
        "alignment_norm", "delta_safety_cosine", "module", "block", "criterion",
        "safety_weight", "combine", "density", "select",
    ):  # fmt: skip
        assert key in first
    write_report(report, tmp_path)
    assert read_report(str(tmp_path)).to_json() == json.loads(json.dumps(document))
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(SafeMergeError, match="not a SafeMERGE report"):
        read_report(str(tmp_path / "other.json"))


def test_card_and_terminal_summary():
    report = build_report(RECORDS, SETTINGS, MODELS)
    card = model_card_section(report)
    assert "## SafeMERGE" in card and "| q_proj | 2 | 2 | 1 | 0.100 | 0.300 | 0.500 |" in card
    text = terminal_summary(Report.from_json(json.loads(json.dumps(report.to_json())), source="r"))
    lines = text.splitlines()
    assert lines[0] == "SafeMERGE: merged 2 of 4 changed matrices (5 candidates)"
    assert any(line.split()[0] == "q_proj" and line.endswith("0") for line in lines)
    assert any(line.split()[0] == "v_proj" and line.endswith("10") for line in lines)
    assert "V = 0" in lines[-1]
    assert len(lines) < 25 and max(map(len, lines)) < 120


def test_safemerge_report_command(tmp_path, capsys):
    write_report(build_report(RECORDS, SETTINGS, MODELS), tmp_path)
    assert safemerge_main(["report", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("SafeMERGE: merged 2 of 4")
    assert safemerge_main(["report", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"Error: safemerge report: {tmp_path / 'missing'}: no such file (a merge "
                   f"output holds {REPORT_FILENAME})"]  # fmt: skip


def test_demo_models_command(tmp_path, capsys):
    assert safemerge_main(["demo-models", str(tmp_path), "--layers", "1"]) == 0
    out = capsys.readouterr().out
    for role in ("unaligned", "aligned", "finetuned", "safety"):
        assert (tmp_path / role / "model.safetensors").exists()
        assert role in out


def test_version_2_reports_are_read_as_before(tmp_path, capsys):
    """Reports written before ``output`` existed: a merged model, unless they say adapter."""
    document = build_report(RECORDS, SETTINGS, MODELS).to_json()
    document["version"] = 2
    del document["output"]
    old = Report.from_json(document, source="old")
    assert old.output == "model" and old.summary == build_report(RECORDS, SETTINGS, MODELS).summary
    adapter = {**document, "output": "adapter", "adapter": {"rank": 8, "uniform_rank": True,
                                                            "modules": 4}}  # fmt: skip
    assert Report.from_json(adapter, source="old").output == "adapter"
    write_json_atomic(str(tmp_path / REPORT_FILENAME), document)
    assert safemerge_main(["report", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("SafeMERGE: merged 2 of 4")
    with pytest.raises(SafeMergeError, match="report version 9 is not one"):
        Report.from_json({**document, "version": 9}, source="new")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["matrices"][0].pop("rho"), r"matrices\[0\]\.rho is missing"),
        (lambda d: d["matrices"][1].update(shape="8x8"), r"matrices\[1\]\.shape is not"),
        (lambda d: d["matrices"][2].update(decision="maybe"), r"matrices\[2\]\.decision"),
        (lambda d: d.update(output="tensor"), r"output 'tensor' is not one of"),
        (lambda d: d["summary"]["by_module"]["q_proj"].pop("merged"), None),
    ],
)
def test_every_edit_of_a_report_is_one_line_or_read(edit, message, tmp_path, capsys):
    document = build_report(RECORDS, SETTINGS, MODELS).to_json()
    edit(document)
    write_json_atomic(str(tmp_path / REPORT_FILENAME), document)
    code = safemerge_main(["report", str(tmp_path)])
    captured = capsys.readouterr()
    if message is None:  # the per-module counts are recomputed from the matrices
        assert code == 0 and captured.out.startswith("SafeMERGE: merged 2 of 4")
        return
    assert code == 1
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "a damaged SafeMERGE report" in lines[0], lines
    assert re.search(message, lines[0]), lines[0]
