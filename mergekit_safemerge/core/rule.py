"""SafeMERGE for one candidate matrix: measure -> decide -> combine. Pure: torch, no mergekit.

For one ``out x in`` weight with ``W_al`` (aligned), ``W_un`` (unaligned) and the updates
``D = W_ft - W_al``, ``S = W_safety - W_al`` (dense or LoRA factors):

1. :func:`measure`: ``V = W_al - W_un``, ``||D||``, ``||S||``, ``||V||``, ``cos(D, S)`` and
   ``rho = cos(C D, D)`` by the cheapest exact route (:mod:`.criterion`);
2. :func:`~mergekit_safemerge.core.decide.decide`: merged or kept, with the reason;
3. a merged matrix is ``W = combine(W_al, D, S)`` (:data:`.combine.COMBINE_RULES`); a kept one
   is the fine-tuned weight itself.

Every pass of the mergekit binding (merge, measure, factors) calls :func:`apply_rule`, asking
for the output it needs (:data:`Output`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from mergekit_safemerge.core.combine import COMBINE_RULES, FACTOR_RULES, CombineSettings
from mergekit_safemerge.core.criterion import (
    Alignment,
    Criterion,
    alignment_criterion,
    as_alignment,
)
from mergekit_safemerge.core.decide import Decision, decide
from mergekit_safemerge.core.records import KEPT, MERGED, MatrixRecord
from mergekit_safemerge.core.settings import Settings
from mergekit_safemerge.core.updates import (
    WORK_DTYPE,
    LoraFactors,
    Update,
    squared_norm,
    update_cosine,
)
from mergekit_safemerge.errors import SafeMergeError


class NonFiniteInput(SafeMergeError):
    """A NaN or Inf in one of a candidate's inputs (the binding names the model)."""

    def __init__(self, tensor_name: str):
        super().__init__(f"tensor {tensor_name}: an input contains NaN or Inf")
        self.tensor_name = tensor_name


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry of a floating-point tensor is finite (other dtypes: True).

    One pass in the tensor's own dtype: ``aminmax`` propagates NaN, and an Inf is the minimum or
    the maximum. No temporary, no sum that could overflow, and no per-element conversion (a
    float32 sum of a 16-bit tensor takes torch's slow converting reduction); docs/performance.md.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


@dataclass(frozen=True)
class RuleSettings:
    """The values applied to one matrix (shared parameters, possibly per ``filter:``); the
    defaults are the parameter table's (:class:`~mergekit_safemerge.core.settings.Settings`)."""

    threshold: float = Settings.threshold
    safety_weight: float = Settings.safety_weight
    combine: str = Settings.combine
    density: float = Settings.density
    select: str = Settings.select
    seed: int = 0  # per-tensor seed of dare_linear (derived from the run's seed and the name)


Output = Literal["weight", "update", "none"]
"""What :func:`apply_rule` returns for a merged matrix: the merged ``weight``, its ``update``
``mix(D, S)`` as LoRA factors (an adapter output), or ``none`` (a measuring pass)."""


@dataclass(frozen=True)
class Measurement:
    """What :func:`measure` found for one matrix (float32 norms, ``criterion`` None when D = 0)."""

    delta_norm: float
    safety_norm: float
    alignment_norm: float
    delta_safety_cosine: float
    criterion: Criterion | None


@dataclass(frozen=True)
class RuleResult:
    """The output (None: keep the fine-tuned weight unchanged) and the record.

    The output is the merged matrix, or the merged update as LoRA factors (``output="update"``).
    """

    output: torch.Tensor | LoraFactors | None
    record: MatrixRecord


def measure(
    name: str,
    alignment: torch.Tensor | Alignment,
    delta: Update,
    safety_delta: Update,
    *,
    detect_low_rank: bool = True,
) -> Measurement:
    """Norms, ``cos(D, S)`` and ``rho`` for one matrix (``V``, ``D``, ``S``: ``out x in``).

    ``alignment`` is ``V`` or an :class:`~mergekit_safemerge.core.criterion.Alignment` that forms
    it from the two weights; ``||V||_F^2`` comes with the criterion's first pass over ``V``.
    Raises :class:`NonFiniteInput` when a norm is NaN or Inf: every input enters one of ``D``,
    ``S``, ``V``, so a NaN or Inf anywhere shows there.
    """
    alignment = as_alignment(alignment)
    delta_sq, safety_sq = squared_norm(delta), squared_norm(safety_delta)
    delta_norm, safety_norm = (float(x.clamp_min(0).sqrt()) for x in (delta_sq, safety_sq))
    if not math.isfinite(delta_norm + safety_norm):
        raise NonFiniteInput(name)
    criterion = None
    if delta_norm != 0.0:
        criterion = alignment_criterion(
            delta, alignment, detect_low_rank=detect_low_rank, delta_sq=delta_sq
        )
    alignment_norm = float(alignment.squared_norm().clamp_min(0).sqrt())
    if not math.isfinite(alignment_norm):
        raise NonFiniteInput(name)
    cosine = update_cosine(delta, safety_delta, delta_norm, safety_norm)
    return Measurement(delta_norm, safety_norm, alignment_norm, cosine, criterion)


def combine(
    rule: str,
    aligned: torch.Tensor,
    delta: Update,
    safety_delta: Update,
    settings: RuleSettings,
    dtype: torch.dtype = WORK_DTYPE,
) -> torch.Tensor:
    """``W = W_aligned + mix(D, S)`` with the rule named ``rule`` (``aligned`` in any dtype; ``W``
    computed in float32 and rounded once to ``dtype``)."""
    function = COMBINE_RULES.get(rule)
    if function is None:
        raise SafeMergeError(
            f"parameters.combine {rule!r} is not one of {', '.join(COMBINE_RULES)}"
        )
    return function(aligned, delta, safety_delta, _combine_settings(settings, dtype))


def combine_factors(
    rule: str, delta: LoraFactors, safety_delta: LoraFactors, settings: RuleSettings
) -> LoraFactors:
    """``mix(D, S)`` exactly as LoRA factors, for the rules that have a low-rank form."""
    function = FACTOR_RULES.get(rule)
    if function is None:
        raise SafeMergeError(
            f"parameters.combine {rule!r} has no exact low-rank form (one of "
            f"{', '.join(FACTOR_RULES)} writes an adapter)"
        )
    if not (isinstance(delta, LoraFactors) and isinstance(safety_delta, LoraFactors)):
        raise SafeMergeError("an adapter output needs both updates as LoRA factors")
    return function(delta, safety_delta, _combine_settings(settings))


def _combine_settings(settings: RuleSettings, dtype: torch.dtype = WORK_DTYPE) -> CombineSettings:
    return CombineSettings(settings.safety_weight, settings.density, settings.seed, dtype)


def record_of(
    name: str,
    shape: tuple[int, int],
    found: Measurement,
    decision: Decision,
    settings: RuleSettings,
) -> MatrixRecord:
    criterion = found.criterion
    return MatrixRecord(
        name=name,
        shape=shape,
        rho=None if criterion is None else criterion.rho,
        decision=MERGED if decision.merged else KEPT,
        reason=decision.reason,
        delta_norm=found.delta_norm,
        safety_norm=found.safety_norm,
        alignment_norm=found.alignment_norm,
        delta_safety_cosine=found.delta_safety_cosine,
        criterion="none" if criterion is None else criterion.describe(),
        threshold=float(settings.threshold),
        safety_weight=float(settings.safety_weight),
        combine=settings.combine,
        density=float(settings.density),
        select=settings.select,
    )


def apply_rule(
    name: str,
    aligned: torch.Tensor,
    unaligned: torch.Tensor,
    delta: Update,
    safety_delta: Update,
    settings: RuleSettings,
    *,
    ranking: Mapping[str, str] | None = None,
    detect_low_rank: bool = True,
    output: Output = "weight",
    dtype: torch.dtype = WORK_DTYPE,
) -> RuleResult:
    """SafeMERGE for one candidate matrix.

    ``aligned`` and ``unaligned`` are the weights (any float dtype), ``delta`` / ``safety_delta``
    the updates ``D`` and ``S`` (float32 dense, or :class:`LoraFactors`). ``ranking`` holds the
    selection of a ranking mode (:func:`~mergekit_safemerge.core.decide.rank_matrices`).
    The output is None when the matrix keeps its fine-tuned weight or ``output="none"``; with
    ``output="update"`` a merged matrix's output is its update ``mix(D, S)`` as LoRA factors
    (both updates must be factors), not the matrix. A merged weight is computed in float32 and
    returned in ``dtype`` (rounded once).
    """
    alignment = Alignment(aligned, unaligned)  # V, formed in float32 as the criterion reads it
    found = measure(name, alignment, delta, safety_delta, detect_low_rank=detect_low_rank)
    del alignment
    decision = decide(
        name,
        None if found.criterion is None else found.criterion.rho,
        select=settings.select,
        threshold=settings.threshold,
        ranking=ranking,
        alignment_zero=found.alignment_norm == 0.0,
    )
    shape = (int(aligned.shape[0]), int(aligned.shape[1]))
    record = record_of(name, shape, found, decision, settings)
    if output == "none" or not decision.merged:
        return RuleResult(None, record)
    if output == "update":
        return RuleResult(combine_factors(settings.combine, delta, safety_delta, settings), record)
    merged = combine(settings.combine, aligned, delta, safety_delta, settings, dtype)
    return RuleResult(merged, record)
