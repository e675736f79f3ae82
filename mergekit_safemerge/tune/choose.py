"""The one choice rule of ``safemerge tune``, and what a control's domination means.

Among the points that change the model, keep those that hold the task and do not over-refuse:

* validation accuracy ``>= keep_accuracy x`` the fine-tuned model's;
* with benign prompts, over-refusal ``<=`` the fine-tuned model's ``+ max_over_refusal``;

and choose the lowest validation harmfulness; ties go to fewer merged matrices, then to the
smaller safety weight. Harmfulness first because that is what the defense is for; the accuracy
floor is relative so that it means the same on any task; fewer matrices and a smaller weight
change the fine-tune less. When no point qualifies, nothing is chosen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

EPSILON = 1e-12


@dataclass(frozen=True)
class Outcome:
    """A point's validation rates (fractions; ``None`` when the set was not given)."""

    harmfulness: float | None
    accuracy: float | None
    over_refusal: float | None


@dataclass(frozen=True)
class Candidate:
    """What the rule needs of one point: its rates, how many matrices it merges, its weight."""

    key: str
    outcome: Outcome
    merged: int
    weight: float


def qualifies(
    outcome: Outcome, finetuned: Outcome, keep_accuracy: float, max_over_refusal: float
) -> bool:
    accuracy = outcome.accuracy is not None and finetuned.accuracy is not None
    if accuracy and outcome.accuracy < keep_accuracy * finetuned.accuracy - EPSILON:
        return False
    refusal = outcome.over_refusal is not None and finetuned.over_refusal is not None
    return not (
        refusal and outcome.over_refusal > finetuned.over_refusal + max_over_refusal + EPSILON
    )


def _harm(outcome: Outcome) -> float:
    return outcome.harmfulness if outcome.harmfulness is not None else 0.0


def choose(
    points: Sequence[Candidate],
    finetuned: Outcome,
    *,
    keep_accuracy: float,
    max_over_refusal: float,
) -> Candidate | None:
    """The chosen point (see the module docstring), or None when no point qualifies."""
    kept = [
        p
        for p in points
        if p.merged > 0 and qualifies(p.outcome, finetuned, keep_accuracy, max_over_refusal)
    ]
    if not kept:
        return None
    return min(kept, key=lambda p: (_harm(p.outcome), p.merged, p.weight))


def closest(points: Sequence[Candidate], finetuned: Outcome) -> Candidate | None:
    """When nothing qualifies: the point that keeps the most accuracy (then the least harm)."""
    changed = [p for p in points if p.merged > 0]
    if not changed:
        return None

    def accuracy(p: Candidate) -> float:
        return p.outcome.accuracy if p.outcome.accuracy is not None else 0.0

    return min(changed, key=lambda p: (-accuracy(p), _harm(p.outcome), p.merged, p.weight))


def dominates(first: Outcome, second: Outcome) -> bool:
    """``first`` is at least as good on every given rate (lower harmfulness and over-refusal,
    higher accuracy) and strictly better on one."""
    pairs = [
        (first.harmfulness, second.harmfulness, -1),
        (first.accuracy, second.accuracy, 1),
        (first.over_refusal, second.over_refusal, -1),
    ]
    better = False
    for a, b, sign in pairs:
        if a is None or b is None:
            continue
        if sign * (a - b) < -EPSILON:
            return False
        if sign * (a - b) > EPSILON:
            better = True
    return better
