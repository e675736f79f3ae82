"""Registers SafeMERGE with stock mergekit right after mergekit imports, at no start-up cost.

``mergekit_safemerge.pth`` imports this module in every interpreter. It imports nothing but
``os`` and ``sys`` and puts a finder at the front of ``sys.meta_path`` that wraps the loaders of
a few modules so that a callback runs right after each has executed:

* ``mergekit.merge_methods`` and ``mergekit_safemerge.binding.method``: once both have executed,
  :func:`mergekit_safemerge.binding.registration.register_method` adds ``safemerge`` to mergekit's
  registry. When mergekit is imported first, its callback imports the method module; when the
  method module is imported first (it imports mergekit itself), the registration waits for the
  method module to finish;
* ``mergekit.merge``: ``run_merge`` is wrapped so that SafeMERGE merges are validated first,
  written aside and published atomically, with their report
  (:mod:`mergekit_safemerge.binding.wrap`);
* ``mergekit.scripts.run_yaml``: the ``mergekit-yaml`` command reads a SafeMERGE configuration
  with one-line errors (YAML syntax, unknown keys, devices).

The finder removes itself when every watched module has executed. It never raises: a failure is
a warning, and mergekit keeps working without SafeMERGE. ``MERGEKIT_SAFEMERGE_AUTOLOAD=0`` turns
it off.
"""

import os
import sys

_AUTOLOAD_ENV = "MERGEKIT_SAFEMERGE_AUTOLOAD"  # same value as mergekit_safemerge.AUTOLOAD_ENV
_OFF_VALUES = frozenset({"0", "false", "no", "off"})
_MERGE_METHODS = "mergekit.merge_methods"
_METHOD_MODULE = "mergekit_safemerge.binding.method"

_executed = set()
"""Watched modules whose execution has finished (our own bookkeeping, no interpreter state)."""


def _warn(what, error):
    import warnings

    warnings.warn(
        f"mergekit-safemerge: could not {what} ({type(error).__name__}: {error}); "
        "mergekit works without SafeMERGE. Call mergekit_safemerge.register() to retry.",
        RuntimeWarning,
        stacklevel=2,
    )


def _register():
    from mergekit_safemerge.binding.registration import register_method

    register_method()


def _on_merge_methods(_module):
    # The method module may be executing right now (it imported mergekit): then it is in
    # sys.modules but has not finished, and _on_method_module registers once it has.
    if _METHOD_MODULE not in sys.modules or _METHOD_MODULE in _executed:
        _register()


def _on_method_module(_module):
    if _MERGE_METHODS in _executed:
        _register()


def _wrap_run_merge(module):
    from mergekit_safemerge.binding.wrap import wrap_run_merge

    module.run_merge = wrap_run_merge(module.run_merge)


def _wrap_mergekit_yaml(module):
    from mergekit_safemerge.binding.wrap import wrap_mergekit_yaml

    wrap_mergekit_yaml(module.main)


CALLBACKS = {
    _MERGE_METHODS: _on_merge_methods,
    _METHOD_MODULE: _on_method_module,
    "mergekit.merge": _wrap_run_merge,
    "mergekit.scripts.run_yaml": _wrap_mergekit_yaml,
}


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

    def watches(self, fullname):
        return fullname in self._callbacks

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

    def fired(self, fullname):
        # Called after the import system has left its loop over sys.meta_path, so removing
        # ourselves here cannot make it skip another finder.
        _executed.add(fullname)
        self._callbacks.pop(fullname, None)
        if not self._callbacks and self in sys.meta_path:
            sys.meta_path.remove(self)


def _watch(callbacks):
    """Run each callback now for a module already imported, later for the others."""
    pending = {}
    for name, callback in callbacks.items():
        module = sys.modules.get(name)
        if module is None:
            pending[name] = callback
        else:  # already imported (explicit register() late in a program): act now
            _executed.add(name)
            callback(module)
    if pending:
        sys.meta_path.insert(0, _PostImportFinder(pending))


def hook_mergekit():
    """Wrap ``run_merge`` and ``mergekit-yaml`` now, or as soon as mergekit imports them."""
    watched = {
        name: CALLBACKS[name]
        for name in ("mergekit.merge", "mergekit.scripts.run_yaml")
        if not any(isinstance(f, _PostImportFinder) and f.watches(name) for f in sys.meta_path)
    }
    _watch(watched)


def enabled():
    return os.environ.get(_AUTOLOAD_ENV, "1").strip().lower() not in _OFF_VALUES


def install():
    """What the .pth runs: watch mergekit's imports unless turned off. Never raises."""
    if not enabled() or any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        return
    try:
        _watch(CALLBACKS)
    except Exception as error:
        _warn("install the mergekit import hook", error)


install()
