"""alignment_cosine against the dense-C oracle, and the identities the fast formula relies on."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import dense_projection, oracle_rho

from mergekit_safemerge.core.criterion import (
    alignment_cosine,
    alignment_criterion,
    alignment_projection,
    factored_alignment_cosine,
    low_rank_factors,
    may_be_exactly_low_rank,
)
from mergekit_safemerge.core.updates import LoraFactors

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


def test_factors_take_the_factored_route():
    g = torch.Generator().manual_seed(5)
    left, right = torch.randn(40, 3, generator=g), torch.randn(3, 56, generator=g)
    v = torch.randn(40, 56, generator=g)
    criterion = alignment_criterion(LoraFactors(left, right), v)
    assert criterion.path == "factored" and criterion.rank == 3
    assert criterion.rho == pytest.approx(oracle_rho(left @ right, v), rel=1e-5)


def test_known_squares_give_the_same_rho():
    d, v = _pair((32, 96), 3)
    plain = alignment_criterion(d, v, detect_low_rank=False).rho
    given = alignment_criterion(
        d, v, detect_low_rank=False, delta_sq=(d * d).sum(), alignment_sq=(v * v).sum()
    ).rho
    assert given == pytest.approx(plain, rel=1e-6)


# ------------------------------------------------------------------ the low-rank path


@pytest.mark.parametrize("seed", range(40))
def test_low_rank_path_matches_dense_oracle(seed):
    g = torch.Generator().manual_seed(1000 + seed)
    out_f = int(torch.randint(64, 200, (1,), generator=g))
    in_f = int(torch.randint(64, 200, (1,), generator=g))
    rank = int(torch.randint(1, 12, (1,), generator=g))
    v = torch.randn(out_f, in_f, generator=g)
    left = torch.randn(out_f, rank, generator=g)
    if seed % 3 == 0:  # lean D towards V's top directions so rho spreads over [0, 1]
        left = left + 3 * torch.linalg.svd(v, full_matrices=False).U[:, :rank]
    d = left @ torch.randn(rank, in_f, generator=g)
    criterion = alignment_criterion(d, v)
    assert criterion.path == "low-rank" and rank <= criterion.rank <= 16
    assert criterion.rho == pytest.approx(oracle_rho(d, v), rel=1e-5, abs=1e-6)
    assert factored_alignment_cosine(left, torch.linalg.lstsq(left, d).solution, v
                                     ) == pytest.approx(oracle_rho(d, v), rel=1e-4)  # fmt: skip


@pytest.mark.parametrize("rank", [20, 40])
def test_larger_ranks_double_the_sketch(rank):
    g = torch.Generator().manual_seed(rank)
    v = torch.randn(256, 320, generator=g)
    d = torch.randn(256, rank, generator=g) @ torch.randn(rank, 320, generator=g)
    criterion = alignment_criterion(d, v)
    assert criterion.path == "low-rank" and criterion.rank >= rank
    assert criterion.rho == pytest.approx(oracle_rho(d, v), rel=1e-5)


def test_full_rank_and_rounded_updates_take_the_dense_path():
    g = torch.Generator().manual_seed(3)
    v = torch.randn(128, 128, generator=g)
    assert low_rank_factors(torch.randn(128, 128, generator=g)) is None
    # a LoRA update recovered from bfloat16 weights is not low rank any more: rounding noise
    w = 0.02 * torch.randn(128, 128, generator=g)
    lora = 1e-3 * torch.randn(128, 8, generator=g) @ torch.randn(8, 128, generator=g)
    d = (w + lora).bfloat16().float() - w.bfloat16().float()
    criterion = alignment_criterion(d, v)
    assert criterion.path == "dense"
    assert criterion.rho == pytest.approx(oracle_rho(d, v), rel=1e-5)


def test_precision_gate_skips_only_what_cannot_be_low_rank():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(128, 128, generator=g)
    assert not may_be_exactly_low_rank(w.bfloat16())
    assert not may_be_exactly_low_rank(w.half())
    assert not may_be_exactly_low_rank(w.bfloat16().float())  # float32 holding bfloat16 values
    assert may_be_exactly_low_rank(w)
    # the gate only ever declines where the detection fails anyway
    lora = 1e-2 * torch.randn(128, 8, generator=g) @ torch.randn(8, 128, generator=g)
    d = (w + lora).bfloat16().float() - w.bfloat16().float()
    assert low_rank_factors(d) is None
    exact = (w + lora) - w
    assert low_rank_factors(exact) is not None


def test_small_matrices_stay_dense():
    d, v = _pair((16, 64), 1, rank=2)
    assert low_rank_factors(d) is None
    assert alignment_criterion(d, v).path == "dense"


def test_detection_leaves_the_global_rng_alone():
    d, v = _pair((96, 96), 2, rank=4)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    alignment_criterion(d, v)
    assert torch.equal(torch.get_rng_state(), state)


def test_factored_degenerate_cases():
    g = torch.Generator().manual_seed(9)
    left, right = torch.randn(80, 3, generator=g), torch.randn(3, 90, generator=g)
    assert factored_alignment_cosine(left, right, torch.zeros(80, 90)) == 0.0
    assert factored_alignment_cosine(torch.zeros(80, 3), right, torch.randn(80, 90)) == 0.0
    with pytest.raises(ValueError, match="do not make"):
        factored_alignment_cosine(left, right, torch.zeros(90, 80))


@pytest.mark.parametrize("shape", [(600, 700), (513, 513), (64, 90), (1030, 1030)])
def test_gram_product_by_blocks_is_the_full_product(shape):
    from mergekit_safemerge.core.criterion import gram_product

    g = torch.Generator().manual_seed(shape[0])
    x, y = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    expected = (x.double() @ x.double().T) @ y.double()
    got = gram_product(x, y).double()
    assert float((got - expected).norm() / expected.norm()) < 1e-6


def test_alignment_forms_v_by_blocks_as_the_criterion_reads_it():
    """V formed from two bfloat16 weights in row blocks gives the rho and ||V|| of V itself, on
    the factored and the dense route, and its blocks concatenate to V exactly."""
    from mergekit_safemerge.core.criterion import Alignment, dense_alignment_cosine

    generator = torch.Generator().manual_seed(11)
    shape = (1536, 1024)  # two row blocks of 2^20 entries
    unaligned = (0.02 * torch.randn(*shape, generator=generator)).bfloat16()
    aligned = (unaligned.float() + 0.002 * torch.randn(*shape, generator=generator)).bfloat16()
    v = aligned.float() - unaligned.float()
    left, right = (
        torch.randn(shape[0], 4, generator=generator),
        torch.randn(4, shape[1], generator=generator),
    )
    alignment = Alignment(aligned, unaligned)
    blocks = [block.clone() for _, block in alignment.row_blocks()]
    assert len(blocks) == 2 and torch.equal(torch.cat(blocks), v)
    assert math.isclose(
        float(alignment.squared_norm()), float((v.double() ** 2).sum()), rel_tol=1e-6
    )
    factored = factored_alignment_cosine(left, right, Alignment(aligned, unaligned))
    assert math.isclose(factored, factored_alignment_cosine(left, right, v), rel_tol=1e-5)
    assert math.isclose(factored, oracle_rho((left @ right).double(), v.double()), rel_tol=1e-5)
    d = torch.randn(*shape, generator=generator)
    dense = dense_alignment_cosine(d, Alignment(aligned, unaligned))
    assert math.isclose(dense, oracle_rho(d.double(), v.double()), rel_tol=1e-5)
    with pytest.raises(ValueError, match="one shape"):
        Alignment(aligned, unaligned[:10])
