"""The ``safemerge_report.json`` document, the model-card section and the terminal summary.

A merge collects one :class:`~mergekit_safemerge.records.MatrixRecord` per candidate matrix
while mergekit executes it (:mod:`.session`); the run integration (:mod:`.run`) builds the
report from them. Version 2 adds every value applied per matrix (threshold, safety_weight,
combine, density, select), the run's warnings, and ``files``: what the run published.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from mergekit_safemerge.errors import SafeMergeError
from mergekit_safemerge.records import MERGED, MatrixRecord, sort_records

REPORT_FILENAME = "safemerge_report.json"
REPORT_FORMAT = "safemerge-report"
REPORT_VERSION = 2


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
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "method": "safemerge",
        "settings": settings,
        "models": models,
        "summary": summarize(ordered),
        "matrices": [r.to_json() for r in ordered],
    }


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


_SUMMARY_KEYS = ("candidates", "changed", "merged", "by_module", "alignment_zero")


def read_report(path: str) -> dict[str, Any]:
    """A report from its file or from the merged model's folder, checked enough to print.

    Raises :class:`SafeMergeError` (one line naming the file) for anything else: a missing or
    unreadable file, JSON that is not a SafeMERGE report, a report with missing fields.
    """
    if os.path.isdir(path):
        path = os.path.join(path, REPORT_FILENAME)
    try:
        with open(path, encoding="utf-8") as fp:
            report = json.load(fp)
    except FileNotFoundError:
        raise SafeMergeError(
            f"{path}: no such file (a merge output holds {REPORT_FILENAME})"
        ) from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise SafeMergeError(f"{path}: not a readable JSON file ({error})") from None
    if not isinstance(report, dict) or report.get("format") not in (
        REPORT_FORMAT,
        "safemerge-scan",
    ):
        raise SafeMergeError(f'{path}: not a SafeMERGE report (no "format": "{REPORT_FORMAT}")')
    summary = report.get("summary")
    problems = []
    if not isinstance(summary, dict):
        problems.append("summary")
    else:
        problems += [k for k in _SUMMARY_KEYS if k not in summary]
        problems += [k for k in ("candidates", "changed", "merged", "alignment_zero")
                     if k in summary and not isinstance(summary[k], int)]  # fmt: skip
        if not isinstance(summary.get("by_module", {}), dict):
            problems.append("summary.by_module")
    for key, kind in (("settings", dict), ("models", dict), ("matrices", list)):
        if not isinstance(report.get(key), kind):
            problems.append(key)
    if not problems and not all(
        isinstance(m, dict) and {"module", "decision", "block"} <= set(m)
        for m in report["matrices"]
    ):
        problems.append("matrices")
    if problems:
        raise SafeMergeError(
            f"{path}: a damaged SafeMERGE report ({', '.join(dict.fromkeys(problems))} missing "
            "or of the wrong type)"
        )
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
