"""Per-matrix records, the ``safemerge_report.json`` file, the model-card section and the summary.

A merge collects one :class:`MatrixRecord` per candidate matrix while mergekit executes it (in
:class:`mergekit_safemerge.session.MergeSession`); the ``run_merge`` integration writes the
report from them after the merge.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

REPORT_FILENAME = "safemerge_report.json"
REPORT_VERSION = 1

MERGED = "merged"
KEPT = "kept"

_BLOCK_PATTERN = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class MatrixRecord:
    """What SafeMERGE measured and decided for one candidate matrix."""

    name: str
    shape: tuple[int, int]
    rho: float | None  # None when D = 0 (no criterion is computed)
    threshold: float
    decision: str  # MERGED or KEPT
    reason: str
    delta_norm: float  # ||D||_F, D = W_finetuned - W_aligned
    safety_norm: float  # ||S||_F, S = W_safety - W_aligned
    alignment_norm: float  # ||V||_F, V = W_aligned - W_unaligned
    delta_safety_cosine: float  # cos(D, S)
    criterion: str = "dense"  # how rho was computed: dense, low-rank (rank <= r), factored

    @property
    def module(self) -> str:
        """The module type, e.g. ``q_proj`` for ``model.layers.3.self_attn.q_proj.weight``."""
        parts = self.name.split(".")
        if len(parts) >= 2 and parts[-1] in ("weight", "bias"):
            return parts[-2]
        return parts[-1]

    @property
    def block(self) -> int | None:
        """The index of the transformer block, when the name has one."""
        match = _BLOCK_PATTERN.search(self.name)
        return int(match.group(1)) if match else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["shape"] = list(self.shape)
        data["module"] = self.module
        data["block"] = self.block
        return data


def sort_records(records: Iterable[MatrixRecord]) -> list[MatrixRecord]:
    """Order by block, then name, so reports read top to bottom like the model."""
    return sorted(records, key=lambda r: (r.block if r.block is not None else -1, r.name))


def summarize(records: Sequence[MatrixRecord]) -> dict[str, Any]:
    """Counts in total and per module type, plus the range of rho over changed matrices."""

    def counts(group: Sequence[MatrixRecord]) -> dict[str, Any]:
        rhos = [r.rho for r in group if r.rho is not None]
        return {
            "candidates": len(group),
            "changed": len(rhos),
            "merged": sum(r.decision == MERGED for r in group),
            "rho_min": min(rhos) if rhos else None,
            "rho_median": statistics.median(rhos) if rhos else None,
            "rho_max": max(rhos) if rhos else None,
        }

    by_module: dict[str, list[MatrixRecord]] = defaultdict(list)
    for record in records:
        by_module[record.module].append(record)
    summary = counts(records)
    summary["alignment_zero"] = sum(r.alignment_norm == 0 for r in records)
    summary["by_module"] = {module: counts(group) for module, group in sorted(by_module.items())}
    return summary


def build_report(
    records: Sequence[MatrixRecord], settings: dict[str, Any], models: dict[str, str]
) -> dict[str, Any]:
    """The JSON document: settings, the model of each role, summary, one entry per candidate."""
    ordered = sort_records(records)
    return {
        "format": "safemerge-report",
        "version": REPORT_VERSION,
        "method": "safemerge",
        "settings": settings,
        "models": models,
        "summary": summarize(ordered),
        "matrices": [r.to_json() for r in ordered],
    }


def write_report(report: dict[str, Any], out_dir: str) -> str:
    path = os.path.join(out_dir, REPORT_FILENAME)
    with open(path, "w", encoding="utf-8") as fp:
        json.dump(report, fp, indent=2, allow_nan=False)
        fp.write("\n")
    return path


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _settings_line(settings: dict[str, Any]) -> str:
    hidden = {"k", "seed"} if settings.get("select", "threshold") == "threshold" else set()
    if settings.get("combine", "linear") == "linear":
        hidden.add("density")
    return ", ".join(
        f"{key} {value}"
        for key, value in settings.items()
        if value not in (None, "") and key not in hidden
    )


def read_report(path: str) -> dict[str, Any]:
    """Load a report from its file or from the merged model's folder."""
    if os.path.isdir(path):
        path = os.path.join(path, REPORT_FILENAME)
    with open(path, encoding="utf-8") as fp:
        report = json.load(fp)
    if report.get("format") != "safemerge-report":
        raise ValueError(f"{path} is not a SafeMERGE report")
    return report


def _merged_blocks(report: dict[str, Any], module: str) -> str:
    blocks = [
        m["block"] for m in report["matrices"] if m["module"] == module and m["decision"] == MERGED
    ]
    if not blocks:
        return "-"
    if any(b is None for b in blocks):
        return f"{len(blocks)} matrices"
    return ",".join(str(b) for b in sorted(blocks))


def model_card_section(report: dict[str, Any]) -> str:
    """A short markdown section appended to the README.md mergekit writes."""
    summary = report["summary"]
    lines = [
        "",
        "## SafeMERGE",
        "",
        "This model was produced with [SafeMERGE](https://arxiv.org/abs/2503.17239): a fine-tuned"
        " weight matrix is merged with a safety-tuned one only when its update drifted from the"
        " alignment subspace (`rho = cos(C D, D) < threshold`).",
        "",
        f"Settings: {_settings_line(report['settings'])}.",
        f"Merged {summary['merged']} of {summary['changed']} changed matrices"
        f" ({summary['candidates']} candidates).",
        "",
        "| module | candidates | changed | merged | rho min | rho median | rho max |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for module, c in summary["by_module"].items():
        lines.append(
            f"| {module} | {c['candidates']} | {c['changed']} | {c['merged']} | "
            f"{_fmt(c['rho_min'])} | {_fmt(c['rho_median'])} | {_fmt(c['rho_max'])} |"
        )
    lines += ["", "| role | model |", "|---|---|"]
    lines += [f"| {role} | {model} |" for role, model in report["models"].items()]
    lines += ["", f"Per-matrix figures and decisions: `{REPORT_FILENAME}`.", ""]
    return "\n".join(lines)


def terminal_summary(report: dict[str, Any]) -> str:
    """One screen: totals, a row per module type, and which blocks were merged."""
    summary = report["summary"]
    header = (
        f"{'module':<14}{'cand.':>6}{'changed':>8}{'merged':>7}  {'rho min/med/max':<19}"
        "  merged blocks"
    )
    lines = [
        f"SafeMERGE: merged {summary['merged']} of {summary['changed']} changed matrices "
        f"({summary['candidates']} candidates)",
        f"  {_settings_line(report['settings'])}",
        "  " + ", ".join(f"{role}: {model}" for role, model in report["models"].items()),
        "  " + header,
    ]
    for module, c in summary["by_module"].items():
        rho = f"{_fmt(c['rho_min'])}/{_fmt(c['rho_median'])}/{_fmt(c['rho_max'])}"
        lines.append(
            f"  {module:<14}{c['candidates']:>6}{c['changed']:>8}{c['merged']:>7}  {rho:<19}  "
            f"{_merged_blocks(report, module)}"
        )
    if summary["alignment_zero"]:
        lines.append(
            f"  note: {summary['alignment_zero']} matrices have V = 0 (alignment left them "
            "unchanged); their rho is 0 by definition"
        )
    return "\n".join(lines)
