"""The read floor of a merge that needs only some tensors: read exactly those tensors' bytes.

``python benchmarks/read_tensors.py MODEL_DIR [MODEL_DIR ...] --match PATTERN [--match ...]
[--whole FILE ...]`` reads, from every ``*.safetensors`` file of each model folder, only the bytes
of the tensors whose name matches one of the glob ``PATTERN``s (``*.q_proj.weight``), and every
``--whole`` file in full (an adapter), with plain reads into one reusable buffer: no mmap, no
tensors, no computation. Each file's layout comes from its own header (the 8-byte little-endian
header length, then the JSON header whose ``data_offsets`` are relative to the end of the
header). ``bench_merge.py`` runs it as ``read_needed``: what ``safemerge adapter`` must at least
read (the adapted matrices of the aligned and unaligned models, and the two adapters).
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import os
import sys
from collections.abc import Callable, Iterable

from mergekit_safemerge.prefetch import read_header, read_range

CHUNK = 64 * 1024 * 1024
Sink = Callable[[str, memoryview], None]


def tensor_ranges(path: str, patterns: Iterable[str]) -> list[tuple[str, int, int]]:
    """(name, start, end) absolute byte ranges in ``path`` of the tensors matching a pattern,
    in file order."""
    patterns = tuple(patterns)
    header, base = read_header(path)
    ranges = [
        (name, base + entry["data_offsets"][0], base + entry["data_offsets"][1])
        for name, entry in header.items()
        if name != "__metadata__" and any(fnmatch.fnmatchcase(name, p) for p in patterns)
    ]
    return sorted(ranges, key=lambda r: r[1])


def _read(fd: int, name: str, start: int, end: int, buffer: memoryview, sink: Sink | None) -> int:
    """Bytes ``[start, end)`` of ``fd`` (:func:`~mergekit_safemerge.prefetch.read_range`, the
    reader of safemerge adapter's read-ahead); ``sink(name, piece)`` sees each piece."""
    try:
        read_range(fd, start, end, buffer, None if sink is None else lambda p: sink(name, p))
    except OSError as error:
        raise OSError(f"{name}: {error}") from None
    return end - start


def read_tensors(
    model_dirs: Iterable[str],
    patterns: Iterable[str],
    whole: Iterable[str] = (),
    *,
    sink: Sink | None = None,
    chunk: int = CHUNK,
) -> dict[str, int]:
    """Read the matching tensors of every model folder and the ``whole`` files; returns the
    counts (tensors, tensor bytes, whole-file bytes). ``sink(name, bytes)`` sees every piece
    read, in order (a tensor's name, or a whole file's path)."""
    patterns = tuple(patterns)
    buffer = memoryview(bytearray(chunk))
    counts = {"tensors": 0, "tensor_bytes": 0, "whole_bytes": 0}
    for folder in model_dirs:
        for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
            ranges = tensor_ranges(path, patterns)
            fd = os.open(path, os.O_RDONLY)
            try:
                for name, start, end in ranges:
                    counts["tensor_bytes"] += _read(fd, name, start, end, buffer, sink)
                    counts["tensors"] += 1
            finally:
                os.close(fd)
    for path in whole:
        fd = os.open(path, os.O_RDONLY)
        try:
            counts["whole_bytes"] += _read(fd, path, 0, os.fstat(fd).st_size, buffer, sink)
        finally:
            os.close(fd)
    return counts


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", metavar="MODEL_DIR")
    parser.add_argument("--match", action="append", required=True, metavar="PATTERN")
    parser.add_argument("--whole", action="append", default=[], metavar="FILE")
    args = parser.parse_args(argv)
    counts = read_tensors(args.models, args.match, args.whole)
    print(f"read {counts['tensors']} tensors ({counts['tensor_bytes']} bytes) and "
          f"{len(args.whole)} whole files ({counts['whole_bytes']} bytes)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
