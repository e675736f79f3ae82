"""The ``safemerge`` command: thin click commands around the package, with mergekit's habits.

Merging itself is the stock ``mergekit-yaml`` command; ``safemerge`` adds what mergekit has no
command for. Options that mean what they mean in mergekit are mergekit's own (same names, help,
defaults and headings: ``--cuda``, ``--device``, ``--lora-merge-cache``, ``--quiet``, ``-v``, ...),
declared in :mod:`mergekit_safemerge.mergekit_options`.
Every error a user can cause is one ``Error: ...`` line; ``-v`` shows library warnings and
tracebacks.

Importing this module imports no torch, transformers, PEFT or mergekit: each command imports what
it runs when it runs, so ``--help``, ``--version`` and ``report`` start in a fraction of a second
(``tests/test_startup.py`` checks it; ``eval`` needs the ``eval`` extra).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from collections.abc import Callable, Iterator

import click

from mergekit_safemerge import __version__
from mergekit_safemerge.errors import SafeMergeError
from mergekit_safemerge.mergekit_options import GroupedHelp, mergekit_options
from mergekit_safemerge.outputs.folder import describe_os_error

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@contextlib.contextmanager
def _library_noise(verbosity: int) -> Iterator[None]:
    """Hide warnings and progress bars of libraries that a user cannot act on (``-v``: show),
    for the command's duration: every setting is restored afterwards."""
    if verbosity:
        yield
        return
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            hf_logging.set_verbosity(level)
            if bars:
                hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _one_line_errors(command: str, verbosity: int = 0) -> Iterator[None]:
    """SafeMergeError (and the OS errors a user causes) as ``Error: safemerge <command>: ...``."""
    try:
        yield
    except SafeMergeError as error:
        if verbosity:
            raise
        raise click.ClickException(f"safemerge {command}: {error}") from None
    except OSError as error:
        if verbosity:
            raise
        target = error.filename or "the output"
        raise click.ClickException(
            f"safemerge {command}: {describe_os_error(error, str(target))}"
        ) from None
    except (click.ClickException, click.exceptions.Exit, click.Abort):
        raise
    except Exception as error:  # anything else a library raised: one line, traceback with -v
        if verbosity:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        raise click.ClickException(
            f"safemerge {command}: {type(error).__name__}: {message} (run with -v for the "
            "traceback)"
        ) from None


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="safemerge")
def cli() -> None:
    """SafeMERGE beside the stock `mergekit-yaml` merge: safety LoRA, scan, tune, adapter, eval.

    \b
    Train:   safemerge safety-lora ALIGNED safety/    (the safety role's LoRA, --data d.jsonl)
    Inspect: safemerge scan my-safemerge.yml          (rho of every matrix, threshold sweep)
    Choose:  safemerge tune my-safemerge.yml tune/ --harmful h.txt --task t.jsonl
    Merge:   mergekit-yaml tune/chosen.yml out/       (stock mergekit, method `safemerge`)
    Adapter: safemerge adapter tune/chosen.yml out/   (the same merge as a PEFT LoRA adapter)
    Report:  safemerge report out/                    (summary of a finished merge or tune)
    Score:   safemerge eval out/ --harmful h.txt --task t.jsonl
    """


def _reading_ahead(function: Callable) -> Callable:
    """Start the read-ahead of the command's tensors (:mod:`.prefetch`) before the options
    import mergekit: the disk reads while Python imports."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        from mergekit_safemerge.prefetch import read_ahead_adapter_inputs

        read_ahead_adapter_inputs(kwargs["config_file"])
        return function(*args, **kwargs)

    return run


# ---------------------------------------------------------------- scan
@cli.command("scan", cls=GroupedHelp, context_settings=CONTEXT)
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option(
    "--out",
    default="scan",
    show_default=True,
    help="Folder for scan.json, scan.csv and scan.png",
)
@mergekit_options(
    "lora_merge_cache", "lora_merge_dtype", "transformers_cache", "trust_remote_code", "cuda",
    "device", "low_cpu_memory", "read_to_gpu", "lazy_unpickle", "num_threads", "quiet",
    "verbosity",
)  # fmt: skip
def scan_command(merge_options, config_file: str, out: str) -> None:
    """Measure rho of every candidate matrix and sweep the threshold, without merging.

    Reads the same YAML as mergekit-yaml, loads tensors lazily as a merge does (a few tensors
    in memory), prints a block x module table of rho and how many matrices each threshold
    would merge, and writes scan.json, scan.csv and scan.png.

    \b
    Example:
      safemerge scan recipes/llama-safemerge.yml --out scan/ --lora-merge-cache ~/.cache/lm
    """
    from mergekit_safemerge.binding.config import read_config
    from mergekit_safemerge.binding.pipeline import publish, run_scan
    from mergekit_safemerge.outputs.folder import SCAN
    from mergekit_safemerge.outputs.scan import (
        build_scan,
        terminal_sweep,
        terminal_table,
        write_scan,
    )

    merge_options.apply_global_options()
    with _one_line_errors("scan", merge_options.verbosity), _library_noise(merge_options.verbosity):
        config, _text = read_config(config_file)
        prepared, records = run_scan(config, out, merge_options, SCAN)
        report = build_scan(records, prepared.settings, prepared.checked.role_sources())
        manifest = report.to_json()
        publish(prepared, manifest, lambda staging: write_scan(report, staging), "the scan")
        report.files = manifest["files"]
    summary = report.summary
    click.echo(terminal_table(report))
    click.echo(
        f"select {report.settings.select}, threshold {report.settings.threshold}: merges "
        f"{summary['merged']} of {summary['changed']} changed matrices "
        f"({summary['candidates']} candidates)"
    )
    click.echo("\nthreshold sweep (merge when rho < tau):")
    click.echo(terminal_sweep(report))
    written = ", ".join(os.path.join(out, name) for name in report.files)
    click.echo(f"\nwrote {written}")


# ---------------------------------------------------------------- adapter
@cli.command("adapter", cls=GroupedHelp, context_settings=CONTEXT)
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.argument("out_path", type=click.Path())
@click.option(
    "--compact/--uniform-rank",
    default=False,
    show_default=True,
    help="Per-module ranks through rank_pattern, or one rank for every module (what every "
    "loader and server reads)",
)
@_reading_ahead
@mergekit_options(
    "allow_crimes", "transformers_cache", "trust_remote_code", "cuda", "device",
    "low_cpu_memory", "read_to_gpu", "lazy_unpickle", "num_threads", "random_seed",
    "write_model_card", "quiet", "verbosity",
)  # fmt: skip
def adapter_command(merge_options, config_file: str, out_path: str, compact: bool) -> None:
    """Write SafeMERGE's result as one PEFT LoRA adapter instead of a full model.

    Takes the recipe mergekit-yaml takes, with the fine-tuned and safety roles as LoRA
    adapters on the aligned model (finetuned_adapter / safety_adapter, or aligned+adapter, read
    here as factors). Decides every module as mergekit-yaml does and writes adapter_config.json,
    adapter_model.safetensors, safemerge_report.json and a model card. A merged module holds
    (1 - a) D + a S exactly (rank r_f + r_s); a kept module the fine-tune's update.

    \b
    Example:
      safemerge adapter recipes/llama3.1-8b-instruct-safemerge.yml out/safe-gsm8k-lora
      # then, in Python: PeftModel.from_pretrained(aligned_model, "out/safe-gsm8k-lora")
    """
    from mergekit_safemerge.binding.config import read_config
    from mergekit_safemerge.binding.pipeline import run_adapter
    from mergekit_safemerge.outputs.report import terminal_summary

    merge_options.apply_global_options()
    with (
        _one_line_errors("adapter", merge_options.verbosity),
        _library_noise(merge_options.verbosity),
    ):
        config, _text = read_config(config_file)
        report = run_adapter(config, out_path, merge_options, compact=compact)
    if not merge_options.quiet:
        adapter = report.adapter
        click.echo(terminal_summary(report))
        click.echo(
            f"  adapter: rank {adapter['rank']}"
            + ("" if adapter["uniform_rank"] else " with rank_pattern")
            + f", {adapter['modules']} modules -> {out_path}"
        )


# ---------------------------------------------------------------- prompts, judges, generation
def _prompts(path: str | None, limit: int | None, *, task: bool = False) -> list:
    from mergekit_safemerge.eval import read_records, read_task

    if not path:
        return []
    try:
        items = read_task(path) if task else [r["prompt"] for r in read_records(path)]
    except ValueError as error:  # a bad line, a task line without an answer
        raise SafeMergeError(str(error)) from None
    if not items:
        raise SafeMergeError(f"{path}: no prompts in the file (it is empty or blank)")
    return items[:limit]


def _stack(*decorators: Callable) -> Callable:
    """Several click decorators as one, applied in the order written (first on top)."""

    def decorate(function: Callable) -> Callable:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return decorate


_PROMPT_OPTIONS = _stack(
    click.option(
        "--harmful",
        type=click.Path(dir_okay=False),
        help='Harmful requests: JSONL with "prompt", or one a line',
    ),
    click.option(
        "--task",
        type=click.Path(dir_okay=False),
        help='Task prompts: JSONL of {"prompt", "answer"} (exact match)',
    ),
    click.option(
        "--benign",
        type=click.Path(dir_okay=False),
        help="Benign requests for over-refusal: JSONL or one a line",
    ),
)
"""The prompt sets ``safemerge eval`` and ``safemerge tune`` read (the same formats)."""

_JUDGE_AND_GENERATION_OPTIONS = _stack(
    click.option(
        "--judge",
        type=click.Choice(["refusal-pattern", "llama-guard"]),
        default="refusal-pattern",
        show_default=True,
        help="How responses to harmful requests are judged",
    ),
    click.option("--guard-model", help="Llama-Guard-3 Hub id or folder (--judge llama-guard)"),
    click.option(
        "--guard-prompt",
        type=click.Choice(["auto", "chat-template", "builtin"]),
        default="auto",
        show_default=True,
        help="Guard prompt: the guard tokenizer's chat template when it has one (auto), or ours",
    ),
    click.option(
        "--guard-dtype", default="bfloat16", show_default=True, help="dtype of the guard model"
    ),
    click.option(
        "--refusal-pattern",
        multiple=True,
        help="Refusal regex, repeatable  [default: common English refusal openings]",
    ),
    click.option(
        "--max-new-tokens",
        type=click.IntRange(min=1),
        default=64,
        show_default=True,
        help="Tokens generated per response",
    ),
    click.option(
        "--batch-size",
        type=click.IntRange(min=1),
        default=16,
        show_default=True,
        help="Prompts per generation batch",
    ),
    click.option(
        "--limit",
        type=click.IntRange(min=1),
        default=None,
        help="Only the first N prompts of each set",
    ),
    click.option(
        "--dtype", default="float32", show_default=True, help="dtype of the evaluated model"
    ),
    click.option(
        "--no-chat-template", is_flag=True, help="Feed prompts raw, without the chat template"
    ),
)
"""How responses are generated and judged, shared by ``safemerge eval`` and ``safemerge tune``."""


def _prompt_sets(options: dict, *, required: tuple[str, ...] = ()):
    """The prompt files of ``options`` read, each one line on a mistake."""
    from mergekit_safemerge.eval import PromptSets

    sets = PromptSets(
        harmful=_prompts(options["harmful"], options["limit"]),
        task=_prompts(options["task"], options["limit"], task=True),
        benign=_prompts(options["benign"], options["limit"]),
    )
    if not (sets.harmful or sets.task or sets.benign):
        raise SafeMergeError("give at least one of --harmful, --task, --benign")
    for name in required:
        if not getattr(sets, name):
            raise SafeMergeError(f"give --{name} (validation prompts)")
    return sets


# ---------------------------------------------------------------- tune
def _numbers(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise SafeMergeError(f"{option} {text!r}: give comma-separated numbers") from None


@cli.command("tune", cls=GroupedHelp, context_settings=CONTEXT)
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.argument("out_path", type=click.Path())
@_PROMPT_OPTIONS
@click.option(
    "--thresholds",
    help="Comma-separated thresholds  [default: every distinct cut of the measured rho]",
)
@click.option(
    "--safety-weights", default="0.2,0.5,0.8", show_default=True, help="Comma-separated weights a"
)
@click.option(
    "--lambdas",
    default="0.2,0.4,0.6,0.8",
    show_default=True,
    help="Interpolation weights of the W_al + lambda D control",
)
@click.option(
    "--max-points",
    type=click.IntRange(min=1),
    default=24,
    show_default=True,
    help="Most thresholds evaluated (spread over the counts of merged matrices)",
)
@click.option(
    "--controls",
    default=",".join(("finetuned", "aligned", "all", "interpolation", "random", "no-safety")),
    show_default=True,
    help="Comparisons evaluated on the same prompts",
)
@click.option(
    "--random-seeds",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="random_k draws at the chosen point's count",
)
@click.option(
    "--keep-accuracy",
    type=float,
    default=0.95,
    show_default=True,
    help="Keep at least this share of the fine-tuned task accuracy",
)
@click.option(
    "--max-over-refusal",
    type=float,
    default=0.05,
    show_default=True,
    help="Over-refuse at most this much more than the fine-tuned model (with --benign)",
)
@click.option(
    "--write",
    type=click.Choice(["adapter", "model"]),
    default=None,
    help="Also write the chosen merge into OUT/chosen/ (safemerge adapter or a full model)",
)
@_JUDGE_AND_GENERATION_OPTIONS
@mergekit_options(
    "lora_merge_cache", "lora_merge_dtype", "transformers_cache", "trust_remote_code", "cuda",
    "device", "low_cpu_memory", "read_to_gpu", "lazy_unpickle", "num_threads", "random_seed",
    "quiet", "verbosity",
)  # fmt: skip
def tune_command(merge_options, config_file: str, out_path: str, **options) -> None:
    """Choose the threshold and safety weight on your validation prompts, with controls.

    Reads the recipe mergekit-yaml takes, measures rho once, keeps one model in memory and
    evaluates every distinct selection of the thresholds at every safety weight, plus the
    controls (fine-tuned, aligned, select all, interpolation, random_k, S = 0). One rule picks
    the lowest harmfulness that keeps the task accuracy. Writes tune.json, tune.csv, tune.png
    and chosen.yml.

    \b
    Example:
      safemerge tune recipes/llama-safemerge.yml tune/ --harmful val-harmful.txt \\
          --task val-gsm8k.jsonl --benign val-benign.txt --lora-merge-cache ~/.cache/lm
    """
    from mergekit_safemerge.binding.config import read_config
    from mergekit_safemerge.eval.cli import check_options, make_judges
    from mergekit_safemerge.tune.run import TuneSettings, run_tune

    merge_options.apply_global_options()
    with _one_line_errors("tune", merge_options.verbosity), _library_noise(merge_options.verbosity):
        check_options({**options, "out": None})
        settings = TuneSettings(
            thresholds=_numbers(options["thresholds"], "--thresholds"),
            safety_weights=_numbers(options["safety_weights"], "--safety-weights"),
            lambdas=_numbers(options["lambdas"], "--lambdas"),
            max_points=options["max_points"],
            controls=tuple(c.strip() for c in options["controls"].split(",") if c.strip()),
            random_seeds=options["random_seeds"],
            keep_accuracy=options["keep_accuracy"],
            max_over_refusal=options["max_over_refusal"],
            write=options["write"],
            eval_dtype=options["dtype"],
            batch_size=options["batch_size"],
            max_new_tokens=options["max_new_tokens"],
            chat=not options["no_chat_template"],
            quiet=merge_options.quiet,
        )
        settings.check()
        config, text = read_config(config_file)
        sets = _prompt_sets(options, required=("harmful", "task"))
        judge, refusal = make_judges(options, merge_options)
        document = run_tune(config, text, out_path, merge_options, sets, judge, refusal, settings)
    click.echo(document["summary"])
    click.echo(f"wrote {', '.join(os.path.join(out_path, f) for f in document['files'])}")
    if document["chosen"] is None:
        raise click.ClickException(
            "safemerge tune: no point keeps the task accuracy within the limits; nothing was "
            "chosen (see the closest point above)"
        )


# ---------------------------------------------------------------- safety-lora
def _safety_lora_options(function: Callable) -> Callable:
    """The options of ``safety-lora``, defaults from :data:`mergekit_safemerge.train.DEFAULTS`."""
    from mergekit_safemerge.train import DEFAULTS as D

    def positive(kind):
        return click.IntRange(min=1) if kind is int else click.FloatRange(min=0, min_open=True)

    options = [
        click.option("--data", required=True, type=click.Path(dir_okay=False),
                     help='JSONL of {"prompt", "response"} or chat {"messages"}; prompts only '
                     "with --self-refusals (never modified)"),
        click.option("--self-refusals", is_flag=True,
                     help="The aligned model writes each response itself (greedy, its chat "
                     "template); only those the refusal judge accepts are kept"),
        click.option("--refusal-pattern", multiple=True,
                     help="Refusal regex, repeatable  [default: common English refusal openings]"),
        click.option("--targets", default=",".join(D.targets), show_default=True,
                     help="Modules the LoRA trains, comma-separated"),
        click.option("--rank", type=positive(int), default=D.rank, show_default=True,
                     help="LoRA rank r"),
        click.option("--alpha", type=positive(float), default=None,
                     help="lora_alpha  [default: the rank, scaling 1]"),
        click.option("--epochs", type=positive(float), default=D.epochs, show_default=True,
                     help="Passes over the training examples"),
        click.option("--max-steps", type=positive(int), default=None,
                     help="Optimizer steps; overrides --epochs"),
        click.option("--lr", type=positive(float), default=D.lr, show_default=True,
                     help="Learning rate (linear decay)"),
        click.option("--batch-size", type=positive(int), default=D.batch_size,
                     show_default=True, help="Examples per step, and prompts per generation batch"),
        click.option("--max-length", type=click.IntRange(min=2), default=D.max_length,
                     show_default=True, help="Tokens of prompt + response in the chat template; "
                     "longer prompts are dropped, longer responses cut (both counted)"),
        click.option("--max-new-tokens", type=positive(int), default=D.max_new_tokens,
                     show_default=True, help="Tokens generated per self-refusal and held-out "
                     "response"),
        click.option("--seed", type=int, default=D.seed, show_default=True,
                     help="Seed of the held-out split, the LoRA's initialisation and the order"),
        click.option("--eval-fraction", type=click.FloatRange(min=0, max=1, max_open=True),
                     default=D.eval_fraction, show_default=True,
                     help="Share of prompts held out: refusal on them before and after training"),
        click.option("--cuda/--no-cuda", default=False, show_default=True,
                     help="Train on the GPU (bfloat16); float32 on the CPU otherwise"),
        click.option("--device", default=None, help="Train on this device (cpu, cuda, cuda:1)"),
        click.option("--quiet", is_flag=True, help="No progress bars and no summary"),
        click.option("-v", "verbosity", count=True,
                     help="Show library warnings and tracebacks"),
    ]  # fmt: skip
    for option in reversed(options):
        function = option(function)
    return function


@cli.command("safety-lora", context_settings=CONTEXT)
@click.argument("aligned")
@click.argument("out_path", type=click.Path())
@_safety_lora_options
def safety_lora_command(aligned: str, out_path: str, **options) -> None:
    """Train the safety LoRA a recipe's safety role needs: ALIGNED + LoRA on refusals.

    ALIGNED is the aligned chat model (a folder or Hub id), the recipe's base_model; the
    adapter's base_model_name_or_path is exactly this string. Trains with TRL's SFTTrainer on
    harmful requests paired with refusals, in the model's chat template, with the loss on the
    response only; measures the refusal rate on held-out prompts before and after; writes a
    PEFT adapter, safety_lora_report.json and a model card (naming the data's sha256 only).

    \b
    Example:
      safemerge safety-lora meta-llama/Llama-2-7b-chat-hf out/safety-lora \\
          --data refusals.jsonl --cuda
      # then in the recipe: safety_adapter: out/safety-lora
    """
    from mergekit_safemerge.train import SafetyLoraOptions

    verbosity = options.pop("verbosity")
    cuda = options.pop("cuda")
    device = options.pop("device") or ("cuda" if cuda else "cpu")
    with _one_line_errors("safety-lora", verbosity), _library_noise(verbosity):
        from mergekit_safemerge.train.report import summary_text
        from mergekit_safemerge.train.run import run_safety_lora

        targets = tuple(t.strip() for t in options.pop("targets").split(",") if t.strip())
        settings = SafetyLoraOptions(
            targets=targets,
            refusal_patterns=tuple(options.pop("refusal_pattern")),
            device=device,
            **options,
        )
        report = run_safety_lora(aligned, out_path, settings, echo=click.echo)
    if not settings.quiet:
        click.echo(summary_text(report, out_path))
    else:
        for note in report["warnings"]:
            click.echo(f"warning: {note}", err=True)


# ---------------------------------------------------------------- report
@cli.command("report", context_settings=CONTEXT)
@click.argument("path", type=click.Path())
def report_command(path: str) -> None:
    """Print the summary of a finished SafeMERGE merge (or of a scan or a tune).

    PATH is the merged model's folder or its safemerge_report.json, a scan folder, or a tune
    folder.

    \b
    Example:
      safemerge report out/
    """
    from mergekit_safemerge.outputs.folder import TUNE, read_manifest
    from mergekit_safemerge.outputs.report import read_report, terminal_summary

    tune = os.path.join(path, TUNE.manifest) if os.path.isdir(path) else path
    document = read_manifest(tune, TUNE.format) if os.path.isfile(tune) else None
    if document is not None and isinstance(document.get("summary"), str):
        click.echo(document["summary"])
        return
    with _one_line_errors("report"):
        report = read_report(path)
    click.echo(terminal_summary(report))


# ---------------------------------------------------------------- demo-models
@cli.command("demo-models", cls=GroupedHelp, context_settings=CONTEXT)
@click.argument("out_dir", type=click.Path())
@click.option(
    "--arch",
    type=click.Choice(["llama", "qwen2", "gemma2"]),
    default="llama",
    show_default=True,
    help="Architecture of the tiny models",
)
@click.option(
    "--layers",
    type=click.IntRange(min=1, max=64),
    default=4,
    show_default=True,
    help="Transformer blocks",
)
@click.option(
    "--random-seed", type=int, default=0, show_default=True, help="Seed of every random weight"
)
def demo_models_command(out_dir: str, arch: str, layers: int, random_seed: int) -> None:
    """Write the four tiny demo models (the four roles) to OUT_DIR, offline.

    Random tiny models of a real architecture, with updates built so that rho spreads over
    [0, 1]: enough to try a recipe end to end in seconds (recipes/demo-safemerge.yml).

    \b
    Example:
      safemerge demo-models .demo/models && mergekit-yaml recipes/demo-safemerge.yml out/demo
    """
    from mergekit_safemerge.binding.pipeline import signals_as_exceptions
    from mergekit_safemerge.demo.tiny_models import ROLE_FOLDERS, build_role_models
    from mergekit_safemerge.outputs.folder import DEMO_MODELS, OutputFolder

    with _one_line_errors("demo-models"), _library_noise(0):
        output = OutputFolder(out_dir, DEMO_MODELS, what="folder")
        output.check()
        with signals_as_exceptions(), output:
            build_role_models(output.staging, arch, seed=random_seed, num_layers=layers)
            output.publish(
                {
                    "format": DEMO_MODELS.format,
                    "arch": arch,
                    "layers": layers,
                    "random_seed": random_seed,
                }
            )
    for role in ROLE_FOLDERS:
        click.echo(f"{role:<10} {os.path.join(out_dir, role)}")


# ---------------------------------------------------------------- eval
@cli.command("eval", cls=GroupedHelp, context_settings=CONTEXT)
@click.argument("model")
@_PROMPT_OPTIONS
@_JUDGE_AND_GENERATION_OPTIONS
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    help="Result JSON  [default: MODEL/safemerge_eval.json, or ./ for a Hub id]",
)
@mergekit_options("cuda", "device", "trust_remote_code", "quiet", "verbosity")
def eval_command(merge_options, model: str, **options) -> None:
    """Score a model: harmfulness, task accuracy and over-refusal, with 95% intervals.

    MODEL is a folder (e.g. a merge output) or a Hub id. Responses are greedy; harmful ones are
    judged by a refusal pattern or by a Llama Guard model.

    \b
    Example:
      safemerge eval out/ --harmful harmful.txt --task gsm8k-lite.jsonl --benign benign.txt
    """
    from mergekit_safemerge.eval.cli import check_options, run_eval

    merge_options.apply_global_options()
    with _one_line_errors("eval", merge_options.verbosity), _library_noise(merge_options.verbosity):
        check_options(options)
        sets = _prompt_sets(options)
        run_eval(model, sets.harmful, sets.task, sets.benign, merge_options, options)


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status (click's, for ``--help`` and errors)."""
    try:
        cli.main(args=argv, prog_name="safemerge", standalone_mode=False)
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.ClickException as error:
        error.show()
        return error.exit_code
    except click.Abort:
        click.echo("Aborted!", err=True)
        return 1
    except BrokenPipeError:  # `safemerge report out/ | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
