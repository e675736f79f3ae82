"""Tiny offline models of real architectures for ``safemerge demo-models``, the demo and tests."""
