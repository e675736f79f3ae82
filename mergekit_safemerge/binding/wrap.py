"""SafeMERGE inside mergekit's own entry points: ``run_merge`` and the ``mergekit-yaml`` command
(installed by the import hook, :mod:`mergekit_safemerge._autoload`).

A configuration whose ``merge_method`` is ``safemerge`` goes through
:func:`~.pipeline.run_safemerge` (checks first, atomic output, report); any other goes straight
to mergekit, untouched. The pipeline is imported when a SafeMERGE merge runs (deferred on
purpose: the hook installs these wrappers while ``mergekit.merge`` finishes importing, and the
pipeline imports ``mergekit.merge``).
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterator

import click

from mergekit_safemerge import METHOD_NAME
from mergekit_safemerge.binding.config import check_method_name, read_config
from mergekit_safemerge.errors import SafeMergeError

_WRAPPED_MARK = "__safemerge_wrapped__"
_SAFEMERGE_LINE = re.compile(
    r"^\s*merge_method\s*:\s*[\"']?safemerge\b", re.MULTILINE | re.IGNORECASE
)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Inside a click command (``mergekit-yaml``), show a SafeMergeError as one ``Error:`` line."""
    try:
        yield
    except SafeMergeError as error:
        if click.get_current_context(silent=True) is None:
            raise
        raise click.ClickException(f"safemerge: {error}") from None


def wrap_run_merge(run_merge: Callable) -> Callable:
    """Return ``run_merge`` with SafeMERGE's checks, atomic output and report around safemerge
    merges."""
    if getattr(run_merge, _WRAPPED_MARK, False):
        return run_merge

    @functools.wraps(run_merge)
    def wrapper(merge_config, out_path, options, config_source=None, *args, **kwargs):
        with user_errors():
            check_method_name(getattr(merge_config, "merge_method", None), "config")
        if getattr(merge_config, "merge_method", None) != METHOD_NAME:
            return run_merge(merge_config, out_path, options, config_source, *args, **kwargs)
        if args or kwargs:
            raise TypeError("run_merge takes (merge_config, out_path, options, config_source)")
        from mergekit_safemerge.binding.pipeline import run_safemerge

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


class _ShardSize(click.ParamType):
    """mergekit's ``--out-shard-size`` with one line for a bad value (mergekit's own type raises
    a bare ValueError, a traceback)."""

    name = "size"

    def __init__(self, inner: click.ParamType):
        self.inner = inner

    def convert(self, value, param, ctx):
        try:
            return self.inner.convert(value, param, ctx)
        except (ValueError, IndexError):
            self.fail(f"{value!r} is not a size (a whole number, or one with K, M or B: 500M, 5B)")


def wrap_mergekit_yaml(command: click.Command) -> None:
    """Let ``mergekit-yaml`` read a SafeMERGE configuration with one-line errors (YAML syntax,
    several documents, unknown or null keys); other configurations are untouched, except that
    a bad ``--out-shard-size`` is one line for every method."""
    original = command.callback
    if getattr(original, _WRAPPED_MARK, False):
        return
    for param in command.params:
        if param.name == "out_shard_size" and not isinstance(param.type, _ShardSize):
            param.type = _ShardSize(param.type)

    @functools.wraps(original)
    def callback(*args, **kwargs):
        config_file = kwargs.get("config_file")
        if config_file and is_safemerge_file(config_file):
            with user_errors():
                read_config(config_file)
        return original(*args, **kwargs)

    setattr(callback, _WRAPPED_MARK, True)
    command.callback = callback
