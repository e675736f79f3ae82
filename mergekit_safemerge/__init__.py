"""SafeMERGE as a merge method for stock mergekit.

Importing this package is cheap on purpose (no torch, no mergekit): the one-line
``mergekit_safemerge.pth`` imports :mod:`mergekit_safemerge._autoload` at every interpreter
start. Everything heavy lives in submodules that are imported on demand.
"""

__version__ = "0.1.0"

METHOD_NAME = "safemerge"
"""The name users write in ``merge_method:``."""

AUTOLOAD_ENV = "MERGEKIT_SAFEMERGE_AUTOLOAD"
"""Set to ``0`` to turn off the automatic registration with mergekit."""


def register() -> None:
    """Register ``safemerge`` with mergekit now, and wrap ``run_merge`` and ``mergekit-yaml``
    (checks first, atomic output, report) now or when mergekit imports them.

    Idempotent. For programs that run with the automatic registration turned off
    (``MERGEKIT_SAFEMERGE_AUTOLOAD=0`` or ``python -S``) or that want it explicit.
    """
    from mergekit_safemerge import _autoload
    from mergekit_safemerge.binding.registration import register_method

    register_method()
    _autoload.hook_mergekit()


__all__ = ["AUTOLOAD_ENV", "METHOD_NAME", "__version__", "register"]
