"""Which tensors are SafeMERGE candidates. Pure Python, no tensors, no mergekit.

A candidate is a 2-D, non-vocabulary weight whose module path matches ``targets``; everything
else passes through from the fine-tuned model.
"""

from __future__ import annotations

import re

from mergekit_safemerge.errors import SafeMergeError

_TARGET_PATTERN = re.compile(r"^[A-Za-z0-9_.]+$")


def parse_targets(targets: str) -> tuple[str, ...]:
    """``"q_proj, v_proj"`` -> ``("q_proj", "v_proj")``; empty means every candidate."""
    names = tuple(t.strip() for t in targets.split(",") if t.strip())
    for name in names:
        if not _TARGET_PATTERN.match(name):
            raise SafeMergeError(
                f"parameters.targets: {name!r} is not a module name (letters, digits, '_', '.')"
            )
    return names


def module_name(tensor_name: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``model.layers.0.self_attn.q_proj``."""
    return tensor_name[: -len(".weight")] if tensor_name.endswith(".weight") else tensor_name


def matches_targets(tensor_name: str, targets: tuple[str, ...]) -> bool:
    """PEFT-style suffix match of the module path: ``q_proj`` or ``self_attn.q_proj``."""
    if not targets:
        return True
    module = module_name(tensor_name)
    return any(module == t or module.endswith("." + t) for t in targets)


def is_candidate(
    tensor_name: str, ndim: int, vocabulary_axis: int | None, targets: tuple[str, ...]
) -> bool:
    """A candidate is a 2-D, non-vocabulary weight inside ``targets``; the rest passes through."""
    return ndim == 2 and vocabulary_axis is None and matches_targets(tensor_name, targets)
