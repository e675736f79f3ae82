"""``safemerge tune`` against the loop a user writes without it, on the miniature 4-block grid.

The loop: for each point of the grid (threshold x safety weight), ``safemerge adapter`` with that
setting, then ``safemerge eval`` of the adapter. ``safemerge tune``: the same grid in one
process, one model in memory. Both run on the shipped miniature models (the benign 4-block
world, LoRA roles read as factors) and the world's validation prompts, with the same judge,
generation settings and prompts; every run is a child process measured by
benchmarks/memory.py (wall time; peak anonymous memory beside max RSS). The script also checks
that each point's harmfulness and accuracy are the same by both routes.

    python benchmarks/bench_tune.py [--limit 40] [--thresholds 0.1,...] [--results FILE]

Prints the table and the two target ratios (tune wall <= 0.25 x the loop's; tune peak anonymous
memory <= 1.5 x one ``safemerge eval``), and writes them to benchmarks/RESULTS-tune.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
from memory import run_measured  # noqa: E402

from benchmarks.miniature import shipped  # noqa: E402
from benchmarks.miniature import world as w  # noqa: E402
from benchmarks.miniature.run import PROFILES, eval_sets  # noqa: E402

BIN = Path(sys.executable).parent
GIB = 1024**3
THRESHOLDS = PROFILES["full"][1].thresholds
WEIGHTS = PROFILES["full"][1].safety_weights


def _write_inputs(work: Path, limit: int) -> tuple[str, str, str]:
    profile = shipped.demo_profile()
    world = shipped.shipped_world(profile)
    if world is None:
        raise SystemExit("the shipped miniature models do not match the code (python -m "
                         "benchmarks.miniature.shipped)")  # fmt: skip
    sets = eval_sets(profile.world, "val", limit, benign=False)
    harmful, task = work / "harmful.txt", work / "task.jsonl"
    harmful.write_text("".join(r.prompt + "\n" for r in sets.harmful))
    task.write_text("".join(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n"
                            for p in sets.task))  # fmt: skip
    recipe = {
        "merge_method": "safemerge",
        "base_model": os.path.abspath(world.aligned),
        "models": [
            {"model": os.path.abspath(world.unaligned), "parameters": {"role": "unaligned"}}
        ],
        "parameters": {
            "targets": "q_proj,v_proj",
            "finetuned_adapter": os.path.abspath(world.finetuned[shipped.FRACTION]),
            "safety_adapter": os.path.abspath(world.safety),
        },
        "dtype": "float32",
    }
    config = work / "recipe.yml"
    config.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(config), str(harmful), str(task)


def _judging(args) -> list[str]:
    return ["--refusal-pattern", "^" + w.REFUSAL_PREFIX, "--max-new-tokens",
            str(args.max_new_tokens), "--batch-size", str(args.batch_size), "--quiet"]  # fmt: skip


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get(
        "OMP_NUM_THREADS", "1")}  # fmt: skip


def _checked(result: dict, what: str) -> dict:
    if result["returncode"] != 0:
        raise SystemExit(f"{what} failed:\n{result['stderr'][-2000:]}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=40, help="validation prompts per set")
    parser.add_argument("--thresholds", default=",".join(f"{t:g}" for t in THRESHOLDS))
    parser.add_argument("--weights", default=",".join(f"{a:g}" for a in WEIGHTS))
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--work", default=str(ROOT / ".demo" / "bench-tune"))
    parser.add_argument("--results", default=str(Path(__file__).parent / "RESULTS-tune.md"))
    args = parser.parse_args(argv)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    config, harmful, task = _write_inputs(work, args.limit)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    weights = [float(a) for a in args.weights.split(",")]
    prompts = ["--harmful", harmful, "--task", task]

    tune = _checked(run_measured(
        [str(BIN / "safemerge"), "tune", config, str(work / "tune"), *prompts,
         "--thresholds", args.thresholds, "--safety-weights", args.weights,
         "--controls", "finetuned", "--keep-accuracy", "0", *_judging(args)], env=_env(),
    ), "safemerge tune")  # fmt: skip
    document = json.loads((work / "tune" / "tune.json").read_text())
    tuned = {(p["threshold"], p["safety_weight"]): p for p in document["points"]
             if p["family"] == "safemerge"}  # fmt: skip

    loop_wall, loop_peak, eval_peak, eval_rss, same, comparable, points = 0.0, 0, 0, 0, 0, 0, 0
    by_selection = {(tuple(p["merged_matrices"]), p["safety_weight"]): p for p in tuned.values()}
    finetuned = next(p for p in document["points"] if p["family"] == "finetuned")
    for a in weights:
        for tau in thresholds:
            data = yaml.safe_load(open(config))  # noqa: SIM115
            data["parameters"].update(threshold=tau, safety_weight=a)
            point_config = work / f"loop-{tau:g}-{a:g}.yml"
            point_config.write_text(yaml.safe_dump(data, sort_keys=False))
            adapter = work / f"loop-{tau:g}-{a:g}"
            adapter_run = [str(BIN / "safemerge"), "adapter", str(point_config), str(adapter)]
            made = _checked(run_measured([*adapter_run, "--quiet"], env=_env()), "adapter")
            eval_run = [str(BIN / "safemerge"), "eval", str(adapter), *prompts, *_judging(args)]
            scored = _checked(run_measured(eval_run, env=_env()), "eval")
            loop_wall += made["wall_s"] + scored["wall_s"]
            loop_peak = max(loop_peak, made["peak_anon_bytes"], scored["peak_anon_bytes"])
            eval_peak = max(eval_peak, scored["peak_anon_bytes"])
            eval_rss = max(eval_rss, scored["max_rss_bytes"])
            points += 1
            result = json.loads((adapter / "safemerge_eval.json").read_text())
            report = json.loads((adapter / "safemerge_report.json").read_text())
            names = tuple(
                sorted(m["name"] for m in report["matrices"] if m["decision"] == "merged")
            )
            twin = by_selection.get((names, a)) if names else finetuned
            comparable += 1
            same += (twin["harmfulness"]["count"], twin["accuracy"]["count"]) == (
                result["harmful"]["unsafe"], result["task"]["correct"])  # fmt: skip
            shutil.rmtree(adapter)

    wall_ratio = tune["wall_s"] / loop_wall
    memory_ratio = tune["peak_anon_bytes"] / eval_peak
    command = " ".join(
        ["python benchmarks/bench_tune.py", *(argv if argv is not None else sys.argv[1:])]
    )
    lines = [
        "# safemerge tune against the per-point loop (benchmarks/bench_tune.py)",
        "",
        f"Measured {datetime.date.today().isoformat()} on {platform.machine()}, "
        f"{os.cpu_count()} CPUs visible, OMP_NUM_THREADS={_env()['OMP_NUM_THREADS']}; python "
        f"{platform.python_version()}. Command: `{command}` "
        "(shipped miniature 4-block models, benign fine-tune; LoRA roles "
        f"as factors; {args.limit} validation prompts per set, harmful and task; "
        f"{args.max_new_tokens} new tokens, batch {args.batch_size}).",
        "",
        f"Grid: thresholds {args.thresholds} x safety weights {args.weights}: {points} points; "
        f"tune evaluated {len(tuned)} distinct merges (points that merge the same matrices at the "
        "same weight once), plus the fine-tuned model.",
        "",
        "| run | wall s | peak anon GiB | max RSS GiB |",
        "|---|---:|---:|---:|",
        f"| safemerge tune (one process) | {tune['wall_s']:.1f} | "
        f"{tune['peak_anon_bytes'] / GIB:.2f} | {tune['max_rss_bytes'] / GIB:.2f} |",
        f"| loop: safemerge adapter + safemerge eval per point ({points} x 2 processes) | "
        f"{loop_wall:.1f} | {loop_peak / GIB:.2f} | - |",
        f"| one safemerge eval (the largest of the loop's) | - | {eval_peak / GIB:.2f} | "
        f"{eval_rss / GIB:.2f} |",
        "",
        f"- tune wall / loop wall = **{wall_ratio:.3f}** (target <= 0.25: "
        f"{'met' if wall_ratio <= 0.25 else 'MISSED'})",
        f"- tune peak anonymous memory / one eval's = **{memory_ratio:.2f}** (target <= 1.5: "
        f"{'met' if memory_ratio <= 1.5 else 'MISSED'})",
        f"- same harmfulness and accuracy counts by both routes: {same} of {comparable} points "
        "(a point that merges nothing is the fine-tuned model)",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.results).write_text(text)
    return 0 if wall_ratio <= 0.25 and memory_ratio <= 1.5 else 1


if __name__ == "__main__":
    sys.exit(main())
