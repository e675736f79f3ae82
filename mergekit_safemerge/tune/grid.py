"""The grid of ``safemerge tune``: which matrices each threshold merges, each selection once.

``rho`` is measured once. A threshold ``tau`` merges the changed matrices with ``rho < tau``
(:func:`~mergekit_safemerge.core.decide.threshold_selects`); thresholds that merge the same
matrices are one selection, shown with their range ``(low, high]``. The default grid is every
distinct cut of the measured ``rho`` values: each count of merged matrices once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mergekit_safemerge.core.decide import threshold_selects


@dataclass(frozen=True)
class Selection:
    """The matrices one range of thresholds merges: any ``tau`` in ``(low, high]`` merges
    exactly ``names``; ``threshold`` is the value written into ``chosen.yml``."""

    names: frozenset[str]
    low: float
    high: float
    threshold: float

    @property
    def count(self) -> int:
        return len(self.names)

    def describe(self) -> str:
        return f"({self.low:.4g}, {self.high:.4g}]"


def _inside(low: float, high: float) -> float:
    """A short decimal strictly above ``low`` and at most ``high`` (the midpoint if none)."""
    for digits in range(2, 8):
        value = round((low + high) / 2, digits)
        if low < value <= high:
            return value
    return high


def cuts(
    rhos: Mapping[str, float],
    thresholds: Sequence[float] | None = None,
    max_points: int | None = None,
) -> list[Selection]:
    """The distinct non-empty selections of ``thresholds`` (default: every cut of ``rhos``),
    in order of count; at most ``max_points``, evenly spread over the counts."""
    values = sorted(set(rhos.values()))
    if thresholds is None:
        # a threshold just above the j-th lowest rho merges the j lowest
        uppers = [*values[1:], 1.0]
        candidates = [_inside(v, u) if u > v else u for v, u in zip(values, uppers, strict=True)]
    else:
        candidates = sorted(set(thresholds))
    selections: dict[frozenset[str], float] = {}
    for tau in candidates:
        names = frozenset(n for n, rho in rhos.items() if threshold_selects(rho, tau))
        if names and names not in selections:
            selections[names] = tau
    found = []
    for names, tau in selections.items():
        above = [r for n, r in rhos.items() if n not in names]
        found.append(
            Selection(
                names,
                low=max(rhos[n] for n in names),
                high=min(above) if above else 1.0,
                threshold=tau,
            )
        )
    found.sort(key=lambda s: (s.count, s.threshold))
    if max_points is not None and len(found) > max_points:
        step = (len(found) - 1) / max(max_points - 1, 1)
        found = [found[round(i * step)] for i in range(max_points)]
    return found
