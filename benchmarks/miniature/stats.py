"""Interval estimates for the miniature benchmark.

Single rates use the Wilson score interval (:func:`mergekit_safemerge.evaluate.wilson_interval`).
The random-layer control is a mean over seeds, whose uncertainty has two sources (which layers a
seed draws, which prompts were sampled), so its interval is a two-level bootstrap.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mergekit_safemerge.eval import wilson_interval

__all__ = ["bootstrap_mean_interval", "rank_correlation", "wilson_interval"]


def bootstrap_mean_interval(
    outcomes: Sequence[Sequence[bool]],
    *,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(mean, low, high)`` of the mean rate over runs ``r`` of 0/1 outcomes ``x_{r,i}``.

    ``mean = (1/R) sum_r mean_i x_{r,i}``. Each resample draws ``R`` runs with replacement and,
    inside each drawn run, its ``n_r`` outcomes with replacement; the interval is the
    ``(1 - level)/2`` and ``(1 + level)/2`` percentiles of the resampled means.
    """
    runs = [np.asarray(run, dtype=float) for run in outcomes]
    if not runs or any(run.size == 0 for run in runs):
        raise ValueError("bootstrap_mean_interval needs at least one non-empty run")
    rng = np.random.default_rng(seed)
    mean = float(np.mean([run.mean() for run in runs]))
    picks = rng.integers(0, len(runs), size=(resamples, len(runs)))
    # inner level: a binomial redraw of each run's rate is the same as resampling its outcomes
    rates = np.array([run.mean() for run in runs])
    sizes = np.array([run.size for run in runs])
    inner = rng.binomial(sizes[picks], rates[picks]) / sizes[picks]
    means = inner.mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return mean, float(low), float(high)


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None for fewer than 3 points or
    a constant variable."""
    if len(x) != len(y):
        raise ValueError("rank_correlation needs two sequences of one length")
    if len(x) < 3:
        return None

    def ranks(values: Sequence[float]) -> np.ndarray:
        values = np.asarray(values, dtype=float)
        order = np.argsort(values, kind="stable")
        result = np.empty(len(values))
        result[order] = np.arange(len(values), dtype=float)
        for v in np.unique(values):  # average ranks of ties
            tied = values == v
            result[tied] = result[tied].mean()
        return result

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])
