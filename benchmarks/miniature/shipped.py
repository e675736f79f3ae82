"""The demo's trained models, shipped in the repository (``benchmarks/miniature/models/``).

The four models of the benign setting of the 4-block world (unaligned, aligned, the benign
fine-tune LoRA, the safety LoRA), each in ``models/<stage>-<key>/`` with its ``stage.json``. The
key is the training cache's stage key (:meth:`~benchmarks.miniature.train.Profile.stage_key`:
settings, parent stages, vocabulary, source of world.py and train.py), so after any change of
the world or the training the shipped folders no longer match and ``tests/test_miniature.py``
fails until they are regenerated with

    python -m benchmarks.miniature.shipped

which trains the stages (or loads them from the cache) and replaces the shipped folders.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import replace
from typing import Any

from benchmarks.miniature.train import Profile, World, build_world, finetune_stage, stage_folder

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(HERE, "models")
FRACTION = 0.0
STAGES = ("unaligned", "aligned", finetune_stage(FRACTION), "safety")
KEPT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "adapter_config.json",
    "adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "stage.json",
)


def stage_kind(stage: str) -> str:
    """``full`` (a whole model) or ``lora`` (an adapter)."""
    return "full" if stage in ("unaligned", "aligned") else "lora"


def demo_profile() -> Profile:
    """The 4-block world of ``make miniature``, benign fine-tune only."""
    from benchmarks.miniature.run import WORLDS

    return replace(WORLDS[0], harmful_fractions=(FRACTION,))


def missing(profile: Profile, root: str = MODELS) -> list[str]:
    """The stage folders ``profile`` needs that are not shipped (empty: all are)."""
    return [
        os.path.relpath(stage_folder(profile, root, stage))
        for stage in STAGES
        if not os.path.isfile(os.path.join(stage_folder(profile, root, stage), "stage.json"))
    ]


def shipped_world(profile: Profile, root: str = MODELS) -> World | None:
    """The shipped models of ``profile`` (None when any is missing or stale)."""
    if missing(profile, root):
        return None
    folder = {stage: stage_folder(profile, root, stage) for stage in STAGES}
    return World(
        unaligned=folder["unaligned"],
        aligned=folder["aligned"],
        finetuned={FRACTION: folder[finetune_stage(FRACTION)]},
        safety=folder["safety"],
        trained=(),
    )


def compare(profile: Profile, world: World, root: str = MODELS) -> dict[str, Any] | None:
    """For a world trained with the demo's settings (same stage keys): the largest absolute
    difference between its tensors and the shipped ones, per stage (0.0: identical; None: not
    shipped). None for a world of other settings."""
    import safetensors.torch

    demo = demo_profile()
    if FRACTION not in world.finetuned or any(
        profile.stage_key(s) != demo.stage_key(s) for s in STAGES
    ):
        return None
    trained = {
        "unaligned": world.unaligned,
        "aligned": world.aligned,
        finetune_stage(FRACTION): world.finetuned.get(FRACTION),
        "safety": world.safety,
    }
    result: dict[str, Any] = {}
    for stage in STAGES:
        ours, theirs = trained[stage], stage_folder(profile, root, stage)
        file = "adapter_model.safetensors" if "lora" in stage_kind(stage) else "model.safetensors"
        if ours is None or not os.path.isfile(os.path.join(theirs, file)):
            result[stage] = None
            continue
        a = safetensors.torch.load_file(os.path.join(ours, file))
        b = safetensors.torch.load_file(os.path.join(theirs, file))
        if a.keys() != b.keys():
            result[stage] = float("inf")
            continue
        result[stage] = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    return result


def regenerate(cache: str, root: str = MODELS) -> list[str]:
    """Train (or load from ``cache``) the demo's stages and replace the shipped folders."""
    profile = demo_profile()
    world = build_world(profile, cache, progress=True)
    os.makedirs(root, exist_ok=True)
    sources = {
        "unaligned": world.unaligned,
        "aligned": world.aligned,
        finetune_stage(FRACTION): world.finetuned[FRACTION],
        "safety": world.safety,
    }
    wanted = {os.path.basename(stage_folder(profile, root, s)) for s in STAGES}
    for name in os.listdir(root):
        if name not in wanted and os.path.isdir(os.path.join(root, name)):
            shutil.rmtree(os.path.join(root, name))
    written = []
    for stage, source in sources.items():
        target = stage_folder(profile, root, stage)
        shutil.rmtree(target, ignore_errors=True)
        os.makedirs(target)
        for file in KEPT_FILES:
            if os.path.isfile(os.path.join(source, file)):
                shutil.copy2(os.path.join(source, file), os.path.join(target, file))
        written.append(os.path.relpath(target))
    return written


def main() -> int:
    import torch

    from benchmarks.miniature.run import DEFAULT_CACHE
    from benchmarks.miniature.train import quiet_libraries

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    quiet_libraries()
    for path in regenerate(os.path.join(DEFAULT_CACHE, "models")):
        print("shipped", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
