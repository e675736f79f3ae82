"""The report of a run: the :class:`Report` type owns the schema of ``safemerge_report.json``
(and of ``scan.json``), its JSON both ways, the model-card section and the terminal summary.

A run collects one :class:`~mergekit_safemerge.core.records.MatrixRecord` per candidate matrix
(:mod:`mergekit_safemerge.binding.passes`) and makes one :class:`Report` of them; the output
folder writes it last (:meth:`~.folder.OutputFolder.publish`). Version 3 records ``output``
(``model``, ``adapter`` or ``scan``) in every report; version 2 reports (no ``output``: a merged
model, unless it says ``adapter``) are read too. Every reader goes through
:meth:`Report.from_json`, so an edited or damaged file is one line, never a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mergekit_safemerge.core.records import KEPT, MERGED, MatrixRecord, sort_records
from mergekit_safemerge.core.settings import Settings
from mergekit_safemerge.core.targets import module_name
from mergekit_safemerge.errors import SafeMergeError
from mergekit_safemerge.outputs.folder import REPORT_FILE

REPORT_FILENAME = REPORT_FILE
REPORT_FORMAT = "safemerge-report"
SCAN_FORMAT = "safemerge-scan"
REPORT_VERSION = 3
READABLE_VERSIONS = (2, 3)
OUTPUTS = ("model", "adapter", "scan")


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


_RECORD_FIELDS = {f.name: f for f in dataclasses.fields(MatrixRecord)}
_NUMBER_FIELDS = (
    "delta_norm", "safety_norm", "alignment_norm", "delta_safety_cosine", "threshold",
    "safety_weight", "density",
)  # fmt: skip


def _record_from_json(entry: Any, where: str) -> MatrixRecord:
    """One ``matrices`` entry, checked field by field (one line naming the first fault)."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is not an object")
    values = {}
    for name, spec in _RECORD_FIELDS.items():
        if name not in entry:
            if spec.default is not dataclasses.MISSING:
                continue
            raise ValueError(f"{where}.{name} is missing")
        values[name] = entry[name]
    shape = values["shape"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(n, int) for n in shape)):
        raise ValueError(f"{where}.shape is not [rows, cols]")
    values["shape"] = (shape[0], shape[1])
    rho = values["rho"]
    if rho is not None and (isinstance(rho, bool) or not isinstance(rho, (int, float))):
        raise ValueError(f"{where}.rho is not a number or null")
    for name in _NUMBER_FIELDS:
        if isinstance(values[name], bool) or not isinstance(values[name], (int, float)):
            raise ValueError(f"{where}.{name} is not a number")
    if values["decision"] not in (MERGED, KEPT):
        raise ValueError(f"{where}.decision is not {MERGED} or {KEPT}")
    for name in ("name", "reason", "criterion", "combine", "select"):
        if name in values and not isinstance(values[name], str):
            raise ValueError(f"{where}.{name} is not a string")
    return MatrixRecord(**values)


_SUMMARY_COUNTS = ("candidates", "changed", "merged", "alignment_zero")


def _damaged_parts(document: dict[str, Any]) -> list[str]:
    """The top-level parts of a report that are missing or of the wrong type (the summary a
    reader prints must agree with the file, so it is checked, not silently recomputed)."""
    problems = []
    summary = document.get("summary")
    if not isinstance(summary, dict):
        problems.append("summary")
    else:
        problems += [k for k in (*_SUMMARY_COUNTS, "by_module") if k not in summary]
        problems += [k for k in _SUMMARY_COUNTS if k in summary and not isinstance(summary[k], int)]
        if not isinstance(summary.get("by_module", {}), dict):
            problems.append("summary.by_module")
    for key, kind in (("settings", dict), ("models", dict), ("matrices", list)):
        if not isinstance(document.get(key), kind):
            problems.append(key)
    return list(dict.fromkeys(problems))


@dataclass
class Report:
    """One run's report: its settings, the model of each role, one record per candidate, and
    what the run wrote (``output``; an adapter's summary; a scan's threshold sweep)."""

    settings: Settings
    models: dict[str, str]
    matrices: list[MatrixRecord]
    output: str = "model"
    adapter: dict[str, Any] | None = None
    sweep: list[dict[str, Any]] | None = None
    wall_time_s: float | None = None
    warnings: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.matrices = sort_records(self.matrices)

    @property
    def format(self) -> str:
        return SCAN_FORMAT if self.output == "scan" else REPORT_FORMAT

    @property
    def summary(self) -> dict[str, Any]:
        return summarize(self.matrices)

    def to_json(self) -> dict[str, Any]:
        """The JSON document (keys in this order; optional parts only when present)."""
        document: dict[str, Any] = {
            "format": self.format,
            "version": REPORT_VERSION,
            "method": "safemerge",
            "output": self.output,
            "settings": self.settings.to_json(),
            "models": dict(self.models),
            "summary": self.summary,
            "matrices": [r.to_json() for r in self.matrices],
        }
        if self.adapter is not None:
            document["adapter"] = self.adapter
        if self.sweep is not None:
            document["sweep"] = self.sweep
        if self.wall_time_s is not None:
            document["wall_time_s"] = self.wall_time_s
        document["warnings"] = list(self.warnings)
        document["files"] = list(self.files)
        return document

    @classmethod
    def from_json(cls, document: Any, *, source: str) -> Report:
        """A report from its JSON, or one :class:`SafeMergeError` line naming ``source`` and
        the first field that is missing or of the wrong type."""
        if not isinstance(document, dict) or document.get("format") not in (
            REPORT_FORMAT,
            SCAN_FORMAT,
        ):
            raise SafeMergeError(
                f'{source}: not a SafeMERGE report (no "format": "{REPORT_FORMAT}")'
            )
        problems = _damaged_parts(document)
        if problems:
            raise SafeMergeError(
                f"{source}: a damaged SafeMERGE report ({', '.join(problems)} missing or of the "
                "wrong type)"
            )
        if document.get("version", READABLE_VERSIONS[0]) not in READABLE_VERSIONS:
            raise SafeMergeError(
                f"{source}: report version {document.get('version')!r} is not one this version "
                f"of SafeMERGE reads ({', '.join(map(str, READABLE_VERSIONS))})"
            )
        try:
            return cls._parse(document)
        except (ValueError, TypeError) as error:
            raise SafeMergeError(f"{source}: a damaged SafeMERGE report ({error})") from None

    @classmethod
    def _parse(cls, document: dict[str, Any]) -> Report:
        scan = document["format"] == SCAN_FORMAT
        output = document.get("output", "scan" if scan else "model")
        if output not in OUTPUTS:
            raise ValueError(f"output {output!r} is not one of {', '.join(OUTPUTS)}")
        models = document["models"]
        if not all(isinstance(v, str) for v in models.values()):
            raise ValueError("models is not role -> model")
        matrices = [
            _record_from_json(entry, f"matrices[{i}]")
            for i, entry in enumerate(document["matrices"])
        ]
        adapter = document.get("adapter")
        if output == "adapter" and not (
            isinstance(adapter, dict) and {"rank", "uniform_rank", "modules"} <= set(adapter)
        ):
            raise ValueError("adapter missing or incomplete")
        warnings, files = document.get("warnings", []), document.get("files", [])
        if not all(isinstance(w, str) for w in warnings) or not all(
            isinstance(f, str) for f in files
        ):
            raise ValueError("warnings or files is not a list of strings")
        wall = document.get("wall_time_s")
        return cls(
            settings=Settings.from_json(document["settings"]),
            models=dict(models),
            matrices=matrices,
            output=output,
            adapter=adapter,
            sweep=document.get("sweep") if scan else None,
            wall_time_s=wall if isinstance(wall, (int, float)) else None,
            warnings=list(warnings),
            files=list(files),
        )


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _settings_line(settings: Settings) -> str:
    hidden = {"k", "seed"} if not settings.ranks_first else set()
    if settings.combine == Settings.combine:
        hidden.add("density")
    return ", ".join(
        f"{key} {value}"
        for key, value in settings.to_json().items()
        if value not in (None, "") and key not in hidden
    )


def read_report(path: str) -> Report:
    """The report in a file, or in the folder of a merge (adapter, scan) that holds one."""
    if os.path.isdir(path):
        for name in (REPORT_FILENAME, "scan.json"):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            path = os.path.join(path, REPORT_FILENAME)
    try:
        with open(path, encoding="utf-8") as fp:
            document = json.load(fp)
    except FileNotFoundError:
        raise SafeMergeError(
            f"{path}: no such file (a merge output holds {REPORT_FILENAME})"
        ) from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise SafeMergeError(f"{path}: not a readable JSON file ({error})") from None
    return Report.from_json(document, source=path)


def _merged_blocks(report: Report, module: str) -> str:
    blocks = [m.block for m in report.matrices if m.module == module and m.merged]
    if not blocks:
        return "-"
    if any(b is None for b in blocks):
        return f"{len(blocks)} matrices"
    return ",".join(str(b) for b in sorted(blocks))


def model_card_section(report: Report) -> str:
    """A short markdown section appended to the README.md mergekit writes."""
    summary = report.summary
    lines = [
        "",
        "## SafeMERGE",
        "",
        "This model was produced with [SafeMERGE](https://arxiv.org/abs/2503.17239): a fine-tuned"
        " weight matrix is merged with a safety-tuned one only when its update drifted from the"
        " alignment subspace (`rho = cos(C D, D) < threshold`).",
        "",
        f"Settings: {_settings_line(report.settings)}.",
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
    lines += [f"| {role} | {model} |" for role, model in report.models.items()]
    lines += ["", f"Per-matrix figures and decisions: `{REPORT_FILENAME}`.", ""]
    return "\n".join(lines)


def terminal_summary(report: Report) -> str:
    """One screen: totals, a row per module type, and which blocks were merged."""
    summary = report.summary
    header = (
        f"{'module':<14}{'cand.':>6}{'changed':>8}{'merged':>7}  {'rho min/med/max':<19}"
        "  merged blocks"
    )
    lines = [
        f"SafeMERGE: merged {summary['merged']} of {summary['changed']} changed matrices "
        f"({summary['candidates']} candidates)",
        f"  {_settings_line(report.settings)}",
        "  " + ", ".join(f"{role}: {model}" for role, model in report.models.items()),
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


def adapter_card(report: Report, base_model: str, name: str) -> str:
    """The adapter's model card: base model, SafeMERGE settings, the decision of every module."""
    adapter = report.adapter or {}
    lines = [
        "---",
        f"base_model: {base_model}",
        "library_name: peft",
        "tags:",
        "- safemerge",
        "- lora",
        "- mergekit",
        "---",
        f"# {name}",
        "",
        "A PEFT LoRA adapter for the base model above, written by `safemerge adapter`: the "
        "fine-tune's LoRA with SafeMERGE applied module by module (merged modules carry "
        "`(1 - a) D + a S` exactly, kept modules the fine-tune's update).",
        "",
        f"Rank {adapter['rank']} for every module"
        if adapter["uniform_rank"]
        else f"Rank {adapter['rank']} with per-module ranks in `rank_pattern`",
        f" ({adapter['modules']} modules, scaling 1).",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base_model}")',
        f'model = PeftModel.from_pretrained(base, "{name}")',
        "```",
    ]
    lines.append(model_card_section(report))
    lines += ["| module | rho | decision | reason |", "|---|---:|---|---|"]
    for m in report.matrices:
        rho = "-" if m.rho is None else f"{m.rho:.4f}"
        lines.append(f"| {module_name(m.name)} | {rho} | {m.decision} | {m.reason} |")
    return "\n".join(lines) + "\n"
