"""Measure every candidate matrix without writing a model: ``safemerge scan`` and the first pass
of the ranking selection modes.

The scan runs mergekit's own plan in memory (same architecture handling, LoRA merging, lazy
loaders, ``filter:`` values, dtype and device as the merge) with the method in measure-only mode:
each candidate's ``rho`` and norms are recorded and the fine-tuned tensor is handed back and
dropped at once, so peak memory stays at a few tensors, as in a merge. Vocabulary tensors
(embeddings, ``lm_head``) are never candidates and are not even read.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from typing import Any

from mergekit_safemerge.report import MERGED, MatrixRecord, sort_records
from mergekit_safemerge.selection import select_matrices, sweep_thresholds, threshold_sweep
from mergekit_safemerge.session import MergeSession, active_session

SCAN_JSON = "scan.json"
SCAN_CSV = "scan.csv"
SCAN_PNG = "scan.png"
PNG_SIZE = (1400, 560)  # pixels: 14 x 5.6 inches at 100 dpi


def measure_candidates(
    merge_config, options, *, targets: str | None = None, desc: str = "SafeMERGE scan"
) -> list[MatrixRecord]:
    """Run mergekit's in-memory plan with the method measuring only; one record per candidate.

    ``targets`` (the plain top-level ``targets`` setting, if any) lets the pass skip reading
    tensors that cannot be candidates; with filters the method decides per tensor.
    """
    from mergekit.architecture import get_architecture_info
    from mergekit.graph import Executor
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import _model_out_config
    from mergekit.plan import MergePlanner

    from mergekit_safemerge.method import register_method

    register_method()
    config = merge_config.model_copy(deep=True)  # the planner rewrites its configuration
    arch_info = get_architecture_info(config, options)
    LoaderCache().setup(options=options)
    out_config = _model_out_config(config, arch_info, trust_remote_code=options.trust_remote_code)
    planner = MergePlanner(config, arch_info, options=options, out_model_config=out_config)
    # plan_in_memory() fails in mergekit 0.1.5 (pydantic cannot validate ReturnTensor's generic
    # task field), so run the per-tensor tasks of the plan directly: the executor streams them
    # and drops each result after use.
    planner._plan()
    from mergekit_safemerge.targets import matches_targets, parse_targets

    modules = parse_targets(targets) if targets else ()
    tasks = [
        task
        for weight, task in planner._tensors
        if weight.vocabulary_axis is None and matches_targets(weight.name, modules)
    ]
    executor = Executor(
        targets=tasks,
        math_device=options.device,
        storage_device=options.device if options.low_cpu_memory else "cpu",
    )
    with active_session(MergeSession(measure_only=True)) as session:
        for _task, _tensor in executor.run(quiet=options.quiet, desc=desc):
            pass
    return sort_records(session.records)


def plain_targets(settings: dict[str, Any]) -> str | None:
    """The top-level ``targets`` when it is one plain string (not filters or a gradient)."""
    targets = settings.get("targets")
    return targets if isinstance(targets, str) else None


def changed_rhos(records: Sequence[MatrixRecord]) -> dict[str, float]:
    """name -> rho for the matrices the fine-tune changed (D != 0)."""
    return {r.name: r.rho for r in records if r.rho is not None}


def apply_selection(
    records: Sequence[MatrixRecord], settings: dict[str, Any]
) -> tuple[list[MatrixRecord], dict[str, str]]:
    """Records with the decisions of the configured selection mode (threshold decisions as
    recorded per tensor; ranking modes decided here over all changed matrices)."""
    from dataclasses import replace

    mode = settings.get("select", "threshold")
    if mode == "threshold":
        return list(records), {r.name: r.reason for r in records if r.decision == MERGED}
    selected = select_matrices(
        changed_rhos(records), mode, k=settings.get("k", 0), seed=settings.get("seed", 0)
    )
    updated = [
        replace(
            r,
            decision=MERGED if r.name in selected else "kept",
            reason=f"rho {r.rho:.4f}; {selected.get(r.name, f'{mode}: not selected')}",
        )
        if r.rho is not None
        else r
        for r in records
    ]
    return updated, selected


def build_scan(records: Sequence[MatrixRecord], settings: dict, models: dict) -> dict[str, Any]:
    """The scan document: settings, per-matrix figures, and the threshold sweep."""
    from mergekit_safemerge.report import build_report

    decided, _selected = apply_selection(records, settings)
    document = build_report(decided, settings, models)
    document["format"] = "safemerge-scan"
    rhos = changed_rhos(records)
    modules = {r.name: r.module for r in records}
    document["sweep"] = threshold_sweep(rhos, modules, sweep_thresholds(rhos))
    return document


def write_csv(document: dict[str, Any], path: str) -> None:
    fields = [
        "name", "module", "block", "rows", "cols", "rho", "threshold", "decision", "reason",
        "delta_norm", "safety_norm", "alignment_norm", "delta_safety_cosine", "criterion",
    ]  # fmt: skip
    with open(path, "w", newline="", encoding="utf-8") as fp:
        writer = csv.DictWriter(fp, fieldnames=fields)
        writer.writeheader()
        for m in document["matrices"]:
            row = {key: m.get(key) for key in fields}
            row["rows"], row["cols"] = m["shape"]
            writer.writerow(row)


def _grid(document: dict[str, Any]) -> tuple[list[int], list[str], dict]:
    matrices = [m for m in document["matrices"] if m["block"] is not None]
    blocks = sorted({m["block"] for m in matrices})
    modules = sorted({m["module"] for m in matrices}, key=_module_order)
    cells = {(m["block"], m["module"]): m for m in matrices}
    return blocks, modules, cells


_MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _module_order(module: str) -> tuple[int, str]:
    return (_MODULE_ORDER.index(module) if module in _MODULE_ORDER else len(_MODULE_ORDER), module)


def terminal_table(document: dict[str, Any]) -> str:
    """Block x module grid of rho; ``*`` marks a matrix merged by the configured selection."""
    blocks, modules, cells = _grid(document)
    width = max(9, *(len(m) + 1 for m in modules)) if modules else 9
    lines = ["block" + "".join(f"{m:>{width}}" for m in modules)]
    for block in blocks:
        row = f"{block:>5}"
        for module in modules:
            m = cells.get((block, module))
            if m is None:
                text = ""
            elif m["rho"] is None:
                text = "D=0"
            else:
                text = f"{m['rho']:.3f}{'*' if m['decision'] == MERGED else ' '}"
            row += f"{text:>{width}}"
        lines.append(row)
    lines.append("* merged with the configured selection; D=0: not changed by the fine-tune")
    return "\n".join(lines)


def terminal_sweep(document: dict[str, Any], step: float = 0.05) -> str:
    """The sweep on the 0.05 grid: threshold -> merged count, total and per module."""
    rows = [
        r
        for r in document["sweep"]
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


def plot_scan(document: dict[str, Any], path: str) -> None:
    """Heatmap of rho over blocks x modules (merged cells marked) and the sweep curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    blocks, modules, cells = _grid(document)
    grid = np.full((max(len(blocks), 1), max(len(modules), 1)), np.nan)
    for i, block in enumerate(blocks):
        for j, module in enumerate(modules):
            m = cells.get((block, module))
            if m is not None and m["rho"] is not None:
                grid[i, j] = m["rho"]
    settings = document["settings"]
    threshold = settings.get("threshold")
    dpi = 100
    fig, (ax_map, ax_sweep) = plt.subplots(
        1, 2, figsize=(PNG_SIZE[0] / dpi, PNG_SIZE[1] / dpi), dpi=dpi,
        gridspec_kw={"width_ratios": [1.1, 1]},
    )  # fmt: skip
    image = ax_map.imshow(grid.T, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                          interpolation="nearest")  # fmt: skip
    for i, block in enumerate(blocks):
        for j, module in enumerate(modules):
            m = cells.get((block, module))
            if m is not None and m["decision"] == MERGED:
                ax_map.plot(i, j, marker="o", color="red", markersize=4)
    ax_map.set_xlabel("block")
    ax_map.set_xticks(range(len(blocks)), [str(b) for b in blocks])
    ax_map.set_yticks(range(len(modules)), modules)
    ax_map.set_title(
        f"rho = cos(C D, D); red dots: merged (select {settings.get('select', 'threshold')}, "
        f"threshold {threshold})",
        fontsize=9,
    )
    colorbar = fig.colorbar(image, ax=ax_map)
    colorbar.set_label("rho")
    if isinstance(threshold, (int, float)):
        colorbar.ax.axhline(threshold, color="red", linewidth=2)

    sweep = document["sweep"]
    taus = [r["threshold"] for r in sweep]
    # count(rho < tau) is constant on (rho_i, rho_j]: draw each value back to the previous point
    ax_sweep.step(taus, [r["merged"] for r in sweep], where="pre", label="all", color="black")
    for module in sorted(sweep[0]["by_module"] if sweep else [], key=_module_order):
        ax_sweep.step(taus, [r["by_module"][module] for r in sweep], where="pre", label=module)
    if isinstance(threshold, (int, float)):
        ax_sweep.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold}")
    ax_sweep.set_xlabel("threshold tau (merge when rho < tau)")
    ax_sweep.set_ylabel("matrices merged")
    ax_sweep.set_xlim(0, 1)
    ax_sweep.legend(fontsize=8)
    ax_sweep.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def write_scan(document: dict[str, Any], out_dir: str) -> dict[str, str]:
    """scan.json, scan.csv and scan.png under ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, name) for name in (SCAN_JSON, SCAN_CSV, SCAN_PNG)}
    with open(paths[SCAN_JSON], "w", encoding="utf-8") as fp:
        json.dump(document, fp, indent=2, allow_nan=False)
        fp.write("\n")
    write_csv(document, paths[SCAN_CSV])
    plot_scan(document, paths[SCAN_PNG])
    return paths
