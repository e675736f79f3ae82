"""SafeMERGE against plain mergekit on the same inputs: wall time, CPU time, memory, I/O.

Builds synthetic Llama-shaped models (benchmarks/synthetic.py, bfloat16, rank-8 LoRA-style
updates with matching PEFT adapter folders; or, scenario ``full``, a dense full-rank fine-tune)
and runs, alternating and repeated, each as a child process measured by benchmarks/memory.py:

* ``io_floor``: every input model read once and one model written once, no computation
  (benchmarks/io_floor.py): the raw I/O limit on this disk;
* ``passthrough``: mergekit ``passthrough`` of the fine-tuned model: the floor a merge cannot beat
  inside mergekit (one model read and written through its loader, planner and writer);
* ``linear``: mergekit ``linear`` over the same four models: what users compare against;
* ``safemerge``: this project on the four dense models;
* ``naive``: SafeMERGE with the projection C formed densely (the authors' approach);
* ``unchecked``: ``safemerge`` without its NaN/Inf check of every output tensor
  (benchmarks/unchecked_safemerge.py; ``naive`` has no such check): what the check costs;
* ``adapters``: ``safemerge`` with ``finetuned_adapter`` / ``safety_adapter`` (LoRA factors read
  directly; only the aligned and unaligned models are full models);
* ``lora_cache``: ``safemerge`` with ``aligned+adapter`` inputs through mergekit's
  ``--lora-merge-cache`` (PEFT merges two full copies first; a fresh cache each run);
* ``adapter_out``: ``safemerge adapter`` on the recipe of ``adapters``: the same decisions written
  as a PEFT LoRA adapter instead of a full model;
* ``startup``: a Python process that only imports what a SafeMERGE command imports (torch,
  mergekit's merge and planner, PEFT): the fixed cost every run above pays before any work.

SafeMERGE runs also report their own work time (``wall_time_s`` of ``safemerge_report.json``: from
the checks to the published output, without the interpreter's start-up and imports), shown as
"work s".

Usage::

    .venv/bin/python benchmarks/bench_merge.py [--size 1b] [--scenario qv|all|full] [--repeats 3]
                                               [--device cpu|cuda]

Prints a table of medians, each run's wall time as a multiple of the two floors and of
``linear``, and the target ratios (all measured in the same run), and writes it with the machine
description to ``benchmarks/RESULTS-perf.md`` (``--results FILE`` to write elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from memory import run_measured  # noqa: E402
from synthetic import SHAPES, build_synthetic_roles  # noqa: E402

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent
GIB = 1024**3
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCENARIOS = {  # name -> (target modules, full fine-tune)
    "qv": (("q_proj", "v_proj"), False),
    "all": (ALL_LINEAR, False),
    "full": (ALL_LINEAR, True),
}
RUNS = (
    "io_floor", "passthrough", "linear", "safemerge", "naive", "unchecked", "adapters",
    "lora_cache", "adapter_out", "startup",
)  # fmt: skip
CONFIG_OF = {"adapter_out": "adapters", "unchecked": "safemerge"}  # runs sharing a recipe
STARTUP_IMPORTS = (
    "import torch, mergekit.merge, mergekit.plan, peft, mergekit_safemerge.binding.method"
)
LORA_RUNS = ("adapters", "lora_cache", "adapter_out")  # not in the full fine-tune scenario
FLOORS = ("io_floor", "passthrough")
# (label, run, reference run, measure, target ratio or None): the targets, in one place
RATIO_CHECKS = (
    ("safemerge wall / naive dense-C", "safemerge", "naive", "wall_s", 1.0),
    ("unchecked wall / naive dense-C (safemerge without its output NaN/Inf check, which naive "
     "lacks)", "unchecked", "naive", "wall_s", None),
    ("safemerge wall / unchecked (what the output NaN/Inf check costs)", "safemerge",
     "unchecked", "wall_s", None),
    ("safemerge wall / linear", "safemerge", "linear", "wall_s", 1.05),
    ("adapters wall / lora_cache", "adapters", "lora_cache", "wall_s", 0.6),
    ("adapters max RSS / linear", "adapters", "linear", "max_rss_bytes", 1.5),
    ("adapter_out wall / adapters (full model, same recipe)", "adapter_out", "adapters", "wall_s",
     0.1),
    ("adapter_out work / adapters work (after start-up, report wall_time_s)", "adapter_out",
     "adapters", "work_s", 0.1),
)  # fmt: skip


def _role_models(paths: dict[str, str]) -> list[dict]:
    return [
        {"model": paths[r], "parameters": {"role": r}} for r in ("unaligned", "finetuned", "safety")
    ]


def write_configs(paths: dict[str, str], targets: tuple[str, ...], folder: Path) -> dict[str, Path]:
    """One YAML per run; all use bfloat16 like the inputs."""
    shared = {"threshold": 0.35, "safety_weight": 0.2, "targets": ",".join(targets)}
    aligned = paths["aligned"]
    configs = {
        "passthrough": {
            "merge_method": "passthrough",
            "models": [{"model": paths["finetuned"]}],
        },
        "linear": {
            "merge_method": "linear",
            "models": [{"model": paths[r], "parameters": {"weight": 0.25}}
                       for r in ("unaligned", "aligned", "finetuned", "safety")],
        },
        "safemerge": {"merge_method": "safemerge", "base_model": aligned,
                      "models": _role_models(paths), "parameters": shared},
        "naive": {"merge_method": "safemerge_naive", "base_model": aligned,
                  "models": _role_models(paths), "parameters": shared},
    }  # fmt: skip
    if "finetuned_adapter" not in paths:  # a full fine-tune: no adapter routes
        return _write(configs, folder)
    configs |= {
        "adapters": {
            "merge_method": "safemerge", "base_model": aligned,
            "models": [{"model": paths["unaligned"], "parameters": {"role": "unaligned"}}],
            "parameters": {**shared, "finetuned_adapter": paths["finetuned_adapter"],
                           "safety_adapter": paths["safety_adapter"]},
        },
        "lora_cache": {
            "merge_method": "safemerge", "base_model": aligned,
            "models": [
                {"model": paths["unaligned"], "parameters": {"role": "unaligned"}},
                {"model": f"{aligned}+{paths['finetuned_adapter']}",
                 "parameters": {"role": "finetuned"}},
                {"model": f"{aligned}+{paths['safety_adapter']}", "parameters": {"role": "safety"}},
            ],
            "parameters": shared,
        },
    }  # fmt: skip
    return _write(configs, folder)


def _write(configs: dict[str, dict], folder: Path) -> dict[str, Path]:
    files = {}
    for name, config in configs.items():
        config["dtype"] = "bfloat16"
        files[name] = folder / f"{name}.yml"
        files[name].write_text(yaml.safe_dump(config, sort_keys=False))
    return files


def command(
    run: str, config: Path, out: Path, cache: Path, device: str, paths: dict[str, str]
) -> list[str]:
    if run == "io_floor":
        models = [paths[r] for r in ("finetuned", "aligned", "unaligned", "safety")]
        return [sys.executable, str(HERE / "io_floor.py"), str(out), *models]
    if run == "startup":
        return [sys.executable, "-c", STARTUP_IMPORTS]
    if run == "adapter_out":
        return [str(BIN / "safemerge"), "adapter", str(config), str(out), "--quiet",
                "--device", device]  # fmt: skip
    flags = ["--no-copy-tokenizer", "--quiet", "--device", device]
    if run in ("naive", "unchecked"):
        script = HERE / f"{run}_safemerge.py"
        return [sys.executable, str(script), str(config), str(out), *flags]
    if run == "lora_cache":
        flags += ["--lora-merge-cache", str(cache), "--lora-merge-dtype", "float32"]
    return [str(BIN / "mergekit-yaml"), str(config), str(out), *flags]


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fp:
            cpu = next(
                line.split(":", 1)[1].strip() for line in fp if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} CPUs, {memory:.0f} GiB RAM, {gpu}; python "
            f"{sys.version.split()[0]}, torch {torch.__version__}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1b", choices=sorted(SHAPES))
    parser.add_argument("--scenario", default="qv", choices=sorted(SCENARIOS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset")
    parser.add_argument("--work", default="out/bench-merge", help="scratch folder (deleted after)")
    parser.add_argument("--results", default=str(HERE / "RESULTS-perf.md"))
    args = parser.parse_args()
    shape = SHAPES[args.size]
    targets, full_finetune = SCENARIOS[args.scenario]
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if full_finetune:
        runs = [r for r in runs if r not in LORA_RUNS]
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    started = time.perf_counter()
    paths = build_synthetic_roles(
        str(work / "models"), shape, targets=targets, adapters=not full_finetune,
        full_finetune=full_finetune,
    )  # fmt: skip
    print(f"built {args.size} models ({shape.parameters() / 1e9:.2f}B parameters each) in "
          f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
    configs = write_configs(paths, targets, work)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    results: dict[str, list[dict]] = {run: [] for run in runs}
    for repeat in range(args.repeats):
        order = runs[repeat % len(runs) :] + runs[: repeat % len(runs)]  # rotate the order
        for run in order:
            out, cache = work / f"out-{run}", work / f"cache-{run}"
            config = configs.get(CONFIG_OF.get(run, run), Path())
            argv = command(run, config, out, cache, args.device, paths)
            result = run_measured(argv, env=env)
            if result["returncode"] != 0:
                raise SystemExit(f"{run} failed:\n{result['stderr'][-3000:]}")
            report_file = out / "safemerge_report.json"
            if report_file.is_file():  # the run's own work time, without start-up
                result["work_s"] = json.loads(report_file.read_text())["wall_time_s"]
            results[run].append(result)
            print(f"repeat {repeat + 1} {run:<11} wall {result['wall_s']:7.1f} s  max RSS "
                  f"{result['max_rss_bytes'] / GIB:5.2f} GiB", flush=True)  # fmt: skip
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(cache, ignore_errors=True)
    text = report(args, shape, targets, full_finetune, runs, results)
    print(text)
    Path(args.results).write_text(text)
    shutil.rmtree(work, ignore_errors=True)


def report(args, shape, targets, full_finetune, runs, results) -> str:
    """The results file: medians, multiples of the floors and of linear, the target checks."""

    def median(run: str, key: str) -> float:
        return statistics.median(r[key] for r in results[run])

    def work(run: str) -> str:
        return f"{median(run, 'work_s'):.1f}" if "work_s" in results[run][0] else "-"

    def ratio(top: str, bottom: str, key: str = "wall_s") -> str:
        if top not in results or bottom not in results:
            return "-"
        return f"{median(top, key) / median(bottom, key):.2f}"

    update = "dense full-rank fine-tune updates" if full_finetune else "rank-8 fine-tune updates"
    lines = [
        f"# Merge benchmark: size {args.size}, scenario {args.scenario}, device {args.device}",
        "",
        f"Generated by `.venv/bin/python benchmarks/bench_merge.py {' '.join(sys.argv[1:])}` on "
        f"{time.strftime('%Y-%m-%d')}.",
        f"Machine: {machine()}.",
        f"Inputs: synthetic Llama-shaped bfloat16 models, {shape.parameters() / 1e9:.2f}B "
        f"parameters each (hidden {shape.hidden}, {shape.layers} blocks), {update} and rank-8 "
        f"safety updates on `{','.join(targets)}`; medians of {args.repeats} alternating runs; "
        "every ratio from this same run.",
        "",
        "| run | wall s | work s | CPU s | peak anon GiB | max RSS GiB | read GiB | written GiB "
        "| wall / io_floor | wall / passthrough | wall / linear | max RSS / linear |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        lines.append(
            f"| {run} | {median(run, 'wall_s'):.1f} | {work(run)} | {median(run, 'cpu_s'):.1f} | "
            f"{median(run, 'peak_anon_bytes') / GIB:.2f} | "
            f"{median(run, 'max_rss_bytes') / GIB:.2f} | "
            f"{median(run, 'read_bytes') / GIB:.2f} | {median(run, 'written_bytes') / GIB:.2f} | "
            f"{ratio(run, 'io_floor')} | {ratio(run, 'passthrough')} | {ratio(run, 'linear')} | "
            f"{ratio(run, 'linear', 'max_rss_bytes')} |"
        )
    checks = []
    for label, top, bottom, key, target in RATIO_CHECKS:
        if {top, bottom} <= set(runs) and all(key in results[r][0] for r in (top, bottom)):
            value = median(top, key) / median(bottom, key)
            verdict = ""
            if target is not None:
                verdict = f" (target <= {target}): {'met' if value <= target else 'missed'}"
            checks.append(f"{label} = {value:.2f}{verdict}")
    lines += ["", *[f"- {c}" for c in checks], ""]
    lines.append("io_floor reads every input model once and writes one model once (no "
                 "computation); passthrough copies the fine-tuned model through mergekit; startup "
                 "only imports what a SafeMERGE command imports. Work s: the run's own wall_time_s "
                 "from its safemerge_report.json (checks to published output, no start-up). "
                 "Read and "
                 "written bytes are storage I/O from /proc (page-cache hits are free), sampled "
                 "every 20 ms; max RSS is the kernel's exact figure for each child; peak "
                 "anonymous memory is sampled RssAnon (mmap'd safetensors pages count in RSS, "
                 "not in it).")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
