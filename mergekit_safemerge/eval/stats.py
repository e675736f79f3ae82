"""Interval estimates of rates, from scipy.

A rate ``k / n`` (harmfulness, accuracy, over-refusal) carries the Wilson score interval that
``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")`` computes.
"""

from __future__ import annotations

CONFIDENCE = 0.95


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of ``p = successes / n``; ``(0, 1)`` when ``n = 0`` (no data)."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n]; got {successes} of {n}")
    from scipy.stats import binomtest

    interval = binomtest(int(successes), int(n)).proportion_ci(
        confidence_level=confidence, method="wilson"
    )
    return float(interval.low), float(interval.high)
