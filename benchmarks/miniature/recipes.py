"""The YAML recipes the miniature driver and the demo hand to the stock ``mergekit-yaml`` command.

LoRA adapters enter as mergekit's ``aligned+adapter`` model strings (merged into full weights
by mergekit with PEFT, in ``--lora-merge-cache``, float32).
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from benchmarks.miniature.safelora import METHOD_NAME as SAFELORA

TARGETS = "q_proj,v_proj"
SAFETY_WEIGHT = 0.2


def lora_input(aligned: str, adapter: str) -> str:
    """mergekit's model string for ``aligned`` with a LoRA adapter applied."""
    return f"{aligned}+{adapter}"


def passthrough(model: str) -> dict[str, Any]:
    """One model through mergekit unchanged (the aligned row)."""
    return {"merge_method": "passthrough", "models": [{"model": model}], "dtype": "float32"}


def safemerge(
    aligned: str,
    unaligned: str,
    finetuned: str,
    safety: str,
    *,
    targets: str = TARGETS,
    **parameters: Any,
) -> dict[str, Any]:
    """A ``safemerge`` recipe; ``parameters`` are top-level (threshold, safety_weight, select,
    k, seed ...)."""
    return {
        "merge_method": "safemerge",
        "base_model": aligned,
        "models": [
            {"model": unaligned, "parameters": {"role": "unaligned"}},
            {"model": finetuned, "parameters": {"role": "finetuned"}},
            {"model": safety, "parameters": {"role": "safety"}},
        ],
        "parameters": {"safety_weight": SAFETY_WEIGHT, "targets": targets, **parameters},
        "dtype": "float32",
    }


def safemerge_factors(
    aligned: str, unaligned: str, finetuned: str, safety: str, *, targets: str = TARGETS,
    **parameters: Any,
) -> dict[str, Any]:  # fmt: skip
    """A ``safemerge`` recipe with both LoRA roles as adapters read as factors (what
    ``safemerge adapter`` and ``safemerge tune`` read without a merge cache)."""
    return {
        "merge_method": "safemerge",
        "base_model": aligned,
        "models": [{"model": unaligned, "parameters": {"role": "unaligned"}}],
        "parameters": {
            "targets": targets,
            "finetuned_adapter": finetuned,
            "safety_adapter": safety,
            **parameters,
        },
        "dtype": "float32",
    }


def interpolation(aligned: str, finetuned: str, lam: float) -> dict[str, Any]:
    """Stock mergekit ``linear``: ``(1 - lambda) W_al + lambda W_ft = W_al + lambda D`` for every
    tensor (Farn et al. 2024's interpolation back toward the aligned model; no safety model)."""
    return {
        "merge_method": "linear",
        "models": [
            {"model": aligned, "parameters": {"weight": round(1.0 - lam, 10)}},
            {"model": finetuned, "parameters": {"weight": lam}},
        ],
        "parameters": {"normalize": False},
        "dtype": "float32",
    }


def safelora(
    aligned: str, unaligned: str, finetuned: str, threshold: float, *, targets: str = TARGETS
) -> dict[str, Any]:
    """The SafeLoRA projection baseline (registered in-process by the driver)."""
    return {
        "merge_method": SAFELORA,
        "base_model": aligned,
        "models": [
            {"model": unaligned, "parameters": {"role": "unaligned"}},
            {"model": finetuned, "parameters": {"role": "finetuned"}},
        ],
        "parameters": {"threshold": threshold, "targets": targets},
        "dtype": "float32",
    }


def write_recipe(recipe: dict[str, Any], path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fp:
        yaml.safe_dump(recipe, fp, sort_keys=False)
    return path
