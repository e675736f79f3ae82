"""The mergekit adapter: the ``safemerge`` merge method for mergekit 0.1.5.

mergekit does the I/O, scheduling and devices and calls :meth:`SafeMergeMethod.merge_group`
once per output tensor with the four inputs (base = aligned; non-base = unaligned, finetuned,
safety, told apart by the per-model ``role`` parameter). This module only routes tensors to the
pure functions of :mod:`.criterion`, :mod:`.selection` and :mod:`.combine` and records what was
decided (:mod:`.report`).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
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
    TensorEntry,
    TensorGroup,
    TensorMetadata,
)
from pydantic import Field

from mergekit_safemerge import METHOD_NAME
from mergekit_safemerge.adapters import LoraFactors, open_adapter
from mergekit_safemerge.combine import (
    CombineRule,
    dare_linear_combine,
    linear_combine,
    tensor_seed,
    ties_combine,
)
from mergekit_safemerge.criterion import (
    WORK_DTYPE,
    Criterion,
    alignment_criterion,
    factored_alignment_cosine,
    frobenius_norm,
    update_cosine,
)
from mergekit_safemerge.errors import SafeMergeError
from mergekit_safemerge.report import KEPT, MERGED, MatrixRecord
from mergekit_safemerge.selection import SelectMode, threshold_selects
from mergekit_safemerge.session import current_session
from mergekit_safemerge.targets import is_candidate, parse_targets

ROLES = ("unaligned", "finetuned", "safety")
Role = Literal["unaligned", "finetuned", "safety"]
UnitInterval = Annotated[float, Field(ge=0.0, le=1.0)]
Density = Annotated[float, Field(gt=0.0, le=1.0)]
CombineName = Literal["linear", "dare_linear", "ties"]

DEFAULT_THRESHOLD = 0.35
DEFAULT_SAFETY_WEIGHT = 0.2

PARAMETERS = (
    ParameterSpec(
        "role", Role, ParameterScope.NON_BASE, description="unaligned, finetuned or safety"
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
        str,
        ParameterScope.SHARED,
        default="",
        description="comma-separated module names; empty: every 2-D non-vocabulary weight",
    ),
    ParameterSpec(
        "combine",
        CombineName,
        ParameterScope.SHARED,
        default=CombineRule.linear.value,
        description="merge rule for a selected matrix: linear, dare_linear or ties",
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
        Annotated[int, Field(ge=0)],
        ParameterScope.SHARED,
        default=0,
        description="how many matrices lowest_k, random_k and highest_k merge",
    ),
    ParameterSpec("seed", int, ParameterScope.SHARED, default=0, description="seed of random_k"),
    ParameterSpec(
        "finetuned_adapter",
        str,
        ParameterScope.SHARED,
        default="",
        description="PEFT LoRA folder: finetuned role = aligned + this adapter, read as factors",
    ),
    ParameterSpec(
        "safety_adapter",
        str,
        ParameterScope.SHARED,
        default="",
        description="PEFT LoRA folder: safety role = aligned + this adapter, read as factors",
    ),
)
ADAPTER_PARAMETERS = {"finetuned": "finetuned_adapter", "safety": "safety_adapter"}


def entries_by_role(
    group: TensorGroup, role: PerInputValues, adapter_roles: frozenset[str] = frozenset()
) -> dict[str, TensorEntry]:
    """Map each role to its entry; exactly one model per role, the aligned model is the base.

    Roles in ``adapter_roles`` come from a LoRA adapter instead of a model.
    """
    if group.base is None:
        raise SafeMergeError(
            f"safemerge needs base_model (the aligned model) for tensor {group.metadata.name}"
        )
    found: dict[str, TensorEntry] = {"aligned": group.base}
    for entry in group.non_base:
        name = role[entry.id]
        if name not in ROLES:
            raise SafeMergeError(
                f"model {entry.id}: parameters.role {name!r} is not one of {', '.join(ROLES)}"
            )
        if name in found:
            raise SafeMergeError(
                f"role {name!r} is given to two models: {found[name].id} and {entry.id}"
            )
        if name in adapter_roles:
            raise SafeMergeError(
                f"role {name!r} is given to model {entry.id} and to "
                f"parameters.{ADAPTER_PARAMETERS[name]}; use one"
            )
        found[name] = entry
    missing = [name for name in ROLES if name not in found and name not in adapter_roles]
    if missing:
        raise SafeMergeError(f"no model has role {missing[0]!r} (each of {', '.join(ROLES)} once)")
    return found


class NonFiniteInput(SafeMergeError):
    """A NaN or Inf in one of a candidate's inputs (the caller names the model)."""

    def __init__(self, tensor_name: str):
        super().__init__(f"tensor {tensor_name}: an input contains NaN or Inf")


@dataclass(frozen=True)
class RoleInput:
    """One role's weight for the current tensor, and where it came from."""

    source: str  # the model reference, or "<aligned>+<adapter folder>"
    tensor: torch.Tensor
    factors: LoraFactors | None = None  # the role is aligned + these LoRA factors


def role_inputs(
    group: TensorGroup, role: PerInputValues, adapters: dict[str, str]
) -> dict[str, RoleInput]:
    """The four roles' weights for this tensor; adapter roles are aligned + ``s B A``.

    An adapter that does not touch the tensor leaves the role equal to the aligned weight.
    """
    entries = entries_by_role(group, role, frozenset(adapters))
    inputs = {name: RoleInput(str(entry.id), entry.tensor) for name, entry in entries.items()}
    aligned = inputs["aligned"]
    tensor_name = group.metadata.name or ""
    for name, path in adapters.items():
        source = f"{aligned.source}+{path}"
        factors = open_adapter(path).factors(tensor_name) if aligned.tensor.ndim == 2 else None
        if factors is None:
            inputs[name] = RoleInput(source, aligned.tensor)
            continue
        shape = (int(factors.left.shape[0]), int(factors.right.shape[1]))
        if shape != tuple(aligned.tensor.shape):
            raise SafeMergeError(
                f"tensor {tensor_name}: adapter {path} ({name}) makes an update of shape {shape}, "
                f"but aligned model {aligned.source} has {tuple(aligned.tensor.shape)}"
            )
        device = aligned.tensor.device
        factors = LoraFactors(factors.left.to(device), factors.right.to(device))
        tensor = (aligned.tensor.to(WORK_DTYPE) + factors.delta()).to(aligned.tensor.dtype)
        inputs[name] = RoleInput(source, tensor, factors)
    return inputs


def _check_shapes(tensor_name: str, inputs: dict[str, RoleInput]) -> None:
    aligned = inputs["aligned"]
    for role_name, item in inputs.items():
        if item.tensor.shape != aligned.tensor.shape:
            raise SafeMergeError(
                f"tensor {tensor_name}: shape {tuple(item.tensor.shape)} in model {item.source} "
                f"({role_name}) differs from {tuple(aligned.tensor.shape)} in aligned model "
                f"{aligned.source}"
            )


def _raise_non_finite(tensor_name: str, inputs: dict[str, RoleInput]) -> None:
    """Name the first input with a NaN or Inf (only called once a norm came out non-finite)."""
    for role_name, item in inputs.items():
        if not bool(torch.isfinite(item.tensor).all()):
            raise SafeMergeError(
                f"tensor {tensor_name} of model {item.source} ({role_name}) contains NaN or Inf"
            )
    raise SafeMergeError(f"tensor {tensor_name}: the updates overflow float32")


def merge_matrix(
    tensor_name: str,
    aligned: torch.Tensor,
    unaligned: torch.Tensor,
    finetuned: torch.Tensor,
    safety: torch.Tensor,
    *,
    threshold: float,
    safety_weight: float,
    combine: str = CombineRule.linear.value,
    density: float = 1.0,
    seed: int = 0,
    selection: tuple[bool, str] | None = None,
    measure_only: bool = False,
    delta_factors: LoraFactors | None = None,
    safety_factors: LoraFactors | None = None,
) -> tuple[torch.Tensor, MatrixRecord]:
    """SafeMERGE for one candidate matrix: the output matrix and the record of the decision.

    ``D = W_ft - W_al``, ``S = W_safety - W_al``, ``V = W_al - W_unal`` (float32). ``D = 0``
    keeps the matrix; otherwise ``rho = cos(C D, D)`` and the matrix is merged when
    ``rho < threshold``, or when ``selection = (True, reason)`` (a ranking mode decided over all
    matrices). A merged matrix mixes ``D`` and ``S`` with the ``combine`` rule; a kept one is the
    fine-tuned tensor itself. With ``measure_only`` nothing is merged, only recorded.
    ``delta_factors`` / ``safety_factors`` give ``D`` / ``S`` exactly as LoRA factors (the role is
    aligned + adapter); ``rho`` then takes the factored path.
    """
    base = aligned.to(WORK_DTYPE)
    delta = delta_factors.delta() if delta_factors else finetuned.to(WORK_DTYPE) - base
    safety_delta = safety_factors.delta() if safety_factors else safety.to(WORK_DTYPE) - base
    alignment = base - unaligned.to(WORK_DTYPE)

    delta_norm = frobenius_norm(delta)
    alignment_norm = frobenius_norm(alignment)
    safety_norm = frobenius_norm(safety_delta)
    # Every input enters one of D, S, V: a NaN or Inf anywhere makes one of their norms non-finite.
    if not math.isfinite(delta_norm + alignment_norm + safety_norm):
        raise NonFiniteInput(tensor_name)

    def record(criterion: Criterion | None, decision: str, reason: str) -> MatrixRecord:
        return MatrixRecord(
            name=tensor_name,
            shape=(int(finetuned.shape[0]), int(finetuned.shape[1])),
            rho=None if criterion is None else criterion.rho,
            threshold=float(threshold),
            decision=decision,
            reason=reason,
            delta_norm=delta_norm,
            safety_norm=safety_norm,
            alignment_norm=alignment_norm,
            delta_safety_cosine=update_cosine(delta, safety_delta),
            criterion="none" if criterion is None else criterion.describe(),
        )

    if delta_norm == 0.0:
        return finetuned, record(None, KEPT, "D = 0: the fine-tune left this matrix unchanged")

    if delta_factors is not None:
        rho = factored_alignment_cosine(delta_factors.left, delta_factors.right, alignment)
        criterion = Criterion(rho, "factored", delta_factors.rank)
    else:
        criterion = alignment_criterion(delta, alignment)
    rho = criterion.rho
    prefix = (
        "V = 0 (alignment left this matrix unchanged), rho = 0 by definition; "
        if alignment_norm == 0.0
        else ""
    )
    if selection is None:
        selected = threshold_selects(rho, threshold)
        reason = f"{prefix}rho {rho:.4f} {'<' if selected else '>='} threshold {threshold:g}"
    else:
        selected, why = selection
        reason = f"{prefix}rho {rho:.4f}; {why}"
    if measure_only or not selected:
        return finetuned, record(criterion, MERGED if selected else KEPT, reason)

    if combine == CombineRule.linear:
        merged = linear_combine(base, delta, safety_delta, safety_weight)
    elif combine == CombineRule.dare_linear:
        merged = dare_linear_combine(base, delta, safety_delta, safety_weight, density, seed)
    elif combine == CombineRule.ties:
        merged = ties_combine(base, delta, safety_delta, safety_weight, density)
    else:
        raise SafeMergeError(
            f"parameters.combine {combine!r} is not one of linear, dare_linear, ties"
        )
    return merged.to(finetuned.dtype), record(criterion, MERGED, reason)


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
        adapters = {
            name: path
            for name, path in (("finetuned", finetuned_adapter), ("safety", safety_adapter))
            if path
        }
        inputs = role_inputs(group, role, adapters)
        finetuned = inputs["finetuned"].tensor
        metadata: TensorMetadata = group.metadata
        name = metadata.name or "<unnamed tensor>"
        if not is_candidate(name, finetuned.ndim, metadata.vocabulary_axis, parse_targets(targets)):
            return finetuned
        _check_shapes(name, inputs)
        session = current_session()
        measure_only = session is not None and session.measure_only
        try:
            merged, record = merge_matrix(
                name,
                inputs["aligned"].tensor,
                inputs["unaligned"].tensor,
                finetuned,
                inputs["safety"].tensor,
                threshold=threshold,
                safety_weight=safety_weight,
                combine=combine,
                density=density,
                # mergekit's --random-seed seeds torch; a per-tensor seed derived from it keeps
                # dare_linear reproducible whatever order the tensors are executed in.
                seed=tensor_seed(torch.initial_seed(), name),
                selection=None if measure_only else _ranked_selection(name, select),
                measure_only=measure_only,
                delta_factors=inputs["finetuned"].factors,
                safety_factors=inputs["safety"].factors,
            )
        except NonFiniteInput:
            _raise_non_finite(name, inputs)
        if session is not None:
            session.add(record)
        return merged


def _ranked_selection(name: str, select: str) -> tuple[bool, str] | None:
    """The decision a ranking mode made for ``name`` in the first pass (None for threshold)."""
    if select == "threshold":
        return None
    session = current_session()
    if session is None or session.selected is None:
        raise SafeMergeError(
            f"parameters.select {select!r} ranks all matrices before merging and needs "
            "SafeMERGE's run_merge integration (stock mergekit-yaml with the package installed, "
            "or mergekit_safemerge.register() before calling run_merge)"
        )
    reason = session.selected.get(name)
    return (True, reason) if reason else (False, f"{select}: not selected")


SAFEMERGE = SafeMergeMethod()


def register_method() -> None:
    """Add ``safemerge`` to mergekit's registry (idempotent)."""
    from mergekit.merge_methods import registry

    for method in registry.registered_methods():
        if method.spec.name == METHOD_NAME:
            if not isinstance(method, SafeMergeMethod):
                raise RuntimeError(f"another merge method named {METHOD_NAME!r} is registered")
            return
    registry.register(SAFEMERGE)


def _finish_deferred_registration() -> None:
    # Importing this module imports mergekit.merge_methods, whose import hook may have had to
    # wait for this module to finish executing (see _autoload._register_method).
    autoload = sys.modules.get("mergekit_safemerge._autoload")
    if autoload is not None:
        try:
            autoload.method_module_ready()
        except Exception as error:  # never break an import over registration
            autoload._warn("register the safemerge method", error)


_finish_deferred_registration()
