"""The four roles of SafeMERGE and the one function that assigns them. Pure Python.

``base_model`` is the aligned model; every other model names its role with the per-model
parameter ``role``; the fine-tuned and safety roles may instead come from LoRA adapters
(``finetuned_adapter`` / ``safety_adapter``). :func:`assign_roles` checks and resolves this
for the configuration (before any tensor is read) and for each tensor group at merge time, with
the same messages.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar, get_args

from mergekit_safemerge.errors import SafeMergeError

Role = Literal["unaligned", "finetuned", "safety"]
ROLES: tuple[str, ...] = get_args(Role)
"""The roles given to models besides ``base_model``, in the order reports list them."""

ALIGNED = "aligned"
ALL_ROLES: tuple[str, ...] = (ALIGNED, *ROLES)

ADAPTER_PARAMETERS = {"finetuned": "finetuned_adapter", "safety": "safety_adapter"}
"""Roles that may be given as a LoRA adapter on the aligned model, and their parameter."""

MISSING = object()
"""The ``role`` of a claim whose model sets no role parameter."""

Model = TypeVar("Model", bound=Hashable)


@dataclass(frozen=True)
class RoleClaim(Generic[Model]):
    """One model entry: where it is written (for messages), the model, the role it claims."""

    where: str
    model: Model
    role: object = MISSING


def assign_roles(
    base: Model | None,
    claims: Iterable[RoleClaim[Model]],
    adapter_roles: Iterable[str] = (),
) -> dict[str, Model]:
    """``{"aligned": base, role: model, ...}`` for every role not given by an adapter.

    Each model besides ``base`` claims exactly one role and each role is claimed by exactly one
    model; a role given by an adapter is claimed by no model. Entries of ``base`` itself (mergekit
    lists it among the models too) must not claim a role.
    """
    if base is None:
        raise SafeMergeError("base_model: safemerge needs the aligned model as base_model")
    adapter_roles = frozenset(adapter_roles)
    claims = list(claims)
    needed = [role for role in ROLES if role not in adapter_roles]
    others = {claim.model for claim in claims if claim.model != base}
    if len(others) != len(needed):
        given = f" ({', '.join(sorted(adapter_roles))} from adapters)" if adapter_roles else ""
        raise SafeMergeError(
            f"models: safemerge needs exactly {len(needed)} models besides base_model, one per "
            f"role ({', '.join(needed)}){given}; got {len(others)}"
        )
    found: dict[str, Model] = {ALIGNED: base}
    for claim in claims:
        where, model, role = claim.where, claim.model, claim.role
        if model == base:
            if role is not MISSING:
                raise SafeMergeError(
                    f"{where}: this is base_model, the aligned model; it takes no role"
                )
            continue
        if role is MISSING:
            raise SafeMergeError(f"{where}: parameters.role is missing (one of {', '.join(ROLES)})")
        if not isinstance(role, str) or role not in ROLES:
            raise SafeMergeError(
                f"{where}: parameters.role {role!r} is not one of {', '.join(ROLES)}"
            )
        if role in adapter_roles:
            raise SafeMergeError(
                f"{where}: role {role!r} is also given by parameters.{ADAPTER_PARAMETERS[role]}; "
                "use one"
            )
        if role in found and found[role] != model:
            raise SafeMergeError(f"{where}: role {role!r} is already given to model {found[role]}")
        for other_role, other in found.items():
            if other == model and other_role != role:
                raise SafeMergeError(f"{where}: this model already has role {other_role!r}")
        found[role] = model
    missing = [role for role in needed if role not in found]
    if missing:
        raise SafeMergeError(
            f"models: no model has role {missing[0]!r} (each of {', '.join(ROLES)} exactly once)"
        )
    return found
