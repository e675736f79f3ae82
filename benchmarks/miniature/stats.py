"""Interval estimates for the miniature benchmark.

Library functions where one does the job: Wilson intervals for single rates
(:func:`mergekit_safemerge.eval.wilson_interval`, scipy's ``binomtest``), paired bootstrap
intervals of differences between two models on the same prompts (``scipy.stats.bootstrap``)
and Spearman's rank correlation (``scipy.stats.spearmanr``).

Written here because no library does it: :func:`two_level_bootstrap`, the interval of a mean over
several runs (random-layer seeds) that share one prompt set, optionally minus a reference model
on the same prompts. Its uncertainty has two sources, which runs (seeds) were drawn and which
prompts were sampled, so each resample draws both.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats as scipy_stats

from mergekit_safemerge.eval import wilson_interval

__all__ = [
    "paired_difference_interval",
    "paired_ratio_interval",
    "spearman",
    "two_level_bootstrap",
    "wilson_interval",
]

LEVEL = 0.95


def two_level_bootstrap(
    runs: Sequence[Sequence[bool]],
    reference: Sequence[bool] | None = None,
    *,
    resamples: int = 2000,
    level: float = LEVEL,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(estimate, low, high)`` for ``T = (1/R) sum_r mean_i x_{r,i} - mean_i y_i`` (``y``: the
    optional ``reference``, else 0), over runs ``r = 1..R`` of 0/1 outcomes on the same ``n``
    prompts ``i``.

    Each resample draws ``R`` runs with replacement and, independently, ``n`` prompt indices with
    replacement, shared by every run and the reference (the prompts are the same, so the
    comparison stays paired); the interval is the ``(1 - level)/2`` and ``(1 + level)/2``
    percentiles of the resampled ``T``. With one run and no reference it is the percentile
    bootstrap of a mean (what ``scipy.stats.bootstrap(method="percentile")`` computes).
    """
    x = np.asarray(runs, dtype=float)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError("two_level_bootstrap needs one or more runs over the same prompts")
    y = np.zeros(x.shape[1]) if reference is None else np.asarray(reference, dtype=float)
    if y.shape != (x.shape[1],):
        raise ValueError("the reference must have one outcome per prompt of the runs")
    rng = np.random.default_rng(seed)
    estimate = float(x.mean() - y.mean())
    run_picks = rng.integers(0, x.shape[0], size=(resamples, x.shape[0]))
    prompt_picks = rng.integers(0, x.shape[1], size=(resamples, x.shape[1]))
    per_run = x[:, prompt_picks].mean(axis=2)  # (R, resamples): each run on each prompt resample
    columns = np.arange(resamples)[:, None]
    statistic = per_run[run_picks, columns].mean(axis=1) - y[prompt_picks].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(statistic, [tail, 1.0 - tail])
    return estimate, float(low), float(high)


def _paired_bootstrap(a, b, statistic, resamples: int, level: float, seed: int):
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.size == 0:
        raise ValueError("a paired interval needs two outcome lists of one length")
    estimate = float(statistic(x, y))
    if np.ptp(x) == 0 and np.ptp(y) == 0:
        return estimate, estimate, estimate  # every resample gives the same value
    result = scipy_stats.bootstrap(
        (x, y),
        statistic,
        paired=True,
        vectorized=True,
        n_resamples=resamples,
        confidence_level=level,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    interval = result.confidence_interval
    return estimate, float(interval.low), float(interval.high)


def paired_difference_interval(
    a: Sequence[bool],
    b: Sequence[bool],
    *,
    resamples: int = 2000,
    level: float = LEVEL,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(mean(a) - mean(b), low, high)``: percentile bootstrap over prompts of two models'
    outcomes on the same prompts (``scipy.stats.bootstrap`` with ``paired=True``)."""

    def difference(u, v, axis=-1):
        return u.mean(axis=axis) - v.mean(axis=axis)

    return _paired_bootstrap(a, b, difference, resamples, level, seed)


def paired_ratio_interval(
    a: Sequence[bool],
    b: Sequence[bool],
    *,
    resamples: int = 2000,
    level: float = LEVEL,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(mean(a) / mean(b), low, high)`` on the same prompts, as
    :func:`paired_difference_interval` (``mean(b)`` must be positive)."""

    def ratio(u, v, axis=-1):
        with np.errstate(divide="ignore", invalid="ignore"):
            return u.mean(axis=axis) / v.mean(axis=axis)

    if not np.any(np.asarray(b, dtype=float)):
        raise ValueError("paired_ratio_interval needs a denominator with a positive mean")
    return _paired_bootstrap(a, b, ratio, resamples, level, seed)


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (``scipy.stats.spearmanr``, average ranks for ties); None
    where it is undefined (fewer than 3 points, or a constant variable)."""
    if len(x) != len(y):
        raise ValueError("spearman needs two sequences of one length")
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy_stats.ConstantInputWarning)
        value = scipy_stats.spearmanr(x, y).statistic
    return None if np.isnan(value) else float(value)
