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

Scenario ``adapter-roles`` (the one that fits a 7B run on a 70 GB disk) builds only what the
adapter routes read: ``aligned`` and ``unaligned`` as full models and the two LoRA roles as PEFT
adapter folders (rank 8 on q_proj, v_proj; about 27 GB at 7B), with one block's values repeated
for every layer (``--repeat-blocks``, its default there: timing does not depend on values), and
runs ``io_floor`` (both full models read once, one written once), ``read_needed`` (exactly the
bytes ``safemerge adapter`` needs: the q_proj/v_proj weights of both models through their
safetensors headers, and the two adapters; benchmarks/read_tensors.py), ``linear`` (mergekit
``linear`` over the same two full models), ``adapters``, ``adapter_out``,
``adapter_out_no_read_ahead`` (the same with ``MERGEKIT_SAFEMERGE_READ_AHEAD=0``: no read-ahead of
its tensors during the imports, mergekit_safemerge/prefetch.py) and ``startup``.

Before every run the input models' pages are dropped from the page cache (``--cache
cold-inputs``, the default: what a first merge of a downloaded model sees, with the libraries
cached as on any machine where they have run before): ``posix_fadvise(POSIX_FADV_DONTNEED)`` on
every input file. ``--cache cold`` drops every cached page (``sync; echo 3 >
/proc/sys/vm/drop_caches`` where that file is writable, root; else as cold-inputs), so start-up
reads the libraries from disk too; ``--cache warm`` drops nothing. The results say which, per
run. Before building, the disk space the size and scenario need
(models, adapters, the largest output, a margin) is checked against what is free in ``--work``.
``--keep-models`` keeps the built models (with a build stamp: size, scenario, repeat-blocks,
seed) and reuses them in the next run with the same stamp; outputs are deleted after each run.

SafeMERGE runs also report their own work time (``wall_time_s`` of ``safemerge_report.json``: from
the checks to the published output, without the interpreter's start-up and imports), shown as
"work s".

Usage::

    .venv/bin/python benchmarks/bench_merge.py [--size 1b] [--scenario qv|all|full|adapter-roles]
                                               [--repeats 3] [--device cpu|cuda]
                                               [--cache cold-inputs|cold|warm]
                                               [--keep-models] [--[no-]repeat-blocks]

Prints a table of medians, each run's wall time as a multiple of the two floors and of
``linear``, and the target ratios (all measured in the same run), and writes it with the machine
description to ``benchmarks/RESULTS-perf.md`` (scenario ``adapter-roles``:
``RESULTS-perf-7b.md`` at ``--size 7b``, else ``RESULTS-perf-<size>-adapter-roles.md``;
``--results FILE`` to write elsewhere).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from memory import run_measured  # noqa: E402
from synthetic import ROLES, SHAPES, Shape, build_synthetic_roles  # noqa: E402

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent
GIB = 1024**3
GB = 1e9
RANK = 8
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RUNS = (
    "io_floor", "passthrough", "linear", "safemerge", "naive", "unchecked", "adapters",
    "lora_cache", "adapter_out", "startup",
)  # fmt: skip
LORA_RUNS = ("adapters", "lora_cache", "adapter_out")  # not in the full fine-tune scenario
ADAPTER_ROLE_RUNS = (
    "io_floor", "read_needed", "linear", "adapters", "adapter_out", "adapter_out_no_read_ahead",
    "startup",
)  # fmt: skip
NO_READ_AHEAD = {"MERGEKIT_SAFEMERGE_READ_AHEAD": "0"}  # the environment of *_no_read_ahead runs


@dataclass(frozen=True)
class Scenario:
    targets: tuple[str, ...]
    runs: tuple[str, ...] = RUNS
    full_finetune: bool = False
    roles: tuple[str, ...] = ROLES  # the roles built as full models
    floors: tuple[str, str] = ("io_floor", "passthrough")
    repeat_blocks: bool = False  # the default of --repeat-blocks

    @property
    def adapters(self) -> bool:
        return not self.full_finetune


SCENARIOS = {
    "qv": Scenario(("q_proj", "v_proj")),
    "all": Scenario(ALL_LINEAR),
    "full": Scenario(ALL_LINEAR, tuple(r for r in RUNS if r not in LORA_RUNS), full_finetune=True),
    "adapter-roles": Scenario(("q_proj", "v_proj"), ADAPTER_ROLE_RUNS,
                              roles=("unaligned", "aligned"), floors=("io_floor", "read_needed"),
                              repeat_blocks=True),
}  # fmt: skip
CONFIG_OF = {  # runs sharing a recipe
    "adapter_out": "adapters", "adapter_out_no_read_ahead": "adapters", "unchecked": "safemerge",
}  # fmt: skip
STARTUP_IMPORTS = (
    "import torch, mergekit.merge, mergekit.plan, peft, mergekit_safemerge.binding.method"
)
LEGACY = ("qv", "all", "full")


class Check(NamedTuple):
    """A ratio of medians: ``top``'s ``key`` over ``ref``'s ``ref_key`` (default ``key``),
    printed in the scenarios named, with its target (None: printed for reading)."""

    label: str
    top: str
    ref: str
    key: str
    target: float | None
    ref_key: str | None = None
    scenarios: tuple[str, ...] = LEGACY


# the targets, in one place
RATIO_CHECKS = (
    Check("safemerge wall / naive dense-C", "safemerge", "naive", "wall_s", 1.0),
    Check("unchecked wall / naive dense-C (safemerge without its output NaN/Inf check, which naive "
          "lacks)", "unchecked", "naive", "wall_s", None),
    Check("safemerge wall / unchecked (what the output NaN/Inf check costs)", "safemerge",
          "unchecked", "wall_s", None),
    Check("safemerge wall / linear", "safemerge", "linear", "wall_s", 1.05),
    Check("adapters wall / lora_cache", "adapters", "lora_cache", "wall_s", 0.6),
    Check("adapters max RSS / linear", "adapters", "linear", "max_rss_bytes", 1.5),
    Check("adapter_out wall / adapters (full model, same recipe)", "adapter_out", "adapters",
          "wall_s", 0.1),
    Check("adapter_out work / adapters work (after start-up, report wall_time_s)", "adapter_out",
          "adapters", "work_s", 0.1),
    Check("adapters wall / linear (mergekit-yaml with SafeMERGE <= 1.1 x linear over the same "
          "inputs)", "adapters", "linear", "wall_s", 1.1, scenarios=("adapter-roles",)),
    Check("adapter_out work / read_needed wall (safemerge adapter's work, report wall_time_s, "
          "against the bytes it must read)", "adapter_out", "read_needed", "work_s", 1.5,
          ref_key="wall_s", scenarios=("adapter-roles",)),
    Check("adapter_out wall / adapters wall (adapter output against the full model, same recipe)",
          "adapter_out", "adapters", "wall_s", 0.2, scenarios=("adapter-roles",)),
    Check("adapter_out wall / adapter_out_no_read_ahead wall (what reading ahead during the "
          "imports saves)", "adapter_out", "adapter_out_no_read_ahead", "wall_s", None,
          scenarios=("adapter-roles",)),
    Check("adapter_out work / adapter_out wall (the share of its wall time after start-up)",
          "adapter_out", "adapter_out", "work_s", None, ref_key="wall_s",
          scenarios=("adapter-roles",)),
)  # fmt: skip


def _role_models(paths: dict[str, str]) -> list[dict]:
    return [
        {"model": paths[r], "parameters": {"role": r}} for r in ("unaligned", "finetuned", "safety")
    ]


def write_configs(paths: dict[str, str], targets: tuple[str, ...], folder: Path) -> dict[str, Path]:
    """One YAML per run whose inputs were built; all use bfloat16 like the inputs."""
    shared = {"threshold": 0.35, "safety_weight": 0.2, "targets": ",".join(targets)}
    aligned = paths["aligned"]
    configs = {}
    if "finetuned" in paths:
        configs |= {
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
    else:  # adapter roles: linear over the two full models SafeMERGE reads
        configs["linear"] = {
            "merge_method": "linear",
            "models": [{"model": paths[r], "parameters": {"weight": 0.5}}
                       for r in ("aligned", "unaligned")],
        }  # fmt: skip
    if "finetuned_adapter" not in paths:  # a full fine-tune: no adapter routes
        return _write(configs, folder)
    configs["adapters"] = {
        "merge_method": "safemerge", "base_model": aligned,
        "models": [{"model": paths["unaligned"], "parameters": {"role": "unaligned"}}],
        "parameters": {**shared, "finetuned_adapter": paths["finetuned_adapter"],
                       "safety_adapter": paths["safety_adapter"]},
    }  # fmt: skip
    if "finetuned" in paths:
        configs["lora_cache"] = {
            "merge_method": "safemerge", "base_model": aligned,
            "models": [
                {"model": paths["unaligned"], "parameters": {"role": "unaligned"}},
                {"model": f"{aligned}+{paths['finetuned_adapter']}",
                 "parameters": {"role": "finetuned"}},
                {"model": f"{aligned}+{paths['safety_adapter']}", "parameters": {"role": "safety"}},
            ],
            "parameters": shared,
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
    run: str,
    config: Path,
    out: Path,
    cache: Path,
    device: str,
    paths: dict[str, str],
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
) -> list[str]:
    if run == "io_floor":  # the first model is the one written
        models = [paths[r] for r in ("finetuned", "aligned", "unaligned", "safety") if r in paths]
        return [sys.executable, str(HERE / "io_floor.py"), str(out), *models]
    if run == "read_needed":
        matches = [arg for t in targets for arg in ("--match", f"*.{t}.weight")]
        wholes = [
            arg
            for role in ("finetuned_adapter", "safety_adapter")
            for arg in ("--whole", os.path.join(paths[role], "adapter_model.safetensors"))
        ]
        return [sys.executable, str(HERE / "read_tensors.py"), paths["aligned"],
                paths["unaligned"], *matches, *wholes]  # fmt: skip
    if run == "startup":
        return [sys.executable, "-c", STARTUP_IMPORTS]
    if run in ("adapter_out", "adapter_out_no_read_ahead"):
        return [str(BIN / "safemerge"), "adapter", str(config), str(out), "--quiet",
                "--device", device]  # fmt: skip
    flags = ["--no-copy-tokenizer", "--quiet", "--device", device]
    if run in ("naive", "unchecked"):
        script = HERE / f"{run}_safemerge.py"
        return [sys.executable, str(script), str(config), str(out), *flags]
    if run == "lora_cache":
        flags += ["--lora-merge-cache", str(cache), "--lora-merge-dtype", "float32"]
    return [str(BIN / "mergekit-yaml"), str(config), str(out), *flags]


# ---------------------------------------------------------------- disk, page cache, models
class Need(NamedTuple):
    """Bytes a benchmark needs free before it builds: models and adapters (0 when kept ones are
    reused), the largest output one run leaves at a time, and a margin."""

    models: int
    output: int
    margin: int

    @property
    def total(self) -> int:
        return self.models + self.output + self.margin


def disk_need(shape: Shape, scenario: Scenario, runs: list[str], *, reuse: bool = False) -> Need:
    """From the shape: bfloat16 full models (2 bytes a parameter), float32 adapter factors,
    and per run its output (a full model; ``lora_cache`` also two float32 merged copies;
    ``adapter_out`` an adapter of at most twice the rank)."""
    model = 2 * shape.parameters()
    adapter = 4 * shape.adapter_parameters(scenario.targets, RANK) if scenario.adapters else 0
    models = 0 if reuse else len(scenario.roles) * model + 2 * adapter
    output = {"lora_cache": model + 2 * 2 * model, "adapter_out": 2 * adapter,
              "adapter_out_no_read_ahead": 2 * adapter, "read_needed": 0,
              "startup": 0}  # fmt: skip
    largest = max((output.get(run, model) for run in runs), default=0)
    margin = 256 * 1024**2 + (models + largest) // 100  # configs, indexes, file system slack
    return Need(models, largest, margin)


def check_disk(label: str, need: Need, folder: Path, *, reuse: bool = False) -> str:
    """The line that says what the run needs and what is free; SystemExit with that line when
    the disk is short."""
    free = shutil.disk_usage(folder).free
    models = ("models reused from an earlier --keep-models run" if reuse
              else f"{need.models / GB:.1f} GB of models")  # fmt: skip
    line = (f"bench_merge: {label} needs {need.total / GB:.1f} GB free in {folder} ({models}, "
            f"{need.output / GB:.1f} GB for one output, {need.margin / GB:.1f} GB margin); "
            f"{free / GB:.1f} GB free")  # fmt: skip
    if free < need.total:
        raise SystemExit(line)
    return line


DROP_CACHES = "/proc/sys/vm/drop_caches"


def drop_page_cache(files: list[Path], mode: str, drop_caches: str = DROP_CACHES) -> str:
    """Flush dirty pages, then (``mode`` cold) drop the page cache; returns how, for the results:
    ``cold (drop_caches)`` (every cached page: also Python's and torch's files), ``cold (fadvise)``
    (POSIX_FADV_DONTNEED on every input file, no root needed; ``mode`` cold-inputs asks for it:
    the libraries stay cached), or ``not dropped (warm)``."""
    os.sync()
    if mode == "warm":
        return "warm (not dropped)"
    if mode == "cold":
        try:
            with open(drop_caches, "w") as fp:
                fp.write("3\n")
            return "cold (drop_caches)"
        except OSError:
            pass
    if hasattr(os, "posix_fadvise"):
        try:
            for path in files:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
            return "cold (fadvise)"
        except OSError:
            pass
    return "not dropped (warm)"


STAMP = "bench_build.json"


def build_models(folder: Path, stamp: dict, shape: Shape, scenario: Scenario) -> dict[str, str]:
    """Build in a child process (the models' memory never counts in this process, whose RSS
    every run's max RSS includes), then write the build stamp."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        paths = pool.submit(
            build_synthetic_roles, str(folder), shape, targets=scenario.targets, rank=RANK,
            seed=stamp["seed"], adapters=scenario.adapters, full_finetune=scenario.full_finetune,
            roles=scenario.roles, repeat_blocks=stamp["repeat_blocks"],
        ).result()  # fmt: skip
    names = {role: os.path.relpath(path, folder) for role, path in paths.items()}
    (folder / STAMP).write_text(json.dumps({**stamp, "paths": names}, indent=2))
    return paths


def kept_models(folder: Path, stamp: dict) -> dict[str, str] | None:
    """The paths of models built earlier with the same stamp, or None."""
    try:
        found = json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(found, dict) or {k: found.get(k) for k in stamp} != stamp:
        return None
    paths = {role: str(folder / name) for role, name in found.get("paths", {}).items()}
    return paths if paths and all(os.path.isdir(p) for p in paths.values()) else None


def _clear(work: Path, keep: Path | None) -> None:
    """Remove everything in ``work`` except ``keep``."""
    if not work.is_dir():
        return
    for child in work.iterdir():
        if keep is not None and child == keep:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


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


def default_results(size: str, scenario: str) -> Path:
    if scenario != "adapter-roles":
        return HERE / "RESULTS-perf.md"
    return HERE / (
        "RESULTS-perf-7b.md" if size == "7b" else f"RESULTS-perf-{size}-adapter-roles.md"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1b", choices=sorted(SHAPES))
    parser.add_argument("--scenario", default="qv", choices=sorted(SCENARIOS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", help="comma-separated subset (default: the scenario's runs)")
    parser.add_argument("--work", default="out/bench-merge", help="scratch folder (deleted after)")
    parser.add_argument("--results", help="results file (default: by size and scenario)")
    parser.add_argument(
        "--cache",
        default="cold-inputs",
        choices=("cold", "cold-inputs", "warm"),
        help="drop the page cache before every run (cold), only the input models' pages "
        "(cold-inputs: libraries stay cached) or nothing (warm)",
    )
    parser.add_argument(
        "--keep-models",
        action="store_true",
        help="keep the built models in WORK/models and reuse them next time",
    )
    parser.add_argument(
        "--repeat-blocks",
        action=argparse.BooleanOptionalAction,
        help="one block's values for every layer (default: on in adapter-roles)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    shape, scenario = SHAPES[args.size], SCENARIOS[args.scenario]
    if args.repeat_blocks is None:
        args.repeat_blocks = scenario.repeat_blocks
    runs = list(scenario.runs)
    if args.runs:
        asked = [r.strip() for r in args.runs.split(",") if r.strip()]
        if unknown := [r for r in asked if r not in (*RUNS, *ADAPTER_ROLE_RUNS)]:
            parser.error(f"unknown runs: {', '.join(unknown)}")
        runs = [r for r in asked if r in scenario.runs]
    results_file = Path(args.results) if args.results else default_results(args.size, args.scenario)
    work = Path(args.work)
    models = work / "models"
    stamp = {"size": args.size, "scenario": args.scenario, "repeat_blocks": args.repeat_blocks,
             "seed": args.seed}  # fmt: skip
    paths = kept_models(models, stamp) if args.keep_models else None
    _clear(work, keep=models if paths else None)
    work.mkdir(parents=True, exist_ok=True)

    label = f"--size {args.size} --scenario {args.scenario}"
    need = disk_need(shape, scenario, runs, reuse=paths is not None)
    print(check_disk(label, need, work, reuse=paths is not None), flush=True)
    if paths is not None:
        print(f"reusing the {args.size} models kept in {models}", flush=True)
    else:
        started = time.perf_counter()
        paths = build_models(models, stamp, shape, scenario)
        print(f"built {args.size} models ({shape.parameters() / 1e9:.2f}B parameters each) in "
              f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
    inputs = sorted(p for p in models.rglob("*") if p.is_file())
    configs = write_configs(paths, scenario.targets, work)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    results: dict[str, list[dict]] = {run: [] for run in runs}
    try:
        for repeat in range(args.repeats):
            order = runs[repeat % len(runs) :] + runs[: repeat % len(runs)]  # rotate the order
            for run in order:
                out, cache = work / f"out-{run}", work / f"cache-{run}"
                config = configs.get(CONFIG_OF.get(run, run), Path())
                argv = command(run, config, out, cache, args.device, paths, scenario.targets)
                cache_state = drop_page_cache(inputs, args.cache)
                extra = NO_READ_AHEAD if run.endswith("_no_read_ahead") else {}
                result = run_measured(argv, env={**env, **extra})
                result["cache"] = cache_state
                if result["returncode"] != 0:
                    raise SystemExit(f"{run} failed:\n{result['stderr'][-3000:]}")
                # the run's own work time, without start-up (safemerge adapter writes the
                # same report file name beside its adapter)
                report_file = out / "safemerge_report.json"
                if report_file.is_file():
                    result["work_s"] = json.loads(report_file.read_text())["wall_time_s"]
                results[run].append(result)
                print(f"repeat {repeat + 1} {run:<25} wall {result['wall_s']:7.1f} s  max RSS "
                      f"{result['max_rss_bytes'] / GIB:5.2f} GiB  {cache_state}",
                      flush=True)  # fmt: skip
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(cache, ignore_errors=True)
    finally:
        _clear(work, keep=models if args.keep_models else None)
        if not args.keep_models:
            shutil.rmtree(work, ignore_errors=True)
    text = report(args, shape, scenario, runs, results)
    print(text)
    results_file.write_text(text)


def report(args, shape: Shape, scenario: Scenario, runs: list[str], results) -> str:
    """The results file: medians, multiples of the floors and of linear, the target checks."""

    def median(run: str, key: str) -> float:
        return statistics.median(r[key] for r in results[run])

    def work(run: str) -> str:
        return f"{median(run, 'work_s'):.1f}" if "work_s" in results[run][0] else "-"

    def ratio(top: str, bottom: str, key: str = "wall_s") -> str:
        if top not in results or bottom not in results:
            return "-"
        return f"{median(top, key) / median(bottom, key):.2f}"

    def cache(run: str) -> str:
        return ", ".join(sorted({r["cache"] for r in results[run]}))

    targets = ",".join(scenario.targets)
    if args.scenario == "adapter-roles":
        inputs = (f"aligned and unaligned as full models, the fine-tune and safety roles as rank-"
                  f"{RANK} PEFT LoRA adapters (float32 factors) on `{targets}`")  # fmt: skip
    else:
        update = ("dense full-rank fine-tune updates" if scenario.full_finetune
                  else f"rank-{RANK} fine-tune updates")  # fmt: skip
        inputs = f"{update} and rank-{RANK} safety updates on `{targets}`"
    values = ("; values repeat across blocks (one block's random tensors written for every "
              "layer, each layer its own tensors in its own shard: timing does not depend on "
              "values)" if args.repeat_blocks else "")  # fmt: skip
    floor_a, floor_b = scenario.floors
    lines = [
        f"# Merge benchmark: size {args.size}, scenario {args.scenario}, device {args.device}",
        "",
        f"Generated by `.venv/bin/python benchmarks/bench_merge.py {' '.join(sys.argv[1:])}` on "
        f"{time.strftime('%Y-%m-%d')}.",
        f"Machine: {machine()}.",
        f"Inputs: synthetic Llama-shaped bfloat16 models, {shape.parameters() / 1e9:.2f}B "
        f"parameters each (hidden {shape.hidden}, {shape.layers} blocks), {inputs}{values}; "
        f"medians of {args.repeats} alternating runs; every ratio from this same run.",
        "",
        f"| run | cache | wall s | work s | CPU s | peak anon GiB | max RSS GiB | read GiB | "
        f"written GiB | wall / {floor_a} | wall / {floor_b} | wall / linear | max RSS / linear |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        lines.append(
            f"| {run} | {cache(run)} | {median(run, 'wall_s'):.1f} | {work(run)} | "
            f"{median(run, 'cpu_s'):.1f} | {median(run, 'peak_anon_bytes') / GIB:.2f} | "
            f"{median(run, 'max_rss_bytes') / GIB:.2f} | "
            f"{median(run, 'read_bytes') / GIB:.2f} | {median(run, 'written_bytes') / GIB:.2f} | "
            f"{ratio(run, floor_a)} | {ratio(run, floor_b)} | {ratio(run, 'linear')} | "
            f"{ratio(run, 'linear', 'max_rss_bytes')} |"
        )
    checks = []
    for check in RATIO_CHECKS:
        ref_key = check.ref_key or check.key
        if args.scenario not in check.scenarios or not {check.top, check.ref} <= set(runs):
            continue
        if check.key not in results[check.top][0] or ref_key not in results[check.ref][0]:
            continue
        value = median(check.top, check.key) / median(check.ref, ref_key)
        verdict = ""
        if check.target is not None:
            verdict = f" (target <= {check.target}): {'met' if value <= check.target else 'missed'}"
        checks.append(f"{check.label} = {value:.2f}{verdict}")
    if args.scenario == "adapter-roles" and "startup" in runs:
        checks.append(f"startup wall = {median('startup', 'wall_s'):.1f} s (the imports every "
                      "run above pays first)")  # fmt: skip
    lines += ["", *[f"- {c}" for c in checks], ""]
    if args.scenario == "adapter-roles":
        lines.append("io_floor reads the aligned and unaligned models once and writes one model "
                     "once (no computation); read_needed reads only the bytes safemerge adapter "
                     "needs (the q_proj/v_proj weights of both models, located through each "
                     "safetensors header, and both adapter files: benchmarks/read_tensors.py); "
                     "linear is mergekit linear over the same two full models.")  # fmt: skip
    else:
        lines.append(
            "io_floor reads every input model once and writes one model once (no "
            "computation); passthrough copies the fine-tuned model through mergekit."
        )
    lines.append("Startup only imports what a SafeMERGE command imports. Work s: the run's own "
                 "wall_time_s from its safemerge_report.json (checks to published output, no "
                 "start-up). Read and "
                 "written bytes are storage I/O from /proc (page-cache hits are free), sampled "
                 "every 20 ms; max RSS is the kernel's exact figure for each child; peak "
                 "anonymous memory is sampled RssAnon (mmap'd safetensors pages count in RSS, "
                 "not in it).")  # fmt: skip
    lines.append("Cache: before every run the benchmark syncs, then cold (drop_caches) is "
                 "`echo 3 > /proc/sys/vm/drop_caches` (every cached page, also the Python and "
                 "torch files each run imports, so start-up is cold too), cold (fadvise) is "
                 "POSIX_FADV_DONTNEED on every input file (`--cache cold-inputs`, or cold where "
                 "drop_caches is not writable: libraries stay cached), warm drops "
                 "nothing.")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
