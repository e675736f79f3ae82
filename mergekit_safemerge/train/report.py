"""What a safety-LoRA run writes besides the adapter: the report (the folder's manifest), the
model card and the one-screen summary. Pure Python over the report document."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence
from typing import Any

FORMAT = "safemerge-safety-lora"
VERSION = 1
PACKAGES = (
    "mergekit-safemerge", "mergekit", "torch", "transformers", "peft", "trl", "datasets",
    "accelerate",
)  # fmt: skip


def versions() -> dict[str, str]:
    """Installed versions of the libraries that shaped the adapter."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def refusal_rate(refused: int, n: int) -> dict[str, Any]:
    """``refused / n`` with its 95% Wilson interval."""
    from mergekit_safemerge.eval.stats import wilson_interval

    low, high = wilson_interval(refused, n)
    return {"refused": refused, "n": n, "rate": refused / n if n else None, "ci95": [low, high]}


def held_out_section(
    before: Sequence[bool], after: Sequence[bool], responses_changed: int, judge: dict[str, Any]
) -> dict[str, Any]:
    """The held-out measurement: refusal before and after training, and whether it moved."""
    n = len(before)
    b, a = sum(before), sum(after)
    return {
        "n": n,
        "judge": judge,
        "before": refusal_rate(b, n),
        "after": refusal_rate(a, n),
        "responses_changed": responses_changed,
        "became_refusals": sum(1 for x, y in zip(before, after, strict=True) if y and not x),
        "stopped_refusing": sum(1 for x, y in zip(before, after, strict=True) if x and not y),
        "changed": responses_changed > 0,
    }


def warnings_for(report: dict[str, Any]) -> list[str]:
    """What a user should know before merging with this adapter."""
    notes = []
    held = report.get("held_out")
    training = report["training"]
    if held is not None and not held["changed"]:
        notes.append(
            f"training changed none of the {held['n']} held-out responses (refusal "
            f"{held['before']['refused']}/{held['n']} before and after): this adapter moves "
            "nothing there, so a SafeMERGE merge with it will mostly shrink the fine-tune's "
            "update (S ~ 0); train on requests the aligned model does not yet refuse, or "
            "longer"
        )
    elif held is not None and held["after"]["refused"] < held["before"]["refused"]:
        notes.append(
            f"the adapter refuses fewer held-out prompts than the aligned model "
            f"({held['after']['refused']} vs {held['before']['refused']} of {held['n']}); "
            "check the data's responses"
        )
    if held is None:
        notes.append("--eval-fraction 0: no held-out prompts, so the effect was not measured")
    first, last = training["loss_first_tenth"], training["loss_last_tenth"]
    if first is not None and first < 0.05:
        notes.append(
            f"the training loss started at {first:.3g}: the aligned model already gives these "
            "responses, so the adapter has little to learn"
        )
    elif first is not None and last is not None and last >= first:
        notes.append(
            f"the training loss did not decrease ({first:.3g} in the first tenth, {last:.3g} "
            "in the last); try a higher --lr or more steps"
        )
    data = report["data"]
    if data["responses_truncated"]:
        notes.append(
            f"{data['responses_truncated']} training responses were cut at --max-length "
            f"{report['settings']['max_length']} tokens (trained without their end)"
        )
    return notes


def _pct(rate: dict[str, Any]) -> str:
    low, high = rate["ci95"]
    value = "n/a" if rate["rate"] is None else f"{100 * rate['rate']:.1f}%"
    return f"{value} ({rate['refused']}/{rate['n']}, 95% CI {100 * low:.1f}-{100 * high:.1f}%)"


def _dropped(data: dict[str, Any]) -> str:
    parts = [f"{data['duplicates_dropped']} duplicate prompts"]
    parts.append(f"{data['prompts_too_long_dropped']} prompts longer than --max-length")
    generated = data.get("self_refusals")
    if generated:
        for reason, count in generated["dropped"].items():
            parts.append(f"{count} responses {reason}")
    return ", ".join(parts)


def summary_text(report: dict[str, Any], out: str) -> str:
    """One screen: data, training, held-out refusal before and after, warnings, the output."""
    data, training, settings = report["data"], report["training"], report["settings"]
    lines = [
        f"safety LoRA on {report['aligned_model']} -> {out}",
        f"  data: {data['records']} records in {data['file']} (sha256 {data['sha256'][:12]}...): "
        f"{data['train_examples']} trained on, {data['held_out_examples']} held out",
        f"  dropped: {_dropped(data)}",
    ]
    generated = data.get("self_refusals")
    if generated:
        lines.append(
            f"  self-refusals: the aligned model refused {generated['kept']} of "
            f"{generated['generated']} training prompts (kept those)"
        )
    lines.append(
        f"  LoRA r={settings['rank']} alpha={settings['alpha']:g} on "
        f"{','.join(settings['targets'])}: "
        f"{training['steps']} steps ({training['epochs']:.3g} epochs) in "
        f"{training['seconds']:.1f} s on {settings['device']}, loss "
        f"{training['loss_first_tenth']:.4g} (first tenth) -> {training['loss_last_tenth']:.4g} "
        "(last tenth)"
    )
    held = report.get("held_out")
    if held:
        lines.append(f"  held-out refusal before: {_pct(held['before'])}")
        lines.append(f"  held-out refusal after:  {_pct(held['after'])}")
        lines.append(
            f"  held-out responses changed by training: {held['responses_changed']}/{held['n']}"
        )
    for note in report["warnings"]:
        lines.append(f"  warning: {note}")
    lines.append(f"  use it: safety_adapter: {out}   (or {report['aligned_model']}+{out})")
    return "\n".join(lines)


def model_card(report: dict[str, Any]) -> str:
    """The adapter's README.md: what it is, how to use it, the data by its sha256 only."""
    data, training, settings = report["data"], report["training"], report["settings"]
    aligned = report["aligned_model"]
    held = report.get("held_out")
    lines = [
        "---",
        f"base_model: {aligned}",
        "library_name: peft",
        "tags: [safemerge, safety-lora, lora]",
        "---",
        "",
        f"# Safety LoRA for {aligned}",
        "",
        "A PEFT LoRA adapter trained by `safemerge safety-lora` on harmful requests paired with "
        "refusals, to serve as the `safety` role of a SafeMERGE merge of fine-tunes of "
        f"`{aligned}`:",
        "",
        "```yaml",
        "parameters:",
        "  safety_adapter: path/to/this-folder      # or, under models:",
        f"# - model: {aligned}+path/to/this-folder",
        "#   parameters: {role: safety}",
        "```",
        "",
        "## Data",
        "",
        f"- file sha256: `{data['sha256']}` ({data['records']} records; its contents are not "
        "reproduced here)",
        f"- trained on {data['train_examples']} examples, {data['held_out_examples']} prompts "
        f"held out; dropped: {_dropped(data)}",
    ]
    generated = data.get("self_refusals")
    if generated:
        lines.append(
            f"- responses written by the aligned model itself (greedy, its chat template), kept "
            f"when the refusal judge accepted them: {generated['kept']} of "
            f"{generated['generated']}"
        )
    lines += [
        "",
        "## Training",
        "",
        f"- LoRA r = {settings['rank']}, alpha = {settings['alpha']:g}, dropout 0, on "
        f"{', '.join(settings['targets'])}",
        f"- TRL SFTTrainer, loss on the response only; {training['steps']} steps "
        f"({training['epochs']:.3g} epochs), lr {settings['lr']:g}, "
        f"batch {settings['batch_size']}, "
        f"max length {settings['max_length']}, seed {settings['seed']}, {settings['dtype']} on "
        f"{settings['device']}",
        f"- loss {training['loss_first_tenth']:.4g} in the first tenth of the steps, "
        f"{training['loss_last_tenth']:.4g} in the last; {training['seconds']:.1f} s",
    ]
    if held:
        lines += [
            "",
            "## Held-out refusal (refusal-pattern judge)",
            "",
            f"- before training (the aligned model): {_pct(held['before'])}",
            f"- after training: {_pct(held['after'])}",
            f"- responses changed by training: {held['responses_changed']} of {held['n']}",
        ]
    if report["warnings"]:
        lines += ["", "## Warnings", ""] + [f"- {note}" for note in report["warnings"]]
    lines += ["", "`safety_lora_report.json` holds every figure and setting.", ""]
    return "\n".join(lines)
