"""A ``safemerge`` configuration read and its values checked, before anything is loaded.

mergekit validates parameters per tensor during planning, after every model (and every LoRA
merge) has been loaded, silently ignores unknown keys, and reports pydantic errors over many
lines. Here each mistake in the YAML or in a value is one
:class:`~mergekit_safemerge.errors.SafeMergeError` line that names the key, with the words of
the parameter table (:mod:`mergekit_safemerge.core.settings`). What is on disk (models,
adapters) is checked by :mod:`.inputs`.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Iterator
from typing import Any

import yaml
from mergekit.common import ModelReference
from mergekit.config import ConditionalParameter, MergeConfiguration
from pydantic import BaseModel, ValidationError

from mergekit_safemerge import METHOD_NAME
from mergekit_safemerge.binding.method import PARAMETER_SPECS
from mergekit_safemerge.core.combine import FACTOR_RULES, NEEDS_FACTORS
from mergekit_safemerge.core.decide import COUNT_MODES
from mergekit_safemerge.core.roles import ADAPTER_PARAMETERS, RoleClaim
from mergekit_safemerge.core.roles import MISSING as NO_ROLE
from mergekit_safemerge.core.settings import (
    BY_NAME,
    COMBINE_NAMES,
    SHARED,
    Parameter,
    Settings,
    without_effect,
)
from mergekit_safemerge.core.targets import parse_targets
from mergekit_safemerge.errors import SafeMergeError

SHARED_NAMES = tuple(p.name for p in SHARED)
PER_MODEL_NAMES = tuple(p.name for p in BY_NAME.values() if p.per_model)
_SPECS = {spec.name: spec for spec in PARAMETER_SPECS}
MERGE_DTYPES = ("float32", "bfloat16", "float16", "float64")


# ---------------------------------------------------------------- the YAML file
def read_config(path: str) -> tuple[MergeConfiguration, str]:
    """``(configuration, YAML text)`` from a file, with one-line errors naming file and key."""
    try:
        with open(path, encoding="utf-8") as fp:
            text = fp.read()
    except (OSError, UnicodeDecodeError) as error:
        raise SafeMergeError(f"config {path}: cannot read it ({error})") from None
    where = f"config {path}"
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise SafeMergeError(f"{where}: YAML syntax error{at}: {problem}") from None
    if len(documents) != 1:
        raise SafeMergeError(
            f"{where}: holds {len(documents)} YAML documents; a merge configuration is "
            "exactly one (for several stages use mergekit-multi)"
        )
    raw = documents[0]
    if not isinstance(raw, dict):
        raise SafeMergeError(f"{where}: not a YAML mapping of keys (merge_method, models...)")
    _check_nodes(nodes[0], where)
    check_method_name(raw.get("merge_method"), where)
    for key_path, key, known in unknown_keys(raw, MergeConfiguration):
        near = difflib.get_close_matches(key, known, n=1)
        hint = f"did you mean {near[0]!r}?" if near else f"known: {', '.join(known)}"
        raise SafeMergeError(
            f"{where}: {key_path}{key} is not a key mergekit or SafeMERGE reads ({hint})"
        )
    return parse_config(raw, where=where), text


# YAML 1.1 (PyYAML, mergekit) reads 5e-2 as text: an exponent needs a decimal point (5.0e-2)
_TEXT_NUMBER = re.compile(r"^[-+]?(\d+|\d*\.\d+|\d+\.\d*)[eE][-+]?\d+$")


def _check_nodes(node: yaml.Node, where: str, inside_parameters: bool = False) -> None:
    """Rules PyYAML does not enforce: no key twice in one mapping (the last would silently win),
    and no number that YAML 1.1 reads as text, under any ``parameters``."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else str(key.value)
            line = key.start_mark.line + 1
            if name in seen:
                raise SafeMergeError(
                    f"{where}: key {name!r} is given twice (lines {seen[name]} and {line}); "
                    "YAML would keep only the last, keep one"
                )
            seen[name] = line
            _check_nodes(value, where, inside_parameters or name == "parameters")
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_nodes(item, where, inside_parameters)
    elif (
        inside_parameters
        and isinstance(node, yaml.ScalarNode)
        and node.style is None
        and node.tag == "tag:yaml.org,2002:str"
        and _TEXT_NUMBER.match(node.value)
    ):
        mantissa, _, exponent = node.value.lower().partition("e")
        fixed = f"{mantissa if '.' in mantissa else mantissa + '.0'}e{exponent}"
        raise SafeMergeError(
            f"{where}: line {node.start_mark.line + 1}: {node.value} is text to YAML 1.1, not a "
            f"number (an exponent needs a decimal point); write {fixed} or "
            f"{float(node.value):g}"
        )


def check_method_name(name: Any, where: str) -> None:
    """``SafeMERGE`` (as the paper writes it) is refused with the name mergekit knows."""
    if isinstance(name, str) and name != METHOD_NAME and name.lower() == METHOD_NAME:
        raise SafeMergeError(
            f"{where}: merge_method {name!r} is not a name mergekit knows; method names are lower "
            f"case: write merge_method: {METHOD_NAME}"
        )


def _models_in(annotation: Any) -> list[Any]:
    """The types inside ``Optional``/``Union``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [t for arg in typing.get_args(annotation) for t in _models_in(arg)]
    return [annotation]


def unknown_keys(raw: Any, annotation: Any, path: str = "") -> Iterator[tuple[str, str, list[str]]]:
    """``(where, key, known keys)`` for every key of ``raw`` that the pydantic models of
    mergekit's configuration do not read (mergekit ignores them silently). Parameter names under
    ``parameters`` are checked by the parameter table instead."""
    candidates = _models_in(annotation)
    if isinstance(raw, dict):
        model = next(
            (t for t in candidates if isinstance(t, type) and issubclass(t, BaseModel)), None
        )
        if model is not None:
            fields = model.model_fields
            known = [f.alias or name for name, f in fields.items()]
            for key, value in raw.items():
                name = next((n for n, f in fields.items() if (f.alias or n) == key), None)
                if name is None:
                    yield path, key, known
                    continue
                yield from unknown_keys(value, fields[name].annotation, f"{path}{key}.")
            return
        for t in candidates:
            if typing.get_origin(t) is dict:
                value_type = typing.get_args(t)[1]
                for key, value in raw.items():
                    yield from unknown_keys(value, value_type, f"{path}{key}.")
                return
    elif isinstance(raw, list):
        for t in candidates:
            if typing.get_origin(t) is list:
                (item_type,) = typing.get_args(t)
                for i, item in enumerate(raw):
                    yield from unknown_keys(item, item_type, f"{path.rstrip('.')}[{i}].")
                return


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


# ---------------------------------------------------------------- where values are written
def model_entries(config: MergeConfiguration) -> Iterator[tuple[str, ModelReference, dict | None]]:
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


def shared_scopes(config: MergeConfiguration) -> Iterator[tuple[str, dict | None]]:
    """(where, parameters) for every mapping of shared parameters (top level, slices, modules)."""
    yield "parameters", config.parameters
    for i, out_slice in enumerate(config.slices or []):
        yield f"slices[{i}].parameters", out_slice.parameters
    for name, module in (config.modules or {}).items():
        yield f"modules.{name}.parameters", module.parameters
        for i, out_slice in enumerate(module.slices or []):
            yield f"modules.{name}.slices[{i}].parameters", out_slice.parameters


def leaf_values(setting: Any) -> Iterator[Any]:
    """Every scalar inside a parameter setting (``filter:`` values and gradients included),
    parsed (``ConditionalParameter``) or as JSON (``{"filter": ..., "value": ...}``)."""
    if isinstance(setting, ConditionalParameter):
        yield from leaf_values(setting.value)
    elif isinstance(setting, dict) and "value" in setting:
        yield from leaf_values(setting["value"])
    elif isinstance(setting, list):
        for item in setting:
            yield from leaf_values(item)
    else:
        yield setting


def configured_values(config: MergeConfiguration, name: str) -> list[Any]:
    """Every value written for shared parameter ``name``, at any level, in any filter."""
    return [
        value
        for _, parameters in shared_scopes(config)
        for value in leaf_values((parameters or {}).get(name, []))
    ]


def configured_filters(config: MergeConfiguration) -> list[tuple[str, str]]:
    """``(where, filter)`` for every ``filter:`` written for a shared parameter."""

    def filters(setting: Any) -> Iterator[str]:
        if isinstance(setting, ConditionalParameter):
            if setting.filter not in (None, "*"):
                yield setting.filter
            yield from filters(setting.value)
        elif isinstance(setting, list):
            for item in setting:
                yield from filters(item)

    return [
        (f"{where}.{name}", text)
        for where, parameters in shared_scopes(config)
        for name, setting in (parameters or {}).items()
        for text in filters(setting)
    ]


# ---------------------------------------------------------------- parameter values
def _is_gradient(setting: Any) -> bool:
    if isinstance(setting, ConditionalParameter):
        return _is_gradient(setting.value)
    if isinstance(setting, list):
        return any(not isinstance(item, ConditionalParameter) for item in setting) or any(
            _is_gradient(item) for item in setting
        )
    return False


def check_value(parameter: Parameter, where: str, setting: Any) -> None:
    """One setting of ``parameter`` as written (plain, filters or gradient), or one line."""
    if not parameter.gradient and _is_gradient(setting):
        hint = (
            f"write {parameter.expects}"
            if parameter.name == "targets"
            else "give one value, or per-group values with filter:"
        )
        raise SafeMergeError(
            f"{where}: a YAML list is a mergekit layer gradient (one value per range of "
            f"layers), not a list of values; {hint}"
        )
    for value in leaf_values(setting):
        if isinstance(value, bool) and not parameter.per_model:
            raise SafeMergeError(
                f"{where}: {str(value).lower()} is a YAML boolean; {parameter.name} takes "
                f"{parameter.expects}"
            )
        if isinstance(value, str) and parameter.numeric:
            raise SafeMergeError(
                f"{where}: {value!r} is a string; write the number without quotes "
                f"({parameter.name} takes {parameter.expects})"
            )
        try:
            _SPECS[parameter.name].validate(value)  # mergekit's own reading of the table's type
        except ValidationError as error:
            message = error.errors()[0]["msg"]
            raise SafeMergeError(
                f"{where}: {value!r} is not valid ({message}); {parameter.name} takes "
                f"{parameter.expects}"
            ) from None
        if parameter.name == "targets":
            parse_targets(value)


def _check_shared(parameters: dict[str, Any] | None, where: str) -> None:
    for key, setting in (parameters or {}).items():
        parameter = BY_NAME.get(key)
        if parameter is not None and parameter.per_model:
            raise SafeMergeError(
                f"{where}.{key}: {key!r} is a per-model parameter; set it under each model"
            )
        if parameter is None:
            raise SafeMergeError(
                f"{where}.{key}: unknown safemerge parameter (known: {', '.join(SHARED_NAMES)})"
            )
        if parameter.whole_merge and (
            where != "parameters" or not isinstance(setting, (bool, int, float, str))
        ):
            raise SafeMergeError(
                f"{where}.{key}: {key} applies to the whole merge; give one plain value under "
                "the top-level parameters"
            )
        check_value(parameter, f"{where}.{key}", setting)


def role_claims(config: MergeConfiguration) -> list[RoleClaim[ModelReference]]:
    """One claim per model entry; per-model keys other than ``role`` are refused here."""
    claims = []
    for where, model, parameters in model_entries(config):
        parameters = parameters or {}
        label = f"{where} ({model})"
        for key in parameters:
            if key in SHARED_NAMES:
                raise SafeMergeError(
                    f"{label}: parameters.{key} is shared by all models; "
                    "set it under the top-level parameters"
                )
            if key not in PER_MODEL_NAMES:
                raise SafeMergeError(
                    f"{label}: unknown safemerge parameter {key!r} "
                    f"(known: {', '.join(PER_MODEL_NAMES)})"
                )
        role = parameters.get("role", NO_ROLE)
        if isinstance(role, (ConditionalParameter, list)):
            raise SafeMergeError(f"{label}: parameters.role must be one plain value")
        claims.append(RoleClaim(label, model, role))
    return claims


def _check_dtypes(config: MergeConfiguration) -> None:
    for key in ("dtype", "out_dtype"):
        value = getattr(config, key)
        if value is not None and value.removeprefix("torch.") not in MERGE_DTYPES:
            raise SafeMergeError(
                f"{key}: {value!r} is not a dtype mergekit merges in (one of "
                f"{', '.join(MERGE_DTYPES)})"
            )


def _as_written(setting: Any) -> Any:
    if isinstance(setting, ConditionalParameter):
        return setting.model_dump(exclude_none=True)
    if isinstance(setting, list):
        return [_as_written(item) for item in setting]
    return setting


def settings_of(config: MergeConfiguration, *, random_seed: int | None = None) -> Settings:
    """The run's :class:`Settings`: each top-level value (filters and gradients as written),
    or the table's default."""
    values: dict[str, Any] = {}
    for name in SHARED_NAMES:
        setting = (config.parameters or {}).get(name)
        if setting is not None:
            values[name] = _as_written(setting)
    return Settings(**values, dtype=config.dtype, random_seed=random_seed)


def check_values(config: MergeConfiguration) -> tuple[Settings, list[str]]:
    """Every key and value of the configuration that needs nothing from disk; returns the
    settings and a warning for each written parameter that has no effect."""
    if config.merge_method != METHOD_NAME:
        raise SafeMergeError(
            f"merge_method: this is a {config.merge_method!r} configuration, not {METHOD_NAME!r}"
        )
    for where, parameters in shared_scopes(config):
        _check_shared(parameters, where)
    _check_dtypes(config)
    settings = settings_of(config)
    if settings.select in COUNT_MODES and settings.k < 1:
        raise SafeMergeError(
            f"parameters.k: select {settings.select} needs k >= 1 (how many matrices to merge)"
        )
    adapters = [key for key in ADAPTER_PARAMETERS.values() if getattr(settings, key)]
    for rule in sorted(set(configured_values(config, "combine")) & NEEDS_FACTORS):
        if len(adapters) != 2:
            raise SafeMergeError(
                f"parameters.combine: {rule} combines LoRA factors; give both LoRA roles as "
                "parameters.finetuned_adapter and parameters.safety_adapter"
            )
    written = {name for _, parameters in shared_scopes(config) for name in (parameters or {})}
    values = {
        p.name: frozenset(
            v for v in configured_values(config, p.name) if isinstance(v, (str, int, float))
        )
        or frozenset([p.default])
        for p in SHARED
    }
    return settings, without_effect(values, written)


# ---------------------------------------------------------------- the adapter output's recipe
def factor_recipe(config: MergeConfiguration) -> MergeConfiguration:
    """The configuration with ``aligned+adapter`` role models turned into adapter parameters,
    for ``safemerge adapter``.

    Refuses a LoRA role given as a full model, an adapter on another model than the aligned
    one, and a ``combine`` rule without an exact low-rank form, each in one line.
    """
    data = config.model_dump(mode="json", exclude_none=True)
    base_model = config.base_model
    parameters = dict(data.get("parameters") or {})
    kept = []
    for i, entry in enumerate(config.models or []):
        role = (entry.parameters or {}).get("role")
        if role not in ADAPTER_PARAMETERS:
            kept.append(data["models"][i])
            continue
        where = f"models[{i}] ({entry.model})"
        if entry.model.lora is None:
            raise SafeMergeError(
                f"{where}: safemerge adapter writes a LoRA adapter, so the {role} role must be a "
                f"LoRA on the aligned model (aligned+adapter or parameters."
                f"{ADAPTER_PARAMETERS[role]}); for a full fine-tune use mergekit-yaml"
            )
        if (
            base_model is None
            or entry.model.model != base_model.model
            or base_model.lora is not None
        ):
            raise SafeMergeError(
                f"{where}: the {role} adapter must sit on the aligned model {base_model}; an "
                f"adapter on {entry.model.model} is a different update"
            )
        parameters[ADAPTER_PARAMETERS[role]] = entry.model.lora.path
    for role, key in ADAPTER_PARAMETERS.items():
        if not parameters.get(key):
            raise SafeMergeError(
                f"parameters.{key}: safemerge adapter needs the {role} role as a LoRA adapter "
                f"(parameters.{key}, or a model written aligned+adapter)"
            )
    for value in leaf_values(parameters.get("combine", Settings.combine)):
        if value in COMBINE_NAMES and value not in FACTOR_RULES:
            raise SafeMergeError(
                f"parameters.combine: {value} has no exact low-rank form (a random or sign mask "
                "of B A is not a product of smaller factors), so it cannot be written as an "
                "adapter; use combine: linear or authors_linear here, or mergekit-yaml for a "
                "full model"
            )
    if config.models is not None:
        data["models"] = kept
    data["parameters"] = parameters
    return MergeConfiguration.model_validate(data)
