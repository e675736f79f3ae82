"""SafeMERGE around mergekit's ``run_merge`` and ``mergekit-yaml`` (installed by the import hook).

For a configuration whose ``merge_method`` is ``safemerge``, :func:`run_safemerge`

1. checks the configuration and every local input before a tensor is read
   (:func:`.validation.validate_config`) and the output folder (:class:`.output.OutputFolder`);
2. with a ranking selection mode, measures every candidate first (:mod:`.scan.measure`);
3. runs mergekit's merge into a staging folder next to the destination while the method
   collects one record per candidate; SIGTERM is handled like Ctrl-C;
4. writes the model card (mergekit's, plus a SafeMERGE section; a failure there is a warning, the
   merge is kept), ``mergekit_config.yml`` and ``safemerge_report.json`` (which lists the
   output's files), then publishes the folder and prints a one-screen summary.

On any failure the staging folder is removed and the destination is as it was; the error is one
``Error: safemerge: ...`` line (the traceback with ``-v``). Any other merge method goes straight
to mergekit's own ``run_merge``, untouched.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mergekit_safemerge import METHOD_NAME
from mergekit_safemerge.errors import SafeMergeError

if TYPE_CHECKING:
    from mergekit_safemerge.output import OutputFolder
    from mergekit_safemerge.validation import ValidatedConfig

LOG = logging.getLogger(__name__)
_WRAPPED_MARK = "__safemerge_wrapped__"
_DISK_FULL = re.compile(r"No space left on device|os error 28\b")
_SAFEMERGE_LINE = re.compile(r"^\s*merge_method\s*:\s*[\"']?safemerge\b", re.MULTILINE)


class Terminated(SystemExit):
    """SIGTERM or SIGHUP during a run: unwinds like Ctrl-C so the staging folder is removed."""


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into :class:`Terminated` in the main thread while the block runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise Terminated(128 + signum)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Inside a click command (``mergekit-yaml``), show a SafeMergeError as one ``Error:`` line."""
    try:
        yield
    except SafeMergeError as error:
        import click

        if click.get_current_context(silent=True) is None:
            raise
        raise click.ClickException(f"safemerge: {error}") from None


def _shape_mismatch(error: ValueError, config, options) -> SafeMergeError | None:
    """mergekit's "Tensor size mismatch" as our one line, naming the model where we can."""
    match = re.match(r"Tensor size mismatch for (\S+?):", str(error))
    if match is None:
        return None
    name = match.group(1)
    from mergekit_safemerge.validation import read_tensor_headers

    aligned_shape = None
    for model in [config.base_model, *(m.model for m in config.models or [])]:
        try:
            local = model.merged(
                cache_dir=options.lora_merge_cache, lora_merge_dtype=options.lora_merge_dtype
            ).local_path(cache_dir=options.transformers_cache)
            header = read_tensor_headers(local, label=f"model {model}").get(name)
        except Exception:  # naming the model is a courtesy; the one line comes anyway
            continue
        if header is None:
            continue
        if aligned_shape is None:
            aligned_shape = header.shape
        elif header.shape != aligned_shape:
            return SafeMergeError(
                f"tensor {name}: shape {header.shape} in model {model} differs from "
                f"{aligned_shape} in aligned model {config.base_model}"
            )
    shapes = str(error).split(":", 1)[1].strip().rstrip(".")
    return SafeMergeError(
        f"tensor {name}: the models have different shapes ({shapes}); every role must have the "
        "aligned model's architecture and size"
    )


def _translate(error: BaseException, config, options, out_path: str) -> BaseException:
    """A one-line SafeMergeError for what a user can cause; other errors as they are."""
    from mergekit_safemerge.output import describe_os_error

    nothing = f"nothing was written to {out_path}"
    if isinstance(error, SafeMergeError):
        return error
    if isinstance(error, OSError):
        return SafeMergeError(f"{describe_os_error(error, 'the merged model')}; {nothing}")
    if isinstance(error, Exception) and _DISK_FULL.search(str(error)):  # safetensors' own error
        full = OSError(errno.ENOSPC, "No space left on device")
        return SafeMergeError(f"{describe_os_error(full, 'the merged model')}; {nothing}")
    if isinstance(error, ValueError):
        translated = _shape_mismatch(error, config, options)
        if translated is not None:
            return translated
    if isinstance(error, Exception):
        message = " ".join(str(error).split()) or type(error).__name__
        hint = "" if options.verbosity else " (run with -v for the traceback)"
        return SafeMergeError(
            f"the merge failed: {type(error).__name__}: {message}; {nothing}{hint}"
        )
    return error


def _card_config(merge_config):
    """The configuration with local model folders as absolute paths, so that mergekit's card
    never asks the Hub about a local folder written like ``models/aligned``."""
    import yaml
    from mergekit.config import MergeConfiguration

    def absolute(reference: str) -> str:
        path, plus, lora = reference.partition("+")
        path = os.path.abspath(path) if os.path.isdir(path) else path
        if plus and os.path.isdir(lora):
            lora = os.path.abspath(lora)
        return path + plus + lora

    def walk(node):
        if isinstance(node, dict):
            return {
                k: absolute(v) if k in ("model", "base_model") and isinstance(v, str) else walk(v)
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [walk(item) for item in node]
        return node

    return MergeConfiguration.model_validate(walk(yaml.safe_load(merge_config.to_yaml())))


def write_model_card(merge_config, config_source: str | None, folder: str, name: str, section: str):
    """mergekit's model card with our section appended, and ``mergekit_config.yml``."""
    from mergekit.card import generate_card

    source = config_source or merge_config.to_yaml()
    card = generate_card(config=_card_config(merge_config), config_yaml=source, name=name)
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as fp:
        fp.write(card + section)


def _write_config_copy(merge_config, config_source: str | None, folder: str) -> None:
    with open(os.path.join(folder, "mergekit_config.yml"), "w", encoding="utf-8") as fp:
        fp.write(config_source or merge_config.to_yaml())


@dataclass(frozen=True)
class PreparedRun:
    """What every SafeMERGE run establishes before a tensor is read."""

    checked: ValidatedConfig
    output: OutputFolder
    settings: dict


def prepare_run(merge_config, out_path: str, options) -> PreparedRun:
    """Register, validate the configuration and its inputs, print the warnings, check the output
    folder: everything that needs no tensor data (shared by the merge and the adapter output)."""
    from mergekit_safemerge import report
    from mergekit_safemerge.output import OutputFolder
    from mergekit_safemerge.registration import register_method
    from mergekit_safemerge.validation import validate_config

    register_method()
    checked = validate_config(merge_config, options)
    for warning in checked.warnings:
        print(f"Warning: safemerge: {warning}", file=sys.stderr, flush=True)
    output = OutputFolder(
        out_path,
        manifest=report.REPORT_FILENAME,
        manifest_format=report.REPORT_FORMAT,
        inputs=checked.input_labels(),
    )
    output.check()
    return PreparedRun(checked, output, checked.report_settings(options, merge_config.dtype))


def ranking_for(merge_config, options, settings: dict) -> dict[str, str] | None:
    """With a ranking selection mode, the selected names (and reasons) from a measuring pass."""
    from mergekit_safemerge.decide import changed_rhos, rank_matrices
    from mergekit_safemerge.scan.measure import measure_candidates, plain_targets

    if settings["select"] == "threshold":
        return None
    records = measure_candidates(
        merge_config, options, targets=plain_targets(settings), desc="SafeMERGE ranking"
    )
    return rank_matrices(
        changed_rhos(records), settings["select"], k=settings["k"], seed=settings["seed"]
    )


def run_safemerge(
    run_merge: Callable, merge_config, out_path: str, options, config_source: str | None = None
):
    """Validate, merge aside while collecting records, write card and report, publish."""
    from mergekit_safemerge import report
    from mergekit_safemerge.output import describe_os_error, write_json_atomic
    from mergekit_safemerge.session import MergeSession, active_session

    prepared = prepare_run(merge_config, out_path, options)
    checked, output, settings = prepared.checked, prepared.output, prepared.settings
    started = time.monotonic()
    notes: list[str] = []
    with signals_as_exceptions(), output:
        session = MergeSession()
        try:
            session.ranking = ranking_for(merge_config, options, settings)
            stage = output.staging
            staged_options = options.model_copy(update={"write_model_card": False})
            with active_session(session):
                result = run_merge(merge_config, stage, staged_options, config_source)
        except BaseException as error:
            translated = _translate(error, merge_config, options, out_path)
            if translated is error:
                raise
            if options.verbosity:
                LOG.exception("SafeMERGE merge failed")
            raise translated from None
        if not os.path.isdir(stage):
            raise SafeMergeError(
                f"mergekit wrote no output folder (architectures that fill missing parameters "
                f"from another model are not supported); nothing was written to {out_path}"
            )
        document = report.build_report(session.records, settings, checked.role_sources())
        document["wall_time_s"] = round(time.monotonic() - started, 3)
        try:
            if options.write_model_card:
                _write_config_copy(merge_config, config_source, stage)
                try:
                    write_model_card(
                        merge_config,
                        config_source,
                        stage,
                        os.path.basename(os.path.abspath(out_path)),
                        report.model_card_section(document),
                    )
                except Exception as error:  # a finished merge is never lost over its card
                    notes.append(f"model card not written ({type(error).__name__}: {error})")
            document["warnings"] = [*checked.warnings, *notes]
            document["files"] = sorted({*output.staged_files(), report.REPORT_FILENAME})
            write_json_atomic(os.path.join(stage, report.REPORT_FILENAME), document)
            output.publish()
        except OSError as error:
            raise SafeMergeError(
                f"{describe_os_error(error, 'the report and model card')}; nothing was written "
                f"to {out_path}"
            ) from None
    for note in notes:
        print(f"Warning: safemerge: {note}; the merged model is complete", file=sys.stderr)
    if not options.quiet:
        print(report.terminal_summary(document), flush=True)
    return result


def wrap_run_merge(run_merge: Callable) -> Callable:
    """Return ``run_merge`` with SafeMERGE's checks, atomic output and report around safemerge
    merges."""
    if getattr(run_merge, _WRAPPED_MARK, False):
        return run_merge

    @functools.wraps(run_merge)
    def wrapper(merge_config, out_path, options, config_source=None, *args, **kwargs):
        if getattr(merge_config, "merge_method", None) != METHOD_NAME:
            return run_merge(merge_config, out_path, options, config_source, *args, **kwargs)
        if args or kwargs:
            raise TypeError("run_merge takes (merge_config, out_path, options, config_source)")
        with user_errors():
            return run_safemerge(run_merge, merge_config, out_path, options, config_source)

    setattr(wrapper, _WRAPPED_MARK, True)
    return wrapper


def is_safemerge_file(path: str) -> bool:
    """Whether a YAML file asks for ``merge_method: safemerge`` (a text sniff, no parsing)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fp:
            return bool(_SAFEMERGE_LINE.search(fp.read(1 << 20)))
    except OSError:
        return False


def wrap_mergekit_yaml(command) -> None:
    """Let ``mergekit-yaml`` read a SafeMERGE configuration with one-line errors (YAML syntax,
    several documents, unknown or null keys); other configurations are untouched."""
    original = command.callback
    if getattr(original, _WRAPPED_MARK, False):
        return

    @functools.wraps(original)
    def callback(*args, **kwargs):
        config_file = kwargs.get("config_file")
        if config_file and is_safemerge_file(config_file):
            from mergekit_safemerge.validation import read_config

            with user_errors():
                read_config(config_file)
        return original(*args, **kwargs)

    setattr(callback, _WRAPPED_MARK, True)
    command.callback = callback
