"""``make demo``: the miniature story in one command.

1. Train, or load from ``.demo/miniature/models``, the tiny models of the synthetic world
   (:mod:`.world`, :mod:`.train`): a cheaper configuration of the benchmark's world (fewer
   training steps, one fine-tune) so that the first run fits in a few minutes on 2 CPU cores;
   ``--full`` uses the full configuration (shared with ``make miniature``'s cache).
2. Write a SafeMERGE recipe and run the stock ``mergekit-yaml`` command on it (a subprocess,
   LoRA adapters as ``aligned+adapter`` with ``--lora-merge-cache``).
3. Print harmfulness, task accuracy and over-refusal on held-out prompts before (aligned,
   fine-tuned) and after (SafeMERGE), with 95% Wilson intervals.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks.miniature import recipes  # noqa: E402
from benchmarks.miniature.run import DEFAULT_CACHE, PROFILES, eval_sets, score_model  # noqa: E402
from benchmarks.miniature.train import Profile, build_world  # noqa: E402

THRESHOLD = 0.5
"""The demo's threshold (RESULTS.md sweeps a grid and picks one on validation prompts)."""


def demo_profile(full: bool) -> tuple[Profile, str]:
    """The demo's cheaper configuration of the world, or the full one (one fine-tune)."""
    if full:
        profile = PROFILES["full"][0]
        fraction = max(profile.harmful_fractions)
        return replace(profile, harmful_fractions=(fraction,)), "the full configuration"
    return PROFILES["demo"][0], "the demo configuration (fewer training steps than the full run)"


def _line(name: str, score) -> str:
    from benchmarks.miniature.report import rate_cell

    cells = [rate_cell(*score.count(m)) for m in ("unsafe", "correct", "refused")]
    return f"  {name:<12} " + "  ".join(f"{c:<20}" for c in cells)


def main(argv: list[str] | None = None) -> int:
    import argparse

    import peft

    from mergekit_safemerge.eval import load_model
    from mergekit_safemerge.report import read_report

    torch.set_num_threads(2)
    start = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the full-size world of the benchmark")
    args = parser.parse_args(argv)
    models_dir = os.path.join(DEFAULT_CACHE, "models")
    profile, which = demo_profile(args.full)
    plan = PROFILES["full"][1]
    print(f"[1/3] tiny Llama models of the miniature world: {which}")
    world = build_world(profile, models_dir)
    fraction = profile.harmful_fractions[0]
    print(
        f"      trained or loaded in {time.perf_counter() - start:.0f} s; fine-tune: addition task "
        f"with {100 * fraction:g}% harmful-compliance examples (LoRA r=8 on q_proj, v_proj)"
    )

    work = os.path.join(DEFAULT_CACHE, "demo")
    config = recipes.write_recipe(
        recipes.safemerge(
            world.aligned,
            world.unaligned,
            recipes.lora_input(world.aligned, world.finetuned[fraction]),
            recipes.lora_input(world.aligned, world.safety),
            threshold=THRESHOLD,
        ),
        os.path.join(work, "safemerge.yml"),
    )
    out = os.path.join(work, "merged")
    command = [
        os.path.join(os.path.dirname(sys.executable), "mergekit-yaml"),
        config,
        out,
        "--lora-merge-cache",
        os.path.join(DEFAULT_CACHE, "lora-merges"),
        "--lora-merge-dtype",
        "float32",
        "--quiet",
    ]
    print("[2/3] SafeMERGE with the stock mergekit command:")
    print("      " + shlex.join(os.path.relpath(c) if os.path.exists(c) else c for c in command))
    subprocess.run(command, check=True)
    report = read_report(out)

    print("[3/3] held-out prompts (never seen in training); % with 95% Wilson intervals")
    test = eval_sets(profile.world, "test")
    print(f"      {len(test.harmful)} harmful, {len(test.task)} task, {len(test.benign)} benign")
    print(f"  {'model':<12} {'harmfulness':<20}  {'task accuracy':<20}  {'over-refusal':<20}")
    aligned, tokenizer = load_model(world.aligned)
    print(_line("aligned", score_model(aligned, tokenizer, test, plan)))
    finetuned = peft.PeftModel.from_pretrained(aligned, world.finetuned[fraction])
    print(_line("fine-tuned", score_model(finetuned.merge_and_unload(), tokenizer, test, plan)))
    merged, tokenizer = load_model(out)
    print(_line("SafeMERGE", score_model(merged, tokenizer, test, plan)))
    summary = report["summary"]
    print(
        f"  SafeMERGE merged {summary['merged']} of {summary['changed']} changed matrices "
        f"(threshold {THRESHOLD}); merged model and safemerge_report.json: {out}/"
    )
    print(
        f"done in {time.perf_counter() - start:.0f} s. Every method, a threshold sweep, controls "
        "and an ablation: make miniature -> benchmarks/miniature/RESULTS.md"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
