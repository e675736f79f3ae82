"""Which candidate matrices are merged. Pure Python, no tensors.

``threshold`` is the paper's rule and decides each matrix on its own. The other modes rank all
changed candidates (``D != 0``) by ``rho`` and so need every ``rho`` first:

* ``lowest_k``:  the ``k`` lowest ``rho`` (SafeLoRA's "number" mode);
* ``highest_k``: the ``k`` highest ``rho`` (the inverse ranking, a control);
* ``random_k``:  ``k`` matrices uniformly at random with ``seed`` (a control at a matched count);
* ``all``:       every changed candidate (the RESTA-like "merge everything" baseline);
* ``none``:      nothing (the fine-tuned model, through the same pipeline).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Literal

from mergekit_safemerge.errors import SafeMergeError

SelectMode = Literal["threshold", "lowest_k", "random_k", "highest_k", "all", "none"]
SELECT_MODES: tuple[str, ...] = ("threshold", "lowest_k", "random_k", "highest_k", "all", "none")
COUNT_MODES = frozenset({"lowest_k", "random_k", "highest_k"})
RANKING_MODES = frozenset(SELECT_MODES) - {"threshold"}


def threshold_selects(rho: float, threshold: float) -> bool:
    """The paper's decision: merge when ``rho < threshold`` (strict).

    ``threshold = 0`` therefore merges nothing and ``threshold = 1`` merges every changed
    matrix whose ``rho`` is below 1.
    """
    return rho < threshold


def select_matrices(
    rhos: Mapping[str, float], mode: str, *, k: int = 0, seed: int = 0, threshold: float = 0.0
) -> dict[str, str]:
    """The selected tensor names, each with the reason, for ``rhos`` = name -> rho.

    Ties in ``rho`` are broken by name, so every mode is deterministic; ``random_k`` samples from
    the names in sorted order with ``random.Random(seed)``, so a seed gives the same set on any
    machine. A count mode with ``k`` larger than the number of changed matrices is an error
    rather than a silent "all".
    """
    names = sorted(rhos)
    if mode == "threshold":
        return {
            n: f"rho {rhos[n]:.4f} < threshold {threshold:g}"
            for n in names
            if threshold_selects(rhos[n], threshold)
        }
    if mode == "all":
        return {n: "select all: every changed matrix" for n in names}
    if mode == "none":
        return {}
    if mode not in COUNT_MODES:
        raise SafeMergeError(f"parameters.select {mode!r} is not one of {', '.join(SELECT_MODES)}")
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


def threshold_sweep(
    rhos: Mapping[str, float], modules: Mapping[str, str], thresholds: list[float]
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
