"""Norms and inner products of dense and factored updates against the dense float64 oracle."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mergekit_safemerge.core.updates import (
    LoraFactors,
    dense,
    frobenius_norm,
    inner_product,
    squared_norm,
    update_cosine,
)


def _updates(seed: int):
    g = torch.Generator().manual_seed(seed)
    first = LoraFactors(torch.randn(24, 3, generator=g), torch.randn(3, 40, generator=g), 2.0)
    second = LoraFactors(torch.randn(24, 5, generator=g), torch.randn(5, 40, generator=g), 0.5)
    return [first, second, torch.randn(24, 40, generator=g)]


@pytest.mark.parametrize("seed", range(3))
def test_every_pairing_matches_the_dense_oracle(seed):
    updates = _updates(seed)
    for x, y in itertools.product(updates, repeat=2):
        oracle = float((dense(x).double() * dense(y).double()).sum())
        assert float(inner_product(x, y)) == pytest.approx(oracle, rel=1e-4, abs=1e-3)
    for x in updates:
        assert float(squared_norm(x)) == pytest.approx(
            float(dense(x).double().norm() ** 2), rel=1e-4
        )


def test_cosine_and_norm():
    x = torch.tensor([[3.0, 4.0]])
    assert frobenius_norm(x) == pytest.approx(5.0)
    assert update_cosine(x, 2 * x, 5.0, 10.0) == pytest.approx(1.0)
    assert update_cosine(x, -x, 5.0, 5.0) == pytest.approx(-1.0)
    assert update_cosine(x, torch.zeros_like(x), 5.0, 0.0) == 0.0
    assert math.isnan(frobenius_norm(torch.tensor([[float("nan"), 1.0]])))


def test_dense_of_factors_is_left_times_right():
    left, right = torch.randn(6, 2), torch.randn(2, 7)
    factors = LoraFactors(left, right)
    assert factors.shape == (6, 7) and factors.rank == 2
    assert torch.allclose(factors.dense(), left @ right)
