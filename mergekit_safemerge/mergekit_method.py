"""The ``safemerge`` merge method for mergekit 0.1.5: a thin binding of :mod:`.rule`.

mergekit does the I/O, scheduling and devices and calls :meth:`SafeMergeMethod.merge_group`
once per output tensor with the inputs (base = aligned; the other models told apart by the
per-model ``role`` parameter; ``finetuned`` / ``safety`` possibly given as LoRA adapters). This
module turns a tensor group into the rule's inputs, runs the rule on candidates, hands back the
output tensor and files the record with the run in progress (:mod:`.session`).
"""

from __future__ import annotations

from typing import Annotated

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    PerInputValues,
    TensorEntry,
    TensorGroup,
)
from pydantic import Field

from mergekit_safemerge import METHOD_NAME
from mergekit_safemerge.adapters import check_update_shape, open_adapter, resolve_adapter
from mergekit_safemerge.combine import CombineName, tensor_seed
from mergekit_safemerge.criterion import may_be_exactly_low_rank
from mergekit_safemerge.decide import SelectMode
from mergekit_safemerge.errors import SafeMergeError
from mergekit_safemerge.roles import (
    ADAPTER_PARAMETERS,
    ALIGNED,
    MISSING,
    RoleClaim,
    assign_roles,
)
from mergekit_safemerge.roles import Role as RoleName
from mergekit_safemerge.rule import NonFiniteInput, RuleSettings, all_finite, apply_rule
from mergekit_safemerge.session import current_session
from mergekit_safemerge.targets import is_candidate, parse_targets
from mergekit_safemerge.updates import WORK_DTYPE, LoraFactors, Update

# strict: a YAML boolean or a quoted string is not silently taken as a number
UnitInterval = Annotated[float, Field(ge=0.0, le=1.0, strict=True)]
Density = Annotated[float, Field(gt=0.0, le=1.0, strict=True)]
Count = Annotated[int, Field(ge=0, strict=True)]
Seed = Annotated[int, Field(strict=True)]
Text = Annotated[str, Field(strict=True)]

DEFAULT_THRESHOLD = 0.35
DEFAULT_SAFETY_WEIGHT = 0.2

PARAMETERS = (
    ParameterSpec(
        "role", RoleName, ParameterScope.NON_BASE, description="unaligned, finetuned or safety"
    ),
    ParameterSpec(
        "threshold",
        UnitInterval,
        ParameterScope.SHARED,
        default=DEFAULT_THRESHOLD,
        description="merge a matrix when rho < threshold",
    ),
    ParameterSpec(
        "safety_weight",
        UnitInterval,
        ParameterScope.SHARED,
        default=DEFAULT_SAFETY_WEIGHT,
        description="a in W = W_aligned + (1 - a) D + a S",
    ),
    ParameterSpec(
        "targets",
        Text,
        ParameterScope.SHARED,
        default="",
        description="comma-separated module names; empty: every 2-D non-vocabulary weight",
    ),
    ParameterSpec(
        "combine",
        CombineName,
        ParameterScope.SHARED,
        default="linear",
        description="merge rule for a selected matrix: linear, dare_linear, ties, authors_linear",
    ),
    ParameterSpec(
        "density",
        Density,
        ParameterScope.SHARED,
        default=1.0,
        description="fraction of D and S kept by dare_linear and ties",
    ),
    ParameterSpec(
        "select",
        SelectMode,
        ParameterScope.SHARED,
        default="threshold",
        description="threshold, lowest_k, random_k, highest_k, all or none",
    ),
    ParameterSpec(
        "k",
        Count,
        ParameterScope.SHARED,
        default=0,
        description="how many matrices lowest_k, random_k and highest_k merge",
    ),
    ParameterSpec("seed", Seed, ParameterScope.SHARED, default=0, description="seed of random_k"),
    ParameterSpec(
        "finetuned_adapter",
        Text,
        ParameterScope.SHARED,
        default="",
        description="PEFT LoRA (folder or Hub id): finetuned = aligned + this adapter, as factors",
    ),
    ParameterSpec(
        "safety_adapter",
        Text,
        ParameterScope.SHARED,
        default="",
        description="PEFT LoRA (folder or Hub id): safety = aligned + this adapter, as factors",
    ),
)


def role_entries(
    group: TensorGroup, role: PerInputValues, adapter_roles: frozenset[str]
) -> dict[str, TensorEntry]:
    """Each role's entry for this tensor (roles given by adapters have none)."""
    claims = [
        RoleClaim(f"model {entry.id}", entry.id, role.get(entry.id, MISSING))
        for entry in group.non_base
    ]
    base = group.base.id if group.base is not None else None
    resolved = assign_roles(base, claims, adapter_roles)
    by_model = {entry.id: entry for entry in group.entries}
    return {name: by_model[model] for name, model in resolved.items()}


def _adapter_update(spec: str, role: str, name: str, aligned: TensorEntry) -> LoraFactors | None:
    """The adapter's factors for this tensor on the aligned tensor's device, or None."""
    if aligned.tensor.ndim != 2:
        return None
    source = resolve_adapter(spec, where=f"parameters.{ADAPTER_PARAMETERS[role]}")
    factors = open_adapter(source.folder).factors(name)
    if factors is None:
        return None
    check_update_shape(name, spec, role, factors.shape, str(aligned.id), aligned.tensor.shape)
    return factors.to(aligned.tensor.device)


def _finetuned_weight(
    entries: dict[str, TensorEntry], delta_factors: LoraFactors | None
) -> torch.Tensor:
    """The fine-tuned model's tensor: a model's own, or aligned + the adapter's ``s B A``."""
    if "finetuned" in entries:
        return entries["finetuned"].tensor
    aligned = entries[ALIGNED].tensor
    if delta_factors is None:
        return aligned
    # out of place: mergekit may hand the same aligned tensor to other tasks (or runs)
    weight = torch.addmm(aligned.to(WORK_DTYPE), delta_factors.left, delta_factors.right)
    return weight.to(aligned.dtype)


def _update(
    entries: dict[str, TensorEntry], role: str, factors: LoraFactors | None, base: torch.Tensor
) -> Update:
    """``W_role - W_aligned`` (float32), or the adapter's factors (rank 0 if it skips the
    tensor)."""
    if role in entries:
        return entries[role].tensor - base
    return factors if factors is not None else LoraFactors.empty(base)


def _name_non_finite(name: str, entries: dict[str, TensorEntry], adapters: dict[str, str]) -> None:
    """Raise the one-line error naming the input with a NaN or Inf."""
    for role, entry in entries.items():
        if not all_finite(entry.tensor):
            raise SafeMergeError(f"tensor {name} of model {entry.id} ({role}) contains NaN or Inf")
    for role, spec in adapters.items():
        factors = _adapter_update(spec, role, name, entries[ALIGNED])
        if factors is not None and not all_finite(factors.dense()):
            raise SafeMergeError(f"tensor {name}: adapter {spec} ({role}) contains NaN or Inf")
    raise SafeMergeError(f"tensor {name}: the updates overflow float32")


def _check_finite_output(name: str, output: torch.Tensor, source: str) -> None:
    """A non-finite output tensor stops the run."""
    if not all_finite(output):
        raise SafeMergeError(
            f"tensor {name} of {source} contains NaN or Inf; SafeMERGE does not write a "
            "model with non-finite weights"
        )


class SafeMergeMethod(GroupMergeMethod):
    """SafeMERGE (Djuhera et al., arXiv 2503.17239) as a mergekit group method."""

    spec = MergeMethodSpec(
        name=METHOD_NAME,
        pretty_name="SafeMERGE",
        reference_url="https://arxiv.org/abs/2503.17239",
        parameters=PARAMETERS,
        # 1 to 3 models besides the aligned base: finetuned and safety may come from adapters
        contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1, max_non_base=3),
    )

    def merge_group(
        self,
        group: TensorGroup,
        /,
        *,
        role: PerInputValues,
        threshold: float,
        safety_weight: float,
        targets: str,
        combine: str,
        density: float,
        select: str,
        k: int,
        seed: int,
        finetuned_adapter: str,
        safety_adapter: str,
    ) -> torch.Tensor:
        del k  # used by the run integration, which ranks all matrices first
        adapters = {
            name: spec
            for name, spec in (("finetuned", finetuned_adapter), ("safety", safety_adapter))
            if spec
        }
        entries = role_entries(group, role, frozenset(adapters))
        name = group.metadata.name or "<unnamed tensor>"
        aligned = entries[ALIGNED]
        candidate = is_candidate(
            name, aligned.tensor.ndim, group.metadata.vocabulary_axis, parse_targets(targets)
        )
        # only what this tensor needs: the safety side only for candidates
        needed = adapters if candidate else {r: s for r, s in adapters.items() if r == "finetuned"}
        factors = {r: _adapter_update(s, r, name, aligned) for r, s in needed.items()}
        delta_factors = factors.get("finetuned")
        if not candidate:
            session = current_session()
            if session is not None and session.factor_output:
                if delta_factors is not None:  # kept as fine-tuned: its update goes out as is
                    session.add_factors(name, delta_factors)
                return aligned.tensor
            output = _finetuned_weight(entries, delta_factors)
            source = str(entries["finetuned"].id) if "finetuned" in entries else "the fine-tune"
            _check_finite_output(name, output, f"model {source} (finetuned)")
            return output

        session = current_session()
        measure_only = session is not None and session.measure_only
        factor_output = session is not None and session.factor_output and not measure_only
        base = aligned.tensor.to(WORK_DTYPE)
        settings = RuleSettings(
            threshold=threshold,
            safety_weight=safety_weight,
            combine=combine,
            density=density,
            select=select,
            # mergekit's --random-seed seeds torch; a per-tensor seed derived from it keeps
            # dare_linear reproducible whatever order the tensors are executed in.
            seed=tensor_seed(torch.initial_seed(), name),
        )
        finetuned = entries.get("finetuned")
        delta = _update(entries, "finetuned", delta_factors, base)
        try:
            result = apply_rule(
                name,
                base,
                entries["unaligned"].tensor,
                delta,
                _update(entries, "safety", factors.get("safety"), base),
                settings,
                ranking=None if session is None else session.ranking,
                measure_only=measure_only,
                detect_low_rank=finetuned is None or may_be_exactly_low_rank(finetuned.tensor),
                as_factors=factor_output,
            )
        except NonFiniteInput:
            _name_non_finite(name, entries, adapters)
        if factor_output:  # safemerge adapter: the update as factors; nothing is written
            update = result.output if result.output is not None else delta
            session.add(result.record, update if result.record.delta_norm > 0 else None)
            return aligned.tensor
        if session is not None:
            session.add(result.record)
        if result.output is None:
            if measure_only:  # the measuring pass writes nothing; skip forming the output
                return aligned.tensor
            return _finetuned_weight(entries, delta_factors)
        output = result.output.to(aligned.tensor.dtype)
        _check_finite_output(name, output, "the merge (overflow in the output dtype)")
        return output


SAFEMERGE = SafeMergeMethod()
