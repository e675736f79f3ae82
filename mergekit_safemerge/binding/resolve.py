"""One output tensor's inputs by role, resolved from mergekit's ``TensorGroup``.

The aligned model is mergekit's base; the other models are told apart by their ``role``; the
fine-tuned and safety roles may be LoRA adapters on the aligned model, read as factors. What a
pass needs of a tensor (:class:`TensorInputs`): its name, whether it is a candidate, the
aligned and unaligned weights, and the two updates ``D`` and ``S`` (dense or factors).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from mergekit.merge_methods.base import PerInputValues, TensorEntry, TensorGroup

from mergekit_safemerge.core.criterion import may_be_exactly_low_rank
from mergekit_safemerge.core.precision import rounding_only
from mergekit_safemerge.core.roles import (
    ADAPTER_PARAMETERS,
    ALIGNED,
    MISSING,
    RoleClaim,
    assign_roles,
)
from mergekit_safemerge.core.rule import RuleSettings, all_finite
from mergekit_safemerge.core.targets import is_candidate, parse_targets
from mergekit_safemerge.core.updates import LoraFactors, Update, difference, weight_plus
from mergekit_safemerge.errors import SafeMergeError
from mergekit_safemerge.lora.read import AdapterReader, check_update_shape


def role_entries(
    group: TensorGroup, role: PerInputValues, adapter_roles: frozenset[str]
) -> dict[str, TensorEntry]:
    """Each role's entry for this tensor (roles given by adapters have none)."""
    claims = [
        RoleClaim(f"model {entry.id}", entry.id, role.get(entry.id, MISSING))
        for entry in group.non_base
    ]
    base_model = group.base.id if group.base is not None else None
    resolved = assign_roles(base_model, claims, adapter_roles)
    by_model = {entry.id: entry for entry in group.entries}
    return {name: by_model[model] for name, model in resolved.items()}


@dataclass
class TensorInputs:
    """What the passes need of one output tensor (``out x in`` for a candidate).

    ``entries``: the roles given as models; ``adapters``: role -> adapter spec for roles given
    as LoRA adapters, with their factors for this tensor in ``delta_factors`` /
    ``safety_factors`` (None: the adapter leaves the tensor alone, or the role is a model).
    """

    name: str
    candidate: bool
    entries: dict[str, TensorEntry]
    adapters: dict[str, str]
    settings: RuleSettings
    reader: AdapterReader
    delta_factors: LoraFactors | None = None
    safety_factors: LoraFactors | None = None

    @property
    def aligned(self) -> TensorEntry:
        return self.entries[ALIGNED]

    @property
    def unaligned(self) -> torch.Tensor:
        return self.entries["unaligned"].tensor

    @property
    def finetuned_source(self) -> str:
        if "finetuned" in self.entries:
            return f"model {self.entries['finetuned'].id} (finetuned)"
        return f"adapter {self.adapters['finetuned']} (finetuned)"

    def finetuned_weight(self) -> torch.Tensor:
        """The fine-tuned model's tensor: a model's own, or aligned + the adapter's ``s B A``."""
        if "finetuned" in self.entries:
            return self.entries["finetuned"].tensor
        aligned = self.aligned.tensor
        if self.delta_factors is None:
            return aligned
        # a new tensor: mergekit may hand the same aligned tensor to other tasks (or runs)
        return weight_plus(aligned, [(self.delta_factors, 1.0)], dtype=aligned.dtype)

    def _update(self, role: str, factors: LoraFactors | None) -> Update:
        """``W_role - W_al`` (float32), or the adapter's factors; rank 0 when the adapter skips
        the tensor or when ``W_role`` is only ``W_al`` rounded to a narrower dtype
        (:func:`~mergekit_safemerge.core.precision.rounding_only`)."""
        if role in self.entries:
            weight = self.entries[role].tensor
            if not rounding_only(weight, self.aligned.tensor):
                return difference(weight, self.aligned.tensor)[0]
        elif factors is not None:
            return factors
        return LoraFactors.empty(self.aligned.tensor)

    def delta(self) -> Update:
        """``D = W_ft - W_al``."""
        return self._update("finetuned", self.delta_factors)

    def safety_delta(self) -> Update:
        """``S = W_safety - W_al``."""
        return self._update("safety", self.safety_factors)

    def may_be_low_rank(self) -> bool:
        """Whether a dense ``D`` is worth the low-rank detection (16-bit weights never are)."""
        finetuned = self.entries.get("finetuned")
        return finetuned is None or may_be_exactly_low_rank(finetuned.tensor)

    def non_finite_error(self) -> SafeMergeError:
        """The one-line error naming the input with a NaN or Inf."""
        for role, entry in self.entries.items():
            if not all_finite(entry.tensor):
                cast = (
                    " in the merge dtype float16 (a value beyond +-65504 in a model stored in a "
                    "wider type overflows in the cast: merge in bfloat16 or float32)"
                    if entry.tensor.dtype == torch.float16
                    else ""
                )
                return SafeMergeError(
                    f"tensor {self.name} of model {entry.id} ({role}) contains NaN or Inf{cast}"
                )
        for role, factors in (("finetuned", self.delta_factors), ("safety", self.safety_factors)):
            if factors is not None and not all_finite(factors.dense()):
                spec = self.adapters[role]
                return SafeMergeError(
                    f"tensor {self.name}: adapter {spec} ({role}) contains NaN or Inf"
                )
        return SafeMergeError(f"tensor {self.name}: the updates overflow float32")


def _adapter_factors(
    reader: AdapterReader, spec: str, role: str, name: str, aligned: TensorEntry
) -> LoraFactors | None:
    """The adapter's factors for this tensor on the aligned tensor's device, or None."""
    if aligned.tensor.ndim != 2:
        return None
    factors = reader.factors(spec, name, where=f"parameters.{ADAPTER_PARAMETERS[role]}")
    if factors is None:
        return None
    check_update_shape(name, spec, role, factors.shape, str(aligned.id), aligned.tensor.shape)
    return factors.to(aligned.tensor.device)


def resolve_group(
    group: TensorGroup,
    *,
    role: PerInputValues,
    adapters: dict[str, str],
    targets: str,
    settings: RuleSettings,
    reader: AdapterReader,
) -> TensorInputs:
    """The inputs of one output tensor. Only what the tensor needs is read: the safety adapter
    only for candidates."""
    entries = role_entries(group, role, frozenset(adapters))
    name = group.metadata.name or "<unnamed tensor>"
    aligned = entries[ALIGNED]
    candidate = is_candidate(
        name, aligned.tensor.ndim, group.metadata.vocabulary_axis, parse_targets(targets)
    )
    inputs = TensorInputs(name, candidate, entries, adapters, settings, reader)
    if "finetuned" in adapters:
        inputs.delta_factors = _adapter_factors(
            reader, adapters["finetuned"], "finetuned", name, aligned
        )
    if candidate and "safety" in adapters:
        inputs.safety_factors = _adapter_factors(
            reader, adapters["safety"], "safety", name, aligned
        )
    return inputs
