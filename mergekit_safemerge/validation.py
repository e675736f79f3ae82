"""Checks of a ``safemerge`` configuration before mergekit reads a single tensor.

mergekit validates parameters per tensor during planning, after every model (and every LoRA
merge) has been loaded, silently ignores unknown keys, and reports pydantic errors over many
lines. :func:`validate_config` runs first and turns each mistake into one
:class:`~mergekit_safemerge.errors.SafeMergeError` line that names the key, model or tensor.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mergekit.common import ModelReference
from mergekit.config import ConditionalParameter, MergeConfiguration
from mergekit.merge_methods.base import ParameterScope, ParameterSpec
from mergekit.options import MergeOptions
from pydantic import ValidationError

from mergekit_safemerge.errors import SafeMergeError
from mergekit_safemerge.method import PARAMETERS, ROLES
from mergekit_safemerge.selection import COUNT_MODES
from mergekit_safemerge.targets import matches_targets, parse_targets

SHARED = {p.name: p for p in PARAMETERS if p.scope == ParameterScope.SHARED}
# Decided once for the whole merge: a per-tensor filter or a layer gradient makes no sense here.
WHOLE_MERGE = ("select", "k", "seed", "finetuned_adapter", "safety_adapter")
PER_MODEL = {p.name: p for p in PARAMETERS if p.scope != ParameterScope.SHARED}


@dataclass(frozen=True)
class ValidatedConfig:
    """What the checks established: the model of each role and the merge settings."""

    models: dict[str, ModelReference]  # the roles given as models
    settings: dict[str, Any]  # shared parameters as configured (or their defaults)
    adapters: dict[str, str] = field(default_factory=dict)  # roles given as aligned + adapter

    def role_sources(self) -> dict[str, str]:
        """Where each role comes from, for the report: a model, or aligned + adapter."""
        sources = {role: str(model) for role, model in self.models.items()}
        for role, path in self.adapters.items():
            sources[role] = f"{self.models['aligned']}+{path} (LoRA factors)"
        return {role: sources[role] for role in ("aligned", *ROLES)}

    def report_settings(self, options: MergeOptions, dtype: str | None) -> dict[str, Any]:
        settings = dict(self.settings)
        settings["dtype"] = dtype
        settings["random_seed"] = options.random_seed
        return settings


def _leaf_values(setting: Any) -> Iterator[Any]:
    """Every scalar inside a mergekit parameter setting (filters and gradients included)."""
    if isinstance(setting, ConditionalParameter):
        yield from _leaf_values(setting.value)
    elif isinstance(setting, list):
        for item in setting:
            yield from _leaf_values(item)
    else:
        yield setting


def _check_value(spec: ParameterSpec, where: str, setting: Any) -> None:
    for value in _leaf_values(setting):
        try:
            spec.validate(value)
        except ValidationError as error:
            message = error.errors()[0]["msg"]
            raise SafeMergeError(f"{where}: {value!r} is not valid ({message})") from None
        if spec.name == "targets":
            parse_targets(value)


def _plain(setting: Any) -> Any:
    if isinstance(setting, ConditionalParameter):
        return setting.model_dump(exclude_none=True)
    if isinstance(setting, list):
        return [_plain(item) for item in setting]
    return setting


def _check_shared(parameters: dict[str, Any] | None, where: str) -> None:
    for key, setting in (parameters or {}).items():
        if key in WHOLE_MERGE and (
            where != "parameters" or not isinstance(setting, (bool, int, float, str))
        ):
            raise SafeMergeError(
                f"{where}.{key}: {key} applies to the whole merge; give one plain value under "
                "the top-level parameters"
            )
        if key in PER_MODEL:
            raise SafeMergeError(
                f"{where}.{key}: {key!r} is a per-model parameter; set it under each model"
            )
        if key not in SHARED:
            raise SafeMergeError(
                f"{where}.{key}: unknown safemerge parameter (known: {', '.join(SHARED)})"
            )
        _check_value(SHARED[key], f"{where}.{key}", setting)


def _sources(config: MergeConfiguration) -> Iterator[tuple[str, ModelReference, dict | None]]:
    """(where, model, per-model parameters) for every model entry of the configuration."""
    for i, entry in enumerate(config.models or []):
        yield f"models[{i}]", entry.model, entry.parameters
    for i, out_slice in enumerate(config.slices or []):
        for j, source in enumerate(out_slice.sources):
            yield f"slices[{i}].sources[{j}]", source.model, source.parameters
    for name, module in (config.modules or {}).items():
        for i, entry in enumerate(module.models or []):
            yield f"modules.{name}.models[{i}]", entry.model, entry.parameters
        for i, out_slice in enumerate(module.slices or []):
            for j, source in enumerate(out_slice.sources):
                yield f"modules.{name}.slices[{i}].sources[{j}]", source.model, source.parameters


def _shared_scopes(config: MergeConfiguration) -> Iterator[tuple[str, dict | None]]:
    yield "parameters", config.parameters
    for i, out_slice in enumerate(config.slices or []):
        yield f"slices[{i}].parameters", out_slice.parameters
    for name, module in (config.modules or {}).items():
        yield f"modules.{name}.parameters", module.parameters
        for i, out_slice in enumerate(module.slices or []):
            yield f"modules.{name}.slices[{i}].parameters", out_slice.parameters


def _roles(config: MergeConfiguration, adapters: dict[str, str]) -> dict[str, ModelReference]:
    base = config.base_model
    if base is None:
        raise SafeMergeError("base_model: safemerge needs the aligned model as base_model")
    others = {model for _, model, _ in _sources(config) if model != base}
    model_roles = [role for role in ROLES if role not in adapters]
    if len(others) != len(model_roles):
        given = f" ({', '.join(sorted(adapters))} from adapters)" if adapters else ""
        raise SafeMergeError(
            f"models: safemerge needs exactly {len(model_roles)} models besides base_model, one "
            f"per role ({', '.join(model_roles)}){given}; got {len(others)}"
        )
    models: dict[str, ModelReference] = {"aligned": base}
    for where, model, parameters in _sources(config):
        parameters = parameters or {}
        for key in parameters:
            if key in SHARED:
                raise SafeMergeError(
                    f"{where} ({model}): parameters.{key} is shared by all models; "
                    "set it under the top-level parameters"
                )
            if key not in PER_MODEL:
                raise SafeMergeError(
                    f"{where} ({model}): unknown safemerge parameter {key!r} (known: role)"
                )
        if model == base:
            if "role" in parameters:
                raise SafeMergeError(
                    f"{where} ({model}): this is base_model, the aligned model; it takes no role"
                )
            continue
        if "role" not in parameters:
            raise SafeMergeError(
                f"{where} ({model}): parameters.role is missing (one of {', '.join(ROLES)})"
            )
        role = parameters["role"]
        if not isinstance(role, str) or role not in ROLES:
            raise SafeMergeError(
                f"{where} ({model}): parameters.role {role!r} is not one of {', '.join(ROLES)}"
            )
        if role in adapters:
            raise SafeMergeError(
                f"{where} ({model}): role {role!r} is also given by parameters.{role}_adapter; "
                "use one"
            )
        if role in models and models[role] != model:
            raise SafeMergeError(
                f"{where} ({model}): role {role!r} is already given to model {models[role]}"
            )
        for other_role, other in models.items():
            if other == model and other_role != role:
                raise SafeMergeError(
                    f"{where} ({model}): this model already has role {other_role!r}"
                )
        models[role] = model
    missing = [role for role in model_roles if role not in models]
    if missing:
        raise SafeMergeError(
            f"models: no model has role {missing[0]!r} (each of {', '.join(ROLES)} exactly once)"
        )
    return models


def _local_dir(model: ModelReference) -> str | None:
    path = model.model.path
    return path if os.path.isdir(path) else None


def read_tensor_shapes(model_dir: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors headers of a model folder (no tensor data)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def _check_adapters(adapters: dict[str, str], aligned: ModelReference) -> None:
    """Each adapter opens as a plain LoRA and fits the aligned model's weights (headers only)."""
    from mergekit_safemerge.adapters import open_adapter

    aligned_dir = _local_dir(aligned)
    reference = read_tensor_shapes(aligned_dir) if aligned_dir else {}
    for role, path in adapters.items():
        if not os.path.isdir(path):
            raise SafeMergeError(f"parameters.{role}_adapter: folder {path} not found")
        adapter = open_adapter(path)
        if not reference:
            continue
        for name, shape in sorted(adapter.factor_shapes().items()):
            expected = reference.get(name)
            if expected is None:
                raise SafeMergeError(
                    f"parameters.{role}_adapter: adapter {path} changes {name}, which aligned "
                    f"model {aligned} does not have"
                )
            if tuple(expected) != shape:
                raise SafeMergeError(
                    f"tensor {name}: adapter {path} ({role}) makes an update of shape {shape}, "
                    f"but aligned model {aligned} has {tuple(expected)}"
                )


def _check_local_inputs(
    models: dict[str, ModelReference], options: MergeOptions, targets: list[str]
) -> None:
    for role, model in models.items():
        if model.lora is not None and not options.lora_merge_cache:
            raise SafeMergeError(
                f"model {model} ({role}) has a LoRA adapter: pass --lora-merge-cache DIR "
                "(and --lora-merge-dtype float32 to keep the update exact)"
            )
        if (
            model.lora is not None
            and _looks_local(model.lora.path)
            and not os.path.isdir(model.lora.path)
        ):
            raise SafeMergeError(
                f"model {model} ({role}): adapter folder {model.lora.path} not found"
            )
        if _looks_local(model.model.path) and not os.path.isdir(model.model.path):
            raise SafeMergeError(f"model {model} ({role}): folder {model.model.path} not found")

    aligned_dir = _local_dir(models["aligned"])
    if aligned_dir is None:
        return
    reference = read_tensor_shapes(aligned_dir)
    if not reference:
        return
    for role, model in models.items():
        model_dir = _local_dir(model)
        if role == "aligned" or model_dir is None:
            continue
        for name, shape in read_tensor_shapes(model_dir).items():
            expected = reference.get(name)
            if expected is not None and expected != shape:
                raise SafeMergeError(
                    f"tensor {name}: shape {shape} in model {model} ({role}) differs from "
                    f"{expected} in aligned model {models['aligned']}"
                )
    matrices = [name for name, shape in reference.items() if len(shape) == 2]
    for value in targets:
        for target in parse_targets(value):
            if not any(matches_targets(name, (target,)) for name in matrices):
                raise SafeMergeError(
                    f"parameters.targets: {target!r} matches no 2-D weight of aligned model "
                    f"{models['aligned']}"
                )


def _looks_local(path: str) -> bool:
    """A path the user clearly meant as a folder (hub ids look like ``org/name``)."""
    return path.startswith(("/", "./", "../", "~")) or path.count("/") >= 2


def validate_config(config: MergeConfiguration, options: MergeOptions) -> ValidatedConfig:
    """All checks that need no tensor data; raises :class:`SafeMergeError` at the first fault."""
    for where, parameters in _shared_scopes(config):
        _check_shared(parameters, where)
    top = config.parameters or {}
    adapters = {
        role: SHARED[key].validate(top[key])
        for role, key in (("finetuned", "finetuned_adapter"), ("safety", "safety_adapter"))
        if top.get(key)
    }
    models = _roles(config, adapters)
    settings: dict[str, Any] = {}
    for name, spec in SHARED.items():
        setting = (config.parameters or {}).get(name)
        if setting is None:
            settings[name] = spec.default
        elif isinstance(setting, (bool, int, float, str)):
            settings[name] = spec.validate(setting)
        else:  # filters and gradients, recorded as written
            settings[name] = _plain(setting)
    if settings["select"] in COUNT_MODES and settings["k"] < 1:
        raise SafeMergeError(
            f"parameters.k: select {settings['select']} needs k >= 1 (how many matrices to merge)"
        )
    targets = [
        value
        for _, parameters in _shared_scopes(config)
        for value in _leaf_values((parameters or {}).get("targets", []))
    ]
    _check_local_inputs(models, options, targets)
    _check_adapters(adapters, models["aligned"])
    return ValidatedConfig(models=models, settings=settings, adapters=adapters)
