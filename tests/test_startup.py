"""Commands that merge nothing import no heavy library: ``safemerge --help``, ``--version``, every
``<command> --help`` and ``report`` (of a merge and of a tune) leave torch, transformers, PEFT and
mergekit out of ``sys.modules`` (what keeps them well under a second; timed by
``benchmarks/startup_cost.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mergekit_safemerge.cli import cli
from mergekit_safemerge.core.records import MERGED, MatrixRecord
from mergekit_safemerge.core.settings import Settings
from mergekit_safemerge.outputs.folder import TUNE, write_json_atomic
from mergekit_safemerge.outputs.report import REPORT_FILENAME, Report

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "mergekit")

PROBE = """
import sys
{prelude}
from mergekit_safemerge.cli import main
status = main(sys.argv[1:])
heavy = sorted({{name.split(".")[0] for name in sys.modules}} & {heavy!r})
print("HEAVY:" + ",".join(heavy))
sys.exit(status)
"""


def _run(*args: str, prelude: str = "") -> tuple[str, list[str]]:
    """``safemerge ARGS`` in a fresh interpreter: its output and the heavy libraries imported."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), env.get("PYTHONPATH"))))
    code = PROBE.format(prelude=prelude, heavy=set(HEAVY))
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    output, _, heavy = result.stdout.rpartition("HEAVY:")
    return output, [name for name in heavy.strip().split(",") if name]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A merge output (its report) and a tune folder (its manifest), as ``report`` reads them."""
    root = tmp_path_factory.mktemp("finished")
    record = MatrixRecord(
        name="model.layers.0.self_attn.q_proj.weight", shape=(8, 8), rho=0.1, threshold=0.35,
        decision=MERGED, reason="rho < threshold", delta_norm=1.0, safety_norm=1.0,
        alignment_norm=1.0, delta_safety_cosine=0.1, criterion="dense", safety_weight=0.2,
        combine="linear", density=1.0,
    )  # fmt: skip
    models = {"aligned": "a", "unaligned": "u", "finetuned": "f", "safety": "s"}
    (root / "merge").mkdir()
    report = Report(Settings(), models, [record])
    write_json_atomic(str(root / "merge" / REPORT_FILENAME), report.to_json())
    (root / "tune").mkdir()
    tune = {"format": TUNE.format, "summary": "the tune's summary"}
    write_json_atomic(str(root / "tune" / TUNE.manifest), tune)
    return root


@pytest.mark.parametrize(
    "args",
    [["--help"], ["--version"], *([command, "--help"] for command in sorted(cli.commands))],
    ids=" ".join,
)
def test_help_and_version_import_no_heavy_library(args):
    output, heavy = _run(*args)
    assert output.strip()
    assert heavy == []


@pytest.mark.parametrize("folder", ["merge", "tune"])
def test_report_imports_no_heavy_library(finished, folder):
    output, heavy = _run("report", str(finished / folder))
    expected = "the tune's summary" if folder == "tune" else "merged 1 of 1 changed matrices"
    assert expected in output
    assert heavy == []


def test_the_probe_sees_a_heavy_import():
    _output, heavy = _run("--version", prelude="import torch")
    assert heavy == ["torch"]
