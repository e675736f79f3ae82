"""The scan's outputs: the decided report, the terminal table and sweep, CSV and a PNG.

Input: the records of the measuring pass (:func:`mergekit_safemerge.binding.executor.
measure_candidates`). The configured selection mode is applied with the same decision function
as the merge (:func:`~mergekit_safemerge.core.decide.redecide`) and the threshold sweep counts,
for every threshold, what ``rho < threshold`` would merge. ``scan.json`` is the
:class:`~.report.Report` itself, written by the output folder as its manifest. matplotlib is
imported only to draw (deferred on purpose: the ``eval`` extra).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence

import numpy as np

from mergekit_safemerge.core.decide import changed_rhos, redecide, sweep_thresholds, threshold_sweep
from mergekit_safemerge.core.records import MatrixRecord
from mergekit_safemerge.core.settings import Settings
from mergekit_safemerge.outputs.folder import SCAN as SCAN_KIND
from mergekit_safemerge.outputs.report import Report

SCAN_JSON = SCAN_KIND.manifest
SCAN_CSV = "scan.csv"
SCAN_PNG = "scan.png"
PNG_WIDTH = 1400  # pixels at 100 dpi; the height grows with the number of blocks


def build_scan(
    records: Sequence[MatrixRecord], settings: Settings, models: dict[str, str]
) -> Report:
    """The scan's report: settings, per-matrix figures decided by the configured mode, sweep."""
    decided = redecide(records, select=settings.select, k=settings.k, seed=settings.seed)
    rhos = changed_rhos(records)
    modules = {r.name: r.module for r in records}
    sweep = threshold_sweep(rhos, modules, sweep_thresholds(rhos))
    return Report(settings, models, decided, output="scan", sweep=sweep)


def write_csv(report: Report, path: str) -> None:
    fields = [
        "name", "module", "block", "rows", "cols", "rho", "threshold", "decision", "reason",
        "delta_norm", "safety_norm", "alignment_norm", "delta_safety_cosine", "criterion",
        "select", "safety_weight", "combine", "density",
    ]  # fmt: skip
    with open(path, "w", newline="", encoding="utf-8") as fp:
        writer = csv.DictWriter(fp, fieldnames=fields)
        writer.writeheader()
        for m in report.to_json()["matrices"]:
            row = {key: m.get(key) for key in fields}
            row["rows"], row["cols"] = m["shape"]
            writer.writerow(row)


def _grid(report: Report) -> tuple[list[int], list[str], dict[tuple[int, str], MatrixRecord]]:
    matrices = [m for m in report.matrices if m.block is not None]
    blocks = sorted({m.block for m in matrices})
    modules = sorted({m.module for m in matrices}, key=_module_order)
    cells = {(m.block, m.module): m for m in matrices}
    return blocks, modules, cells


_MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _module_order(module: str) -> tuple[int, str]:
    return (_MODULE_ORDER.index(module) if module in _MODULE_ORDER else len(_MODULE_ORDER), module)


def terminal_table(report: Report) -> str:
    """Block x module grid of rho; ``*`` marks a matrix merged by the configured selection."""
    blocks, modules, cells = _grid(report)
    width = max(9, *(len(m) + 1 for m in modules)) if modules else 9
    lines = ["block" + "".join(f"{m:>{width}}" for m in modules)]
    for block in blocks:
        row = f"{block:>5}"
        for module in modules:
            m = cells.get((block, module))
            if m is None:
                text = ""
            elif m.rho is None:
                text = "D=0"
            else:
                text = f"{m.rho:.3f}{'*' if m.merged else ' '}"
            row += f"{text:>{width}}"
        lines.append(row)
    lines.append("* merged with the configured selection; D=0: not changed by the fine-tune")
    return "\n".join(lines)


def terminal_sweep(report: Report, step: float = 0.05) -> str:
    """The sweep on the 0.05 grid: threshold -> merged count, total and per module."""
    rows = [
        r
        for r in report.sweep or []
        if abs(r["threshold"] / step - round(r["threshold"] / step)) < 1e-9
    ]
    modules = sorted(rows[0]["by_module"], key=_module_order) if rows else []
    header = f"{'tau':>5}{'merged':>8}" + "".join(f"{m:>11}" for m in modules)
    lines = [header]
    for r in rows:
        lines.append(
            f"{r['threshold']:>5.2f}{r['merged']:>8}"
            + "".join(f"{r['by_module'][m]:>11}" for m in modules)
        )
    return "\n".join(lines)


def _block_ticks(blocks: Sequence[int], most: int = 24) -> tuple[list[int], list[str]]:
    """Tick positions and labels: every block up to ``most``, else every n-th (n = 2, 4, 5,
    10, ...) so that labels never run together; the last block is always labelled."""
    if len(blocks) <= most:
        return list(range(len(blocks))), [str(b) for b in blocks]
    step = next(n for n in (2, 4, 5, 8, 10, 16, 20, 25, 50, 100) if len(blocks) / n <= most)
    positions = [i for i in range(len(blocks)) if i % step == 0]
    if positions[-1] != len(blocks) - 1 and len(blocks) - 1 - positions[-1] >= step / 2:
        positions.append(len(blocks) - 1)
    return positions, [str(blocks[i]) for i in positions]


def plot_scan(report: Report, path: str) -> None:
    """Write :func:`scan_figure` to ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    fig = scan_figure(report)
    fig.savefig(path, dpi=fig.dpi)
    plt.close(fig)


def scan_figure(report: Report):
    """Heatmap of rho over blocks x modules (merged cells marked) beside the sweep curve.

    Blocks run along x, labelled every n-th block beyond 24 (readable from 2 to 80+ blocks).
    Cell colours: rho on a 0..1 scale; white: the fine-tune left the matrix unchanged (D = 0,
    no rho); grey: no candidate there. The threshold is a line on the colour bar and on the
    sweep.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    blocks, modules, cells = _grid(report)
    grid = np.full((max(len(modules), 1), max(len(blocks), 1)), np.nan)
    unchanged = np.zeros_like(grid, dtype=bool)
    merged_x, merged_y = [], []
    for i, block in enumerate(blocks):
        for j, module in enumerate(modules):
            m = cells.get((block, module))
            if m is None:
                continue
            if m.rho is None:
                unchanged[j, i] = True
            else:
                grid[j, i] = m.rho
            if m.merged:
                merged_x.append(i)
                merged_y.append(j)
    threshold = report.settings.threshold
    select = report.settings.select
    dpi = 100
    height = 5.6 + 0.25 * max(0, len(modules) - 7)
    fig, (ax_map, ax_sweep) = plt.subplots(
        1, 2, figsize=(PNG_WIDTH / dpi, height), dpi=dpi,
        gridspec_kw={"width_ratios": [1.6 if len(blocks) > 24 else 1.1, 1]},
    )  # fmt: skip
    ax_map.set_facecolor("#c8c8c8")  # no candidate
    # NaN cells are transparent: they show the facecolor or the white layer below
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    white = np.where(unchanged, 1.0, np.nan)
    ax_map.imshow(white, aspect="auto", cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    image = ax_map.imshow(grid, aspect="auto", cmap=cmap, vmin=0.0, vmax=1.0,
                          interpolation="nearest")  # fmt: skip
    marker = max(1.5, min(5.0, 160 / max(len(blocks), 1)))
    ax_map.plot(merged_x, merged_y, "o", color="red", markersize=marker, linestyle="none")
    positions, labels = _block_ticks(blocks)
    ax_map.set_xticks(positions, labels, fontsize=8 if len(blocks) > 24 else 9)
    ax_map.set_yticks(range(len(modules)), modules)
    ax_map.set_xlabel("block")
    numeric = isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
    rule = f", merge when rho < {threshold:g}" if select == "threshold" and numeric else ""
    ax_map.set_title(f"rho = cos(C D, D) per matrix; select {select}{rule}", fontsize=9)
    ax_map.legend(
        handles=[
            Patch(facecolor="white", edgecolor="black", label="D = 0 (unchanged)"),
            Patch(facecolor="#c8c8c8", edgecolor="black", label="not a candidate"),
            plt.Line2D([], [], marker="o", color="red", linestyle="none", label="merged"),
        ],
        loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=8, frameon=False,
    )  # fmt: skip
    colorbar = fig.colorbar(image, ax=ax_map)
    colorbar.set_label("rho")
    if numeric and not math.isnan(threshold):
        colorbar.ax.axhline(threshold, color="red", linewidth=2)

    sweep = report.sweep or []
    taus = [r["threshold"] for r in sweep]
    # count(rho < tau) is constant on (rho_i, rho_j]: draw each value back to the previous point
    ax_sweep.step(taus, [r["merged"] for r in sweep], where="pre", label="all", color="black")
    for module in sorted(sweep[0]["by_module"] if sweep else [], key=_module_order):
        ax_sweep.step(taus, [r["by_module"][module] for r in sweep], where="pre", label=module)
    if numeric:
        ax_sweep.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold:g}")
    ax_sweep.set_xlabel("threshold tau (merge when rho < tau)")
    ax_sweep.set_ylabel("matrices merged")
    ax_sweep.set_xlim(0, 1)
    ax_sweep.legend(fontsize=8)
    ax_sweep.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def write_scan(report: Report, folder: str) -> None:
    """scan.csv and scan.png in ``folder`` (scan.json, the report, is the folder's manifest)."""
    write_csv(report, os.path.join(folder, SCAN_CSV))
    plot_scan(report, os.path.join(folder, SCAN_PNG))
