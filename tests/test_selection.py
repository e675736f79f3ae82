"""Selection modes and the threshold sweep, on constructed examples."""

from __future__ import annotations

import pytest

from mergekit_safemerge.errors import SafeMergeError
from mergekit_safemerge.selection import (
    select_matrices,
    sweep_thresholds,
    threshold_selects,
    threshold_sweep,
)

RHOS = {"a.q": 0.5, "b.q": 0.1, "c.v": 0.9, "d.v": 0.3, "e.q": 0.3, "f.v": 0.7}
MODULES = {name: name.split(".")[1] for name in RHOS}


def test_threshold_is_strict():
    assert threshold_selects(0.34, 0.35) and not threshold_selects(0.35, 0.35)
    assert set(select_matrices(RHOS, "threshold", threshold=0.5)) == {"b.q", "d.v", "e.q"}


@pytest.mark.parametrize(
    ("mode", "k", "expected"),
    [
        ("lowest_k", 1, {"b.q"}),
        ("lowest_k", 2, {"b.q", "d.v"}),  # d.v and e.q tie at 0.3: the name breaks the tie
        ("lowest_k", 3, {"b.q", "d.v", "e.q"}),
        ("highest_k", 2, {"c.v", "f.v"}),
        ("highest_k", 4, {"c.v", "f.v", "a.q", "e.q"}),
        ("all", 0, set(RHOS)),
        ("none", 0, set()),
    ],
)
def test_modes_select_the_expected_set(mode, k, expected):
    assert set(select_matrices(RHOS, mode, k=k)) == expected


def test_reasons_name_rank_and_mode():
    chosen = select_matrices(RHOS, "lowest_k", k=2)
    assert chosen["b.q"] == "lowest_k: rank 1 of 6, lowest rho first (k = 2)"
    assert select_matrices(RHOS, "highest_k", k=1)["c.v"].startswith("highest_k: rank 1 of 6")


def test_random_k_is_reproducible_and_seed_dependent():
    draws = {frozenset(select_matrices(RHOS, "random_k", k=3, seed=s)) for s in range(20)}
    assert frozenset(select_matrices(RHOS, "random_k", k=3, seed=4)) == frozenset(
        select_matrices(dict(reversed(list(RHOS.items()))), "random_k", k=3, seed=4)
    )
    assert len(draws) > 5  # different seeds give different sets
    assert all(len(d) == 3 for d in draws)
    # uniform: every matrix is drawn sometimes
    assert set().union(*draws) == set(RHOS)


@pytest.mark.parametrize("k", [0, 7])
@pytest.mark.parametrize("mode", ["lowest_k", "random_k", "highest_k"])
def test_count_modes_reject_impossible_k(mode, k):
    with pytest.raises(SafeMergeError, match=rf"parameters.k = {k} for select {mode}"):
        select_matrices(RHOS, mode, k=k)


def test_unknown_mode():
    with pytest.raises(SafeMergeError, match="parameters.select 'best'"):
        select_matrices(RHOS, "best")


def test_sweep_counts_match_the_threshold_rule():
    taus = sweep_thresholds(RHOS)
    assert taus[0] == 0.0 and taus[-1] == 1.0
    assert set(RHOS.values()) <= set(taus) and 0.35 in taus
    rows = threshold_sweep(RHOS, MODULES, taus)
    for row in rows:
        merged = [n for n, rho in RHOS.items() if rho < row["threshold"]]
        assert row["merged"] == len(merged)
        assert row["by_module"] == {
            "q": sum(MODULES[n] == "q" for n in merged),
            "v": sum(MODULES[n] == "v" for n in merged),
        }
    at = {row["threshold"]: row["merged"] for row in rows}
    assert at[0.3] == 1 and at[0.35] == 3  # strict: the two 0.3 count only above 0.3
