"""Every SafeMERGE run, start to finish: prepare, rank, run the pass, report, publish.

:func:`prepare_run` is what every command does before a tensor is read: the configuration's
values (:mod:`.config`) and its inputs on disk (:mod:`.inputs`) checked, warnings printed, the
output folder checked. Then

* :func:`run_safemerge` (``mergekit-yaml`` and ``run_merge``): with a ranking selection mode a
  measuring pass first, then mergekit's merge into the staging folder with a
  :class:`~.passes.MergePass` current, the model card (a failure there is a warning, the merge
  is kept) and the report;
* :func:`run_adapter` (``safemerge adapter``): the plan in memory with a
  :class:`~.passes.FactorPass`, written as one PEFT adapter;
* :func:`run_scan` (``safemerge scan``): a :class:`~.passes.MeasurePass`, the scan's report.

Each publishes through :class:`~mergekit_safemerge.outputs.folder.OutputFolder` (staged, locked,
the report written last as the manifest) inside :func:`signals_as_exceptions`: on any failure
the staging folder is removed and the destination is as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from mergekit.common import ModelReference, dtype_from_name
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from mergekit_safemerge.binding.card import write_config_copy, write_model_card
from mergekit_safemerge.binding.config import (
    check_values,
    configured_filters,
    configured_values,
    factor_recipe,
    role_claims,
)
from mergekit_safemerge.binding.executor import measure_candidates, run_in_memory
from mergekit_safemerge.binding.inputs import (
    check_adapters,
    check_device,
    check_models,
    read_tensor_headers,
)
from mergekit_safemerge.binding.passes import FactorPass, MergePass, running
from mergekit_safemerge.binding.registration import register_method
from mergekit_safemerge.core.decide import changed_rhos, rank_matrices
from mergekit_safemerge.core.records import MatrixRecord, sort_records
from mergekit_safemerge.core.roles import ADAPTER_PARAMETERS, ALIGNED, ALL_ROLES, assign_roles
from mergekit_safemerge.core.settings import Settings
from mergekit_safemerge.errors import SafeMergeError
from mergekit_safemerge.lora.read import AdapterReader, AdapterSource
from mergekit_safemerge.lora.write import adapter_files, write_adapter
from mergekit_safemerge.outputs.folder import (
    ADAPTER,
    MODEL,
    OutputFolder,
    OutputKind,
    describe_os_error,
    require_path,
)
from mergekit_safemerge.outputs.report import (
    Report,
    adapter_card,
    model_card_section,
    terminal_summary,
)

LOG = logging.getLogger(__name__)
_DISK_FULL = re.compile(r"No space left on device|os error 28\b")


# ---------------------------------------------------------------- signals and mergekit's errors
class Terminated(SystemExit):
    """SIGTERM or SIGHUP during a run: unwinds like Ctrl-C so the staging folder is removed."""


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into :class:`Terminated` in the main thread while the block runs.

    The exception is raised wherever Python happens to be; a library that turns it into an
    error of its own (seen: torch, mid-write) does not change the outcome: once a signal has
    arrived, the block ends as :class:`Terminated` with the signal's exit status."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum, _frame):
        received.append(signum)
        raise Terminated(128 + signum)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    except Terminated:
        raise
    except BaseException:
        if received:
            raise Terminated(128 + received[0]) from None
        raise
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _shape_mismatch(
    error: ValueError, config: MergeConfiguration, options: MergeOptions
) -> SafeMergeError | None:
    """mergekit's "Tensor size mismatch" as our one line, naming the model where we can."""
    match = re.match(r"Tensor size mismatch for (\S+?):", str(error))
    if match is None:
        return None
    name = match.group(1)
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


def _translate(
    error: BaseException, config: MergeConfiguration, options: MergeOptions, out_path: str
) -> BaseException:
    """A one-line SafeMergeError for what a user can cause; other errors as they are."""
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


# ---------------------------------------------------------------- before any tensor is read
@dataclass(frozen=True)
class ValidatedConfig:
    """The model of each role, the merge settings, the adapters, and what to warn about."""

    models: dict[str, ModelReference]  # the roles given as models (aligned included)
    settings: Settings
    adapters: dict[str, AdapterSource] = field(default_factory=dict)  # roles given as adapters
    warnings: tuple[str, ...] = ()

    def role_sources(self) -> dict[str, str]:
        """Where each role comes from, for the report: a model, or aligned + adapter."""
        sources = {role: str(model) for role, model in self.models.items()}
        for role, adapter in self.adapters.items():
            sources[role] = f"{self.models[ALIGNED]}+{adapter.spec} (LoRA factors)"
        return {role: sources[role] for role in ALL_ROLES}

    def input_labels(self) -> dict[str, str]:
        """Every local folder the merge reads (models, their LoRA adapters, adapter roles),
        keyed by a label for messages."""
        folders = {}
        for role, model in self.models.items():
            folders[f"{role} model {model}"] = model.model.path
            if model.lora is not None:
                folders[f"adapter {model.lora.path} ({role})"] = model.lora.path
        for role, adapter in self.adapters.items():
            folders[f"adapter {adapter.spec} ({role})"] = adapter.folder
        return {label: path for label, path in folders.items() if os.path.isdir(path)}


def validate_config(config: MergeConfiguration, options: MergeOptions) -> ValidatedConfig:
    """All checks that need no tensor data; raises :class:`SafeMergeError` at the first fault."""
    settings, notes = check_values(config)
    check_device(options)
    specs = {
        role: getattr(settings, key)
        for role, key in ADAPTER_PARAMETERS.items()
        if getattr(settings, key)
    }
    models = assign_roles(config.base_model, role_claims(config), specs)
    on_disk = check_models(
        models, options, configured_values(config, "targets"), configured_filters(config)
    )
    adapters, warnings = check_adapters(specs, models[ALIGNED], AdapterReader())
    warnings = [*notes, *on_disk.warnings, *warnings]
    settings = dataclasses.replace(settings, random_seed=options.random_seed)
    return ValidatedConfig(
        models=models, settings=settings, adapters=adapters, warnings=tuple(warnings)
    )


@dataclass(frozen=True)
class PreparedRun:
    """What every SafeMERGE run establishes before a tensor is read."""

    config: MergeConfiguration
    options: MergeOptions
    checked: ValidatedConfig
    output: OutputFolder

    @property
    def settings(self) -> Settings:
        return self.checked.settings

    def report(self, records: list[MatrixRecord], **parts) -> Report:
        """The run's report of ``records`` (``parts``: output, adapter, sweep, ...)."""
        return Report(self.settings, self.checked.role_sources(), records, **parts)


def prepare_run(
    config: MergeConfiguration,
    out_path: str,
    options: MergeOptions,
    kind: OutputKind,
    *,
    what: str = "output folder",
) -> PreparedRun:
    """Register, validate the configuration and its inputs, print the warnings, check the output
    folder: everything that needs no tensor data (shared by every command)."""
    register_method()
    output = OutputFolder(out_path, kind, what=what)  # an empty path stops here, first
    checked = validate_config(config, options)
    for warning in checked.warnings:
        print(f"Warning: safemerge: {warning}", file=sys.stderr, flush=True)
    output.check(inputs=checked.input_labels())
    return PreparedRun(config, options, checked, output)


def ranking_for(prepared: PreparedRun) -> dict[str, str] | None:
    """With a ranking selection mode, the selected names (and reasons) from a measuring pass."""
    settings = prepared.settings
    if not settings.ranks_first:
        return None
    records = measure_candidates(
        prepared.config,
        prepared.options,
        targets=settings.plain_targets,
        desc="SafeMERGE ranking",
    )
    return rank_matrices(changed_rhos(records), settings.select, k=settings.k, seed=settings.seed)


def _publish_manifest(prepared: PreparedRun, manifest: dict[str, Any], what: str) -> None:
    """The manifest (a report's JSON) written last, then the folder published."""
    try:
        prepared.output.publish(manifest)
    except OSError as error:
        raise SafeMergeError(
            f"{describe_os_error(error, what)}; nothing was written to "
            f"{prepared.output.destination}"
        ) from None


def publish(
    prepared: PreparedRun,
    manifest: dict[str, Any],
    write_files: Callable[[str], None],
    what: str,
) -> None:
    """Stage the files (``write_files(staging folder)``) and the manifest (a report's JSON),
    then publish; on any failure or signal nothing is published."""
    with signals_as_exceptions(), prepared.output as output:
        try:
            write_files(output.staging)
        except OSError as error:
            raise SafeMergeError(
                f"{describe_os_error(error, what)}; nothing was written to "
                f"{prepared.output.destination}"
            ) from None
        _publish_manifest(prepared, manifest, what)


# ---------------------------------------------------------------- the commands
def run_safemerge(
    run_merge: Callable,
    merge_config: MergeConfiguration,
    out_path: str,
    options: MergeOptions,
    config_source: str | None = None,
):
    """Validate, merge aside while collecting records, write card and report, publish."""
    prepared = prepare_run(merge_config, out_path, options, MODEL)
    started = time.monotonic()
    notes: list[str] = []
    with signals_as_exceptions(), prepared.output as output:
        try:
            merging = MergePass(
                ranking_for(prepared), written=dtype_from_name(merge_config.out_dtype)
            )
            staged_options = options.model_copy(update={"write_model_card": False})
            with running(merging):
                result = run_merge(merge_config, output.staging, staged_options, config_source)
        except BaseException as error:
            translated = _translate(error, merge_config, options, out_path)
            if translated is error:
                raise
            if options.verbosity:
                LOG.exception("SafeMERGE merge failed")
            raise translated from None
        if not os.path.isdir(output.staging):
            raise SafeMergeError(
                f"mergekit wrote no output folder (architectures that fill missing parameters "
                f"from another model are not supported); nothing was written to {out_path}"
            )
        report = prepared.report(merging.records, wall_time_s=round(time.monotonic() - started, 3))
        try:
            if options.write_model_card:
                write_config_copy(merge_config, config_source, output.staging)
                try:
                    write_model_card(
                        merge_config,
                        config_source,
                        output.staging,
                        os.path.basename(os.path.abspath(out_path)),
                        model_card_section(report),
                    )
                except Exception as error:  # a finished merge is never lost over its card
                    notes.append(f"model card not written ({type(error).__name__}: {error})")
        except OSError as error:
            raise SafeMergeError(
                f"{describe_os_error(error, 'the report and model card')}; nothing was written "
                f"to {out_path}"
            ) from None
        report.warnings = [*prepared.checked.warnings, *notes]
        _publish_manifest(prepared, report.to_json(), "the report and model card")
    for note in notes:
        print(f"Warning: safemerge: {note}; the merged model is complete", file=sys.stderr)
    if not options.quiet:
        print(terminal_summary(report), flush=True)
    return result


def run_adapter(
    config: MergeConfiguration, out_path: str, options: MergeOptions, *, compact: bool = False
) -> Report:
    """Decide every module through mergekit's plan in memory and publish one PEFT adapter.

    ``config`` is the recipe ``mergekit-yaml`` takes; its LoRA roles are read as adapters
    (:func:`~.config.factor_recipe`)."""
    require_path(out_path)
    config = factor_recipe(config)
    prepared = prepare_run(config, out_path, options, ADAPTER)
    started = time.monotonic()
    collecting = FactorPass(ranking_for(prepared))
    touched = set()
    for adapter in prepared.checked.adapters.values():
        touched |= {f"{m}.weight" for m in collecting.adapters.open(adapter.folder).modules}
    weights = run_in_memory(
        config, options, collecting, keep=touched.__contains__, desc="SafeMERGE adapter"
    )
    _keep_every_update(collecting, prepared.checked.adapters["finetuned"])
    base_model = str(prepared.checked.models[ALIGNED])
    tensors, lora_config, summary = adapter_files(
        collecting.factors, weights, base_model, compact=compact
    )
    report = prepared.report(
        collecting.records,
        output="adapter",
        adapter=summary,
        wall_time_s=round(time.monotonic() - started, 3),
        warnings=list(prepared.checked.warnings),
    )
    name = os.path.basename(os.path.abspath(out_path))
    card = adapter_card(report, base_model, name) if options.write_model_card else None
    publish(
        prepared,
        report.to_json(),
        lambda staging: write_adapter(staging, tensors, lora_config, card),
        "the adapter",
    )
    return report


def _keep_every_update(collecting: FactorPass, finetuned: AdapterSource) -> None:
    """The fine-tune's updates the plan never handed to the method (vocabulary tensors such as
    ``lm_head``, which the in-memory plan does not read) go into the adapter as they are, as the
    full merge keeps them: an adapter output holds every update the fine-tune made."""
    adapter = collecting.adapters.open(finetuned.folder)
    for module in sorted(adapter.modules):
        name = f"{module}.weight"
        if name not in collecting.factors:
            factors = adapter.factors(name)
            if factors is not None:
                collecting.factors[name] = factors


def run_scan(
    config: MergeConfiguration, out_path: str, options: MergeOptions, kind: OutputKind
) -> tuple[PreparedRun, list[MatrixRecord]]:
    """The scan's measuring pass: the prepared run (its output folder not yet entered) and one
    record per candidate with its threshold decision."""
    prepared = prepare_run(config, out_path, options, kind, what="scan folder")
    records = measure_candidates(config, options, targets=prepared.settings.plain_targets)
    return prepared, sort_records(records)
