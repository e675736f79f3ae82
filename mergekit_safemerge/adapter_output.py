"""``safemerge adapter``: SafeMERGE's result as one PEFT LoRA adapter, not a full model.

The recipe is the one ``mergekit-yaml`` takes, with both LoRA roles given as adapters on the
aligned model (``finetuned_adapter`` / ``safety_adapter``, or ``aligned+adapter`` references,
read here as factors). mergekit's own plan runs in memory over the modules the adapters touch:
only the aligned and unaligned weights of those modules are read, every decision is the one the
full merge makes (same rule, ``filter:`` values, selection modes and report), and each module's
update is collected as LoRA factors:

* a merged module: ``(1 - a) s_f B_f A_f + a s_s B_s A_s`` exactly, as one LoRA of rank
  ``r_f + r_s`` (:func:`~mergekit_safemerge.combine.linear_factors`), or the authors' factor-wise
  combination with ``combine: authors_linear``;
* a kept module: the fine-tune's update unchanged.

All updates are written with scaling 1 (``lora_alpha = r``). By default every module gets one rank
``R`` (the largest), smaller updates padded with zero factors, because several serving stacks
ignore ``rank_pattern`` / ``alpha_pattern``; ``compact`` writes each module at its own rank
through those patterns instead.
"""

from __future__ import annotations

import collections
import os
import time
from typing import Any

import torch

from mergekit_safemerge.adapters import KEY_PREFIX, open_adapter
from mergekit_safemerge.combine import COMBINE_NAMES, FACTOR_RULES
from mergekit_safemerge.errors import SafeMergeError
from mergekit_safemerge.records import MatrixRecord
from mergekit_safemerge.roles import ADAPTER_PARAMETERS, ALIGNED
from mergekit_safemerge.targets import module_name
from mergekit_safemerge.updates import LoraFactors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


# ---------------------------------------------------------------- the recipe
def factor_recipe(config):
    """The configuration with ``aligned+adapter`` role models turned into adapter parameters.

    Refuses a LoRA role given as a full model, an adapter on another model than the aligned
    one, and a ``combine`` rule without an exact low-rank form, each in one line.
    """
    from mergekit.config import ConditionalParameter

    data = config.model_dump(mode="json", exclude_none=True)
    base = config.base_model
    parameters = dict(data.get("parameters") or {})
    kept = []
    for i, entry in enumerate(config.models or []):
        role = (entry.parameters or {}).get("role")
        if role not in ADAPTER_PARAMETERS:
            kept.append(data["models"][i])
            continue
        where = f"models[{i}] ({entry.model})"
        if entry.model.lora is None:
            raise SafeMergeError(
                f"{where}: safemerge adapter writes a LoRA adapter, so the {role} role must be a "
                f"LoRA on the aligned model (aligned+adapter or parameters."
                f"{ADAPTER_PARAMETERS[role]}); for a full fine-tune use mergekit-yaml"
            )
        if base is None or entry.model.model != base.model or base.lora is not None:
            raise SafeMergeError(
                f"{where}: the {role} adapter must sit on the aligned model {base}; an adapter "
                f"on {entry.model.model} is a different update"
            )
        parameters[ADAPTER_PARAMETERS[role]] = entry.model.lora.path
    for role, key in ADAPTER_PARAMETERS.items():
        if not parameters.get(key):
            raise SafeMergeError(
                f"parameters.{key}: safemerge adapter needs the {role} role as a LoRA adapter "
                f"(parameters.{key}, or a model written aligned+adapter)"
            )
    for value in _leaf_values(parameters.get("combine", "linear"), ConditionalParameter):
        if value in COMBINE_NAMES and value not in FACTOR_RULES:
            raise SafeMergeError(
                f"parameters.combine: {value} has no exact low-rank form (a random or sign mask "
                "of B A is not a product of smaller factors), so it cannot be written as an "
                "adapter; use combine: linear or authors_linear here, or mergekit-yaml for a "
                "full model"
            )
    if config.models is not None:
        data["models"] = kept
    data["parameters"] = parameters
    from mergekit.config import MergeConfiguration

    return MergeConfiguration.model_validate(data)


def _leaf_values(setting: Any, conditional: type):
    if isinstance(setting, dict) and "value" in setting:
        yield from _leaf_values(setting["value"], conditional)
    elif isinstance(setting, conditional):
        yield from _leaf_values(setting.value, conditional)
    elif isinstance(setting, list):
        for item in setting:
            yield from _leaf_values(item, conditional)
    else:
        yield setting


# ---------------------------------------------------------------- the adapter
def _padded(factors: LoraFactors, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_A, lora_B)`` of scaling 1 for ``factors``, zero-padded to ``rank``."""
    left, right = factors.left.float().cpu(), factors.right.float().cpu()
    pad = rank - factors.rank
    if pad:
        left = torch.cat([left, left.new_zeros(left.shape[0], pad)], 1)
        right = torch.cat([right, right.new_zeros(pad, right.shape[1])], 0)
    return right.contiguous(), left.contiguous()


def target_modules(modules: list[str], weights: list[str]) -> list[str]:
    """The module suffixes (``q_proj``) when they match exactly the written modules among the
    model's weights, else the full module paths (PEFT then matches each exactly)."""
    suffixes = sorted({m.rsplit(".", 1)[-1] for m in modules})
    matching = {
        module_name(w)
        for w in weights
        if w.endswith(".weight") and module_name(w).rsplit(".", 1)[-1] in suffixes
    }
    return suffixes if matching == set(modules) else sorted(modules)


def adapter_files(
    factors: dict[str, LoraFactors],
    weights: list[str],
    base_model: str,
    *,
    compact: bool = False,
) -> tuple[dict[str, torch.Tensor], Any, dict[str, Any]]:
    """The tensors, the PEFT ``LoraConfig`` and a summary of the adapter holding ``factors``
    (tensor name -> update; zero updates left out)."""
    from peft import LoraConfig

    updates = {module_name(name): f for name, f in sorted(factors.items()) if f.rank > 0}
    if not updates:
        raise SafeMergeError(
            "the fine-tune adapter changes none of the modules in this recipe (check targets)"
        )
    ranks = {module: f.rank for module, f in updates.items()}
    if compact:
        common = collections.Counter(ranks.values()).most_common(1)[0][0]
        pattern = {m: r for m, r in ranks.items() if r != common}
        rank = common
    else:
        rank, pattern = max(ranks.values()), {}
    tensors: dict[str, torch.Tensor] = {}
    for module, update in updates.items():
        down, up = _padded(update, ranks[module] if compact else rank)
        tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = down
        tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = up
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,  # scaling 1: the factors already carry every scale
        target_modules=target_modules(list(updates), weights),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
        inference_mode=True,
    )
    summary = {
        "rank": rank,
        "uniform_rank": not pattern,
        "rank_pattern": pattern,
        "modules": len(updates),
        "module_ranks": dict(sorted(collections.Counter(ranks.values()).items())),
    }
    return tensors, config, summary


def adapter_card(report: dict[str, Any], base_model: str, name: str) -> str:
    """The adapter's model card: base model, SafeMERGE settings, the decision of every module."""
    from mergekit_safemerge.report import model_card_section

    adapter = report["adapter"]
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
    for m in report["matrices"]:
        rho = "-" if m["rho"] is None else f"{m['rho']:.4f}"
        lines.append(f"| {module_name(m['name'])} | {rho} | {m['decision']} | {m['reason']} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the command
def run_adapter(config, out_path: str, options, *, compact: bool = False) -> dict[str, Any]:
    """Validate, decide every module through mergekit's plan, write and publish the adapter."""
    from safetensors.torch import save_file

    from mergekit_safemerge import report
    from mergekit_safemerge.output import write_json_atomic
    from mergekit_safemerge.run import prepare_run, ranking_for, signals_as_exceptions
    from mergekit_safemerge.scan.measure import run_in_memory
    from mergekit_safemerge.session import MergeSession

    config = factor_recipe(config)
    prepared = prepare_run(config, out_path, options)
    checked, output, settings = prepared.checked, prepared.output, prepared.settings
    started = time.monotonic()
    session = MergeSession(factor_output=True)
    session.ranking = ranking_for(config, options, settings)
    touched = set()
    for adapter in checked.adapters.values():
        touched |= {f"{m}.weight" for m in open_adapter(adapter.folder).modules}
    weights = run_in_memory(
        config, options, session, keep=touched.__contains__, desc="SafeMERGE adapter"
    )
    base_model = str(checked.models[ALIGNED])
    tensors, lora_config, summary = adapter_files(
        session.factors, weights, base_model, compact=compact
    )
    records: list[MatrixRecord] = session.records
    document = report.build_report(records, settings, checked.role_sources())
    document["output"] = "adapter"
    document["adapter"] = summary
    document["wall_time_s"] = round(time.monotonic() - started, 3)
    document["warnings"] = list(checked.warnings)
    with signals_as_exceptions(), output:
        stage = output.staging
        save_file(tensors, os.path.join(stage, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        lora_config.save_pretrained(stage)
        if options.write_model_card:
            name = os.path.basename(os.path.abspath(out_path))
            with open(os.path.join(stage, "README.md"), "w", encoding="utf-8") as fp:
                fp.write(adapter_card(document, base_model, name))
        document["files"] = sorted({*output.staged_files(), report.REPORT_FILENAME})
        write_json_atomic(os.path.join(stage, report.REPORT_FILENAME), document)
        output.publish()
    return document
