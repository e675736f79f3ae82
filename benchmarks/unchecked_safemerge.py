"""``safemerge`` with its NaN/Inf check of every output tensor turned off, for the benchmark only.

The check is part of the method's guarantee (a non-finite weight stops the run, docs/method.md);
this run measures what it costs, so that ``safemerge`` against ``naive`` (which has no such
check) can be read. Runs stock mergekit's ``mergekit-yaml`` command in this process::

    python benchmarks/unchecked_safemerge.py CONFIG.yml OUT [mergekit-yaml options]
"""

from __future__ import annotations


def main() -> None:
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    from mergekit_safemerge.binding import passes

    passes._finite = lambda name, tensor, source, written=None: tensor
    mergekit_yaml()


if __name__ == "__main__":
    main()
