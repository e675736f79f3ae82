"""SafeMERGE against plain mergekit on the same inputs: wall time, CPU time, memory, I/O.

Builds synthetic Llama-shaped models (benchmarks/synthetic.py, bfloat16, rank-8 LoRA-style
updates, with matching PEFT adapter folders) and runs, alternating and repeated, each as a child
process measured by benchmarks/memory.py:

* ``linear``: mergekit ``linear`` over the same four models: the floor users compare against;
* ``safemerge``: this project on the four dense models;
* ``naive``: SafeMERGE with the projection C formed densely (the authors' approach);
* ``adapters``: ``safemerge`` with ``finetuned_adapter`` / ``safety_adapter`` (LoRA factors read
  directly; only the aligned and unaligned models are full models);
* ``lora_cache``: ``safemerge`` with ``aligned+adapter`` inputs through mergekit's
  ``--lora-merge-cache`` (PEFT merges two full copies first; a fresh cache each run).

Usage::

    .venv/bin/python benchmarks/bench_merge.py [--size 1b] [--scenario qv|all] [--repeats 3]
                                               [--device cpu|cuda]

Prints a table of medians and ratios to ``linear`` (same run), and writes it with the machine
description to ``benchmarks/RESULTS-perf.md`` (``--results FILE`` to write elsewhere).
"""

from __future__ import annotations

import argparse
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
SCENARIOS = {
    "qv": ("q_proj", "v_proj"),
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
RUNS = ("linear", "safemerge", "naive", "adapters", "lora_cache")
# (label, run, reference run, measure, target ratio or None): the targets, in one place
RATIO_CHECKS = (
    ("safemerge wall / linear", "safemerge", "linear", "wall_s", 1.25),
    ("adapters wall / lora_cache", "adapters", "lora_cache", "wall_s", 0.6),
    ("adapters max RSS / linear", "adapters", "linear", "max_rss_bytes", 1.5),
    ("naive dense-C wall / safemerge", "naive", "safemerge", "wall_s", None),
)


def _role_models(paths: dict[str, str]) -> list[dict]:
    return [
        {"model": paths[r], "parameters": {"role": r}} for r in ("unaligned", "finetuned", "safety")
    ]


def write_configs(paths: dict[str, str], targets: tuple[str, ...], folder: Path) -> dict[str, Path]:
    """One YAML per run; all use bfloat16 like the inputs."""
    shared = {"threshold": 0.35, "safety_weight": 0.2, "targets": ",".join(targets)}
    aligned = paths["aligned"]
    configs = {
        "linear": {
            "merge_method": "linear",
            "models": [{"model": paths[r], "parameters": {"weight": 0.25}}
                       for r in ("unaligned", "aligned", "finetuned", "safety")],
        },
        "safemerge": {"merge_method": "safemerge", "base_model": aligned,
                      "models": _role_models(paths), "parameters": shared},
        "naive": {"merge_method": "safemerge_naive", "base_model": aligned,
                  "models": _role_models(paths), "parameters": shared},
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
    files = {}
    for name, config in configs.items():
        config["dtype"] = "bfloat16"
        files[name] = folder / f"{name}.yml"
        files[name].write_text(yaml.safe_dump(config, sort_keys=False))
    return files


def command(run: str, config: Path, out: Path, cache: Path, device: str) -> list[str]:
    flags = ["--no-copy-tokenizer", "--quiet", "--device", device]
    if run == "naive":
        return [sys.executable, str(HERE / "naive_safemerge.py"), str(config), str(out), *flags]
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
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shape, targets = SHAPES[args.size], SCENARIOS[args.scenario]

    started = time.perf_counter()
    paths = build_synthetic_roles(str(work / "models"), shape, targets=targets, adapters=True)
    print(f"built {args.size} models ({shape.parameters() / 1e9:.2f}B parameters each) in "
          f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
    configs = write_configs(paths, targets, work)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    results: dict[str, list[dict]] = {run: [] for run in runs}
    for repeat in range(args.repeats):
        order = runs[repeat % len(runs) :] + runs[: repeat % len(runs)]  # rotate the order
        for run in order:
            out, cache = work / f"out-{run}", work / f"cache-{run}"
            result = run_measured(command(run, configs[run], out, cache, args.device), env=env)
            if result["returncode"] != 0:
                raise SystemExit(f"{run} failed:\n{result['stderr'][-3000:]}")
            results[run].append(result)
            print(f"repeat {repeat + 1} {run:<11} wall {result['wall_s']:7.1f} s  max RSS "
                  f"{result['max_rss_bytes'] / GIB:5.2f} GiB", flush=True)  # fmt: skip
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(cache, ignore_errors=True)

    def median(run: str, key: str) -> float:
        return statistics.median(r[key] for r in results[run])

    base = "linear" if "linear" in runs else runs[0]
    lines = [
        f"# Merge benchmark: size {args.size}, scenario {args.scenario}, device {args.device}",
        "",
        f"Generated by `.venv/bin/python benchmarks/bench_merge.py {' '.join(sys.argv[1:])}` on "
        f"{time.strftime('%Y-%m-%d')}.",
        f"Machine: {machine()}.",
        f"Inputs: synthetic Llama-shaped bfloat16 models, {shape.parameters() / 1e9:.2f}B "
        f"parameters each (hidden {shape.hidden}, {shape.layers} blocks), rank-8 updates on "
        f"`{','.join(targets)}`; medians of {args.repeats} alternating runs; ratios to "
        f"`{base}` from the same run.",
        "",
        "| run | wall s | CPU s | peak anon GiB | max RSS GiB | read GiB | written GiB "
        f"| wall / {base} | max RSS / {base} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        lines.append(
            f"| {run} | {median(run, 'wall_s'):.1f} | {median(run, 'cpu_s'):.1f} | "
            f"{median(run, 'peak_anon_bytes') / GIB:.2f} | "
            f"{median(run, 'max_rss_bytes') / GIB:.2f} | "
            f"{median(run, 'read_bytes') / GIB:.2f} | {median(run, 'written_bytes') / GIB:.2f} | "
            f"{median(run, 'wall_s') / median(base, 'wall_s'):.2f} | "
            f"{median(run, 'max_rss_bytes') / median(base, 'max_rss_bytes'):.2f} |"
        )
    checks = []
    for label, top, bottom, key, target in RATIO_CHECKS:
        if {top, bottom} <= set(runs):
            ratio = median(top, key) / median(bottom, key)
            verdict = ""
            if target is not None:
                verdict = f" (target <= {target}): {'met' if ratio <= target else 'missed'}"
            checks.append(f"{label} = {ratio:.2f}{verdict}")
    lines += ["", *[f"- {c}" for c in checks], ""]
    lines.append("Read and written bytes are storage I/O from /proc (page-cache hits are free), "
                 "sampled every 20 ms; max RSS is the kernel's exact figure for each child; peak "
                 "anonymous memory is sampled RssAnon (mmap'd safetensors pages count in RSS, "
                 "not in it).")  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.results).write_text(text)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
