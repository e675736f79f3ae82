"""Merge rules for a selected matrix, against their formulas."""

from __future__ import annotations

import pytest
import torch

from mergekit_safemerge.core.combine import (
    dare_linear_combine,
    linear_combine,
    tensor_seed,
    ties_combine,
)


def _inputs(shape=(16, 24), seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g) for _ in range(3))


@pytest.mark.parametrize("a", [0.0, 0.2, 0.5, 1.0])
def test_linear_is_the_papers_rule(a):
    w, d, s = _inputs()
    expected = w.double() + (1 - a) * d.double() + a * s.double()
    assert torch.allclose(linear_combine(w, d, s, a).double(), expected, atol=1e-6, rtol=0)


def test_tensor_seed_is_stable_and_name_dependent():
    assert tensor_seed(42, "a.weight") == tensor_seed(42, "a.weight")
    assert tensor_seed(42, "a.weight") != tensor_seed(42, "b.weight")
    assert tensor_seed(42, "a.weight") != tensor_seed(43, "a.weight")
    assert 0 <= tensor_seed(2**63, "x") < 2**63


def test_dare_linear_is_deterministic_per_seed_and_leaves_global_rng_alone():
    w, d, s = _inputs()
    torch.manual_seed(5)
    state = torch.get_rng_state()
    first = dare_linear_combine(w, d, s, 0.2, density=0.5, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, dare_linear_combine(w, d, s, 0.2, density=0.5, seed=7))
    assert not torch.equal(first, dare_linear_combine(w, d, s, 0.2, density=0.5, seed=8))


def test_dare_linear_drops_and_rescales():
    w, d, s = _inputs((64, 64))
    merged = dare_linear_combine(w, d, s, 0.0, density=0.5, seed=1)  # only D contributes
    kept = merged - w
    dropped = (kept == 0).float().mean().item()
    assert 0.4 < dropped < 0.6
    # l1 rescaling keeps the L1 norm of the update
    assert kept.abs().sum().item() == pytest.approx(d.abs().sum().item(), rel=1e-4)


def test_dare_linear_at_density_one_is_linear():
    w, d, s = _inputs()
    assert torch.allclose(
        dare_linear_combine(w, d, s, 0.3, 1.0, seed=3), linear_combine(w, d, s, 0.3)
    )


def _ties_oracle(w, d, s, a, density):
    def prune(x):
        k = int(density * x.numel())
        keep = torch.zeros(x.numel())
        keep[x.abs().flatten().argsort(descending=True)[:k]] = 1
        return x * keep.view_as(x)

    dp, sp = prune(d.double()), prune(s.double())
    out = torch.empty_like(w, dtype=torch.float64)
    for i in range(w.numel()):
        terms = [((1 - a), dp.flatten()[i]), (a, sp.flatten()[i])]
        elected = 1.0 if sum(wt * x for wt, x in terms) >= 0 else -1.0
        agree = [(wt, x) for wt, x in terms if torch.sign(x) == elected]
        total = sum(wt for wt, _ in agree)
        value = sum(wt * x for wt, x in agree) / total if total != 0 else 0.0
        out.view(-1)[i] = w.double().flatten()[i] + value
    return out


@pytest.mark.parametrize("density", [1.0, 0.5])
def test_ties_matches_an_elementwise_oracle(density):
    w, d, s = _inputs((6, 8), seed=4)
    got = ties_combine(w, d, s, 0.2, density)
    assert torch.allclose(got.double(), _ties_oracle(w, d, s, 0.2, density), atol=1e-6)


def test_linear_with_factors_equals_dense_and_leaves_inputs_alone():
    from mergekit_safemerge.core.updates import LoraFactors

    w, _, _ = _inputs()
    g = torch.Generator().manual_seed(3)
    d = LoraFactors(torch.randn(16, 2, generator=g), torch.randn(2, 24, generator=g))
    s = LoraFactors(torch.randn(16, 3, generator=g), torch.randn(3, 24, generator=g))
    before = w.clone()
    merged = linear_combine(w, d, s, 0.3)
    assert torch.equal(w, before)  # the aligned weight is never modified in place
    expected = w + 0.7 * d.dense() + 0.3 * s.dense()
    assert torch.allclose(merged, expected, atol=1e-5)


def test_rule_table_names_every_combine_value():
    from typing import get_args

    from mergekit_safemerge.core.combine import COMBINE_RULES
    from mergekit_safemerge.core.settings import CombineName

    assert set(COMBINE_RULES) == set(get_args(CombineName))
