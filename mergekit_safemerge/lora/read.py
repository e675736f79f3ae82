"""PEFT LoRA adapters read as factors, without merging them into a full copy of the model.

A LoRA adapter changes a module's weight by ``D = s * B A`` with ``B`` (``out x r``, saved as
``lora_B``), ``A`` (``r x in``, ``lora_A``) and ``s = lora_alpha / r``, or
``lora_alpha / sqrt(r)`` with rsLoRA; ``alpha_pattern`` and ``rank_pattern`` override alpha and
r per module as PEFT does. The configuration is parsed by PEFT itself (``LoraConfig``), the
weights are opened lazily (memory-mapped safetensors) and handed out one module at a time.

Every mismatch PEFT would refuse on loading is refused here before any tensor is read: a rank in
the weights that is not the configured ``r`` (or ``rank_pattern``), a module outside
``target_modules``, factors that do not multiply. Features that are not a plain low-rank update
of linear weights (DoRA, LoRA biases, ``modules_to_save``, embedding LoRA, ``fan_in_fan_out``)
are refused too, so nothing is silently dropped. An adapter may be a local folder or a Hub id
(``org/name`` or ``org/name@revision``), resolved through huggingface_hub and its cache.

An :class:`AdapterReader` belongs to one run (a pass of the binding, or one check of a
configuration): it resolves each adapter once and opens each folder once, and is dropped with
the run. Nothing is cached for the life of the process.

PEFT and safetensors are imported when an adapter is first opened (deferred on purpose: every
``mergekit-yaml`` process imports this module through the registration, and most never read an
adapter).
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from safetensors import SafetensorError, safe_open

from mergekit_safemerge.core.updates import LoraFactors
from mergekit_safemerge.errors import SafeMergeError
from mergekit_safemerge.sources import looks_local, read_json

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
_FACTOR_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


@dataclass(frozen=True)
class AdapterSource:
    """Where an adapter comes from: what the user wrote, and the local folder it resolved to."""

    spec: str
    folder: str


def resolve_adapter(spec: str, *, where: str) -> AdapterSource:
    """A local adapter folder, or a Hub id (``org/name[@revision]``) fetched into the Hub cache.

    Only ``adapter_config.json`` and ``adapter_model.safetensors`` are fetched; with
    ``HF_HUB_OFFLINE=1`` the cache alone is used. Errors are one line naming ``where``.
    """
    if os.path.isdir(spec):
        return AdapterSource(spec, spec)
    if looks_local(spec) and "@" not in spec:
        raise SafeMergeError(f"{where}: adapter folder {spec} not found")
    repo_id, _, revision = spec.partition("@")
    if repo_id.count("/") != 1:
        raise SafeMergeError(
            f"{where}: adapter {spec} is neither a folder nor a Hub id (org/name[@revision])"
        )
    try:
        folder = snapshot_download(
            repo_id, revision=revision or None, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE]
        )
    except LocalEntryNotFoundError:
        raise SafeMergeError(
            f"{where}: no folder {spec}, and Hub adapter {repo_id} is not in the local Hub cache "
            "(offline, or the Hub is unreachable)"
        ) from None
    except (HFValidationError, OSError, ValueError) as error:
        message = " ".join(str(error).split())
        raise SafeMergeError(f"{where}: cannot fetch Hub adapter {spec} ({message})") from None
    return AdapterSource(spec, folder)


def _read_config(path: str):
    """The adapter's ``LoraConfig``, parsed by PEFT; one-line errors for anything unreadable."""
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise SafeMergeError(f"adapter {path}: no {CONFIG_FILE} (not a PEFT adapter folder)")
    raw = read_json(config_path, f"adapter {path}")
    if not isinstance(raw, dict):
        raise SafeMergeError(f"adapter {path}: {CONFIG_FILE} is not a JSON object")
    if raw.get("peft_type", "LORA") != "LORA":
        raise SafeMergeError(
            f"adapter {path}: peft_type {raw.get('peft_type')!r} is not LORA; give this role as "
            "model+adapter (--lora-merge-cache) instead"
        )
    from peft import LoraConfig

    try:
        config = LoraConfig.from_pretrained(path)
    except Exception as error:  # PEFT raises TypeError/ValueError for bad fields
        message = " ".join(str(error).split())
        raise SafeMergeError(
            f"adapter {path}: {CONFIG_FILE} is not a valid LoRA config ({message})"
        ) from None
    refuse = {
        "use_dora": bool(config.use_dora),
        "bias": config.bias != "none" or bool(getattr(config, "lora_bias", False)),
        "modules_to_save": bool(config.modules_to_save),
        "fan_in_fan_out": bool(config.fan_in_fan_out),
        "trainable_token_indices": bool(getattr(config, "trainable_token_indices", None)),
    }
    for key, bad in refuse.items():
        if bad:
            raise SafeMergeError(
                f"adapter {path}: {key}={getattr(config, key, None)!r} is not a plain low-rank "
                "update; give this role as model+adapter (--lora-merge-cache) instead"
            )
    return config


class LoraAdapter:
    """One PEFT LoRA adapter folder, read lazily; every module checked on opening (headers)."""

    def __init__(self, path: str):
        self.path = path
        self.config = _read_config(path)
        weights_path = os.path.join(path, WEIGHTS_FILE)
        if not os.path.isfile(weights_path):
            raise SafeMergeError(
                f"adapter {path}: no {WEIGHTS_FILE} (save the adapter with safetensors)"
            )
        try:
            self._file = safe_open(weights_path, framework="pt")
            keys = list(self._file.keys())
        except (SafetensorError, OSError) as error:
            raise SafeMergeError(
                f"adapter {path}: {WEIGHTS_FILE} is not a readable safetensors file ({error})"
            ) from None
        self._shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self._modules = self._index(keys)
        self._lock = threading.Lock()

    def _index(self, keys: list[str]) -> set[str]:
        from peft.tuners.tuners_utils import check_target_module_exists

        modules = set()
        for key in keys:
            if "lora_embedding" in key:
                raise SafeMergeError(
                    f"adapter {self.path}: embedding LoRA ({key}) is not supported as factors; "
                    "give this role as model+adapter (--lora-merge-cache) instead"
                )
            suffix = next((s for s in _FACTOR_SUFFIXES if key.endswith(s)), None)
            if suffix is None and key.endswith(".weight"):
                raise SafeMergeError(
                    f"adapter {self.path}: {key} is a full weight, not LoRA factors (PEFT saves "
                    "these for modules_to_save, trainable tokens or a LoRA on tied embeddings); "
                    "give this role as aligned+adapter with --lora-merge-cache, where PEFT "
                    "merges it"
                )
            if suffix is None or not key.startswith(KEY_PREFIX):
                raise SafeMergeError(f"adapter {self.path}: unexpected tensor {key}")
            modules.add(key.removeprefix(KEY_PREFIX).removesuffix(suffix))
        for module in sorted(modules):
            down_key, up_key = (f"{KEY_PREFIX}{module}{s}" for s in _FACTOR_SUFFIXES)
            if down_key not in keys or up_key not in keys:
                raise SafeMergeError(
                    f"adapter {self.path}: {module} has only one of lora_A and lora_B"
                )
            down = tuple(self._file.get_slice(down_key).get_shape())
            up = tuple(self._file.get_slice(up_key).get_shape())
            if len(down) != 2 or len(up) != 2 or up[1] != down[0]:
                raise SafeMergeError(
                    f"adapter {self.path}: {module} has lora_A {down} and lora_B {up}, "
                    "which do not multiply"
                )
            configured = self.rank(module)
            if down[0] != configured:
                raise SafeMergeError(
                    f"adapter {self.path}: {module} has rank {down[0]} in its weights but "
                    f"{CONFIG_FILE} says r = {configured} (PEFT would refuse to load it)"
                )
            if self._names_targets() and not check_target_module_exists(self.config, module):
                targets = self.config.target_modules
                shown = sorted(targets) if isinstance(targets, (set, list)) else targets
                raise SafeMergeError(
                    f"adapter {self.path}: {module} is not matched by target_modules {shown!r} "
                    f"of {CONFIG_FILE}"
                )
            self._shapes[module] = (down, up)
        return modules

    def _names_targets(self) -> bool:
        """Whether ``target_modules`` names modules. ``None`` (PEFT's mapping by model type) and
        ``"all-linear"`` are resolved by PEFT from the model when it trains; the modules in
        the saved weights are then the adapter's modules, as PEFT loads them."""
        targets = self.config.target_modules
        return targets is not None and targets != "all-linear"

    @property
    def modules(self) -> frozenset[str]:
        """Module paths the adapter changes, e.g. ``model.layers.0.self_attn.q_proj``."""
        return frozenset(self._modules)

    @property
    def base_model(self) -> str | None:
        """``base_model_name_or_path`` of the adapter's configuration (what it was trained on)."""
        return self.config.base_model_name_or_path or None

    def rank(self, module: str) -> int:
        """The configured ``r`` of ``module`` (``rank_pattern`` over ``r``, as PEFT resolves it)."""
        from peft.utils.other import get_pattern_key

        pattern = self.config.rank_pattern or {}
        return int(pattern.get(get_pattern_key(pattern.keys(), module), self.config.r))

    def scaling(self, module: str, rank: int) -> float:
        """``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), with PEFT's per-module patterns."""
        from peft.utils.other import get_pattern_key

        pattern = self.config.alpha_pattern or {}
        alpha = pattern.get(get_pattern_key(pattern.keys(), module), self.config.lora_alpha)
        if self.config.use_rslora:
            return alpha / math.sqrt(rank)
        return alpha / rank

    def factors(self, tensor_name: str) -> LoraFactors | None:
        """The factors for ``<module>.weight``, or None when the adapter leaves it alone."""
        if not tensor_name.endswith(".weight"):
            return None
        module = tensor_name.removesuffix(".weight")
        if module not in self._modules:
            return None
        with self._lock:
            down = self._file.get_tensor(f"{KEY_PREFIX}{module}.lora_A.weight")
            up = self._file.get_tensor(f"{KEY_PREFIX}{module}.lora_B.weight")
        scale = self.scaling(module, int(down.shape[0]))
        return LoraFactors(
            left=up.to(torch.float32) * scale, right=down.to(torch.float32), scaling=scale
        )

    def factor_shapes(self) -> dict[str, tuple[int, int]]:
        """``<module>.weight`` -> the ``(out, in)`` shape its update has (headers only)."""
        return {f"{m}.weight": (up[0], down[1]) for m, (down, up) in self._shapes.items()}


class AdapterReader:
    """The adapters of one run: each spec resolved once, each folder opened once (thread-safe;
    a retrained adapter at the same path is a new adapter)."""

    def __init__(self) -> None:
        self._sources: dict[str, AdapterSource] = {}
        self._adapters: dict[tuple[str, int], LoraAdapter] = {}
        self._lock = threading.Lock()

    def source(self, spec: str, *, where: str) -> AdapterSource:
        with self._lock:
            known = self._sources.get(spec)
        if known is None:
            known = resolve_adapter(spec, where=where)
            with self._lock:
                self._sources[spec] = known
        return known

    def open(self, path: str) -> LoraAdapter:
        weights = os.path.join(path, WEIGHTS_FILE)
        key = (
            os.path.realpath(path),
            os.stat(weights).st_mtime_ns if os.path.exists(weights) else 0,
        )
        with self._lock:
            adapter = self._adapters.get(key)
            if adapter is None:
                adapter = self._adapters[key] = LoraAdapter(path)
            return adapter

    def factors(self, spec: str, tensor_name: str, *, where: str) -> LoraFactors | None:
        """The factors adapter ``spec`` has for ``tensor_name`` (None: it leaves it alone)."""
        return self.open(self.source(spec, where=where).folder).factors(tensor_name)


def check_update_shape(
    tensor_name: str,
    adapter: str,
    role: str,
    update_shape: tuple[int, int],
    aligned: str,
    aligned_shape: tuple[int, ...],
) -> None:
    """An adapter's update must have the shape of the aligned weight it changes."""
    if tuple(update_shape) != tuple(aligned_shape):
        raise SafeMergeError(
            f"tensor {tensor_name}: adapter {adapter} ({role}) makes an update of shape "
            f"{tuple(update_shape)}, but aligned model {aligned} has {tuple(aligned_shape)}"
        )
