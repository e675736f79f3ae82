"""One ``safemerge safety-lora`` run: checks, data, self-refusals, training, measurement, publish.

Order of work (everything a user can get wrong is checked before the model's weights load):

1. the options, the aligned model (a folder must be a model, not an adapter), the data file
   (read, never written; not inside the output folder), the output folder (one output kind per
   folder, never an input);
2. the aligned tokenizer: its chat template (the adapter is trained in the model's own chat
   format), each prompt's length under ``--max-length``;
3. the targets against the model's tensors (a local folder's safetensors headers before
   loading, every model's modules after);
4. inside the output folder's staging and :func:`signals_as_exceptions`: greedy responses of the
   aligned model to the held-out prompts (and to the training prompts with ``--self-refusals``,
   where only those the refusal judge accepts are kept), the TRL training, the held-out
   responses again with the adapter, then the adapter, the card and the report (manifest,
   last). A failure, Ctrl-C or SIGTERM anywhere leaves the output folder as it was.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from mergekit_safemerge.binding.inputs import read_tensor_headers
from mergekit_safemerge.binding.pipeline import signals_as_exceptions
from mergekit_safemerge.core.targets import matches_targets
from mergekit_safemerge.errors import SafeMergeError
from mergekit_safemerge.eval.generation import generate_from_texts, load_model
from mergekit_safemerge.eval.judges import REFUSAL_PATTERNS, RefusalPatternJudge
from mergekit_safemerge.outputs.folder import SAFETY_LORA, OutputFolder
from mergekit_safemerge.sources import looks_local
from mergekit_safemerge.train import SafetyLoraOptions, sft
from mergekit_safemerge.train.data import DataSet, Example, read_data, split_held_out
from mergekit_safemerge.train.report import (
    FORMAT,
    VERSION,
    held_out_section,
    model_card,
    versions,
    warnings_for,
)

NOT_A_REFUSAL = "not accepted by the refusal judge"
CHAT_TEMPLATE_FIX = (
    "its tokenizer has no chat template; the safety LoRA is trained in the model's own chat "
    "format, so save the template the model was aligned with next to it "
    "(tokenizer.chat_template = ...; tokenizer.save_pretrained(folder)) or use the chat model "
    "rather than its base"
)


# ---------------------------------------------------------------- checks before any weight loads
def check_options(options: SafetyLoraOptions) -> None:
    if not options.targets:
        raise SafeMergeError("--targets is empty; name the modules, e.g. q_proj,v_proj")
    for name in options.targets:
        if not name.replace("_", "").replace(".", "").isalnum():
            raise SafeMergeError(
                f"--targets: {name!r} is not a module name (letters, digits, '_', '.')"
            )
    if not 0 <= options.eval_fraction < 1:
        raise SafeMergeError(f"--eval-fraction must be in [0, 1), not {options.eval_fraction}")
    if options.max_steps is None and options.epochs <= 0:
        raise SafeMergeError(f"--epochs must be positive, not {options.epochs}")
    if options.lr <= 0:
        raise SafeMergeError(f"--lr must be positive, not {options.lr}")
    if options.alpha is not None and options.alpha <= 0:
        raise SafeMergeError(f"--alpha must be positive, not {options.alpha}")
    device = options.device
    if device != "cpu":
        import torch

        if not device.startswith("cuda"):
            raise SafeMergeError(f"--device {device}: train on cpu or cuda[:N]")
        if not torch.cuda.is_available():
            raise SafeMergeError(f"--device {device}: no CUDA device is available here")
        try:
            torch.cuda.set_device(torch.device(device))  # the trainer uses the current device
        except (RuntimeError, ValueError) as error:
            raise SafeMergeError(f"--device {device}: {error}") from None


def check_aligned(aligned: str) -> None:
    """A local ALIGNED must be a model folder, not a LoRA adapter (whose base is the model)."""
    if not looks_local(aligned):
        return
    if not os.path.isdir(aligned):
        raise SafeMergeError(f"aligned model {aligned}: no such folder")
    if os.path.isfile(os.path.join(aligned, "adapter_config.json")):
        raise SafeMergeError(
            f"aligned model {aligned} is a LoRA adapter (adapter_config.json); give the aligned "
            "model itself (the adapter's base model), not an adapter"
        )
    if not os.path.isfile(os.path.join(aligned, "config.json")):
        raise SafeMergeError(f"aligned model {aligned}: no config.json; give a model folder")


def check_data_outside(data: str, output: OutputFolder) -> None:
    real = os.path.realpath(data)
    if os.path.commonpath([real, os.path.realpath(output.destination)]) == os.path.realpath(
        output.destination
    ):
        raise SafeMergeError(
            f"--data {data} is inside the {output.label}; keep the data elsewhere (the data "
            "file is never written)"
        )


def load_tokenizer(aligned: str):
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(aligned)
    except (OSError, ValueError) as error:
        message = " ".join(str(error).split())[:300]
        raise SafeMergeError(
            f"aligned model {aligned}: cannot load its tokenizer ({message})"
        ) from None
    if not getattr(tokenizer, "chat_template", None):
        raise SafeMergeError(f"aligned model {aligned}: {CHAT_TEMPLATE_FIX}")
    return tokenizer


def _missing_targets(names: Sequence[str], targets: Sequence[str]) -> list[str]:
    return [t for t in targets if not any(matches_targets(n, (t,)) for n in names)]


def check_targets_on_disk(aligned: str, targets: Sequence[str]) -> None:
    if not looks_local(aligned):
        return
    headers = read_tensor_headers(aligned, label=f"aligned model {aligned}")
    names = [
        n
        for n, header in headers.items()
        if n.endswith(".weight")
        and len(header.shape) == 2
        and "embed" not in n
        and "lm_head" not in n
    ]
    missing = _missing_targets(names, targets)
    if names and missing:
        raise SafeMergeError(
            f"--targets: aligned model {aligned} has no module {', '.join(missing)} (its "
            f"modules end in e.g. {_examples(names)})"
        )


def _examples(names: Sequence[str]) -> str:
    leaves = sorted({n.removesuffix(".weight").rsplit(".", 1)[-1] for n in names})
    return ", ".join(leaves[:10])


def check_loaded(model, aligned: str, targets: Sequence[str]) -> None:
    if getattr(model, "_hf_peft_config_loaded", False):
        raise SafeMergeError(
            f"aligned model {aligned} is a LoRA adapter; give the aligned model itself"
        )
    import torch

    names = [
        f"{n}.weight"
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    ]
    missing = _missing_targets(names, targets)
    if missing:
        raise SafeMergeError(
            f"--targets: aligned model {aligned} has no linear module {', '.join(missing)} (its "
            f"linear modules end in e.g. {_examples(names)})"
        )


# ---------------------------------------------------------------- prompts and lengths
def render(tokenizer, messages: list[dict], *, response: str | None = None) -> str:
    """The chat template's text of a prompt (ready for the response), or of prompt + response."""
    if response is None:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    turns = [*messages, {"role": "assistant", "content": response}]
    return tokenizer.apply_chat_template(turns, tokenize=False)


def _length(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def drop_long_prompts(tokenizer, examples: list[Example], max_length: int) -> tuple[list, int]:
    """Examples whose rendered prompt leaves room for a response in ``max_length`` tokens."""
    kept = [e for e in examples if _length(tokenizer, render(tokenizer, e.messages)) < max_length]
    return kept, len(examples) - len(kept)


def count_truncated(tokenizer, pairs: Sequence[tuple[list, str]], max_length: int) -> int:
    """Prompt + response pairs longer than ``max_length`` tokens (TRL keeps their start)."""
    return sum(
        1 for m, r in pairs if _length(tokenizer, render(tokenizer, m, response=r)) > max_length
    )


def respond(model, tokenizer, examples: Sequence[Example], options, desc: str) -> list[str]:
    """Greedy responses to each example's prompt, through the chat template."""
    if not examples:
        return []
    return generate_from_texts(
        model,
        tokenizer,
        [render(tokenizer, e.messages) for e in examples],
        max_new_tokens=options.max_new_tokens,
        batch_size=options.batch_size,
        progress=not options.quiet,
        desc=desc,
    )


# ---------------------------------------------------------------- the run
def run_safety_lora(
    aligned: str,
    out: str,
    options: SafetyLoraOptions,
    *,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train, measure and publish a safety LoRA on ``aligned`` into ``out``; the report."""
    started = time.monotonic()
    check_options(options)
    check_aligned(aligned)
    data = read_data(options.data, self_refusals=options.self_refusals)
    local = looks_local(aligned)
    output = OutputFolder(
        out, SAFETY_LORA, inputs={f"aligned model {aligned}": aligned} if local else {}
    )
    check_data_outside(options.data, output)
    output.check()
    tokenizer = load_tokenizer(aligned)
    check_targets_on_disk(aligned, options.targets)
    examples, too_long = drop_long_prompts(tokenizer, data.examples, options.max_length)
    if not examples:
        raise SafeMergeError(
            f"--data {options.data}: every prompt is longer than --max-length "
            f"{options.max_length} tokens in the chat template; raise --max-length"
        )
    train, held = split_held_out(examples, options.eval_fraction, options.seed)
    judge = RefusalPatternJudge(options.refusal_patterns or REFUSAL_PATTERNS)
    dtype = "float32" if options.device == "cpu" else "bfloat16"
    if not options.quiet:
        echo(f"loading {aligned} ({dtype} on {options.device})")
    try:
        model, tokenizer = load_model(aligned, device=options.device, dtype=dtype)
    except (OSError, ValueError) as error:
        message = " ".join(str(error).split())[:300]
        raise SafeMergeError(f"aligned model {aligned}: cannot load it ({message})") from None
    check_loaded(model, aligned, options.targets)

    with signals_as_exceptions(), output:
        pairs, trained_lines, before, generated = _training_pairs(
            model, tokenizer, train, held, options, judge, aligned
        )
        truncated = count_truncated(tokenizer, pairs, options.max_length)
        given_refusals = (
            None if options.self_refusals else sum(judge.is_refusal(r) for _, r in pairs)
        )

        schedule = sft.LoraSchedule(
            targets=tuple(options.targets),
            rank=options.rank,
            alpha=options.lora_alpha,
            epochs=options.epochs,
            max_steps=options.max_steps,
            lr=options.lr,
            batch_size=options.batch_size,
            max_length=options.max_length,
            seed=options.seed,
        )
        training_started = time.monotonic()
        trained = sft.train_lora(
            model, tokenizer, pairs, schedule, device=options.device, progress=not options.quiet
        )
        training_seconds = time.monotonic() - training_started
        after = respond(trained.model, tokenizer, held, options, "held-out responses (after)")

        trained.model.peft_config["default"].base_model_name_or_path = aligned
        trained.model.save_pretrained(output.staging, safe_serialization=True)
        tenths = sft.loss_by_tenth(trained.losses)
        report = {
            "format": FORMAT,
            "version": VERSION,
            "aligned_model": aligned,
            "data": _data_section(
                data,
                options,
                too_long,
                truncated,
                train,
                held,
                trained_lines,
                generated,
                given_refusals,
            ),
            "settings": _settings_section(options, judge, dtype),
            "training": {
                "steps": trained.steps,
                "epochs": trained.epochs,
                "examples": len(pairs),
                "loss_first_tenth": tenths[0] if tenths else None,
                "loss_last_tenth": tenths[-1] if tenths else None,
                "loss_by_tenth": tenths,
                "losses": trained.losses,
                "seconds": round(training_seconds, 2),
            },
            "held_out": None,
            "versions": versions(),
        }
        if held:
            before_refused = [judge.is_refusal(r) for r in before]
            after_refused = [judge.is_refusal(r) for r in after]
            changed = sum(1 for x, y in zip(before, after, strict=True) if x != y)
            report["held_out"] = held_out_section(
                before_refused, after_refused, changed, {"name": judge.name}
            )
        report["warnings"] = warnings_for(report)
        report["seconds"] = round(time.monotonic() - started, 2)
        with open(os.path.join(output.staging, "README.md"), "w", encoding="utf-8") as fp:
            fp.write(model_card(report))
        output.publish(report)
    return report


def _training_pairs(model, tokenizer, train, held, options: SafetyLoraOptions, judge, aligned):
    """``(pairs, their data lines, held-out responses before training, generation counts)``:
    the data's own responses, or with ``--self-refusals`` the aligned model's, kept only where
    the refusal judge accepts them."""
    if not options.self_refusals:
        before = respond(model, tokenizer, held, options, "held-out responses (before)")
        return [(e.messages, e.response) for e in train], [e.line for e in train], before, None
    responses = respond(model, tokenizer, [*train, *held], options, "aligned responses")
    own, before = responses[: len(train)], responses[len(train) :]
    keep = [judge.is_refusal(r) for r in own]
    if not any(keep):
        raise SafeMergeError(
            f"--self-refusals: aligned model {aligned} refused none of the {len(train)} training "
            f"prompts of {options.data} by the refusal judge; nothing to train on (give refusals "
            "in the data, or --refusal-pattern for this model's refusals)"
        )
    pairs = [(e.messages, r) for e, r, k in zip(train, own, keep, strict=True) if k]
    lines = [e.line for e, k in zip(train, keep, strict=True) if k]
    generated = {
        "generated": len(train),
        "kept": len(pairs),
        "dropped": {NOT_A_REFUSAL: len(train) - len(pairs)},
        "max_new_tokens": options.max_new_tokens,
    }
    return pairs, lines, before, generated


def _settings_section(options: SafetyLoraOptions, judge, dtype: str) -> dict[str, Any]:
    """The report's ``settings``: every value the training used."""
    return {
        "targets": list(options.targets),
        "rank": options.rank,
        "alpha": options.lora_alpha,
        "dropout": 0.0,
        "epochs": options.epochs,
        "max_steps": options.max_steps,
        "lr": options.lr,
        "batch_size": options.batch_size,
        "max_length": options.max_length,
        "max_new_tokens": options.max_new_tokens,
        "seed": options.seed,
        "eval_fraction": options.eval_fraction,
        "self_refusals": options.self_refusals,
        "refusal_patterns": list(judge.patterns),
        "device": options.device,
        "dtype": dtype,
        "chat_template": "the aligned model's",
        "loss": "response tokens only (TRL prompt-completion, completion_only_loss)",
    }


def _data_section(
    data: DataSet,
    options: SafetyLoraOptions,
    too_long: int,
    truncated: int,
    train: list[Example],
    held: list[Example],
    trained_lines: list[int],
    generated: dict | None,
    given_refusals: int | None,
) -> dict[str, Any]:
    return {
        "file": options.data,
        "sha256": data.sha256,
        "records": data.records,
        "kinds": data.kinds,
        "duplicates_dropped": data.duplicates,
        "prompts_too_long_dropped": too_long,
        "responses_truncated": truncated,
        "responses_in_file_ignored": data.ignored_responses,
        "given_responses_judged_refusals": given_refusals,
        "self_refusals": generated,
        "train_examples": len(trained_lines),
        "held_out_examples": len(held),
        "prompts_for_training": len(train),
        "trained_lines": trained_lines,
        "held_out_lines": [e.line for e in held],
    }
