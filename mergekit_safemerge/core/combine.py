"""Merge rules for one selected matrix, on the updates ``D`` (fine-tune) and ``S`` (safety).

Every rule returns ``W = W_aligned + mix(D, S)`` in float32; the caller casts to the model dtype.
Unselected matrices never reach this module, so they are never sparsified. ``D`` and ``S`` are
dense tensors or :class:`~mergekit_safemerge.core.updates.LoraFactors`; :data:`COMBINE_RULES` maps
each rule name users write in ``combine:`` (:data:`~mergekit_safemerge.core.settings.COMBINE_NAMES`,
pure Python so that reading a report imports no torch) to its function. The sparsification and
sign-consensus steps are mergekit's own (:mod:`mergekit.sparsify`, ``get_mask``), imported when
a rule that needs them runs, so importing this module imports no mergekit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mergekit_safemerge.core.updates import WORK_DTYPE, LoraFactors, Update, dense, weight_plus


@dataclass(frozen=True)
class CombineSettings:
    """The values a rule may use: ``a`` (safety weight), DARE/TIES density, a per-tensor seed,
    and the dtype of the merged weight (computed in float32 and rounded once to it)."""

    safety_weight: float
    density: float = 1.0
    seed: int = 0
    dtype: torch.dtype = WORK_DTYPE


def linear_combine(
    aligned: torch.Tensor,
    delta: Update,
    safety_delta: Update,
    safety_weight: float,
    dtype: torch.dtype = WORK_DTYPE,
) -> torch.Tensor:
    """The paper's rule: ``W = W_aligned + (1 - a) D + a S`` (all ``out x in``; in ``dtype``,
    one pass over ``W``, :func:`~mergekit_safemerge.core.updates.weight_plus`)."""
    a = float(safety_weight)
    return weight_plus(aligned, [(delta, 1.0 - a), (safety_delta, a)], dtype)


def tensor_seed(base_seed: int, tensor_name: str) -> int:
    """A 63-bit seed that depends only on ``base_seed`` and the tensor's name.

    It makes random sparsification reproducible per tensor whatever order the tensors run in.
    """
    digest = hashlib.blake2b(f"{base_seed}:{tensor_name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def dare_linear_combine(
    aligned: torch.Tensor,
    delta: Update,
    safety_delta: Update,
    safety_weight: float,
    density: float,
    seed: int,
    dtype: torch.dtype = WORK_DTYPE,
) -> torch.Tensor:
    """DARE then linear: ``W = W_aligned + (1 - a) dare(D) + a dare(S)``.

    ``dare(X)`` keeps each entry with probability ``density`` and rescales the survivors so the
    L1 norm of ``X`` is kept (mergekit's ``dare_linear`` rescaling). The masks come from the
    global torch generator seeded with ``seed`` inside a forked RNG state, so the caller's
    random stream is left untouched.
    """
    from mergekit.sparsify import RescaleNorm, SparsificationMethod, sparsify

    def dare(update: torch.Tensor) -> torch.Tensor:
        return sparsify(
            update, density=density, method=SparsificationMethod.random, rescale_norm=RescaleNorm.l1
        )

    a = float(safety_weight)
    d, s = dense(delta), dense(safety_delta)
    devices = [d.device] if d.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        d = dare(d)
        s = dare(s)
    return linear_combine(aligned, d, s, a, dtype)


def ties_combine(
    aligned: torch.Tensor,
    delta: Update,
    safety_delta: Update,
    safety_weight: float,
    density: float,
    dtype: torch.dtype = WORK_DTYPE,
) -> torch.Tensor:
    """TIES on the two updates, as mergekit's ``ties`` does it for two models.

    ``X' = magnitude_prune(X, density)`` for ``X`` in ``(D, S)`` with weights
    ``w = (1 - a, a)``; the sign of each entry is elected from ``sum_k w_k X'_k``; entries that
    disagree with it are dropped (mask ``m_k``); then, entry-wise,
    ``W = W_aligned + sum_k w_k m_k X'_k / sum_k w_k m_k`` (0 where no update survives).
    """
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask
    from mergekit.sparsify import SparsificationMethod, sparsify

    a = float(safety_weight)
    updates = torch.stack(
        [
            sparsify(dense(x), density=density, method=SparsificationMethod.magnitude)
            for x in (delta, safety_delta)
        ]
    )
    weights = torch.tensor([1.0 - a, a], dtype=WORK_DTYPE, device=updates.device)
    weights = weights.view(2, *([1] * (updates.ndim - 1)))
    weighted = updates * weights
    mask = get_mask(weighted, method="sum", mask_dtype=WORK_DTYPE)
    divisor = (weights * mask).sum(dim=0)
    divisor[divisor == 0] = 1.0
    merged = aligned.to(WORK_DTYPE) + (weighted * mask).sum(dim=0) / divisor
    return merged.to(dtype)


def authors_linear_factors(
    delta: LoraFactors, safety_delta: LoraFactors, safety_weight: float
) -> LoraFactors:
    """The authors' script on a merged module: PEFT's factor-wise ``linear`` combination.

    With weights ``w = (1 - a, a)`` and scalings ``s_k``, PEFT's ``add_weighted_adapter(...,
    combination_type="linear")`` builds ``A = sum_k sqrt(w_k s_k) A_k`` and
    ``B = sum_k sqrt(w_k s_k) B_k`` (both adapters of one rank ``r``), and the new adapter has
    scaling 1, so the update is ``B A``: the paper's ``(1 - a) D + a S`` plus the cross terms
    ``sqrt(w_f s_f w_s s_s) (B_f A_s + B_s A_f)``. In terms of our factors (``left = s B``,
    ``right = A``): ``B = sum_k sqrt(w_k / s_k) left_k``, ``A = sum_k sqrt(w_k s_k) right_k``.
    An adapter that does not touch the module (rank 0) adds nothing to either sum.
    """
    pairs = ((1.0 - float(safety_weight), delta), (float(safety_weight), safety_delta))
    weighted = [(w, f) for w, f in pairs if f.rank > 0]
    ranks = {f.rank for _, f in weighted}
    if len(ranks) > 1:
        raise ValueError(
            f"authors_linear needs adapters of one rank (PEFT's linear combination); got "
            f"{delta.rank} and {safety_delta.rank}"
        )
    if not weighted:
        return LoraFactors(delta.left[:, :0], delta.right[:0], scaling=1.0)
    left = sum((w / f.scaling) ** 0.5 * f.left.to(WORK_DTYPE) for w, f in weighted)
    right = sum((w * f.scaling) ** 0.5 * f.right.to(WORK_DTYPE) for w, f in weighted)
    return LoraFactors(left, right, scaling=1.0)


def authors_linear_combine(
    aligned: torch.Tensor,
    delta: Update,
    safety_delta: Update,
    safety_weight: float,
    dtype: torch.dtype = WORK_DTYPE,
) -> torch.Tensor:
    """``W = W_aligned + B A`` with ``B A`` from :func:`authors_linear_factors` (in ``dtype``)."""
    if not (isinstance(delta, LoraFactors) and isinstance(safety_delta, LoraFactors)):
        raise ValueError("authors_linear needs both updates as LoRA factors")
    update = authors_linear_factors(delta, safety_delta, safety_weight)
    return weight_plus(aligned, [(update, 1.0)], dtype)


def linear_factors(
    delta: LoraFactors, safety_delta: LoraFactors, safety_weight: float
) -> LoraFactors:
    """The paper's update ``(1 - a) D + a S`` exactly as one LoRA of rank ``r_f + r_s``.

    ``[(1 - a) L_f, a L_s] @ [R_f; R_s] = (1 - a) L_f R_f + a L_s R_s`` (scalings already in
    ``L = s B``); the result has scaling 1. A factor of rank 0 (an adapter that does not touch the
    module) adds nothing.
    """
    a = float(safety_weight)
    left = torch.cat(
        [(1.0 - a) * delta.left.to(WORK_DTYPE), a * safety_delta.left.to(WORK_DTYPE)], 1
    )
    right = torch.cat([delta.right.to(WORK_DTYPE), safety_delta.right.to(WORK_DTYPE)], 0)
    return LoraFactors(left, right, scaling=1.0)


CombineRule = Callable[[torch.Tensor, Update, Update, CombineSettings], torch.Tensor]

COMBINE_RULES: dict[str, CombineRule] = {
    "linear": lambda w, d, s, c: linear_combine(w, d, s, c.safety_weight, c.dtype),
    "dare_linear": lambda w, d, s, c: dare_linear_combine(
        w, d, s, c.safety_weight, c.density, c.seed, c.dtype
    ),
    "ties": lambda w, d, s, c: ties_combine(w, d, s, c.safety_weight, c.density, c.dtype),
    "authors_linear": lambda w, d, s, c: authors_linear_combine(w, d, s, c.safety_weight, c.dtype),
}
"""``combine:`` name -> ``rule(W_aligned, D, S, settings) -> W`` (in ``settings.dtype``)."""

NEEDS_FACTORS = frozenset({"authors_linear"})
"""Rules defined only when both ``D`` and ``S`` are given as LoRA factors."""

FactorRule = Callable[[LoraFactors, LoraFactors, CombineSettings], LoraFactors]

FACTOR_RULES: dict[str, FactorRule] = {
    "linear": lambda d, s, c: linear_factors(d, s, c.safety_weight),
    "authors_linear": lambda d, s, c: authors_linear_factors(d, s, c.safety_weight),
}
"""The rules with an exact low-rank form: the merged update as LoRA factors (``safemerge
adapter``). ``dare_linear`` and ``ties`` have none: a random or sign mask of ``B A`` is not a
product of smaller factors."""
