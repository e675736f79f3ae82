"""Start-up cost: the registration hook (the one-line .pth), and commands that merge nothing.

1. The hook: runs ``python -X importtime -c pass`` many times and reads the cumulative import time
   of ``mergekit_safemerge._autoload`` (which includes the package ``__init__``), the only work the
   .pth adds to every Python process; it also times whole ``python -c pass`` start-ups with the
   hook and with ``-S`` (no site at all) for scale.
2. Commands: the wall time of whole processes, warm (bytecode compiled, one untimed run first),
   median of ``--command-runs`` each: ``python -c pass``, ``import torch`` and mergekit's import
   chain (``import mergekit.merge, mergekit.plan``: torch, transformers, PEFT) for reference,
   then ``safemerge --version``, ``--help``, ``report --help``, ``adapter --help``,
   ``tune --help`` and ``report`` of a merge folder and of a tune folder it writes itself (with
   the package's ``Report``; offline). Target: each command <= 1 s.

Usage::

    .venv/bin/python benchmarks/startup_cost.py [--runs 40] [--command-runs 7]

The output is printed and written to ``benchmarks/RESULTS-startup.md`` (``--results``).
"""

from __future__ import annotations

import argparse
import compileall
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mergekit_safemerge

RESULTS = Path(__file__).with_name("RESULTS-startup.md")
PACKAGE_DIR = Path(mergekit_safemerge.__file__).parent
LINE = re.compile(r"import time:\s+\d+ \|\s+(\d+) \|\s+mergekit_safemerge\._autoload$")
COMMAND_TARGET_S = 1.0
SAFEMERGE = "import sys; from mergekit_safemerge.cli import main; sys.exit(main())"
"""What the ``safemerge`` console script runs."""


# ---------------------------------------------------------------- 1. the registration hook
def hook_import_us(env: dict[str, str]) -> int:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "pass"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    for line in result.stderr.splitlines():
        match = LINE.search(line.strip())
        if match:
            return int(match.group(1))
    raise RuntimeError(
        "mergekit_safemerge._autoload was not imported at start-up: is the .pth installed?"
    )


def startup_s(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args, "-c", "pass"], check=True)
    return time.perf_counter() - start


def hook_lines(runs: int, env: dict[str, str]) -> list[str]:
    cached = sorted(hook_import_us(env) for _ in range(runs))
    no_cache_env = {**env, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPYCACHEPREFIX": "/nonexistent"}
    uncached = sorted(hook_import_us(no_cache_env) for _ in range(max(runs // 4, 5)))
    with_hook = statistics.median(startup_s([]) for _ in range(runs // 2))
    no_site = statistics.median(startup_s(["-S"]) for _ in range(runs // 2))

    def ms(values: list[int]) -> str:
        return (
            f"median {statistics.median(values) / 1000:.3f} ms, "
            f"p90 {values[int(0.9 * (len(values) - 1))] / 1000:.3f} ms"
        )

    return [
        f"hook import, bytecode cached (normal install): {ms(cached)}",
        f"hook import, no bytecode cache (source compiled at each start): {ms(uncached)}",
        f"whole `python -c pass` for scale: {with_hook * 1000:.1f} ms with site and the hook, "
        f"{no_site * 1000:.1f} ms with -S",
    ]


# ---------------------------------------------------------------- 2. commands that merge nothing
def write_finished_folders(root: Path) -> tuple[Path, Path]:
    """A merge output (one matrix's report) and a tune folder (its manifest) for ``report``."""
    from mergekit_safemerge.core.records import MERGED, MatrixRecord
    from mergekit_safemerge.core.settings import Settings
    from mergekit_safemerge.outputs.folder import TUNE, write_json_atomic
    from mergekit_safemerge.outputs.report import REPORT_FILENAME, Report

    record = MatrixRecord(
        name="model.layers.0.self_attn.q_proj.weight", shape=(8, 8), rho=0.1, threshold=0.35,
        decision=MERGED, reason="rho < threshold", delta_norm=1.0, safety_norm=1.0,
        alignment_norm=1.0, delta_safety_cosine=0.1, criterion="dense", safety_weight=0.2,
        combine="linear", density=1.0,
    )  # fmt: skip
    models = {"aligned": "a", "unaligned": "u", "finetuned": "f", "safety": "s"}
    merge, tune = root / "merge", root / "tune"
    merge.mkdir()
    tune.mkdir()
    report = Report(Settings(), models, [record])
    write_json_atomic(str(merge / REPORT_FILENAME), report.to_json())
    write_json_atomic(str(tune / TUNE.manifest), {"format": TUNE.format, "summary": "tuned"})
    return merge, tune


def process_s(argv: list[str], env: dict[str, str], runs: int) -> float:
    """Median wall time of ``argv`` as a whole process, after one untimed (warming) run."""
    times = []
    for _ in range(runs + 1):
        start = time.perf_counter()
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def command_table(runs: int, env: dict[str, str]) -> tuple[list[str], list[str]]:
    """The table's rows (markdown) and the target lines."""
    python = [sys.executable, "-c"]
    references = [
        ("`python -c pass`", python + ["pass"], "the interpreter (site and the hook)"),
        ("`python -c 'import torch'`", python + ["import torch"], "torch's import (not ours)"),
        (
            "`python -c 'import mergekit.merge, mergekit.plan'`",
            python + ["import mergekit.merge, mergekit.plan"],
            "mergekit's import chain (torch, transformers, PEFT): what a merging command pays",
        ),
    ]
    with tempfile.TemporaryDirectory() as folder:
        merge, tune = write_finished_folders(Path(folder))
        commands = [
            ["--version"], ["--help"], ["report", "--help"], ["adapter", "--help"],
            ["tune", "--help"], ["report", str(merge)], ["report", str(tune)],
        ]  # fmt: skip
        names = {str(merge): "MERGE_OUT/", str(tune): "TUNE_OUT/"}
        measured = [
            (label, process_s(argv, env, runs), what) for label, argv, what in references
        ] + [
            (
                f"`safemerge {' '.join(names.get(a, a) for a in args)}`",
                process_s(python + [SAFEMERGE, *args], env, runs),
                "ours",
            )
            for args in commands
        ]
    interpreter = measured[0][1]
    rows = [
        "| process | median s | x `python -c pass` | what |",
        "|---|---:|---:|---|",
    ] + [f"| {label} | {s:.3f} | {s / interpreter:.1f} | {what} |" for label, s, what in measured]
    ours = [(label, s) for label, s, what in measured if what == "ours"]
    slowest_label, slowest = max(ours, key=lambda item: item[1])
    targets = [
        f"target: each command that merges nothing <= {COMMAND_TARGET_S:.0f} s: "
        f"{'met' if slowest <= COMMAND_TARGET_S else 'missed'} (slowest {slowest_label}, "
        f"{slowest:.3f} s; our own cost above the interpreter: "
        f"{slowest - interpreter:.3f} s at most)",
        f"mergekit's chain ({measured[2][1]:.2f} s, of which torch {measured[1][1]:.2f} s) is "
        "paid only by the commands that merge (adapter, scan, tune, eval, demo-models, "
        "safety-lora)",
    ]
    return rows, targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40, help="interpreter starts for the hook")
    parser.add_argument("--command-runs", type=int, default=7, help="timed runs per command")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()

    compileall.compile_dir(str(PACKAGE_DIR), quiet=1)  # what a wheel install does
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["HF_HUB_OFFLINE"] = "1"
    machine = (
        f"python {sys.version.split()[0]} on {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{time.strftime('%Y-%m-%d')}"
    )
    hook = hook_lines(args.runs, env)
    rows, targets = command_table(args.command_runs, env)
    print("\n".join([machine, *hook, "", *rows, "", *targets]))
    args.results.write_text(
        "# Start-up cost\n\n"
        "Generated by `.venv/bin/python benchmarks/startup_cost.py`; rerun to refresh.\n\n"
        f"{machine}.\n\n"
        f"## The registration hook (every Python process, {args.runs} runs)\n\n"
        + "".join(f"- {line}\n" for line in hook)
        + f"\n## Commands that merge nothing (warm, median of {args.command_runs} runs)\n\n"
        "Whole processes, as the `safemerge` console script runs them; MERGE_OUT/ holds a "
        "merge's safemerge_report.json, TUNE_OUT/ a tune's tune.json.\n\n"
        + "".join(f"{row}\n" for row in rows)
        + "\n"
        + "".join(f"- {line}\n" for line in targets)
    )


if __name__ == "__main__":
    main()
