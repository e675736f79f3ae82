"""A PEFT LoRA adapter folder written from updates in factors (``safemerge adapter``'s output).

The run (:func:`mergekit_safemerge.binding.pipeline.run_adapter`) decides every module as the
full merge does and collects each module's update as LoRA factors:

* a merged module: ``(1 - a) s_f B_f A_f + a s_s B_s A_s`` exactly, as one LoRA of rank
  ``r_f + r_s`` (:func:`~mergekit_safemerge.core.combine.linear_factors`), or the authors'
  factor-wise combination with ``combine: authors_linear``;
* a kept module: the fine-tune's update unchanged.

All updates are written with scaling 1 (``lora_alpha = r``). By default every module gets one rank
``R`` (the largest), smaller updates padded with zero factors, because several serving stacks
ignore ``rank_pattern`` / ``alpha_pattern``; ``compact`` writes each module at its own rank
through those patterns instead.
"""

from __future__ import annotations

import collections
import os
from typing import Any

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from mergekit_safemerge.core.targets import module_name
from mergekit_safemerge.core.updates import LoraFactors
from mergekit_safemerge.errors import SafeMergeError
from mergekit_safemerge.lora.read import KEY_PREFIX, WEIGHTS_FILE


# ---------------------------------------------------------------- the adapter
def _padded(factors: LoraFactors, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_A, lora_B)`` of scaling 1 for ``factors``, zero-padded to ``rank``."""
    left, right = factors.left.float().cpu(), factors.right.float().cpu()
    pad = rank - factors.rank
    if pad:
        left = torch.cat([left, left.new_zeros(left.shape[0], pad)], 1)
        right = torch.cat([right, right.new_zeros(pad, right.shape[1])], 0)
    return right.contiguous(), left.contiguous()


def target_modules(modules: list[str], weights: list[str]) -> list[str]:
    """The module suffixes (``q_proj``) when they match exactly the written modules among the
    model's weights, else the full module paths (PEFT then matches each exactly)."""
    suffixes = sorted({m.rsplit(".", 1)[-1] for m in modules})
    matching = {
        module_name(w)
        for w in weights
        if w.endswith(".weight") and module_name(w).rsplit(".", 1)[-1] in suffixes
    }
    return suffixes if matching == set(modules) else sorted(modules)


def adapter_files(
    factors: dict[str, LoraFactors],
    weights: list[str],
    base_model: str,
    *,
    compact: bool = False,
) -> tuple[dict[str, torch.Tensor], Any, dict[str, Any]]:
    """The tensors, the PEFT ``LoraConfig`` and a summary of the adapter holding ``factors``
    (tensor name -> update; zero updates left out)."""
    updates = {module_name(name): f for name, f in sorted(factors.items()) if f.rank > 0}
    if not updates:
        raise SafeMergeError(
            "the fine-tune adapter changes none of the modules in this recipe (check targets)"
        )
    ranks = {module: f.rank for module, f in updates.items()}
    if compact:
        common = collections.Counter(ranks.values()).most_common(1)[0][0]
        pattern = {m: r for m, r in ranks.items() if r != common}
        rank = common
    else:
        rank, pattern = max(ranks.values()), {}
    tensors: dict[str, torch.Tensor] = {}
    for module, update in updates.items():
        down, up = _padded(update, ranks[module] if compact else rank)
        tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = down
        tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = up
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,  # scaling 1: the factors already carry every scale
        target_modules=target_modules(list(updates), weights),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
        inference_mode=True,
    )
    summary = {
        "rank": rank,
        "uniform_rank": not pattern,
        "rank_pattern": pattern,
        "modules": len(updates),
        "module_ranks": dict(sorted(collections.Counter(ranks.values()).items())),
    }
    return tensors, config, summary


def write_adapter(
    folder: str,
    tensors: dict[str, torch.Tensor],
    config: Any,
    card: str | None,
) -> None:
    """``adapter_model.safetensors``, ``adapter_config.json`` and the card into ``folder``."""
    save_file(tensors, os.path.join(folder, WEIGHTS_FILE), metadata={"format": "pt"})
    config.save_pretrained(folder)
    if card is not None:
        with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as fp:
            fp.write(card)
