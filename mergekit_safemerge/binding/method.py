"""The ``safemerge`` merge method for mergekit 0.1.5: its spec, and one tensor at a time.

mergekit does the I/O, scheduling and devices and calls :meth:`SafeMergeMethod.merge_group`
once per output tensor. The method resolves the tensor's inputs by role
(:func:`~.resolve.resolve_group`) and hands them to the pass of the run in progress
(:mod:`.passes`; a plain merge outside a run). Its ``ParameterSpec``s are derived from the one
parameter table, :mod:`mergekit_safemerge.core.settings`.

Through mergekit's in-memory API (``merge_state_dicts``, ``merge_tensors``, or calling the method
on tensor groups) every ``select`` mode works: a ranking mode measures every group first, then
merges. In mergekit's graph (``run_merge``, ``mergekit-yaml``) the method sees one tensor at a
time, so a ranking mode needs the run integration, which measures first; without it the method
refuses with one line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

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

from mergekit_safemerge import METHOD_NAME
from mergekit_safemerge.binding.passes import MeasurePass, MergePass, current_pass, running
from mergekit_safemerge.binding.resolve import resolve_group
from mergekit_safemerge.core.combine import tensor_seed
from mergekit_safemerge.core.decide import changed_rhos, rank_matrices
from mergekit_safemerge.core.rule import RuleSettings
from mergekit_safemerge.core.settings import PARAMETERS, Parameter, Settings


def value_type(parameter: Parameter) -> Any:
    """The pydantic type mergekit validates a value with: strict (a YAML boolean or a quoted
    string is never taken as a number), with the table's bounds or choices."""
    if parameter.choices is not None:
        return Literal[parameter.choices]
    bounds: dict[str, float] = {}
    if parameter.low is not None:
        bounds["gt" if parameter.low_open else "ge"] = parameter.low
    if parameter.high is not None:
        bounds["le"] = parameter.high
    return Annotated[parameter.kind, Field(strict=True, **bounds)]


def parameter_spec(parameter: Parameter) -> ParameterSpec:
    scope = ParameterScope.NON_BASE if parameter.per_model else ParameterScope.SHARED
    options = {} if parameter.default is None else {"default": parameter.default}
    return ParameterSpec(
        parameter.name,
        value_type(parameter),
        scope,
        description=parameter.description,
        **options,
    )


PARAMETER_SPECS: tuple[ParameterSpec, ...] = tuple(parameter_spec(p) for p in PARAMETERS)


def _ranking_selects(parameters: Mapping[str, Any] | None) -> bool:
    select = (parameters or {}).get("select", Settings.select)
    return isinstance(select, str) and select != "threshold"


class SafeMergeMethod(GroupMergeMethod):
    """SafeMERGE (Djuhera et al., arXiv 2503.17239) as a mergekit group method."""

    spec = MergeMethodSpec(
        name=METHOD_NAME,
        pretty_name="SafeMERGE",
        reference_url="https://arxiv.org/abs/2503.17239",
        parameters=PARAMETER_SPECS,
        # 1 to 3 models besides the aligned base: finetuned and safety may come from adapters
        contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1, max_non_base=3),
    )

    def __call__(
        self, groups: Sequence[TensorGroup], /, *, parameters: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> tuple[torch.Tensor, ...]:  # fmt: skip
        """mergekit's in-memory entry point. With a ranking ``select`` and no run in progress,
        every group is measured first and the ranking taken over all of them, as a run does
        over the whole model."""
        groups = tuple(groups)
        if current_pass() is not None or not _ranking_selects(parameters):
            return super().__call__(groups, parameters=parameters, **options)
        with running(MeasurePass()) as measuring:
            super().__call__(groups, parameters=parameters, **options)
        settings = {**(parameters or {})}
        ranking = rank_matrices(
            changed_rhos(measuring.records),
            settings["select"],
            k=settings.get("k", Settings.k),
            seed=settings.get("seed", Settings.seed),
        )
        with running(MergePass(ranking)):
            return super().__call__(groups, parameters=parameters, **options)

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
        k: int,  # read by the run (the ranking); here only validated
        seed: int,  # likewise
        finetuned_adapter: str,
        safety_adapter: str,
    ) -> torch.Tensor:
        del k, seed
        pass_ = current_pass() or MergePass()
        name = group.metadata.name or "<unnamed tensor>"
        adapters = {
            role_name: spec
            for role_name, spec in (("finetuned", finetuned_adapter), ("safety", safety_adapter))
            if spec
        }
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
        inputs = resolve_group(
            group,
            role=role,
            adapters=adapters,
            targets=targets,
            settings=settings,
            reader=pass_.adapters,
        )
        return pass_.tensor(inputs)


SAFEMERGE = SafeMergeMethod()
