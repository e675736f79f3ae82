"""alignment_cosine against the dense-C oracle, and the identities the fast formula relies on."""

from __future__ import annotations

import pytest
import torch
from helpers import dense_projection, oracle_rho

from mergekit_safemerge.criterion import (
    alignment_cosine,
    alignment_projection,
    frobenius_norm,
    update_cosine,
)

SHAPES = [(48, 48), (16, 64), (64, 16), (32, 96), (80, 24)]  # square, GQA-like out<in, out>in


def _pair(shape, seed, rank=None):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(shape, generator=g)
    if rank is None:
        d = torch.randn(shape, generator=g)
    else:
        d = torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)
    # make rho vary: mix in a part of D along V's top directions
    u = torch.linalg.svd(v, full_matrices=False).U[:, :2]
    d = d + (seed % 5) * u @ torch.randn(2, shape[1], generator=g)
    return d, v


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", [None, 1, 4])
@pytest.mark.parametrize("seed", range(4))
def test_matches_dense_oracle_float32(shape, rank, seed):
    d, v = _pair(shape, seed, rank)
    assert alignment_cosine(d, v) == pytest.approx(oracle_rho(d, v), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_low_precision_inputs_are_computed_in_float32(dtype, shape):
    d, v = _pair(shape, 7, rank=4)
    d, v = d.to(dtype), v.to(dtype)
    # the oracle sees the same rounded inputs, so only the arithmetic differs
    assert alignment_cosine(d, v) == pytest.approx(oracle_rho(d.float(), v.float()), rel=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_gram_identities(shape):
    d, v = _pair(shape, 3)
    d64, v64 = d.double(), v.double()
    c = dense_projection(v64)
    norm_v = torch.linalg.norm(v64)
    inner = (c @ d64 * d64).sum()
    assert float(inner) == pytest.approx(
        float(torch.linalg.norm(v64.T @ d64) ** 2 / norm_v), rel=1e-10
    )
    assert float(torch.linalg.norm(c @ d64)) == pytest.approx(
        float(torch.linalg.norm(v64 @ (v64.T @ d64)) / norm_v), rel=1e-10
    )
    # the projection we form is ||V|| C D, in either product order
    projected = alignment_projection(d, v).double()
    assert torch.allclose(projected, norm_v * c @ d64, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("shape", SHAPES)
def test_invariances(shape):
    d, v = _pair(shape, 11, rank=3)
    rho = alignment_cosine(d, v)
    assert 0.0 <= rho <= 1.0
    assert alignment_cosine(-d, v) == pytest.approx(rho, rel=1e-6)
    assert alignment_cosine(123.0 * d, v) == pytest.approx(rho, rel=1e-5)
    assert alignment_cosine(d, 1e-3 * v) == pytest.approx(rho, rel=1e-5)


def test_not_a_projector():
    _, v = _pair((24, 24), 5)
    c = dense_projection(v)
    assert not torch.allclose(c @ c, c, atol=1e-3)


def test_degenerate_cases_are_zero():
    d, v = _pair((16, 32), 2)
    assert alignment_cosine(d, torch.zeros_like(v)) == 0.0
    assert alignment_cosine(torch.zeros_like(d), v) == 0.0
    # D orthogonal to the column space of V: C D = 0
    u = torch.linalg.svd(v[:, :4] @ torch.randn(4, 32), full_matrices=True).U
    low_rank_v = u[:, :4] @ torch.randn(4, 32)
    orthogonal_d = u[:, 4:] @ torch.randn(12, 32)
    assert alignment_cosine(orthogonal_d, low_rank_v) == pytest.approx(0.0, abs=1e-5)


def test_d_inside_v_gives_one_for_rank_one_v():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(20, 1, generator=g) @ torch.randn(1, 30, generator=g)
    d = 0.3 * v
    assert alignment_cosine(d, v) == pytest.approx(1.0, abs=1e-6)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="one shape"):
        alignment_cosine(torch.ones(4, 5), torch.ones(5, 4))


def test_norm_and_update_cosine():
    x = torch.tensor([[3.0, 4.0]])
    assert frobenius_norm(x) == pytest.approx(5.0)
    assert update_cosine(x, 2 * x) == pytest.approx(1.0)
    assert update_cosine(x, -x) == pytest.approx(-1.0)
    assert update_cosine(x, torch.zeros_like(x)) == 0.0
