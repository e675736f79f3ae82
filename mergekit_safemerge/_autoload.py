"""Registers SafeMERGE with stock mergekit right after mergekit imports, at no start-up cost.

``mergekit_safemerge.pth`` imports this module in every interpreter. It imports nothing but
``os`` and ``sys`` and puts a one-shot finder at the front of ``sys.meta_path`` that waits for
two mergekit modules:

* ``mergekit.merge_methods`` (the package, whose ``__init__`` is complete only after
  ``registry``): once it has executed, ``safemerge`` is registered;
* ``mergekit.merge``: once it has executed, ``run_merge`` is wrapped so that SafeMERGE merges
  validate their configuration first and write ``safemerge_report.json``.

The finder removes itself when both have fired. It never raises: a failure is a warning, and
mergekit keeps working without SafeMERGE. Setting ``MERGEKIT_SAFEMERGE_AUTOLOAD=0`` turns it off.
"""

import os
import sys

_AUTOLOAD_ENV = "MERGEKIT_SAFEMERGE_AUTOLOAD"  # same value as mergekit_safemerge.AUTOLOAD_ENV
_OFF_VALUES = frozenset({"0", "false", "no", "off"})


def _warn(what: str, error: BaseException) -> None:
    import warnings

    warnings.warn(
        f"mergekit-safemerge: could not {what} ({type(error).__name__}: {error}); "
        "mergekit works without SafeMERGE. Call mergekit_safemerge.register() to retry.",
        RuntimeWarning,
        stacklevel=2,
    )


_registration_deferred = False


def _register_method(_module) -> None:
    global _registration_deferred
    method = sys.modules.get("mergekit_safemerge.method")
    if method is not None and getattr(method.__spec__, "_initializing", False):
        # mergekit was imported by our own method module, which is still executing: it
        # registers itself through method_module_ready() at its end.
        _registration_deferred = True
        return
    from mergekit_safemerge.method import register_method

    register_method()


def method_module_ready() -> None:
    """Called at the end of ``mergekit_safemerge.method``: finish a deferred registration."""
    global _registration_deferred
    if _registration_deferred:
        _registration_deferred = False
        from mergekit_safemerge.method import register_method

        register_method()


def _wrap_run_merge(module) -> None:
    from mergekit_safemerge.integration import wrap_run_merge

    module.run_merge = wrap_run_merge(module.run_merge)


class _HookedLoader:
    """Delegates to the real loader and runs ``callback(module)`` after the module executed."""

    def __init__(self, loader, callback, finder):
        self._loader = loader
        self._callback = callback
        self._finder = finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._finder.fired(module.__name__)
        try:
            self._callback(module)
        except Exception as error:  # a broken plugin must never break mergekit
            _warn(f"hook into {module.__name__}", error)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _PostImportFinder:
    """A meta-path finder that only wraps the loaders of the watched modules."""

    def __init__(self, callbacks):
        self._callbacks = dict(callbacks)

    def find_spec(self, fullname, path=None, target=None):
        callback = self._callbacks.get(fullname)
        if callback is None:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _HookedLoader(spec.loader, callback, self)
        return spec

    def fired(self, fullname) -> None:
        # Called after the import system has left its loop over sys.meta_path, so removing
        # ourselves here cannot make it skip another finder.
        self._callbacks.pop(fullname, None)
        if not self._callbacks and self in sys.meta_path:
            sys.meta_path.remove(self)


def _watch(callbacks) -> None:
    pending = {}
    for name, callback in callbacks.items():
        module = sys.modules.get(name)
        if module is None:
            pending[name] = callback
        else:  # already imported (explicit register() late in a program): act now
            callback(module)
    if pending:
        sys.meta_path.insert(0, _PostImportFinder(pending))


def hook_run_merge() -> None:
    """Wrap ``mergekit.merge.run_merge`` now, or as soon as ``mergekit.merge`` is imported."""
    module = sys.modules.get("mergekit.merge")
    if module is not None:
        _wrap_run_merge(module)
    elif not any(
        isinstance(f, _PostImportFinder) and "mergekit.merge" in f._callbacks for f in sys.meta_path
    ):
        _watch({"mergekit.merge": _wrap_run_merge})


def enabled() -> bool:
    return os.environ.get(_AUTOLOAD_ENV, "1").strip().lower() not in _OFF_VALUES


def install() -> None:
    """What the .pth runs: watch mergekit's imports unless turned off. Never raises."""
    if not enabled() or any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        return
    try:
        _watch({"mergekit.merge_methods": _register_method, "mergekit.merge": _wrap_run_merge})
    except Exception as error:
        _warn("install the mergekit import hook", error)


install()
