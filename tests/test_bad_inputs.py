"""Every bad input: one ``Error: safemerge: ...`` line from stock mergekit-yaml, no model."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import yaml
from helpers import run_mergekit, run_mergekit_in_process, write_config
from safetensors.torch import load_file, save_file


def _roles(tiny):
    return dict(tiny.paths)


def _config_with(tmp_path, roles, mutate=None, **parameters):
    path = write_config(tmp_path / "bad.yml", roles, **parameters)
    if mutate is not None:
        with open(path) as fp:
            config = yaml.safe_load(fp)
        mutate(config)
        with open(path, "w") as fp:
            fp.write(yaml.safe_dump(config, sort_keys=False))
    return path


CASES = {
    "missing role": (
        lambda c: c["models"][0].pop("parameters"),
        {},
        r"models\[0\] \(.*unaligned\): parameters.role is missing",
    ),
    "unknown role": (
        lambda c: c["models"][0]["parameters"].update(role="base"),
        {},
        r"models\[0\] \(.*unaligned\): parameters.role 'base' is not one of",
    ),
    "duplicate role": (
        lambda c: c["models"][2]["parameters"].update(role="finetuned"),
        {},
        r"models\[2\] \(.*safety\): role 'finetuned' is already given to model",
    ),
    "too few models": (
        lambda c: c["models"].pop(),
        {},
        r"exactly 3 models besides base_model.*got 2",
    ),
    "too many models": (
        lambda c: c["models"].append(
            {"model": c["base_model"] + "/../unaligned2", "parameters": {"role": "safety"}}
        ),
        {},
        r"exactly 3 models besides base_model.*got 4",
    ),
    "threshold above 1": (
        None,
        {"threshold": 1.5},
        r"parameters.threshold: 1.5 is not valid \(Input should be less than or equal to 1\)",
    ),
    "threshold below 0": (None, {"threshold": -0.1}, r"parameters.threshold: -0.1 is not valid"),
    "safety_weight above 1": (
        None,
        {"safety_weight": 2},
        r"parameters.safety_weight: 2 is not valid",
    ),
    "safety_weight in a filter": (
        None,
        {"safety_weight": [{"filter": "mlp", "value": -1}, {"value": 0.2}]},
        r"parameters.safety_weight: -1 is not valid",
    ),
    "unknown combine": (None, {"combine": "slerp"}, r"parameters.combine: 'slerp' is not valid"),
    "density zero": (
        None,
        {"combine": "ties", "density": 0},
        r"parameters.density: 0 is not valid",
    ),
    "unknown key": (None, {"treshold": 0.5}, r"parameters.treshold: unknown safemerge parameter"),
    "role at top level": (
        None,
        {"role": "safety"},
        r"parameters.role: 'role' is a per-model parameter",
    ),
    "shared key on a model": (
        lambda c: c["models"][1]["parameters"].update(threshold=0.5),
        {},
        r"models\[1\] \(.*finetuned\): parameters.threshold is shared by all models",
    ),
    "no base model": (
        lambda c: c.pop("base_model"),
        {},
        r"base_model: safemerge needs the aligned model",
    ),
    "bad targets": (
        None,
        {"targets": "q_proj;v_proj"},
        r"parameters.targets: 'q_proj;v_proj' is not a module name",
    ),
    "targets match nothing": (
        None,
        {"targets": "q_prj"},
        r"parameters.targets: 'q_prj' matches no 2-D weight of aligned model",
    ),
    "lora without cache": (
        lambda c: c["models"][1].update(model=c["base_model"] + "+" + c["base_model"]),
        {},
        r"has a LoRA adapter: pass --lora-merge-cache DIR",
    ),
    "missing folder": (
        lambda c: c["models"][2].update(model="/nonexistent/dir/safety"),
        {},
        r"folder /nonexistent/dir/safety not found",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_one_line_error_and_no_output(case, tiny_roles, tmp_path):
    mutate, parameters, message = CASES[case]
    config = _config_with(tmp_path, _roles(tiny_roles("llama")), mutate, **parameters)
    out = tmp_path / "out"
    result = run_mergekit_in_process(config, out)
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: safemerge: "), result.output
    assert "Traceback" not in result.output
    import re

    assert re.search(message, last), last
    assert not out.exists()


def _copy_models(tiny, tmp_path):
    roles = {}
    for role, path in tiny.paths.items():
        roles[role] = shutil.copytree(path, tmp_path / role)
    return {k: str(v) for k, v in roles.items()}


def test_shape_mismatch_is_caught_before_loading(tiny_roles, tmp_path):
    roles = _copy_models(tiny_roles("llama"), tmp_path)
    file = os.path.join(roles["safety"], "model.safetensors")
    state = load_file(file)
    state["model.layers.1.self_attn.v_proj.weight"] = torch.zeros(8, 64)
    save_file(state, file, metadata={"format": "pt"})
    config = write_config(tmp_path / "c.yml", roles)
    result = run_mergekit_in_process(config, tmp_path / "out")
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert "tensor model.layers.1.self_attn.v_proj.weight: shape (8, 64) in model" in last
    assert "(safety) differs from (32, 64) in aligned model" in last
    assert not (tmp_path / "out").exists()


def test_nan_found_during_merge_leaves_no_output(tiny_roles, tmp_path):
    """A NaN is only visible once the tensor is read: the real CLI fails cleanly, no model left."""
    roles = _copy_models(tiny_roles("llama"), tmp_path)
    file = os.path.join(roles["finetuned"], "model.safetensors")
    state = load_file(file)
    state["model.layers.1.self_attn.q_proj.weight"][3, 3] = float("nan")
    save_file(state, file, metadata={"format": "pt"})
    config = write_config(tmp_path / "c.yml", roles, targets="q_proj,v_proj")
    out = tmp_path / "out"
    result = run_mergekit(config, out)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "Error: safemerge: tensor model.layers.1.self_attn.q_proj.weight of model"
    )
    assert "(finetuned) contains NaN or Inf" in last
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_failed_run_into_existing_folder_removes_only_its_own_files(tiny_roles, tmp_path):
    roles = _copy_models(tiny_roles("llama"), tmp_path)
    file = os.path.join(roles["safety"], "model.safetensors")
    state = load_file(file)
    state["model.layers.0.self_attn.v_proj.weight"][0, 0] = float("inf")
    save_file(state, file, metadata={"format": "pt"})
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = run_mergekit_in_process(write_config(tmp_path / "c.yml", roles), out)
    assert result.exit_code == 1
    assert "contains NaN or Inf" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
