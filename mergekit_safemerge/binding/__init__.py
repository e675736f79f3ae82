"""The mergekit side: the method and its passes, the in-memory executor, the checks of a
configuration (``config``) and of its inputs on disk (``inputs``), every run start to finish
(``pipeline``), the wrappers of mergekit's entry points (``wrap``) and the registration.

Imports the core, ``lora`` and ``outputs`` (folder, report); never the edges (the CLI, ``eval``,
the scan's pictures).
"""
