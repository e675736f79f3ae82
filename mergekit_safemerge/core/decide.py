"""Which candidate matrices are merged: the one place a matrix is declared merged or kept.

Pure Python, no tensors. ``threshold`` is the paper's rule and decides each matrix on its own.
The ranking modes need every ``rho`` first and rank the changed candidates (``D != 0``):

* ``lowest_k``:  the ``k`` lowest ``rho`` (SafeLoRA's "number" mode);
* ``highest_k``: the ``k`` highest ``rho`` (the inverse ranking, a control);
* ``random_k``:  ``k`` matrices uniformly at random with ``seed`` (a control at a matched count);
* ``all``:       every changed candidate (the RESTA-like "merge everything" baseline);
* ``none``:      nothing (the fine-tuned model, through the same pipeline).

A merge with a ranking mode measures first (:func:`rank_matrices` over all ``rho``), then
decides each matrix with :func:`decide`; the scan decides its records with the same function
(:func:`redecide`).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal, get_args

from mergekit_safemerge.core.records import KEPT, MERGED, MatrixRecord
from mergekit_safemerge.errors import SafeMergeError

SelectMode = Literal["threshold", "lowest_k", "random_k", "highest_k", "all", "none"]
SELECT_MODES: tuple[str, ...] = get_args(SelectMode)
COUNT_MODES = frozenset({"lowest_k", "random_k", "highest_k"})


@dataclass(frozen=True)
class Decision:
    merged: bool
    reason: str


def threshold_selects(rho: float, threshold: float) -> bool:
    """The paper's decision: merge when ``rho < threshold`` (strict).

    ``threshold = 0`` therefore merges nothing and ``threshold = 1`` merges every changed
    matrix whose ``rho`` is below 1.
    """
    return rho < threshold


def decide(
    name: str,
    rho: float | None,
    *,
    select: str,
    threshold: float,
    ranking: Mapping[str, str] | None = None,
    alignment_zero: bool = False,
) -> Decision:
    """Merged or kept, with the reason, for one candidate matrix.

    ``rho = None`` (``D = 0``) is always kept. ``select = "threshold"`` merges when
    ``rho < threshold``; a ranking mode merges the names in ``ranking`` (name -> reason, from
    :func:`rank_matrices` over the whole model).
    """
    if rho is None:
        return Decision(False, "D = 0: the fine-tune left this matrix unchanged")
    prefix = (
        "V = 0 (alignment left this matrix unchanged), rho = 0 by definition; "
        if alignment_zero
        else ""
    )
    if select == "threshold":
        merged = threshold_selects(rho, threshold)
        relation = "<" if merged else ">="
        return Decision(merged, f"{prefix}rho {rho:.4f} {relation} threshold {threshold:g}")
    if ranking is None:
        raise SafeMergeError(
            f"parameters.select {select!r} ranks all matrices before merging and needs "
            "SafeMERGE's run_merge integration (stock mergekit-yaml with the package installed, "
            "or mergekit_safemerge.register() before calling run_merge)"
        )
    reason = ranking.get(name)
    why = reason if reason is not None else f"{select}: not selected"
    return Decision(reason is not None, f"{prefix}rho {rho:.4f}; {why}")


def rank_matrices(
    rhos: Mapping[str, float], mode: str, *, k: int = 0, seed: int = 0
) -> dict[str, str]:
    """The names a ranking ``mode`` selects among ``rhos`` (name -> rho), each with its reason.

    Ties in ``rho`` are broken by name, so every mode is deterministic; ``random_k`` samples
    from the names in sorted order with ``random.Random(seed)``, so a seed gives the same set on
    any machine. A count mode with ``k`` larger than the number of changed matrices is an error
    rather than a silent "all".
    """
    names = sorted(rhos)
    if mode == "all":
        return {n: "select all: every changed matrix" for n in names}
    if mode == "none":
        return {}
    if mode not in COUNT_MODES:
        raise SafeMergeError(
            f"parameters.select {mode!r} is not a ranking mode (one of all, none, "
            f"{', '.join(sorted(COUNT_MODES))})"
        )
    if not 1 <= k <= len(names):
        raise SafeMergeError(
            f"parameters.k = {k} for select {mode}: need 1 <= k <= {len(names)}, "
            "the number of matrices the fine-tune changed"
        )
    if mode == "random_k":
        chosen = random.Random(seed).sample(names, k)
        return {n: f"random_k: drawn with seed {seed} (k = {k})" for n in sorted(chosen)}
    ranked = sorted(names, key=lambda n: (rhos[n], n), reverse=(mode == "highest_k"))
    order = "lowest" if mode == "lowest_k" else "highest"
    return {
        n: f"{mode}: rank {i + 1} of {len(names)}, {order} rho first (k = {k})"
        for i, n in enumerate(ranked[:k])
    }


def changed_rhos(records: Sequence[MatrixRecord]) -> dict[str, float]:
    """name -> rho for the matrices the fine-tune changed (``D != 0``)."""
    return {r.name: r.rho for r in records if r.rho is not None}


def redecide(
    records: Sequence[MatrixRecord], *, select: str, k: int = 0, seed: int = 0
) -> list[MatrixRecord]:
    """Records measured with threshold decisions, decided again with the mode ``select``."""
    if select == "threshold":
        return list(records)
    ranking = rank_matrices(changed_rhos(records), select, k=k, seed=seed)
    decided = []
    for record in records:
        decision = decide(
            record.name,
            record.rho,
            select=select,
            threshold=record.threshold,
            ranking=ranking,
            alignment_zero=record.alignment_norm == 0.0,
        )
        decided.append(
            replace(
                record,
                decision=MERGED if decision.merged else KEPT,
                reason=decision.reason,
                select=select,
            )
        )
    return decided


def threshold_sweep(
    rhos: Mapping[str, float], modules: Mapping[str, str], thresholds: Sequence[float]
) -> list[dict]:
    """For each threshold, how many matrices ``rho < threshold`` merges, in total and per module.

    ``modules`` maps a tensor name to its module type (``q_proj``, ...).
    """
    module_names = sorted(set(modules[n] for n in rhos))
    rows = []
    for tau in sorted(set(thresholds)):
        merged = [n for n in rhos if threshold_selects(rhos[n], tau)]
        per_module = {m: sum(modules[n] == m for n in merged) for m in module_names}
        rows.append({"threshold": tau, "merged": len(merged), "by_module": per_module})
    return rows


def sweep_thresholds(rhos: Mapping[str, float], step: float = 0.05) -> list[float]:
    """``0, step, ..., 1`` plus every distinct rho (where the count changes)."""
    grid = [round(i * step, 10) for i in range(int(round(1 / step)) + 1)]
    return sorted(set(grid) | set(rhos.values()))
