"""Which candidate matrices are merged. Pure Python, no tensors."""

from __future__ import annotations


def threshold_selects(rho: float, threshold: float) -> bool:
    """The paper's decision: merge when ``rho < threshold`` (strict).

    ``threshold = 0`` therefore merges nothing and ``threshold = 1`` merges every changed
    matrix whose ``rho`` is below 1.
    """
    return rho < threshold
