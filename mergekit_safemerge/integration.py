"""SafeMERGE's wrapper around ``mergekit.merge.run_merge`` (installed by the import hook).

For a configuration whose ``merge_method`` is ``safemerge`` it

1. validates the configuration before any model is loaded (:func:`.validation.validate_config`);
2. collects one record per candidate matrix while mergekit runs the merge;
3. on failure, removes what the failed run wrote to the output folder, so no partial model is
   left looking finished;
4. on success, writes ``safemerge_report.json``, appends a SafeMERGE section to the model card
   and prints a one-screen summary.

Any other merge method goes straight to mergekit's own ``run_merge``, untouched.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import time
from collections.abc import Callable, Iterator

from mergekit_safemerge import METHOD_NAME
from mergekit_safemerge.errors import SafeMergeError

_WRAPPED_MARK = "__safemerge_wrapped__"


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


def _files_under(path: str) -> dict[str, float]:
    found = {}
    for root, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with contextlib.suppress(OSError):
                found[full] = os.stat(full).st_mtime_ns
    return found


def remove_partial_output(out_path: str, before: dict[str, float] | None) -> None:
    """Delete what a failed run wrote: the folder if it created it, else new or changed files."""
    if before is None:
        shutil.rmtree(out_path, ignore_errors=True)
        return
    for path, mtime in _files_under(out_path).items():
        if before.get(path) != mtime:
            with contextlib.suppress(OSError):
                os.remove(path)


def run_safemerge(run_merge: Callable, merge_config, out_path: str, options, *args, **kwargs):
    """Validate, run mergekit's merge while collecting records, then write the report.

    A ranking selection mode (``lowest_k``, ``random_k``, ``highest_k``, ``all``, ``none``) needs
    every ``rho`` before the first matrix is merged: a measure-only first pass over the candidates
    (:func:`.scan.measure_candidates`) ranks them, and the merge applies that selection.
    """
    from mergekit_safemerge import report
    from mergekit_safemerge.method import register_method
    from mergekit_safemerge.scan import changed_rhos, measure_candidates, plain_targets
    from mergekit_safemerge.selection import select_matrices
    from mergekit_safemerge.session import MergeSession, active_session
    from mergekit_safemerge.validation import validate_config

    register_method()
    checked = validate_config(merge_config, options)
    settings = checked.report_settings(options, merge_config.dtype)
    started = time.monotonic()
    session = MergeSession()
    if settings["select"] != "threshold":
        records = measure_candidates(
            merge_config, options, targets=plain_targets(settings), desc="SafeMERGE ranking"
        )
        rhos = changed_rhos(records)
        session.selected = select_matrices(
            rhos, settings["select"], k=settings["k"], seed=settings["seed"]
        )
    before = _files_under(out_path) if os.path.isdir(out_path) else None
    try:
        with active_session(session):
            result = run_merge(merge_config, out_path, options, *args, **kwargs)
    except BaseException:
        remove_partial_output(out_path, before)
        raise

    models = checked.role_sources()
    document = report.build_report(session.records, settings, models)
    document["wall_time_s"] = round(time.monotonic() - started, 3)
    report.write_report(document, out_path)
    card = os.path.join(out_path, "README.md")
    if options.write_model_card and os.path.isfile(card):
        with open(card, "a", encoding="utf-8") as fp:
            fp.write(report.model_card_section(document))
    if not options.quiet:
        print(report.terminal_summary(document), flush=True)
    return result


def wrap_run_merge(run_merge: Callable) -> Callable:
    """Return ``run_merge`` with SafeMERGE's checks and report around safemerge merges."""
    if getattr(run_merge, _WRAPPED_MARK, False):
        return run_merge

    @functools.wraps(run_merge)
    def wrapper(merge_config, out_path, options, *args, **kwargs):
        if getattr(merge_config, "merge_method", None) != METHOD_NAME:
            return run_merge(merge_config, out_path, options, *args, **kwargs)
        with user_errors():
            return run_safemerge(run_merge, merge_config, out_path, options, *args, **kwargs)

    setattr(wrapper, _WRAPPED_MARK, True)
    return wrapper
