"""The inputs of a merge checked on disk before a single tensor is read.

What is read: each local model's ``config.json`` and safetensors headers (names, shapes,
dtypes; no tensor data), its shard index, each adapter's configuration and headers; a model
that is not a local folder must be a Hub model that can be reached (or is cached). Every fault
is one :class:`~mergekit_safemerge.errors.SafeMergeError` line naming the model, file or tensor.
"""

from __future__ import annotations

import collections
import glob
import os
from dataclasses import dataclass
from typing import Any

import huggingface_hub
import torch
from huggingface_hub import constants as hub_constants
from mergekit.common import ModelReference
from mergekit.options import MergeOptions
from safetensors import SafetensorError, safe_open

from mergekit_safemerge.core.roles import ADAPTER_PARAMETERS, ALIGNED
from mergekit_safemerge.core.targets import matches_targets, parse_targets
from mergekit_safemerge.errors import SafeMergeError
from mergekit_safemerge.lora.read import AdapterReader, AdapterSource, check_update_shape
from mergekit_safemerge.sources import looks_local, read_json

_FLOAT_SAFETENSORS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_OPTIONAL_TENSORS = ("lm_head.weight",)  # absent when the embeddings are tied
SHARD_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorHeader:
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code: F32, BF16, I64, ...


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def weight_file_stays_inside(model_dir: str, path: str) -> bool:
    """Whether a weight file resolves inside its model folder, or, for a Hub cache snapshot
    (``<repo>/snapshots/<revision>/``, whose files link to ``<repo>/blobs/``), inside that
    repository's blobs."""
    folder = os.path.realpath(model_dir)
    real = os.path.realpath(path)
    if _inside(real, folder):
        return True
    snapshots = os.path.dirname(folder)
    blobs = os.path.join(os.path.dirname(snapshots), "blobs")
    return os.path.basename(snapshots) == "snapshots" and _inside(real, blobs)


def _shards(model_dir: str, label: str) -> list[str]:
    """The shard files named by ``model.safetensors.index.json`` (none without an index): each
    must be a plain name inside the folder, and exist."""
    index_path = os.path.join(model_dir, SHARD_INDEX)
    if not os.path.isfile(index_path):
        return []
    document = read_json(index_path, label)
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise SafeMergeError(
            f"{label}: {SHARD_INDEX} is not a valid index (no weight_map of tensor -> file)"
        )
    shards = []
    for tensor, shard in sorted(weight_map.items(), key=lambda item: item[1]):
        path = os.path.join(model_dir, shard)
        if (
            os.path.isabs(shard)
            or ".." in shard.replace("\\", "/").split("/")
            or not weight_file_stays_inside(model_dir, path)
        ):
            raise SafeMergeError(
                f"{label}: {SHARD_INDEX} maps {tensor} to {shard}, outside the model folder; "
                "a shard must be a file of the model's own folder"
            )
        if not os.path.isfile(path):
            raise SafeMergeError(f"{label}: shard {shard} named in {SHARD_INDEX} is missing")
        shards.append(path)
    return shards


def read_tensor_headers(model_dir: str, *, label: str) -> dict[str, TensorHeader]:
    """Tensor name -> shape and dtype from a model folder's safetensors headers (no data).

    With a ``model.safetensors.index.json`` every shard it names must be a file of the folder
    and exist. A weight file may not resolve outside the folder. Unreadable files (truncated, a
    bad header) are one-line errors naming ``label`` and the file.
    """
    _shards(model_dir, label)
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    for path in files:
        if not weight_file_stays_inside(model_dir, path):
            raise SafeMergeError(
                f"{label}: {os.path.basename(path)} links to {os.path.realpath(path)}, outside "
                "the model folder"
            )
    headers: dict[str, TensorHeader] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                    piece = handle.get_slice(key)
                    headers[key] = TensorHeader(tuple(piece.get_shape()), piece.get_dtype())
        except (SafetensorError, OSError) as error:
            message = " ".join(str(error).split())
            raise SafeMergeError(
                f"{label}: {os.path.basename(path)} is not a readable safetensors file ({message})"
            ) from None
    return headers


def _read_model_config(model_dir: str, label: str) -> dict[str, Any]:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        has_files = any(os.scandir(model_dir))
        what = "has no config.json" if has_files else "is empty"
        raise SafeMergeError(f"{label}: folder {model_dir} {what} (not a transformers model)")
    config = read_json(path, label)
    if not isinstance(config, dict) or not config.get("architectures"):
        raise SafeMergeError(
            f"{label}: config.json has no 'architectures' (which model class this is)"
        )
    return config


def _check_reachable(model: ModelReference, label: str) -> None:
    """A model that is not a local folder must be a Hub model we can reach (or have cached)."""
    path = model.model.path
    if os.path.isdir(path):
        return
    if looks_local(path):
        raise SafeMergeError(f"{label}: folder {path} not found")
    revision = model.model.revision
    cached = huggingface_hub.try_to_load_from_cache(path, "config.json", revision=revision)
    if isinstance(cached, str):
        return
    if hub_constants.HF_HUB_OFFLINE:
        raise SafeMergeError(
            f"{label}: no folder {path}, and not reachable as a Hub model (HF_HUB_OFFLINE=1 and "
            "it is not in the Hub cache)"
        )
    try:
        huggingface_hub.model_info(path, revision=revision)
    except Exception as error:  # not found, gated, no network: all mean "cannot merge it"
        reason = type(error).__name__
        raise SafeMergeError(
            f"{label}: no folder {path}, and not reachable as a Hub model ({reason})"
        ) from None


# ---------------------------------------------------------------- the role models
class RoleModels:
    """The role models of a configuration, checked step by step (each method one rule)."""

    def __init__(self, models: dict[str, ModelReference], options: MergeOptions):
        self.models = models
        self.options = options
        self.labels = {role: f"model {model} ({role})" for role, model in models.items()}
        self.local = {
            role: m.model.path for role, m in models.items() if os.path.isdir(m.model.path)
        }
        self.headers: dict[str, dict[str, TensorHeader]] = {}
        self.warnings: list[str] = []

    @property
    def aligned(self) -> ModelReference:
        return self.models[ALIGNED]

    def check_sources(self) -> None:
        """A LoRA model needs the merge cache; every folder exists or the Hub has the model."""
        for role, model in self.models.items():
            if model.lora is not None and not self.options.lora_merge_cache:
                raise SafeMergeError(
                    f"{self.labels[role]} has a LoRA adapter: pass --lora-merge-cache DIR "
                    "(and --lora-merge-dtype float32 to keep the update exact)"
                )
            lora = model.lora.path if model.lora is not None else None
            if lora is not None and looks_local(lora) and not os.path.isdir(lora):
                raise SafeMergeError(f"{self.labels[role]}: adapter folder {lora} not found")
            _check_reachable(model, self.labels[role])

    def check_architectures(self) -> None:
        """Every local model is a transformers model of the aligned model's architecture."""
        configs = {
            role: _read_model_config(path, self.labels[role]) for role, path in self.local.items()
        }
        reference = configs.get(ALIGNED)
        if reference is None:
            return
        for role, config in configs.items():
            for key in ("architectures", "model_type"):
                if config.get(key) != reference.get(key):
                    raise SafeMergeError(
                        f"{self.labels[role]}: {key} {config.get(key)!r} differs from "
                        f"{reference.get(key)!r} of aligned model {self.aligned}"
                    )

    def check_headers(self) -> None:
        """Every header readable; every 2-D weight floating-point."""
        self.headers = {
            role: read_tensor_headers(path, label=self.labels[role])
            for role, path in self.local.items()
        }
        for role, tensors in self.headers.items():
            for name, header in tensors.items():
                if header.dtype not in _FLOAT_SAFETENSORS and len(header.shape) == 2:
                    raise SafeMergeError(
                        f"tensor {name}: dtype {header.dtype} in {self.labels[role]} is not a "
                        "floating-point weight (quantized or corrupt models cannot be merged)"
                    )

    def check_shapes(self) -> None:
        """Every model has the aligned model's tensors, of its shapes and kinds of dtype."""
        reference = self.headers.get(ALIGNED)
        if not reference:
            return
        for role, tensors in self.headers.items():
            if role == ALIGNED or not tensors:
                continue
            for name, header in tensors.items():
                expected = reference.get(name)
                if expected is None:
                    continue
                if expected.shape != header.shape:
                    raise SafeMergeError(
                        f"tensor {name}: shape {header.shape} in {self.labels[role]} differs "
                        f"from {expected.shape} in aligned model {self.aligned}"
                    )
                if (header.dtype in _FLOAT_SAFETENSORS) != (expected.dtype in _FLOAT_SAFETENSORS):
                    raise SafeMergeError(
                        f"tensor {name}: dtype {header.dtype} in {self.labels[role]} differs in "
                        f"kind from {expected.dtype} in aligned model {self.aligned}"
                    )
            missing = sorted(set(reference) - set(tensors) - set(_OPTIONAL_TENSORS))
            if missing:
                raise SafeMergeError(
                    f"tensor {missing[0]}: missing in {self.labels[role]} "
                    f"({len(missing)} tensors of aligned model {self.aligned} are missing)"
                )

    def check_precisions(self) -> None:
        """Roles stored in different floating-point precisions are worth a warning: a matrix
        the fine-tune left alone then differs by rounding only (taken as D = 0), and every
        other update carries that rounding."""
        stored = {
            role: collections.Counter(
                h.dtype for h in tensors.values() if len(h.shape) == 2
            ).most_common(1)[0][0]
            for role, tensors in self.headers.items()
            if any(len(h.shape) == 2 for h in tensors.values())
        }
        if len(set(stored.values())) > 1:
            shown = ", ".join(f"{role} {dtype}" for role, dtype in stored.items())
            self.warnings.append(
                f"the models are stored in different precisions ({shown}): a matrix whose "
                "update is only the rounding to the narrower dtype is taken as unchanged "
                "(D = 0); other updates include that rounding (store every role in one "
                "precision for exact updates)"
            )

    def check_targets(self, targets: list[str]) -> None:
        """Every module named in ``targets`` matches a 2-D weight of the aligned model."""
        reference = self.headers.get(ALIGNED)
        if not reference:
            return
        matrices = [name for name, header in reference.items() if len(header.shape) == 2]
        for value in targets:
            for target in parse_targets(value):
                if not any(matches_targets(name, (target,)) for name in matrices):
                    raise SafeMergeError(
                        f"parameters.targets: {target!r} matches no 2-D weight of aligned model "
                        f"{self.aligned}"
                    )

    def check_filters(self, filters: list[tuple[str, str]]) -> None:
        """Every ``filter:`` matches some tensor of the aligned model (mergekit matches a filter
        as a part of the tensor name; one that matches nothing silently applies nowhere)."""
        reference = self.headers.get(ALIGNED)
        if not reference:
            return
        for where, text in filters:
            if not any(text in name for name in reference):
                raise SafeMergeError(
                    f"{where}: filter {text!r} matches no tensor of aligned model "
                    f"{self.aligned} (a filter is a part of the tensor name, e.g. mlp or "
                    "self_attn.q_proj)"
                )


def check_models(
    models: dict[str, ModelReference],
    options: MergeOptions,
    targets: list[str],
    filters: list[tuple[str, str]],
) -> RoleModels:
    """Every check of the role models, in order; returns what was read (headers)."""
    checked = RoleModels(models, options)
    checked.check_sources()
    checked.check_architectures()
    checked.check_headers()
    checked.check_shapes()
    checked.check_precisions()
    checked.check_targets(targets)
    checked.check_filters(filters)
    return checked


# ---------------------------------------------------------------- adapters
def _same_base(adapter_base: str, aligned: ModelReference) -> bool:
    """Whether an adapter's ``base_model_name_or_path`` names the aligned model."""
    aligned_path = aligned.model.path
    if os.path.isdir(adapter_base) and os.path.isdir(aligned_path):
        return os.path.realpath(adapter_base) == os.path.realpath(aligned_path)
    tail = adapter_base.rstrip("/").rsplit("/", 1)[-1].lower()
    return tail == aligned_path.rstrip("/").rsplit("/", 1)[-1].lower()


def check_adapters(
    specs: dict[str, str], aligned: ModelReference, reader: AdapterReader
) -> tuple[dict[str, AdapterSource], list[str]]:
    """Each adapter resolves, opens as a plain LoRA and fits the aligned model (headers only);
    returns the sources and what to warn about."""
    sources, warnings = {}, []
    aligned_dir = aligned.model.path if os.path.isdir(aligned.model.path) else None
    reference = (
        read_tensor_headers(aligned_dir, label=f"aligned model {aligned}") if aligned_dir else {}
    )
    for role, spec in specs.items():
        where = f"parameters.{ADAPTER_PARAMETERS[role]}"
        source = sources[role] = reader.source(spec, where=where)
        adapter = reader.open(source.folder)
        if adapter.base_model and not _same_base(adapter.base_model, aligned):
            warnings.append(
                f"{where}: adapter {spec} was trained on {adapter.base_model}, but the aligned "
                f"model is {aligned}; check that it belongs to this model"
            )
        for name, shape in sorted(adapter.factor_shapes().items()):
            if not reference:
                break
            expected = reference.get(name)
            if expected is None:
                raise SafeMergeError(
                    f"{where}: adapter {spec} changes {name}, which aligned model {aligned} "
                    "does not have"
                )
            check_update_shape(name, spec, role, shape, str(aligned), expected.shape)
    folders = {role: os.path.realpath(s.folder) for role, s in sources.items()}
    if len(folders) == 2 and len(set(folders.values())) == 1:
        warnings.append(
            "parameters.finetuned_adapter and parameters.safety_adapter are the same adapter "
            f"({specs['finetuned']}): S = D, so merging only rescales the fine-tune"
        )
    return sources, warnings


def check_device(options: MergeOptions) -> None:
    """``--cuda`` / ``--device cuda`` needs a CUDA device."""
    device = str(options.device or "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SafeMergeError(
            f"--device {device} (or --cuda): no CUDA device is available here; "
            "run on CPU (the default) or on a machine with a GPU"
        )
