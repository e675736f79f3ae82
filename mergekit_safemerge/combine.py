"""Merge rules for one selected matrix, on the updates ``D`` (fine-tune) and ``S`` (safety).

All rules return ``W = W_aligned + mix(D, S)`` in float32; the caller casts to the model dtype.
Unselected matrices never reach this module, so they are never sparsified. The sparsification
and sign-consensus steps are mergekit's own (:mod:`mergekit.sparsify` and ``get_mask`` from
``generalized_task_arithmetic``), applied to ``D`` and ``S`` only.
"""

from __future__ import annotations

import hashlib
from enum import Enum

import torch
from mergekit.sparsify import RescaleNorm, SparsificationMethod, sparsify

WORK_DTYPE = torch.float32


class CombineRule(str, Enum):
    linear = "linear"
    dare_linear = "dare_linear"
    ties = "ties"


def linear_combine(
    aligned: torch.Tensor, delta: torch.Tensor, safety_delta: torch.Tensor, safety_weight: float
) -> torch.Tensor:
    """The paper's rule: ``W = W_aligned + (1 - a) D + a S`` (all ``out x in``)."""
    a = float(safety_weight)
    return (
        aligned.to(WORK_DTYPE) + (1.0 - a) * delta.to(WORK_DTYPE) + a * safety_delta.to(WORK_DTYPE)
    )


def tensor_seed(base_seed: int, tensor_name: str) -> int:
    """A 63-bit seed that depends only on ``base_seed`` and the tensor's name.

    It makes random sparsification reproducible per tensor whatever order the tensors run in.
    """
    digest = hashlib.blake2b(f"{base_seed}:{tensor_name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def dare_linear_combine(
    aligned: torch.Tensor,
    delta: torch.Tensor,
    safety_delta: torch.Tensor,
    safety_weight: float,
    density: float,
    seed: int,
) -> torch.Tensor:
    """DARE then linear: ``W = W_aligned + (1 - a) dare(D) + a dare(S)``.

    ``dare(X)`` keeps each entry with probability ``density`` and rescales the survivors so the
    L1 norm of ``X`` is kept (mergekit's ``dare_linear`` rescaling). The masks come from the
    global torch generator seeded with ``seed`` inside a forked RNG state, so the caller's
    random stream is left untouched.
    """
    a = float(safety_weight)
    d = delta.to(WORK_DTYPE)
    s = safety_delta.to(WORK_DTYPE)
    devices = [d.device] if d.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        d = _dare(d, density)
        s = _dare(s, density)
    return aligned.to(WORK_DTYPE) + (1.0 - a) * d + a * s


def _dare(update: torch.Tensor, density: float) -> torch.Tensor:
    return sparsify(
        update, density=density, method=SparsificationMethod.random, rescale_norm=RescaleNorm.l1
    )


def ties_combine(
    aligned: torch.Tensor,
    delta: torch.Tensor,
    safety_delta: torch.Tensor,
    safety_weight: float,
    density: float,
) -> torch.Tensor:
    """TIES on the two updates, as mergekit's ``ties`` does it for two models.

    ``X' = magnitude_prune(X, density)`` for ``X`` in ``(D, S)`` with weights
    ``w = (1 - a, a)``; the sign of each entry is elected from ``sum_k w_k X'_k``; entries that
    disagree with it are dropped (mask ``m_k``); then, entry-wise,
    ``W = W_aligned + sum_k w_k m_k X'_k / sum_k w_k m_k`` (0 where no update survives).
    """
    # Imported here, not at the top: importing mergekit.merge_methods fires SafeMERGE's
    # registration hook, which imports mergekit_safemerge.method and with it this module.
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask

    a = float(safety_weight)
    updates = torch.stack(
        [
            sparsify(x.to(WORK_DTYPE), density=density, method=SparsificationMethod.magnitude)
            for x in (delta, safety_delta)
        ]
    )
    weights = torch.tensor([1.0 - a, a], dtype=WORK_DTYPE, device=updates.device)
    weights = weights.view(2, *([1] * (updates.ndim - 1)))
    weighted = updates * weights
    mask = get_mask(weighted, method="sum", mask_dtype=WORK_DTYPE)
    divisor = (weights * mask).sum(dim=0)
    divisor[divisor == 0] = 1.0
    return aligned.to(WORK_DTYPE) + (weighted * mask).sum(dim=0) / divisor
