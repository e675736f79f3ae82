"""Adds ``safemerge`` to mergekit's registry of merge methods. Nothing else.

Called by the import hook (:mod:`mergekit_safemerge._autoload`) once both
``mergekit.merge_methods`` and :mod:`.method` have finished importing, or by
:func:`mergekit_safemerge.register`. Its imports are deferred on purpose: the hook calls it
while one of those modules may still be finishing its own import.
"""

from __future__ import annotations

from mergekit_safemerge import METHOD_NAME


def register_method() -> None:
    """Register ``safemerge`` with mergekit (idempotent; refuses another method of that name)."""
    from mergekit.merge_methods import registry

    from mergekit_safemerge.binding.method import SAFEMERGE, SafeMergeMethod

    for method in registry.registered_methods():
        if method.spec.name == METHOD_NAME:
            if not isinstance(method, SafeMergeMethod):
                raise RuntimeError(f"another merge method named {METHOD_NAME!r} is registered")
            return
    registry.register(SAFEMERGE)
