"""Every SafeMERGE parameter, defined once. Pure Python.

:class:`Settings` is the table: one field per shared parameter (name, type, default), its
metadata a :class:`Parameter` (what it means, the words messages use for its values, bounds or
choices, whether it is decided once for the whole merge, whether a YAML list is allowed).
From it the binding derives mergekit's ``ParameterSpec``s and the validator's messages, and
every reader gets typed fields: the run's settings are one frozen :class:`Settings`. The one
per-model parameter, ``role``, is :data:`ROLE`.

A shared value is a plain value, or, for per-tensor parameters, mergekit's ``filter:`` values
or a layer gradient; those are kept in :class:`Settings` as written (JSON) and resolved per
tensor by mergekit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from mergekit_safemerge.core.decide import COUNT_MODES, SELECT_MODES
from mergekit_safemerge.core.roles import ROLES

CombineName = Literal["linear", "dare_linear", "ties", "authors_linear"]
COMBINE_NAMES: tuple[str, ...] = get_args(CombineName)
"""The merge rules ``combine:`` names (their functions: :data:`.combine.COMBINE_RULES`)."""


@dataclass(frozen=True)
class Parameter:
    """One parameter: what users write, what it means, what values it takes.

    ``kind`` is ``float``, ``int`` or ``str``; numbers lie in ``[low, high]`` (``low`` excluded
    when ``low_open``), strings in ``choices`` when given. ``whole_merge``: one plain value
    under the top-level ``parameters`` (no ``filter:``, no gradient). ``gradient``: a YAML list
    (mergekit's layer gradient) is allowed. ``expects`` is the phrase messages use for a valid
    value. ``applies`` says when the value has an effect: a test over every value configured
    for each parameter (:data:`Configured`), and the words for it (``applies_when``).
    """

    name: str
    kind: type
    default: Any
    description: str
    expects: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] | None = None
    whole_merge: bool = False
    gradient: bool = True
    per_model: bool = False
    applies: Callable[[Configured], bool] | None = None
    applies_when: str = ""

    @property
    def numeric(self) -> bool:
        return self.kind in (int, float)


Configured = Mapping[str, frozenset]
"""Parameter name -> every value configured for it (all ``filter:`` values and gradient points,
or the default when it is not written)."""


def _selects(*modes: str) -> Callable[[Configured], bool]:
    return lambda values: bool(values["select"] & set(modes))


def _merges_something(values: Configured) -> bool:
    return values["select"] != {"none"}


def _parameter(default: Any, description: str, expects: str, **options: Any) -> Any:
    """A :class:`Settings` field whose metadata is its :class:`Parameter` (named and typed from
    the field itself by :func:`_table`)."""
    return field(
        default=default,
        metadata={"parameter": dict(description=description, expects=expects, **options)},
    )


@dataclass(frozen=True)
class Settings:
    """The shared parameters of one SafeMERGE run, plus the run's dtype and seed (report only).

    Per-tensor parameters (``threshold``, ``safety_weight``, ``targets``, ``combine``,
    ``density``) hold the plain value, or the ``filter:`` values / gradient as written.
    """

    threshold: float = _parameter(
        0.35,
        "merge a matrix when rho < threshold",
        "a number in [0, 1]",
        low=0.0,
        high=1.0,
        applies=_selects("threshold"),
        applies_when="with select threshold",
    )
    safety_weight: float = _parameter(
        0.2,
        "a in W = W_aligned + (1 - a) D + a S",
        "a number in [0, 1]",
        low=0.0,
        high=1.0,
        applies=_merges_something,
        applies_when="when a matrix can be merged (not with select none)",
    )
    targets: str = _parameter(
        "",
        "comma-separated module names; empty: every 2-D non-vocabulary weight",
        'one comma-separated string of module names, e.g. targets: "q_proj,v_proj"',
        gradient=False,
    )
    combine: str = _parameter(
        "linear",
        "merge rule for a selected matrix: linear, dare_linear, ties, authors_linear",
        f"one of {', '.join(COMBINE_NAMES)}",
        choices=COMBINE_NAMES,
        gradient=False,
        applies=_merges_something,
        applies_when="when a matrix can be merged (not with select none)",
    )
    density: float = _parameter(
        1.0,
        "fraction of D and S kept by dare_linear and ties",
        "a number in (0, 1]",
        low=0.0,
        high=1.0,
        low_open=True,
        applies=lambda values: (
            _merges_something(values) and bool(values["combine"] & {"dare_linear", "ties"})
        ),
        applies_when="with combine dare_linear or ties (and not select none)",
    )
    select: str = _parameter(
        "threshold",
        "threshold, lowest_k, random_k, highest_k, all or none",
        f"one of {', '.join(SELECT_MODES)}",
        choices=SELECT_MODES,
        whole_merge=True,
    )
    k: int = _parameter(
        0,
        "how many matrices lowest_k, random_k and highest_k merge",
        f"a whole number >= 0 (>= 1 with select {', '.join(sorted(COUNT_MODES))})",
        low=0,
        whole_merge=True,
        applies=_selects(*COUNT_MODES),
        applies_when=f"with select {', '.join(sorted(COUNT_MODES))}",
    )
    seed: int = _parameter(
        0,
        "seed of random_k",
        "a whole number",
        whole_merge=True,
        applies=_selects("random_k"),
        applies_when="with select random_k (dare_linear is seeded by mergekit's --random-seed)",
    )
    finetuned_adapter: str = _parameter(
        "",
        "PEFT LoRA (folder or Hub id): finetuned = aligned + this adapter, as factors",
        "a folder or Hub id (org/name[@revision])",
        whole_merge=True,
    )
    safety_adapter: str = _parameter(
        "",
        "PEFT LoRA (folder or Hub id): safety = aligned + this adapter, as factors",
        "a folder or Hub id (org/name[@revision])",
        whole_merge=True,
    )
    # the run, not parameters: recorded in reports
    dtype: str | None = field(default=None, metadata={"run": True})
    random_seed: int | None = field(default=None, metadata={"run": True})

    @property
    def plain_targets(self) -> str | None:
        """``targets`` when it is one plain string (not ``filter:`` values)."""
        return self.targets if isinstance(self.targets, str) else None

    @property
    def ranks_first(self) -> bool:
        """Whether the selection mode ranks every matrix before any is merged."""
        return self.select != "threshold"

    def to_json(self) -> dict[str, Any]:
        """The report's ``settings``: every parameter in table order, then dtype and seed."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> Settings:
        """Settings from a report's ``settings`` (unknown keys ignored, missing ones default)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in document.items() if key in names})


def _table() -> tuple[Parameter, ...]:
    kinds = {"float": float, "int": int, "str": str}
    return tuple(
        Parameter(
            name=f.name, kind=kinds[str(f.type)], default=f.default, **f.metadata["parameter"]
        )
        for f in dataclasses.fields(Settings)
        if "parameter" in f.metadata
    )


SHARED: tuple[Parameter, ...] = _table()
"""The shared parameters (one value per tensor, or per merge), in the order users see them."""

ROLE = Parameter(
    name="role",
    kind=str,
    default=None,
    description="unaligned, finetuned or safety",
    expects=f"one of {', '.join(ROLES)}",
    choices=ROLES,
    per_model=True,
    gradient=False,
)
"""The per-model parameter: which role the model plays."""

PARAMETERS: tuple[Parameter, ...] = (ROLE, *SHARED)
BY_NAME: dict[str, Parameter] = {p.name: p for p in PARAMETERS}


def without_effect(values: Configured, written: set[str]) -> list[str]:
    """One warning per parameter the user wrote that has no effect with the other values (the
    ``applies`` column of the table)."""
    return [
        f"parameters.{p.name}: has no effect here ({p.name} applies only {p.applies_when}); "
        "remove it, or change the setting it depends on"
        for p in SHARED
        if p.name in written and p.applies is not None and not p.applies(values)
    ]
