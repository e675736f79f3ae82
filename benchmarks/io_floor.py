"""The raw I/O limit of a merge: read every input model once, write one model once.

``python benchmarks/io_floor.py OUT_DIR MODEL_DIR [MODEL_DIR ...]`` reads every safetensors file of
each model folder in 64 MiB chunks and writes the first model's files to ``OUT_DIR``: the bytes a
merge of these models must at least move, on the same disk and through the same page cache, with no
computation. ``bench_merge.py`` reads each run's wall time as a multiple of this.
"""

from __future__ import annotations

import glob
import os
import sys

CHUNK = 64 * 1024 * 1024


def main(argv: list[str]) -> int:
    out, first, *others = argv
    os.makedirs(out, exist_ok=True)
    for folder in (first, *others):
        for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
            target = None
            if folder == first:
                target = open(os.path.join(out, os.path.basename(path)), "wb")  # noqa: SIM115
            with open(path, "rb", buffering=0) as source:
                while chunk := source.read(CHUNK):
                    if target is not None:
                        target.write(chunk)
            if target is not None:
                target.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
