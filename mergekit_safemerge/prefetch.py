"""Read ahead the tensors ``safemerge adapter`` will read, while Python imports mergekit.

A command that merges first pays mergekit's import chain (torch, transformers, PEFT: seconds of
CPU) and only then reads its tensors (seconds of disk when the model files are not in the page
cache, as in the first merge of a downloaded model). :func:`read_ahead_adapter_inputs` overlaps
the two: from the recipe alone (the YAML, the shard indexes and the safetensors headers; no
torch, no mergekit) it finds the byte ranges of the tensors the adapter command reads (the
modules the adapters change, in the aligned and the unaligned model) and reads them once, from a
daemon thread, in large chunks into one reused buffer, so that they are in the page cache when
mergekit's loader maps them. ``os.preadv`` releases the GIL, so the imports go on meanwhile;
large sequential reads are also what the disk serves fastest (docs/performance.md, "Reading
ahead", compares the kernel's own hint).

It is a hint and nothing else: the bytes it reads are thrown away, anything it cannot find or
parse is skipped without a word, and the command checks and reads every input as before. It
reads at most a quarter of the memory available, so what it reads ahead is not pushed out again
before use. ``MERGEKIT_SAFEMERGE_READ_AHEAD=0`` turns it off.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator

from mergekit_safemerge.sources import looks_local

READ_AHEAD_ENV = "MERGEKIT_SAFEMERGE_READ_AHEAD"
CHUNK = 16 * 1024 * 1024
"""Bytes per read of the read-ahead."""
MEMORY_SHARE = 0.25
"""The most of ``MemAvailable`` one read-ahead asks for."""
ADAPTER_KEYS = ("finetuned_adapter", "safety_adapter")
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
_PEFT_PREFIX = "base_model.model."

Range = tuple[str, int, int]
"""``(file, offset, length)`` of one tensor's bytes."""


def read_ahead_adapter_inputs(config_file: str) -> threading.Thread | None:
    """Start reading ahead what ``safemerge adapter CONFIG_FILE`` reads; the thread, or None
    when there is nothing to do (turned off, no local model, anything unreadable)."""
    if os.environ.get(READ_AHEAD_ENV, "1").strip().lower() in {"0", "false", "no", "off"}:
        return None
    if not hasattr(os, "preadv"):
        return None
    try:
        ranges = list(_within_budget(adapter_input_ranges(config_file), _budget()))
    except Exception:  # a hint: the command reports every problem with its inputs itself
        return None
    if not ranges:
        return None
    thread = threading.Thread(target=_read, args=(ranges,), name="read-ahead", daemon=True)
    thread.start()
    return thread


def adapter_input_ranges(config_file: str) -> list[Range]:
    """The byte ranges of the weights the adapters change, in every full model of the recipe
    that is a local folder, in file order."""
    import yaml

    with open(config_file, encoding="utf-8") as fp:
        recipe = yaml.safe_load(fp)
    models, adapters = _recipe_folders(recipe)
    wanted = set()
    for adapter in adapters:
        wanted |= _adapted_weights(os.path.join(adapter, "adapter_model.safetensors"))
    ranges: list[Range] = []
    for model in models:
        ranges += _tensor_ranges(model, wanted)
    return ranges


def _recipe_folders(recipe: object) -> tuple[list[str], list[str]]:
    """The local model folders and adapter folders a recipe names (``path+adapter`` split)."""
    if not isinstance(recipe, dict):
        return [], []
    references = [recipe.get("base_model")]
    references += [m.get("model") for m in recipe.get("models") or [] if isinstance(m, dict)]
    models, adapters = [], []
    for reference in references:
        if isinstance(reference, str):
            model, _, adapter = reference.partition("+")
            models.append(model)
            adapters.append(adapter)
    parameters = recipe.get("parameters")
    if isinstance(parameters, dict):
        adapters += [parameters.get(key) for key in ADAPTER_KEYS]

    def local(paths: Iterable[object]) -> list[str]:
        found = []
        for path in paths:
            if isinstance(path, str) and path and looks_local(path):
                folder = os.path.expanduser(path)
                if os.path.isdir(folder) and folder not in found:
                    found.append(folder)
        return found

    return local(models), local(adapters)


def read_header(path: str) -> tuple[dict, int]:
    """A safetensors file's JSON header (an 8-byte little-endian length, then the JSON) and
    where its data begin (``data_offsets`` count from there)."""
    with open(path, "rb") as fp:
        (length,) = struct.unpack("<Q", fp.read(8))
        return json.loads(fp.read(length)), 8 + length


def read_range(
    descriptor: int,
    start: int,
    end: int,
    buffer: memoryview,
    sink: Callable[[memoryview], None] | None = None,
) -> None:
    """Read bytes ``[start, end)`` of an open file with ``os.preadv`` in pieces of at most
    ``len(buffer)`` into ``buffer``; ``sink`` sees each piece. OSError when the file ends first."""
    offset = start
    while offset < end:
        view = buffer[: min(len(buffer), end - offset)]
        got = os.preadv(descriptor, [view], offset)
        if got <= 0:
            raise OSError(f"the file ends at byte {offset}, before {end}")
        if sink is not None:
            sink(view[:got])
        offset += got


def _adapted_weights(adapter_file: str) -> set[str]:
    """``module.weight`` for every module a PEFT LoRA file holds factors of."""
    names = set()
    for key in read_header(adapter_file)[0]:
        for suffix in _LORA_SUFFIXES:
            if key.endswith(suffix):
                names.add(key.removesuffix(suffix).removeprefix(_PEFT_PREFIX) + ".weight")
    return names


def _tensor_ranges(folder: str, wanted: set[str]) -> list[Range]:
    """Where the ``wanted`` tensors of a model folder lie, by its shard index (or its one
    ``model.safetensors``)."""
    index_file = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index_file):
        with open(index_file, encoding="utf-8") as fp:
            weight_map = json.load(fp)["weight_map"]
        shards = sorted({weight_map[name] for name in wanted if name in weight_map})
    else:
        shards = ["model.safetensors"]
    ranges = []
    for shard in shards:
        path = os.path.realpath(os.path.join(folder, shard))
        header, start = read_header(path)
        for name in sorted(wanted & header.keys(), key=lambda n: header[n]["data_offsets"][0]):
            begin, end = header[name]["data_offsets"]
            ranges.append((path, start + begin, end - begin))
    return ranges


def _budget() -> int:
    """Bytes one read-ahead may ask for: a share of ``MemAvailable`` (0 where unknown)."""
    with open("/proc/meminfo", encoding="ascii") as fp:
        for line in fp:
            if line.startswith("MemAvailable:"):
                return int(int(line.split()[1]) * 1024 * MEMORY_SHARE)
    return 0


def _within_budget(ranges: Iterable[Range], budget: int) -> Iterator[Range]:
    """The ranges in order until ``budget`` bytes are asked for."""
    for path, offset, length in ranges:
        if length > budget:
            return
        budget -= length
        yield path, offset, length


def _read(ranges: list[Range]) -> None:
    """Read each range once into one reused buffer, so that it is in the page cache when the
    command reads it (``os.preadv`` releases the GIL: the imports go on meanwhile)."""
    buffer = memoryview(bytearray(CHUNK))
    for path, offset, length in ranges:
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            read_range(descriptor, offset, offset + length, buffer)
        except OSError:
            pass
        finally:
            os.close(descriptor)
