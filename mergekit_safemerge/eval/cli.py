"""What ``safemerge eval`` does once its options are read: load, generate, judge, write, print."""

from __future__ import annotations

import os
import re
from typing import Any

import click

from mergekit_safemerge.errors import SafeMergeError
from mergekit_safemerge.eval.generation import load_model
from mergekit_safemerge.eval.judges import LlamaGuardJudge, RefusalPatternJudge
from mergekit_safemerge.eval.scoring import PromptSets, evaluate, summary_text
from mergekit_safemerge.outputs.folder import EVAL_FILE, read_manifest, write_json_atomic
from mergekit_safemerge.sources import looks_local

EVAL_FORMAT = EVAL_FILE[1]
DTYPES = ("float32", "bfloat16", "float16", "float64", "auto")


def check_options(options: dict[str, Any]) -> None:
    """Every value typed on the command line, before any model is loaded (one line each)."""
    for key in ("dtype", "guard_dtype"):
        if options[key] not in DTYPES:
            raise SafeMergeError(
                f"--{key.replace('_', '-')} {options[key]!r} is not a dtype (one of "
                f"{', '.join(DTYPES)})"
            )
    for pattern in options["refusal_pattern"]:
        try:
            re.compile(pattern)
        except re.error as error:
            raise SafeMergeError(
                f"--refusal-pattern {pattern!r} is not a regular expression ({error})"
            ) from None
    if options["out"] is not None and not options["out"].strip():
        raise SafeMergeError("--out is an empty path (an unset variable?); give a file name")


def _load(model: str, **kwargs):
    """``load_model`` with one-line errors for a missing folder or an unreachable Hub id."""
    if looks_local(model) and not os.path.isdir(model):
        raise SafeMergeError(f"model {model}: no such folder")
    try:
        return load_model(model, **kwargs)
    except (OSError, ValueError) as error:
        message = " ".join(str(error).split())[:300]
        raise SafeMergeError(f"model {model}: cannot load it ({message})") from None


def _output_path(model: str, out: str | None) -> str:
    folder = model if os.path.isdir(model) else "."
    path = out or os.path.join(folder, EVAL_FILE[0])
    if os.path.isdir(path):
        raise SafeMergeError(f"--out {path} is a folder; give a file name")
    if os.path.exists(path) and read_manifest(path, EVAL_FORMAT) is None:
        raise SafeMergeError(
            f"--out {path} exists and is not a safemerge eval result; choose another file"
        )
    return path


def make_judges(options: dict[str, Any], merge_options) -> tuple[Any, RefusalPatternJudge | None]:
    """``(judge of harmful responses, refusal judge of benign ones or None)`` from the options
    ``safemerge eval`` and ``safemerge tune`` share; a guard model that will not load is one
    line."""
    refusal = (
        RefusalPatternJudge(options["refusal_pattern"]) if options["refusal_pattern"] else None
    )
    if options["judge"] != "llama-guard":
        return refusal or RefusalPatternJudge(), refusal
    if not options["guard_model"]:
        raise SafeMergeError("--judge llama-guard needs --guard-model ID_OR_FOLDER")
    guard_model, guard_tokenizer = _load(
        options["guard_model"], device=merge_options.device or "cpu", dtype=options["guard_dtype"]
    )
    judge = LlamaGuardJudge(
        options["guard_model"],
        model=guard_model,
        tokenizer=guard_tokenizer,
        batch_size=options["batch_size"],
        prompt_format=options["guard_prompt"],
        progress=not merge_options.quiet,
    )
    return judge, refusal


def run_eval(
    model: str,
    harmful: list[str],
    task: list[tuple[str, str]],
    benign: list[str],
    merge_options,
    options: dict[str, Any],
) -> None:
    device = merge_options.device or "cpu"
    out = _output_path(model, options["out"])
    judge, refusal = make_judges(options, merge_options)
    loaded, tokenizer = _load(model, device=device, dtype=options["dtype"])
    result = evaluate(
        loaded,
        tokenizer,
        PromptSets(harmful=harmful, task=task, benign=benign),
        judge=judge,
        refusal=refusal,
        max_new_tokens=options["max_new_tokens"],
        batch_size=options["batch_size"],
        chat=not options["no_chat_template"],
        progress=not merge_options.quiet,
    )
    result = {"model": model, **result}
    result["settings"] = {
        "max_new_tokens": options["max_new_tokens"],
        "batch_size": options["batch_size"],
        "chat_template": not options["no_chat_template"],
        "dtype": options["dtype"],
        "judge": options["judge"],
        "guard_model": options["guard_model"],
        "refusal_patterns": list((refusal or RefusalPatternJudge()).patterns),
    }
    write_json_atomic(out, result)
    click.echo(summary_text(result))
    click.echo(f"wrote {out}")
