"""Updates that are only the rounding of a dtype conversion. Pure torch.

A fine-tune stored in bfloat16 (or float16) against aligned and unaligned models stored in
float32 differs from the aligned model in every matrix, even those the fine-tune never touched:
``W_ft = round16(W_al)`` there. Such a ``D`` is the rounding of a conversion, not an update, and
is taken as ``D = 0`` (the matrix is kept as fine-tuned). A matrix the fine-tune changed keeps
its ``D``, rounding included.
"""

from __future__ import annotations

import torch

_NARROW = (torch.bfloat16, torch.float16)


def _representable(tensor: torch.Tensor, dtype: torch.dtype, samples: int) -> bool:
    """Whether a sample of ``samples`` entries survives a round trip through ``dtype``."""
    flat = tensor.reshape(-1)
    sample = flat[:: max(1, flat.numel() // samples)]
    return bool(torch.equal(sample.to(dtype).to(sample.dtype), sample))


def rounding_only(weight: torch.Tensor, aligned: torch.Tensor, samples: int = 1024) -> bool:
    """Whether ``weight`` is exactly ``aligned`` rounded to a narrower dtype (bfloat16 or
    float16) while ``aligned`` itself is not of that precision.

    Only tensors held in a wider dtype than the narrow one are tested; a sample decides first,
    so inputs of one precision pay a few thousand element operations per matrix.
    """
    if weight.dtype in _NARROW or weight.dtype != aligned.dtype or weight.numel() == 0:
        return False
    for dtype in _NARROW:
        if _representable(weight, dtype, samples) and not _representable(aligned, dtype, samples):
            return torch.equal(aligned.to(dtype).to(weight.dtype), weight)
    return False
