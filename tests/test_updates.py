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


# ---------------------------------------------------------------- the blocked passes
# 1536 x 1024 = 1.5M entries: two row blocks of BLOCK_ELEMENTS (2^20) entries, the second short.
BLOCKED = (1536, 1024)


def _pair(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    base = 0.02 * torch.randn(*BLOCKED, generator=generator)
    other = base + 0.002 * torch.randn(*BLOCKED, generator=generator)
    return base.to(dtype), other.to(dtype)


def test_row_blocks_cover_every_row_once():
    from mergekit_safemerge.core.updates import row_blocks

    blocks = row_blocks(BLOCKED)
    assert len(blocks) == 2 and blocks[0] == slice(0, 1024) and blocks[-1] == slice(1024, 1536)
    assert row_blocks((3, 10), elements=4) == [slice(0, 1), slice(1, 2), slice(2, 3)]
    assert row_blocks((0, 10)) == [] and row_blocks((7,)) == [slice(None)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_difference_is_the_exact_difference_and_its_squared_norm(dtype):
    from mergekit_safemerge.core.updates import difference

    first, second = _pair(dtype)
    got, squared = difference(first, second, with_squared_norm=True)
    reference = first.double() - second.double()
    assert got.dtype == torch.float32
    if dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(got.double(), reference)  # two 16-bit numbers: exact in float32
        assert not torch.equal(torch.sub(first, second).double(), reference)  # 16-bit rounds
    else:
        assert torch.equal(got, reference.float())  # rounded once
    expected = float((reference.float().double() ** 2).sum())
    assert math.isclose(float(squared), expected, rel_tol=1e-6)
    assert difference(first, second)[1] is None


def test_dense_inner_product_sums_by_blocks_in_float64():
    from mergekit_safemerge.core.updates import dense_inner_product

    first, second = _pair(torch.float32, seed=3)
    value = dense_inner_product(first, second)
    assert value.dtype == torch.float64
    assert math.isclose(float(value), float((first.double() * second.double()).sum()), rel_tol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_plus_is_the_weight_plus_every_update_rounded_once(dtype):
    from mergekit_safemerge.core.updates import weight_plus

    generator = torch.Generator().manual_seed(5)
    weight, dense_update = _pair(torch.bfloat16, seed=5)
    dense_update = dense_update.float() - weight.float()
    factors = LoraFactors(
        torch.randn(BLOCKED[0], 3, generator=generator),
        torch.randn(3, BLOCKED[1], generator=generator),
    )
    other = LoraFactors(
        torch.randn(BLOCKED[0], 2, generator=generator),
        torch.randn(2, BLOCKED[1], generator=generator),
    )
    terms = [(dense_update, 0.3), (factors, 0.5), (other, 0.2), (LoraFactors.empty(weight), 1.0)]
    got = weight_plus(weight, terms, dtype)
    reference = weight.double() + 0.3 * dense_update.double()
    reference += 0.5 * factors.dense().double() + 0.2 * other.dense().double()
    assert got.dtype == dtype and got.shape == weight.shape
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(got.double(), reference, rtol=tolerance, atol=tolerance * 1e-2)
    if dtype != torch.float32:  # one rounding, from the float32 result
        assert torch.equal(got, weight_plus(weight, terms).to(dtype))
    assert torch.equal(weight_plus(weight, [(factors, 0.0)]), weight.float())
