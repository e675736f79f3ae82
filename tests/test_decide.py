"""The decision (threshold and ranking modes), its reasons, and the sweep, on constructed
examples."""

from __future__ import annotations

import pytest

from mergekit_safemerge.core.decide import (
    decide,
    rank_matrices,
    redecide,
    sweep_thresholds,
    threshold_selects,
    threshold_sweep,
)
from mergekit_safemerge.core.records import KEPT, MERGED, MatrixRecord
from mergekit_safemerge.errors import SafeMergeError

RHOS = {"a.q": 0.5, "b.q": 0.1, "c.v": 0.9, "d.v": 0.3, "e.q": 0.3, "f.v": 0.7}
MODULES = {name: name.split(".")[1] for name in RHOS}


def test_threshold_is_strict():
    assert threshold_selects(0.34, 0.35) and not threshold_selects(0.35, 0.35)
    merged = {
        n for n, rho in RHOS.items() if decide(n, rho, select="threshold", threshold=0.5).merged
    }
    assert merged == {"b.q", "d.v", "e.q"}


def test_decision_reasons():
    assert decide("x", 0.2, select="threshold", threshold=0.35).reason == (
        "rho 0.2000 < threshold 0.35"
    )
    kept = decide("x", 0.5, select="threshold", threshold=0.35)
    assert not kept.merged and kept.reason == "rho 0.5000 >= threshold 0.35"
    unchanged = decide("x", None, select="all", threshold=0.35, ranking={"x": "why"})
    assert not unchanged.merged and unchanged.reason.startswith("D = 0")
    zero_v = decide("x", 0.0, select="threshold", threshold=0.35, alignment_zero=True)
    assert zero_v.merged and zero_v.reason.startswith("V = 0")
    ranked = decide("x", 0.4, select="lowest_k", threshold=0.35, ranking={"x": "lowest_k: rank 1"})
    assert ranked.merged and ranked.reason == "rho 0.4000; lowest_k: rank 1"
    assert decide("y", 0.4, select="lowest_k", threshold=0.35, ranking={}).reason.endswith(
        "lowest_k: not selected"
    )
    with pytest.raises(SafeMergeError, match="ranks all matrices before merging"):
        decide("x", 0.4, select="random_k", threshold=0.35)


def _record(name, rho):
    return MatrixRecord(
        name=name, shape=(2, 2), rho=rho, decision=KEPT, reason="", delta_norm=1.0,
        safety_norm=1.0, alignment_norm=1.0, delta_safety_cosine=0.0, criterion="dense",
        threshold=0.35, safety_weight=0.2, combine="linear", density=1.0,
    )  # fmt: skip


def test_redecide_applies_the_ranking_to_measured_records():
    records = [_record(n, rho) for n, rho in RHOS.items()] + [_record("g.q", None)]
    decided = {r.name: r for r in redecide(records, select="lowest_k", k=2)}
    assert {n for n, r in decided.items() if r.decision == MERGED} == {"b.q", "d.v"}
    assert decided["g.q"].decision == KEPT and decided["g.q"].reason.startswith("D = 0")
    assert all(r.select == "lowest_k" for r in decided.values())
    assert redecide(records, select="threshold") == records


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
    assert set(rank_matrices(RHOS, mode, k=k)) == expected


def test_reasons_name_rank_and_mode():
    chosen = rank_matrices(RHOS, "lowest_k", k=2)
    assert chosen["b.q"] == "lowest_k: rank 1 of 6, lowest rho first (k = 2)"
    assert rank_matrices(RHOS, "highest_k", k=1)["c.v"].startswith("highest_k: rank 1 of 6")


def test_random_k_is_reproducible_and_seed_dependent():
    draws = {frozenset(rank_matrices(RHOS, "random_k", k=3, seed=s)) for s in range(20)}
    assert frozenset(rank_matrices(RHOS, "random_k", k=3, seed=4)) == frozenset(
        rank_matrices(dict(reversed(list(RHOS.items()))), "random_k", k=3, seed=4)
    )
    assert len(draws) > 5  # different seeds give different sets
    assert all(len(d) == 3 for d in draws)
    # uniform: every matrix is drawn sometimes
    assert set().union(*draws) == set(RHOS)


@pytest.mark.parametrize("k", [0, 7])
@pytest.mark.parametrize("mode", ["lowest_k", "random_k", "highest_k"])
def test_count_modes_reject_impossible_k(mode, k):
    with pytest.raises(SafeMergeError, match=rf"parameters.k = {k} for select {mode}"):
        rank_matrices(RHOS, mode, k=k)


def test_unknown_mode():
    with pytest.raises(SafeMergeError, match="parameters.select 'best' is not a ranking mode"):
        rank_matrices(RHOS, "best")


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
