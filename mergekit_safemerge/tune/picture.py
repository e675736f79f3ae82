"""``tune.png``: harmfulness against task accuracy, one Pareto front per family, the chosen point
marked, 95% intervals. matplotlib is imported only to draw (the ``eval`` extra)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

COLOURS = {
    "safemerge": "#1f77b4",
    "all": "#ff7f0e",
    "interpolation": "#2ca02c",
    "random_k": "#9467bd",
    "no-safety": "#8c564b",
    "finetuned": "#d62728",
    "aligned": "#000000",
}


def _xy(point: dict[str, Any]) -> tuple[float, float] | None:
    if "accuracy" not in point or "harmfulness" not in point:
        return None
    accuracy, harm = point["accuracy"]["rate"], point["harmfulness"]["rate"]
    if accuracy is None or harm is None:
        return None
    return accuracy, harm


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both (higher accuracy, lower harmfulness), by
    accuracy."""
    front = []
    for x, y in sorted(set(points), key=lambda p: (-p[0], p[1])):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return sorted(front)


def plot_tune(document: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = document["points"]
    many = len(points) > 40
    fig, ax = plt.subplots(figsize=(10.5, 6.5), dpi=100)
    for family, colour in COLOURS.items():
        members = [(p, _xy(p)) for p in points if p["family"] == family]
        members = [(p, xy) for p, xy in members if xy is not None]
        if not members:
            continue
        xs = [xy[0] for _, xy in members]
        ys = [xy[1] for _, xy in members]
        x_err = [[xy[0] - p["accuracy"]["ci95"][0] for p, xy in members],
                 [p["accuracy"]["ci95"][1] - xy[0] for p, xy in members]]  # fmt: skip
        y_err = [[xy[1] - p["harmfulness"]["ci95"][0] for p, xy in members],
                 [p["harmfulness"]["ci95"][1] - xy[1] for p, xy in members]]  # fmt: skip
        ax.errorbar(xs, ys, xerr=x_err, yerr=y_err, fmt="none", ecolor=colour,
                    alpha=0.12 if many else 0.3, linewidth=0.8)  # fmt: skip
        ax.scatter(xs, ys, s=14 if many else 36, color=colour, label=family, alpha=0.8, zorder=3)
        front = pareto_front(list(zip(xs, ys, strict=True)))
        if len(front) > 1:
            ax.plot(*zip(*front, strict=True), color=colour, linewidth=1.2, alpha=0.8)
    for p in points:
        xy = _xy(p)
        if p["chosen"] and xy is not None:
            ax.scatter(*xy, s=260, facecolors="none", edgecolors="red", linewidths=2, zorder=4,
                       label="chosen")  # fmt: skip
            ax.annotate(p["label"], xy, textcoords="offset points", xytext=(8, 8), fontsize=8)
    ax.set_xlabel("task accuracy (validation)")
    ax.set_ylabel("harmfulness (validation)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title("safemerge tune: lower right is better; lines join each family's Pareto front",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=fig.dpi)
    plt.close(fig)
