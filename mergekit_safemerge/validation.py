"""Checks of a ``safemerge`` configuration and its inputs before a single tensor is read.

mergekit validates parameters per tensor during planning, after every model (and every LoRA
merge) has been loaded, silently ignores unknown keys, and reports pydantic errors over many
lines. :func:`read_config` and :func:`validate_config` run first and turn each mistake into one
:class:`~mergekit_safemerge.errors.SafeMergeError` line that names the key, model or tensor.
What they read: the YAML, each local model's ``config.json`` and safetensors headers (names,
shapes, dtypes; no tensor data), each adapter's configuration and headers.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mergekit.common import ModelReference
from mergekit.config import ConditionalParameter, MergeConfiguration
from mergekit.merge_methods.base import ParameterScope, ParameterSpec
from mergekit.options import MergeOptions
from pydantic import ValidationError

from mergekit_safemerge import METHOD_NAME
from mergekit_safemerge.adapters import (
    AdapterSource,
    check_update_shape,
    open_adapter,
    resolve_adapter,
)
from mergekit_safemerge.combine import NEEDS_FACTORS
from mergekit_safemerge.decide import COUNT_MODES
from mergekit_safemerge.errors import SafeMergeError
from mergekit_safemerge.mergekit_method import PARAMETERS
from mergekit_safemerge.roles import ADAPTER_PARAMETERS, ALIGNED, ALL_ROLES, RoleClaim, assign_roles
from mergekit_safemerge.roles import MISSING as NO_ROLE
from mergekit_safemerge.targets import matches_targets, parse_targets

SHARED = {p.name: p for p in PARAMETERS if p.scope == ParameterScope.SHARED}
PER_MODEL = {p.name: p for p in PARAMETERS if p.scope != ParameterScope.SHARED}
WHOLE_MERGE = ("select", "k", "seed", "finetuned_adapter", "safety_adapter")
"""Decided once for the whole merge: a per-tensor filter or a layer gradient makes no sense."""
NO_GRADIENT = ("targets", "combine")
"""Text values: a YAML list is a mergekit layer gradient, never what the user meant."""
MERGE_DTYPES = ("float32", "bfloat16", "float16", "float64")
_FLOAT_SAFETENSORS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_OPTIONAL_TENSORS = ("lm_head.weight",)  # absent when the embeddings are tied


# ---------------------------------------------------------------- the YAML file
def read_config(path: str) -> tuple[MergeConfiguration, str]:
    """``(configuration, YAML text)`` from a file, with one-line errors naming file and key."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fp:
            text = fp.read()
    except (OSError, UnicodeDecodeError) as error:
        raise SafeMergeError(f"config {path}: cannot read it ({error})") from None
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise SafeMergeError(f"config {path}: YAML syntax error{where}: {problem}") from None
    if len(documents) != 1:
        raise SafeMergeError(
            f"config {path}: holds {len(documents)} YAML documents; a merge configuration is "
            "exactly one (for several stages use mergekit-multi)"
        )
    raw = documents[0]
    if not isinstance(raw, dict):
        raise SafeMergeError(f"config {path}: not a YAML mapping of keys (merge_method, models...)")
    return parse_config(raw, where=f"config {path}"), text


def parse_config(raw: dict, *, where: str = "config") -> MergeConfiguration:
    """``MergeConfiguration`` from a mapping; pydantic's errors as one line naming the key."""
    for key in _null_keys(raw):
        raise SafeMergeError(f"{where}: {key} is empty (null); give it a value or remove the key")
    try:
        return MergeConfiguration.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(part) for part in first["loc"] if not _is_type_name(part)) or "top"
        raise SafeMergeError(f"{where}: {key}: {first['msg']}") from None
    except (RuntimeError, ValueError) as error:  # mergekit's own model validators
        raise SafeMergeError(f"{where}: {' '.join(str(error).split())}") from None


def _is_type_name(part: Any) -> bool:
    return isinstance(part, str) and (
        "[" in part or part in ("ConditionalParameter", "bool", "int", "float", "str")
    )


def _null_keys(raw: Any, prefix: str = "") -> Iterator[str]:
    """Keys under any ``parameters`` mapping whose value is null (mergekit rejects them with a
    screenful of pydantic errors)."""
    if isinstance(raw, dict):
        for key, value in raw.items():
            path = f"{prefix}{key}"
            if value is None and (prefix.endswith("parameters.") or prefix == ""):
                yield path
            yield from _null_keys(value, path + ".")
    elif isinstance(raw, list):
        for i, item in enumerate(raw):
            yield from _null_keys(item, f"{prefix.rstrip('.')}[{i}].")


# ---------------------------------------------------------------- what the checks establish
@dataclass(frozen=True)
class ValidatedConfig:
    """The model of each role, the merge settings, the adapters, and what to warn about."""

    models: dict[str, ModelReference]  # the roles given as models (aligned included)
    settings: dict[str, Any]  # shared parameters as configured (or their defaults)
    adapters: dict[str, AdapterSource] = field(default_factory=dict)  # roles given as adapters
    warnings: tuple[str, ...] = ()

    def role_sources(self) -> dict[str, str]:
        """Where each role comes from, for the report: a model, or aligned + adapter."""
        sources = {role: str(model) for role, model in self.models.items()}
        for role, adapter in self.adapters.items():
            sources[role] = f"{self.models[ALIGNED]}+{adapter.spec} (LoRA factors)"
        return {role: sources[role] for role in ALL_ROLES}

    def report_settings(self, options: MergeOptions, dtype: str | None) -> dict[str, Any]:
        settings = dict(self.settings)
        settings["dtype"] = dtype
        settings["random_seed"] = options.random_seed
        return settings

    def input_labels(self) -> dict[str, str]:
        """Every local folder the merge reads (models, their LoRA adapters, adapter roles),
        keyed by a label for messages."""
        folders = {}
        for role, model in self.models.items():
            folders[f"{role} model {model}"] = model.model.path
            if model.lora is not None:
                folders[f"adapter {model.lora.path} ({role})"] = model.lora.path
        for role, adapter in self.adapters.items():
            folders[f"adapter {adapter.spec} ({role})"] = adapter.folder
        return {label: path for label, path in folders.items() if os.path.isdir(path)}


# ---------------------------------------------------------------- parameter values
def _leaf_values(setting: Any) -> Iterator[Any]:
    """Every scalar inside a mergekit parameter setting (filters and gradients included)."""
    if isinstance(setting, ConditionalParameter):
        yield from _leaf_values(setting.value)
    elif isinstance(setting, list):
        for item in setting:
            yield from _leaf_values(item)
    else:
        yield setting


def _is_gradient(setting: Any) -> bool:
    if isinstance(setting, ConditionalParameter):
        return _is_gradient(setting.value)
    if isinstance(setting, list):
        return any(not isinstance(item, ConditionalParameter) for item in setting) or any(
            _is_gradient(item) for item in setting
        )
    return False


def _check_value(spec: ParameterSpec, where: str, setting: Any) -> None:
    if spec.name in NO_GRADIENT and _is_gradient(setting):
        hint = (
            'write one comma-separated string, e.g. targets: "q_proj,v_proj"'
            if spec.name == "targets"
            else "give one value, or per-group values with filter:"
        )
        raise SafeMergeError(
            f"{where}: a YAML list is a mergekit layer gradient (one value per range of "
            f"layers), not a list of values; {hint}"
        )
    for value in _leaf_values(setting):
        if isinstance(value, bool) and spec.name not in ("role",):
            raise SafeMergeError(
                f"{where}: {str(value).lower()} is a YAML boolean; {spec.name} takes "
                f"{_expected(spec)}"
            )
        if isinstance(value, str) and _expects_number(spec):
            raise SafeMergeError(
                f"{where}: {value!r} is a string; write the number without quotes "
                f"({spec.name} takes {_expected(spec)})"
            )
        try:
            spec.validate(value)
        except ValidationError as error:
            message = error.errors()[0]["msg"]
            raise SafeMergeError(f"{where}: {value!r} is not valid ({message})") from None
        if spec.name == "targets":
            parse_targets(value)


_EXPECTED = {
    "threshold": "a number in [0, 1]",
    "safety_weight": "a number in [0, 1]",
    "density": "a number in (0, 1]",
    "k": "a whole number >= 1",
    "seed": "a whole number",
}


def _expects_number(spec: ParameterSpec) -> bool:
    return spec.name in _EXPECTED


def _expected(spec: ParameterSpec) -> str:
    return _EXPECTED.get(spec.name, "a string")


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


def _role_claims(config: MergeConfiguration) -> list[RoleClaim[ModelReference]]:
    """One claim per model entry; per-model keys other than ``role`` are refused here."""
    claims = []
    for where, model, parameters in _sources(config):
        parameters = parameters or {}
        label = f"{where} ({model})"
        for key in parameters:
            if key in SHARED:
                raise SafeMergeError(
                    f"{label}: parameters.{key} is shared by all models; "
                    "set it under the top-level parameters"
                )
            if key not in PER_MODEL:
                raise SafeMergeError(f"{label}: unknown safemerge parameter {key!r} (known: role)")
        role = parameters.get("role", NO_ROLE)
        if isinstance(role, (ConditionalParameter, list)):
            raise SafeMergeError(f"{label}: parameters.role must be one plain value")
        claims.append(RoleClaim(label, model, role))
    return claims


# ---------------------------------------------------------------- models and adapters on disk
@dataclass(frozen=True)
class TensorHeader:
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code: F32, BF16, I64, ...


def read_tensor_headers(model_dir: str, *, label: str) -> dict[str, TensorHeader]:
    """Tensor name -> shape and dtype from a model folder's safetensors headers (no data).

    With a ``model.safetensors.index.json`` every shard it names must exist. Unreadable files
    (truncated, a bad header) are one-line errors naming ``label`` and the file.
    """
    from safetensors import SafetensorError, safe_open

    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as fp:
                weight_map = json.load(fp)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise SafeMergeError(
                f"{label}: model.safetensors.index.json is not a valid index ({error})"
            ) from None
        for shard in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(model_dir, shard)):
                raise SafeMergeError(
                    f"{label}: shard {shard} named in model.safetensors.index.json is missing"
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
    try:
        with open(path, encoding="utf-8") as fp:
            config = json.load(fp)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SafeMergeError(f"{label}: config.json is not valid JSON ({error})") from None
    if not isinstance(config, dict) or not config.get("architectures"):
        raise SafeMergeError(
            f"{label}: config.json has no 'architectures' (which model class this is)"
        )
    return config


def _looks_local(path: str) -> bool:
    """A path the user clearly meant as a folder (Hub ids look like ``org/name``)."""
    return path.startswith(("/", "./", "../", "~")) or path.count("/") != 1


def _check_reachable(model: ModelReference, label: str) -> None:
    """A model that is not a local folder must be a Hub model we can reach (or have cached)."""
    path = model.model.path
    if os.path.isdir(path):
        return
    if _looks_local(path):
        raise SafeMergeError(f"{label}: folder {path} not found")
    import huggingface_hub
    from huggingface_hub import constants

    revision = model.model.revision
    cached = huggingface_hub.try_to_load_from_cache(path, "config.json", revision=revision)
    if isinstance(cached, str):
        return
    if constants.HF_HUB_OFFLINE:
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


def _check_local_models(
    models: dict[str, ModelReference], options: MergeOptions, targets: list[str]
) -> None:
    """Lora cache, reachability, config.json, architectures, and every tensor header."""
    labels = {role: f"model {model} ({role})" for role, model in models.items()}
    for role, model in models.items():
        if model.lora is not None and not options.lora_merge_cache:
            raise SafeMergeError(
                f"{labels[role]} has a LoRA adapter: pass --lora-merge-cache DIR "
                "(and --lora-merge-dtype float32 to keep the update exact)"
            )
        lora = model.lora.path if model.lora is not None else None
        if lora is not None and _looks_local(lora) and not os.path.isdir(lora):
            raise SafeMergeError(f"{labels[role]}: adapter folder {lora} not found")
        _check_reachable(model, labels[role])

    local = {role: m.model.path for role, m in models.items() if os.path.isdir(m.model.path)}
    configs = {role: _read_model_config(path, labels[role]) for role, path in local.items()}
    if ALIGNED in configs:
        reference = configs[ALIGNED]
        for role, config in configs.items():
            for key in ("architectures", "model_type"):
                if config.get(key) != reference.get(key):
                    raise SafeMergeError(
                        f"{labels[role]}: {key} {config.get(key)!r} differs from "
                        f"{reference.get(key)!r} of aligned model {models[ALIGNED]}"
                    )
    headers = {role: read_tensor_headers(path, label=labels[role]) for role, path in local.items()}
    for role, tensors in headers.items():
        for name, header in tensors.items():
            if header.dtype not in _FLOAT_SAFETENSORS and len(header.shape) == 2:
                raise SafeMergeError(
                    f"tensor {name}: dtype {header.dtype} in {labels[role]} is not a "
                    "floating-point weight (quantized or corrupt models cannot be merged)"
                )
    reference = headers.get(ALIGNED)
    if not reference:
        return
    for role, tensors in headers.items():
        if role == ALIGNED or not tensors:
            continue
        for name, header in tensors.items():
            expected = reference.get(name)
            if expected is None:
                continue
            if expected.shape != header.shape:
                raise SafeMergeError(
                    f"tensor {name}: shape {header.shape} in {labels[role]} differs from "
                    f"{expected.shape} in aligned model {models[ALIGNED]}"
                )
            if (header.dtype in _FLOAT_SAFETENSORS) != (expected.dtype in _FLOAT_SAFETENSORS):
                raise SafeMergeError(
                    f"tensor {name}: dtype {header.dtype} in {labels[role]} differs in kind "
                    f"from {expected.dtype} in aligned model {models[ALIGNED]}"
                )
        missing = sorted(set(reference) - set(tensors) - set(_OPTIONAL_TENSORS))
        if missing:
            raise SafeMergeError(
                f"tensor {missing[0]}: missing in {labels[role]} "
                f"({len(missing)} tensors of aligned model {models[ALIGNED]} are missing)"
            )
    matrices = [name for name, header in reference.items() if len(header.shape) == 2]
    for value in targets:
        for target in parse_targets(value):
            if not any(matches_targets(name, (target,)) for name in matrices):
                raise SafeMergeError(
                    f"parameters.targets: {target!r} matches no 2-D weight of aligned model "
                    f"{models[ALIGNED]}"
                )


def _same_base(adapter_base: str, aligned: ModelReference) -> bool:
    """Whether an adapter's ``base_model_name_or_path`` names the aligned model."""
    aligned_path = aligned.model.path
    if os.path.isdir(adapter_base) and os.path.isdir(aligned_path):
        return os.path.realpath(adapter_base) == os.path.realpath(aligned_path)
    tail = adapter_base.rstrip("/").rsplit("/", 1)[-1].lower()
    return tail == aligned_path.rstrip("/").rsplit("/", 1)[-1].lower()


def _check_adapters(
    specs: dict[str, str], aligned: ModelReference
) -> tuple[dict[str, AdapterSource], list[str]]:
    """Each adapter resolves, opens as a plain LoRA and fits the aligned model (headers only)."""
    sources, warnings = {}, []
    aligned_dir = aligned.model.path if os.path.isdir(aligned.model.path) else None
    reference = (
        read_tensor_headers(aligned_dir, label=f"aligned model {aligned}") if aligned_dir else {}
    )
    for role, spec in specs.items():
        where = f"parameters.{ADAPTER_PARAMETERS[role]}"
        source = sources[role] = resolve_adapter(spec, where=where)
        adapter = open_adapter(source.folder)
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


# ---------------------------------------------------------------- the whole configuration
def _check_dtypes(config: MergeConfiguration) -> None:
    for key in ("dtype", "out_dtype"):
        value = getattr(config, key)
        if value is not None and value.removeprefix("torch.") not in MERGE_DTYPES:
            raise SafeMergeError(
                f"{key}: {value!r} is not a dtype mergekit merges in (one of "
                f"{', '.join(MERGE_DTYPES)})"
            )


def _check_device(options: MergeOptions) -> None:
    device = str(options.device or "cpu")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SafeMergeError(
                f"--device {device} (or --cuda): no CUDA device is available here; "
                "run on CPU (the default) or on a machine with a GPU"
            )


def _settings(config: MergeConfiguration) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for name, spec in SHARED.items():
        setting = (config.parameters or {}).get(name)
        if setting is None:
            settings[name] = spec.default
        elif isinstance(setting, (bool, int, float, str)):
            settings[name] = spec.validate(setting)
        else:  # filters and gradients, recorded as written
            settings[name] = _plain(setting)
    return settings


def validate_config(config: MergeConfiguration, options: MergeOptions) -> ValidatedConfig:
    """All checks that need no tensor data; raises :class:`SafeMergeError` at the first fault."""
    if config.merge_method != METHOD_NAME:
        raise SafeMergeError(
            f"merge_method: this is a {config.merge_method!r} configuration, not {METHOD_NAME!r}"
        )
    for where, parameters in _shared_scopes(config):
        _check_shared(parameters, where)
    _check_dtypes(config)
    _check_device(options)
    settings = _settings(config)
    specs = {role: settings[key] for role, key in ADAPTER_PARAMETERS.items() if settings[key]}
    models = assign_roles(config.base_model, _role_claims(config), specs)
    if settings["select"] in COUNT_MODES and settings["k"] < 1:
        raise SafeMergeError(
            f"parameters.k: select {settings['select']} needs k >= 1 (how many matrices to merge)"
        )
    combines = {
        value for _, parameters in _shared_scopes(config)
        for value in _leaf_values((parameters or {}).get("combine", []))
    }  # fmt: skip
    for rule in sorted(combines & NEEDS_FACTORS):
        if len(specs) != 2:
            raise SafeMergeError(
                f"parameters.combine: {rule} combines LoRA factors; give both LoRA roles as "
                "parameters.finetuned_adapter and parameters.safety_adapter"
            )
    targets = [
        value
        for _, parameters in _shared_scopes(config)
        for value in _leaf_values((parameters or {}).get("targets", []))
    ]
    _check_local_models(models, options, targets)
    adapters, warnings = _check_adapters(specs, models[ALIGNED])
    return ValidatedConfig(
        models=models, settings=settings, adapters=adapters, warnings=tuple(warnings)
    )
