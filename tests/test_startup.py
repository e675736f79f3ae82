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
    """A merge output (its report) and a tune folder (its manifest), as ``report`` reads them:
    the folders the start-up benchmark times ``report`` on."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from startup_cost import write_finished_folders

    root = tmp_path_factory.mktemp("finished")
    write_finished_folders(root)
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
    expected = "tuned" if folder == "tune" else "merged 1 of 1 changed matrices"
    assert expected in output
    assert heavy == []


def test_the_probe_sees_a_heavy_import():
    _output, heavy = _run("--version", prelude="import torch")
    assert heavy == ["torch"]
