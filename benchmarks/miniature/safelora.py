"""SafeLoRA's projection (Hsu et al., 2024) as a mergekit merge method, a baseline for the
miniature benchmark; registered in-process only (:func:`register`), never installed.

Per candidate matrix (2-D, non-vocabulary, inside ``targets``), with the aligned model as base:

* ``D = W_ft - W_al``, ``V = W_al - W_unal``, ``rho = cos(C D, D)`` with ``C = V V^T / ||V||_F``
  (:func:`mergekit_safemerge.core.criterion.alignment_cosine`);
* if ``rho <= tau`` (SafeLoRA's rule, ``<=`` and default ``tau = 0.5``) the update is projected,
  ``W = W_al + C D`` with ``C D = V (V^T D) / ||V||_F`` (``C`` is never formed);
* otherwise ``W = W_ft``. Everything else is the fine-tuned tensor.

Each decision is appended to :data:`RECORDS` so a driver can count projected matrices.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    PerInputValues,
    TensorGroup,
)
from pydantic import Field

from mergekit_safemerge.core.criterion import alignment_cosine, alignment_projection
from mergekit_safemerge.core.targets import is_candidate, parse_targets

METHOD_NAME = "safelora_projection"
RECORDS: list[dict] = []
"""``{"name", "rho", "projected"}`` per candidate matrix with ``D != 0``, in merge order."""


def project_update(delta: torch.Tensor, alignment: torch.Tensor) -> torch.Tensor:
    """``C D = V V^T D / ||V||_F`` in float32 (the criterion's product, no ``C``); 0 when V = 0."""
    norm = torch.linalg.vector_norm(alignment.float())
    if float(norm) == 0.0:
        return torch.zeros_like(delta, dtype=torch.float32)
    return alignment_projection(delta, alignment) / norm


def safelora_matrix(
    aligned: torch.Tensor, unaligned: torch.Tensor, finetuned: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, float | None, bool]:
    """``(W, rho, projected)`` for one matrix; ``rho`` is None when ``D = 0``."""
    base = aligned.float()
    delta = finetuned.float() - base
    if not bool(delta.any()):
        return finetuned, None, False
    alignment = base - unaligned.float()
    rho = alignment_cosine(delta, alignment)
    if rho <= threshold:
        return (base + project_update(delta, alignment)).to(finetuned.dtype), rho, True
    return finetuned, rho, False


class SafeLoRAProjection(GroupMergeMethod):
    """SafeLoRA's ``D <- C D`` for matrices with ``rho <= threshold``."""

    spec = MergeMethodSpec(
        name=METHOD_NAME,
        pretty_name="SafeLoRA projection (miniature baseline)",
        reference_url="https://arxiv.org/abs/2405.16833",
        parameters=(
            ParameterSpec(
                "role",
                Literal["unaligned", "finetuned"],
                ParameterScope.NON_BASE,
                description="unaligned or finetuned",
            ),
            ParameterSpec(
                "threshold",
                Annotated[float, Field(ge=0.0, le=1.0)],
                ParameterScope.SHARED,
                default=0.5,
                description="project a matrix when rho <= threshold",
            ),
            ParameterSpec("targets", str, ParameterScope.SHARED, default=""),
        ),
        contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=2, max_non_base=2),
    )

    def merge_group(
        self, group: TensorGroup, /, *, role: PerInputValues, threshold: float, targets: str
    ) -> torch.Tensor:
        by_role = {role[e.id]: e.tensor for e in group.non_base}
        if sorted(by_role) != ["finetuned", "unaligned"]:
            raise ValueError("safelora_projection needs one unaligned and one finetuned model")
        finetuned = by_role["finetuned"]
        name = group.metadata.name or ""
        if not is_candidate(
            name, finetuned.ndim, group.metadata.vocabulary_axis, parse_targets(targets)
        ):
            return finetuned
        merged, rho, projected = safelora_matrix(
            group.base.tensor, by_role["unaligned"], finetuned, threshold
        )
        if rho is not None:
            RECORDS.append({"name": name, "rho": rho, "projected": projected})
        return merged


def register() -> None:
    """Add the method to mergekit's registry of this process (idempotent)."""
    from mergekit.merge_methods import registry

    if all(m.spec.name != METHOD_NAME for m in registry.registered_methods()):
        registry.register(SafeLoRAProjection())
