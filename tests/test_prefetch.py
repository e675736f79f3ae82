"""The read-ahead of ``safemerge adapter``'s tensors: the right bytes, within its budget, a hint
that never fails a command."""

from __future__ import annotations

import os

import pytest
import yaml
from helpers import write_config
from safetensors import safe_open

from mergekit_safemerge import prefetch


def _adapter_recipe(tmp_path, paths: dict[str, str], adapters: dict[str, str]) -> str:
    """The recipe with both LoRA roles as adapter parameters."""
    roles = {"aligned": paths["aligned"], "unaligned": paths["unaligned"]}
    return write_config(
        tmp_path / "recipe.yml",
        roles,
        finetuned_adapter=adapters["finetuned"],
        safety_adapter=adapters["safety"],
    )


def _tensor_bytes(model_dir: str, name: str) -> bytes:
    for file in sorted(os.listdir(model_dir)):
        if file.endswith(".safetensors"):
            with safe_open(os.path.join(model_dir, file), "pt") as fp:
                if name in fp.keys():  # noqa: SIM118
                    return fp.get_tensor(name).contiguous().numpy().tobytes()
    raise KeyError(name)


def test_ranges_are_exactly_the_adapted_weights_of_both_models(tiny_roles, lora_adapters, tmp_path):
    roles = tiny_roles("llama")
    config = _adapter_recipe(tmp_path, roles.paths, lora_adapters)
    ranges = prefetch.adapter_input_ranges(config)
    names = [f"model.layers.{i}.self_attn.{m}.weight" for i in (0, 1) for m in ("q_proj", "v_proj")]
    assert len(ranges) == 2 * len(names)
    found = {}
    for path, offset, length in ranges:
        with open(path, "rb") as fp:
            fp.seek(offset)
            found.setdefault(os.path.dirname(path), []).append(fp.read(length))
    for role in ("aligned", "unaligned"):
        folder = os.path.realpath(roles.paths[role])
        assert sorted(found[folder]) == sorted(_tensor_bytes(folder, n) for n in names)


def test_the_plus_form_names_the_adapter_too(tiny_roles, lora_adapters, tmp_path):
    roles = tiny_roles("llama")
    recipe = {
        "merge_method": "safemerge",
        "base_model": roles.paths["aligned"],
        "models": [
            {"model": roles.paths["unaligned"], "parameters": {"role": "unaligned"}},
            {
                "model": f"{roles.paths['aligned']}+{lora_adapters['finetuned']}",
                "parameters": {"role": "finetuned"},
            },
        ],
    }
    path = tmp_path / "plus.yml"
    path.write_text(yaml.safe_dump(recipe))
    assert len(prefetch.adapter_input_ranges(str(path))) == 8  # 4 matrices x 2 models


def test_budget_stops_before_the_range_that_does_not_fit():
    ranges = [("a", 0, 10), ("a", 10, 10), ("b", 0, 5)]
    assert list(prefetch._within_budget(ranges, 24)) == ranges[:2]
    assert list(prefetch._within_budget(ranges, 25)) == ranges
    assert list(prefetch._within_budget(ranges, 9)) == []


@pytest.mark.parametrize(
    "text",
    ["merge_method: [unclosed", "- a list", "base_model: org/hub-model\n", "models: 3\n", ""],
)
def test_anything_it_cannot_read_is_no_read_ahead_and_no_error(tmp_path, text):
    path = tmp_path / "bad.yml"
    path.write_text(text)
    assert prefetch.read_ahead_adapter_inputs(str(path)) is None
    assert prefetch.read_ahead_adapter_inputs(str(tmp_path / "missing.yml")) is None


def test_it_starts_a_daemon_thread_and_can_be_turned_off(
    tiny_roles, lora_adapters, tmp_path, monkeypatch
):
    roles = tiny_roles("llama")
    config = _adapter_recipe(tmp_path, roles.paths, lora_adapters)
    thread = prefetch.read_ahead_adapter_inputs(config)
    assert thread is not None and thread.daemon
    thread.join(timeout=30)
    monkeypatch.setenv(prefetch.READ_AHEAD_ENV, "0")
    assert prefetch.read_ahead_adapter_inputs(config) is None


def test_it_imports_no_torch_and_no_mergekit():
    """It runs before the command imports mergekit, so it must not import it (or torch) itself."""
    import subprocess
    import sys

    code = (
        "import sys, mergekit_safemerge.prefetch\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'mergekit', 'peft'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
