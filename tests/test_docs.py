"""Figures shown in docs/ come from commands: rerun them and compare."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mergekit_safemerge.cli import main as safemerge_main

ROOT = Path(__file__).resolve().parents[1]


def _code_block_after(text: str, marker: str) -> str:
    start = text.index(marker)
    match = re.compile(r"```text\n(.*?)\n```", re.S).search(text, start)
    assert match, f"no text block after {marker!r}"
    return match.group(1)


def test_scan_example_in_docs_is_the_demo_output(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert safemerge_main(["demo-models", ".demo/models"]) == 0  # the defaults `make demo` uses
    capsys.readouterr()
    recipe = str(ROOT / "recipes" / "demo-safemerge.yml")
    assert safemerge_main(["scan", recipe, "--out", "out/scan", "--quiet"]) == 0
    printed = capsys.readouterr().out
    got = "\n".join(line.rstrip() for line in printed.splitlines() if not line.startswith("wrote "))
    documented = _code_block_after((ROOT / "docs" / "scan.md").read_text(), "### Example")
    assert got.strip() == documented.strip()


def test_resource_table_in_recipes_doc_is_the_script_output():
    import subprocess
    import sys

    table = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "resource_estimate.py")],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert table in (ROOT / "docs" / "recipes.md").read_text()


@pytest.mark.parametrize(
    "command", ["", "adapter", "safety-lora", "scan", "tune", "report", "eval", "demo-models"]
)
def test_cli_help_in_docs_is_the_commands_own(command):
    from click.testing import CliRunner

    from mergekit_safemerge.cli import cli

    args = [command, "--help"] if command else ["--help"]
    result = CliRunner().invoke(cli, args, prog_name="safemerge", env={"COLUMNS": "100"},
                                terminal_width=100)  # fmt: skip
    assert result.exit_code == 0, result.output
    title = f"safemerge {command} --help" if command else "safemerge --help"
    documented = _code_block_after((ROOT / "docs" / "cli.md").read_text(), f"## `{title}`")
    assert result.output.rstrip() == documented.rstrip()


def test_version():
    from click.testing import CliRunner

    from mergekit_safemerge import __version__
    from mergekit_safemerge.cli import cli

    result = CliRunner().invoke(cli, ["--version"], prog_name="safemerge")
    assert result.output.strip() == f"safemerge, version {__version__}"
