"""PEFT LoRA adapters read as factors, without merging them into a full copy of the model.

A LoRA adapter changes a module's weight by ``D = s * B A`` with ``B`` (``out x r``, saved as
``lora_B``), ``A`` (``r x in``, ``lora_A``) and ``s = lora_alpha / r``, or
``lora_alpha / sqrt(r)`` with rsLoRA; ``alpha_pattern`` and ``rank_pattern`` override alpha and
r per module as PEFT does. :class:`LoraAdapter` opens the adapter's safetensors file lazily
(memory-mapped) and hands out one module's factors at a time. Features that are not a plain
low-rank update of linear weights (DoRA, LoRA biases, ``modules_to_save``, embedding LoRA,
``fan_in_fan_out``) are refused with a one-line error, so nothing is silently dropped.
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass

import torch

from mergekit_safemerge.errors import SafeMergeError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraFactors:
    """``D = left @ right`` with ``left = s B`` (``out x r``) and ``right = A`` (``r x in``)."""

    left: torch.Tensor
    right: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.right.shape[0])

    def delta(self) -> torch.Tensor:
        """The dense update ``s B A`` (float32)."""
        return self.left @ self.right


class LoraAdapter:
    """One PEFT LoRA adapter folder, read lazily."""

    def __init__(self, path: str):
        self.path = path
        config_path = os.path.join(path, CONFIG_FILE)
        weights_path = os.path.join(path, WEIGHTS_FILE)
        if not os.path.isfile(config_path):
            raise SafeMergeError(f"adapter {path}: no {CONFIG_FILE} (not a PEFT adapter folder)")
        if not os.path.isfile(weights_path):
            raise SafeMergeError(
                f"adapter {path}: no {WEIGHTS_FILE} (save the adapter with safetensors)"
            )
        with open(config_path, encoding="utf-8") as fp:
            self.config = json.load(fp)
        self._check_config()
        from safetensors import safe_open

        self._file = safe_open(weights_path, framework="pt")
        self._modules = self._index(list(self._file.keys()))
        self._lock = threading.Lock()

    def _check_config(self) -> None:
        config = self.config
        refuse = {
            "peft_type": config.get("peft_type", "LORA") != "LORA",
            "use_dora": bool(config.get("use_dora")),
            "bias": config.get("bias", "none") != "none" or bool(config.get("lora_bias")),
            "modules_to_save": bool(config.get("modules_to_save")),
            "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
            "trainable_token_indices": bool(config.get("trainable_token_indices")),
        }
        for key, bad in refuse.items():
            if bad:
                raise SafeMergeError(
                    f"adapter {self.path}: {key}={config.get(key)!r} is not a plain low-rank "
                    "update; give this role as model+adapter (--lora-merge-cache) instead"
                )

    def _index(self, keys: list[str]) -> set[str]:
        modules = set()
        for key in keys:
            if "lora_embedding" in key:
                raise SafeMergeError(
                    f"adapter {self.path}: embedding LoRA ({key}) is not supported as factors; "
                    "give this role as model+adapter (--lora-merge-cache) instead"
                )
            for suffix in (".lora_A.weight", ".lora_B.weight"):
                if key.endswith(suffix):
                    modules.add(key.removeprefix(_PREFIX).removesuffix(suffix))
                    break
            else:
                raise SafeMergeError(f"adapter {self.path}: unexpected tensor {key}")
        return modules

    @property
    def modules(self) -> frozenset[str]:
        """Module paths the adapter changes, e.g. ``model.layers.0.self_attn.q_proj``."""
        return frozenset(self._modules)

    def scaling(self, module: str, rank: int) -> float:
        """``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), with PEFT's per-module patterns."""
        from peft.utils.other import get_pattern_key

        alpha_pattern = self.config.get("alpha_pattern") or {}
        alpha = alpha_pattern.get(
            get_pattern_key(alpha_pattern.keys(), module), self.config["lora_alpha"]
        )
        if self.config.get("use_rslora"):
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
            down = self._file.get_tensor(f"{_PREFIX}{module}.lora_A.weight")
            up = self._file.get_tensor(f"{_PREFIX}{module}.lora_B.weight")
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise SafeMergeError(
                f"adapter {self.path}: {module} has lora_A {tuple(down.shape)} and lora_B "
                f"{tuple(up.shape)}, which do not multiply"
            )
        scale = self.scaling(module, rank)
        return LoraFactors(left=up.to(torch.float32) * scale, right=down.to(torch.float32))

    def factor_shapes(self) -> dict[str, tuple[int, int]]:
        """``<module>.weight`` -> the ``(out, in)`` shape its update has (headers only)."""
        shapes = {}
        for module in self._modules:
            up = self._file.get_slice(f"{_PREFIX}{module}.lora_B.weight").get_shape()
            down = self._file.get_slice(f"{_PREFIX}{module}.lora_A.weight").get_shape()
            shapes[f"{module}.weight"] = (up[0], down[1])
        return shapes


_open_adapters: dict[tuple[str, int], LoraAdapter] = {}
_open_lock = threading.Lock()


def open_adapter(path: str) -> LoraAdapter:
    """The adapter at ``path``, opened once per process (and again if its weights change)."""
    weights = os.path.join(path, WEIGHTS_FILE)
    # a retrained adapter at the same path is a new adapter
    key = (os.path.realpath(path), os.stat(weights).st_mtime_ns if os.path.exists(weights) else 0)
    with _open_lock:
        adapter = _open_adapters.get(key)
        if adapter is None:
            adapter = _open_adapters[key] = LoraAdapter(path)
        return adapter
