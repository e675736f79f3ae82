"""Every bad input a user can cause, through the real commands.

Each case asserts the exit status, one ``Error: ...`` line naming the key, model, tensor or file
at fault (no traceback), and that nothing on disk changed: the output folder and everything
next to it is exactly as before.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import (
    BIN,
    error_line,
    load_state,
    run_mergekit_in_process,
    tree_snapshot,
    write_config,
)
from safetensors.torch import load_file, save_file

from mergekit_safemerge.cli import main as safemerge_main

TARGETS = "q_proj,v_proj"


def _merge_fails(tmp_path, config, pattern, *flags, out=None):
    """Run mergekit-yaml in process; it must fail with one line and leave tmp_path untouched."""
    out = out or tmp_path / "out"
    before = tree_snapshot(tmp_path)
    result = run_mergekit_in_process(str(config), out, *flags)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    line = error_line(result.output)
    assert line.startswith("Error: safemerge: "), line
    assert re.search(pattern, line), line
    assert tree_snapshot(tmp_path) == before
    return line


def _config(tmp_path, roles, mutate=None, **parameters):
    path = write_config(tmp_path / "bad.yml", roles, **parameters)
    if mutate is not None:
        config = yaml.safe_load(open(path))  # noqa: SIM115
        mutate(config)
        (tmp_path / "bad.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# ---------------------------------------------------------------- the configuration
CONFIG_CASES = {
    "missing role": (
        lambda c: c["models"][0].pop("parameters"), {},
        r"models\[0\] \(.*unaligned\): parameters.role is missing",
    ),
    "unknown role": (
        lambda c: c["models"][0]["parameters"].update(role="base"), {},
        r"models\[0\] \(.*unaligned\): parameters.role 'base' is not one of",
    ),
    "duplicate role": (
        lambda c: c["models"][2]["parameters"].update(role="finetuned"), {},
        r"models\[2\] \(.*safety\): role 'finetuned' is already given to model",
    ),
    "too few models": (
        lambda c: c["models"].pop(), {}, r"exactly 3 models besides base_model.*got 2",
    ),
    "too many models": (
        lambda c: c["models"].append(
            {"model": c["base_model"] + "/../unaligned2", "parameters": {"role": "safety"}}
        ),
        {}, r"exactly 3 models besides base_model.*got 4",
    ),
    "threshold above 1": (
        None, {"threshold": 1.5},
        r"parameters.threshold: 1.5 is not valid \(Input should be less than or equal to 1\)",
    ),
    "threshold below 0": (None, {"threshold": -0.1}, r"parameters.threshold: -0.1 is not valid"),
    "threshold true": (
        None, {"threshold": True},
        r"parameters.threshold: true is a YAML boolean; threshold takes a number in \[0, 1\]",
    ),
    "threshold null": (
        lambda c: c["parameters"].update(threshold=None), {"threshold": 0.3},
        r"config .*bad.yml: parameters.threshold is empty \(null\)",
    ),
    "threshold string": (
        None, {"threshold": "0.5"},
        r"parameters.threshold: '0.5' is a string; write the number without quotes",
    ),
    "safety_weight yes": (
        None, {"safety_weight": True}, r"parameters.safety_weight: true is a YAML boolean",
    ),
    "k true": (
        None, {"select": "lowest_k", "k": True}, r"parameters.k: true is a YAML boolean",
    ),
    "k float": (None, {"select": "lowest_k", "k": 2.0}, r"parameters.k: 2.0 is not valid"),
    "safety_weight above 1": (
        None, {"safety_weight": 2}, r"parameters.safety_weight: 2 is not valid",
    ),
    "safety_weight in a filter": (
        None, {"safety_weight": [{"filter": "mlp", "value": -1}, {"value": 0.2}]},
        r"parameters.safety_weight: -1 is not valid",
    ),
    "unknown combine": (None, {"combine": "slerp"}, r"parameters.combine: 'slerp' is not valid"),
    "authors_linear without adapters": (
        None, {"combine": "authors_linear"},
        r"parameters.combine: authors_linear combines LoRA factors; give both LoRA roles",
    ),
    "density zero": (
        None, {"combine": "ties", "density": 0}, r"parameters.density: 0 is not valid",
    ),
    "unknown key": (None, {"treshold": 0.5}, r"parameters.treshold: unknown safemerge parameter"),
    "role at top level": (
        None, {"role": "safety"}, r"parameters.role: 'role' is a per-model parameter",
    ),
    "shared key on a model": (
        lambda c: c["models"][1]["parameters"].update(threshold=0.5), {},
        r"models\[1\] \(.*finetuned\): parameters.threshold is shared by all models",
    ),
    "no base model": (
        lambda c: c.pop("base_model"), {}, r"base_model: safemerge needs the aligned model",
    ),
    "bad targets": (
        None, {"targets": "q_proj;v_proj"},
        r"parameters.targets: 'q_proj;v_proj' is not a module name",
    ),
    "targets as a YAML list": (
        None, {"targets": ["q_proj", "v_proj"]},
        r"parameters.targets: a YAML list is a mergekit layer gradient .* "
        r'targets: "q_proj,v_proj"',
    ),
    "targets match nothing": (
        None, {"targets": "q_prj"},
        r"parameters.targets: 'q_prj' matches no 2-D weight of aligned model",
    ),
    "unknown dtype": (
        lambda c: c.update(dtype="float17"), {},
        r"dtype: 'float17' is not a dtype mergekit merges in",
    ),
    "lora without cache": (
        lambda c: c["models"][1].update(model=c["base_model"] + "+" + c["base_model"]), {},
        r"has a LoRA adapter: pass --lora-merge-cache DIR",
    ),
    "missing folder": (
        lambda c: c["models"][2].update(model="/nonexistent/dir/safety"), {},
        r"model /nonexistent/dir/safety \(safety\): folder /nonexistent/dir/safety not found",
    ),
    "hub-like path that does not exist": (
        lambda c: c["models"][0].update(model="models/unaligned-typo"), {},
        r"model models/unaligned-typo \(unaligned\): no folder models/unaligned-typo, and not "
        r"reachable as a Hub model",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_configuration(case, roles, tmp_path):
    mutate, parameters, pattern = CONFIG_CASES[case]
    config = _config(tmp_path, roles, mutate, **{"targets": TARGETS, **parameters})
    _merge_fails(tmp_path, config, pattern)


def test_a_layer_gradient_on_threshold_still_works(roles, tmp_path):
    config = write_config(tmp_path / "c.yml", roles, targets=TARGETS, threshold=[0.0, 1.0])
    result = run_mergekit_in_process(config, tmp_path / "out")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "safemerge_report.json").read_text())
    assert report["settings"]["threshold"] == [0.0, 1.0]
    assert {m["threshold"] for m in report["matrices"]} == {0.0, 1.0}  # per block, recorded


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("merge_method: safemerge\nmodels: [\n", r"YAML syntax error at line 3, column 1"),
        ("merge_method: safemerge\n---\nmerge_method: safemerge\n", r"holds 2 YAML documents"),
        ("merge_method: safemerge\nbase_model: [1, 2\n", r"YAML syntax error"),
    ],
)
def test_unreadable_yaml(text, pattern, tmp_path):
    config = tmp_path / "bad.yml"
    config.write_text(text)
    _merge_fails(tmp_path, config, pattern)


# ---------------------------------------------------------------- the models on disk
def _edit_state(folder, edit, file="model.safetensors"):
    path = os.path.join(folder, file)
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def _set(name, value, index=(0,)):
    def edit(state):
        state[name].view(-1)[index[0]] = value

    return edit


def _as_int32(name):
    def edit(state):
        state[name] = (state[name] * 1000).to(torch.int32)

    return edit


def _write_bytes(offset, data):
    def corrupt(folder):
        path = os.path.join(folder, "model.safetensors")
        raw = bytearray(open(path, "rb").read())  # noqa: SIM115
        raw[offset : offset + len(data)] = data
        open(path, "wb").write(raw)  # noqa: SIM115

    return corrupt


def _edit_config(edit):
    def corrupt(folder):
        path = os.path.join(folder, "config.json")
        config = json.load(open(path))  # noqa: SIM115
        edit(config)
        json.dump(config, open(path, "w"))  # noqa: SIM115

    return corrupt


def _other_architecture(tiny_roles):
    import shutil

    def corrupt(folder):
        shutil.rmtree(folder)
        shutil.copytree(tiny_roles("qwen2").paths["safety"], folder)

    return corrupt


def _write_text(file, text):
    def corrupt(folder):
        with open(os.path.join(folder, file), "w") as fp:
            fp.write(text)

    return corrupt


def _empty(folder):
    for entry in os.scandir(folder):
        os.remove(entry.path)


def _truncate(folder, size=1000, file="model.safetensors"):
    os.truncate(os.path.join(folder, file), size)


def _state(edit):
    return lambda folder: _edit_state(folder, edit)


Q = "model.layers.1.self_attn.q_proj.weight"
UP = "model.layers.0.mlp.up_proj.weight"
NAN, INF = float("nan"), float("inf")
MODEL_CASES = {
    "empty folder": ("safety", _empty, r"model .*safety \(safety\): folder .*safety is empty"),
    "no config.json": (
        "safety", lambda f: os.remove(os.path.join(f, "config.json")),
        r"folder .*safety has no config.json",
    ),
    "config without architectures": (
        "safety", _edit_config(lambda c: c.pop("architectures")),
        r"\(safety\): config.json has no 'architectures'",
    ),
    "config not JSON": (
        "finetuned", _write_text("config.json", "{"),
        r"\(finetuned\): config.json is not valid JSON",
    ),
    "missing tensor": (
        "safety", _state(lambda s: s.pop(Q)), rf"tensor {Q}: missing in model .*safety \(safety\)",
    ),
    "shape mismatch": (
        "safety", _state(lambda s: s.update({Q: torch.zeros(8, 64)})),
        rf"tensor {Q}: shape \(8, 64\) in model .*\(safety\) differs from \(64, 64\)",
    ),
    "truncated safetensors": (
        "safety", _truncate, r"\(safety\): model.safetensors is not a readable safetensors file",
    ),
    "bad safetensors header": (
        "unaligned", _write_bytes(8, b"xxxxxxxxxxxx"),
        r"\(unaligned\): model.safetensors is not a readable safetensors",
    ),
    "huge header length": (
        "aligned", _write_bytes(0, struct.pack("<Q", 2**40)),
        r"\(aligned\): model.safetensors is not a readable safetensors file \(.*header too large\)",
    ),
    "integer weights": (
        "safety", _state(_as_int32(Q)),
        rf"tensor {Q}: dtype I32 in model .*\(safety\) is not a floating-point",
    ),
    "NaN in a norm": (
        "finetuned", _state(_set("model.norm.weight", NAN)),
        r"tensor model.norm.weight of model .*\(finetuned\) contains NaN or Inf",
    ),
    "Inf in the embedding": (
        "finetuned", _state(_set("model.embed_tokens.weight", INF)),
        r"tensor model.embed_tokens.weight of model .*\(finetuned\) contains NaN or Inf",
    ),
    "NaN in an MLP matrix outside targets": (
        "finetuned", _state(_set(UP, NAN)), rf"tensor {UP} of model .*\(finetuned\) contains NaN",
    ),
    "NaN in a candidate": (
        "unaligned", _state(_set(Q, NAN)),
        rf"tensor {Q} of model .*unaligned \(unaligned\) contains NaN or Inf",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_bad_model_on_disk(case, roles, tmp_path):
    role, corrupt, pattern = MODEL_CASES[case]
    corrupt(roles[role])
    _merge_fails(tmp_path, write_config(tmp_path / "c.yml", roles, targets=TARGETS), pattern)


def test_roles_of_different_architectures(roles, tmp_path, tiny_roles):
    _other_architecture(tiny_roles)(roles["safety"])
    config = write_config(tmp_path / "c.yml", roles, targets=TARGETS)
    _merge_fails(tmp_path, config, r"\(safety\): architectures \['Qwen2ForCausalLM'\] differs")


def test_missing_shard(roles, tmp_path):
    sharded = tmp_path / "sharded"
    config = write_config(tmp_path / "c.yml", roles, targets=TARGETS)
    result = run_mergekit_in_process(config, sharded, "--out-shard-size", "100K")
    assert result.exit_code == 0, result.output
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    roles = {**roles, "safety": str(sharded)}
    config = write_config(tmp_path / "c2.yml", roles, targets=TARGETS)
    _merge_fails(tmp_path, config, rf"shard {shards[1].name} named in .*index.json is missing")


def test_cuda_without_a_gpu(roles, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for machines without it")
    config = write_config(tmp_path / "c.yml", roles, targets=TARGETS)
    _merge_fails(tmp_path, config, r"--device cuda \(or --cuda\): no CUDA device", "--cuda")


# ---------------------------------------------------------------- the output path
def test_output_is_a_file(roles, tmp_path):
    (tmp_path / "out").write_text("mine")
    config = write_config(tmp_path / "c.yml", roles, targets=TARGETS)
    _merge_fails(tmp_path, config, r"output folder .*out is a file, not a folder")


def test_output_is_a_dangling_link(roles, tmp_path):
    (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    config = write_config(tmp_path / "c.yml", roles, targets=TARGETS)
    _merge_fails(tmp_path, config, r"output folder .*out is a dangling symbolic link")


@pytest.mark.parametrize(
    ("target", "relation"),
    [("aligned", "is"), (".", "contains"), ("aligned/sub", "is inside")],
)
def test_output_overlapping_an_input_is_refused(target, relation, roles, tmp_path):
    out = tmp_path / "models" / target
    config = write_config(tmp_path / "c.yml", roles, targets=TARGETS)
    line = _merge_fails(tmp_path, config, rf"output folder .* {relation} the folder of", out=out)
    assert "SafeMERGE never writes into its inputs" in line


def test_output_holding_someone_elses_model_is_refused(roles, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    config = write_config(tmp_path / "c.yml", roles, targets=TARGETS)
    _merge_fails(tmp_path, config, r"output folder .*out holds files that no SafeMERGE run wrote "
                 r"\(config.json\)")  # fmt: skip


def test_local_folders_written_like_hub_ids_merge_offline_with_a_card(roles, tmp_path, monkeypatch):
    """``models/aligned`` (one slash) is a local folder: the model card never asks the Hub."""
    monkeypatch.chdir(tmp_path)
    local = {role: f"models/{role}" for role in roles}
    config = write_config(tmp_path / "c.yml", local, targets=TARGETS)
    result = run_mergekit_in_process(config, "out")
    assert result.exit_code == 0, result.output
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## SafeMERGE" in card and "merged using the [SafeMERGE]" in card
    assert "model card not written" not in result.output


# ---------------------------------------------------------------- adapters read as factors
@pytest.fixture
def adapter_roles(tiny_roles, lora_adapters, tmp_path):
    import shutil

    tiny = tiny_roles("llama")
    adapters = {role: str(shutil.copytree(path, tmp_path / "adapters" / role))
                for role, path in lora_adapters.items()}  # fmt: skip
    roles = {"aligned": tiny.paths["aligned"], "unaligned": tiny.paths["unaligned"]}
    return roles, adapters


def _adapter_config(tmp_path, roles, adapters, **parameters):
    return write_config(tmp_path / "c.yml", roles, targets=TARGETS,
                        finetuned_adapter=adapters["finetuned"],
                        safety_adapter=adapters["safety"], **parameters)  # fmt: skip


def _edit_adapter_config(folder, edit):
    path = os.path.join(folder, "adapter_config.json")
    config = json.load(open(path))  # noqa: SIM115
    edit(config)
    json.dump(config, open(path, "w"))  # noqa: SIM115


ADAPTER_CASES = {
    "rank in config differs from weights": (
        lambda f: _edit_adapter_config(f, lambda c: c.update(r=16)),
        r"adapter .*finetuned: .*q_proj has rank 4 in its weights but adapter_config.json says "
        r"r = 16",
    ),
    "target_modules do not match the weights": (
        lambda f: _edit_adapter_config(f, lambda c: c.update(target_modules=["k_proj"])),
        r"adapter .*finetuned: .* is not matched by target_modules \['k_proj'\]",
    ),
    "invalid adapter_config.json": (
        _write_text("adapter_config.json", "{not json"),
        r"adapter .*finetuned: adapter_config.json is not valid JSON",
    ),
    "truncated adapter weights": (
        lambda f: os.truncate(os.path.join(f, "adapter_model.safetensors"), 100),
        r"adapter .*finetuned: adapter_model.safetensors is not a readable safetensors file",
    ),
    "DoRA adapter": (
        lambda f: _edit_adapter_config(f, lambda c: c.update(use_dora=True)),
        r"adapter .*finetuned: use_dora=True is not a plain low-rank update",
    ),
}


@pytest.mark.parametrize("case", sorted(ADAPTER_CASES))
def test_bad_adapter(case, adapter_roles, tmp_path):
    roles, adapters = adapter_roles
    corrupt, pattern = ADAPTER_CASES[case]
    corrupt(adapters["finetuned"])
    _merge_fails(tmp_path, _adapter_config(tmp_path, roles, adapters), pattern)


def test_suspicious_adapters_are_warned_about_and_recorded(adapter_roles, tmp_path):
    roles, adapters = adapter_roles
    _edit_adapter_config(
        adapters["safety"], lambda c: c.update(base_model_name_or_path="org/another-model")
    )
    config = _adapter_config(tmp_path, roles, {**adapters, "finetuned": adapters["safety"]})
    result = run_mergekit_in_process(config, tmp_path / "out")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("Warning: ")]
    assert any("was trained on org/another-model, but the aligned model is" in w for w in warnings)
    assert any("are the same adapter" in w for w in warnings)
    report = json.loads((tmp_path / "out" / "safemerge_report.json").read_text())
    assert report["warnings"] == [w.removeprefix("Warning: safemerge: ") for w in warnings]
    assert len(warnings) == 3  # the foreign base, seen through both roles, and the same adapter


# ---------------------------------------------------------------- the other commands
def _command_fails(args, pattern, capsys, tmp_path):
    before = tree_snapshot(tmp_path)
    assert safemerge_main(args) == 1
    captured = capsys.readouterr()
    line = error_line(captured.err)
    assert re.search(pattern, line), line
    assert tree_snapshot(tmp_path) == before


REPORTS = {
    "a JSON list": ("[1, 2]", r"not a SafeMERGE report"),
    "null": ("null", r"not a SafeMERGE report"),
    "no summary": ('{"format": "safemerge-report", "settings": {}, "models": {}, "matrices": []}',
                   r"a damaged SafeMERGE report \(summary missing"),
    "merged null": (None, r"a damaged SafeMERGE report \(merged missing or of the wrong type\)"),
    "not JSON": ("{", r"not a readable JSON file"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REPORTS))
def test_report_on_a_bad_file(case, tmp_path, capsys, roles):
    text, pattern = REPORTS[case]
    path = tmp_path / "safemerge_report.json"
    if text is None:  # a real report with one summary value broken
        config = write_config(tmp_path / "c.yml", roles, targets=TARGETS)
        assert run_mergekit_in_process(config, tmp_path / "out").exit_code == 0
        document = json.loads((tmp_path / "out" / "safemerge_report.json").read_text())
        document["summary"]["merged"] = None
        text = json.dumps(document)
    path.write_text(text)
    _command_fails(["report", str(path)], rf"Error: safemerge report: .*: {pattern}", capsys,
                   tmp_path)  # fmt: skip


@pytest.mark.slow
def test_report_into_a_closed_pipe_prints_no_traceback(roles, tmp_path):
    config = write_config(tmp_path / "c.yml", roles, targets=TARGETS)
    assert run_mergekit_in_process(config, tmp_path / "out").exit_code == 0
    command = f"{BIN / 'safemerge'} report {tmp_path / 'out'} | head -c 10"
    result = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120)
    assert result.stdout == "SafeMERGE:"[:10]
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("merge_method: safemerge\nmodels: [\n", r"YAML syntax error at line 3"),
        ("merge_method: safemerge\n---\nmerge_method: safemerge\n", r"holds 2 YAML documents"),
    ],
)
def test_scan_on_unreadable_yaml(text, pattern, tmp_path, capsys):
    (tmp_path / "bad.yml").write_text(text)
    args = ["scan", str(tmp_path / "bad.yml"), "--out", str(tmp_path / "scan")]
    _command_fails(args, rf"Error: safemerge scan: config .*bad.yml: {pattern}", capsys, tmp_path)


def test_eval_on_a_missing_folder(tmp_path, capsys):
    (tmp_path / "h.txt").write_text("how do i x\n")
    args = ["eval", str(tmp_path / "missing"), "--harmful", str(tmp_path / "h.txt")]
    _command_fails(args, r"Error: safemerge eval: model .*missing: no such folder", capsys,
                   tmp_path)  # fmt: skip


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_eval_on_an_empty_prompt_file(content, tmp_path, capsys, roles):
    (tmp_path / "h.txt").write_text(content)
    args = ["eval", roles["aligned"], "--harmful", str(tmp_path / "h.txt")]
    _command_fails(args, r"Error: safemerge eval: .*h.txt: no prompts in the file", capsys,
                   tmp_path)  # fmt: skip


def test_demo_models_into_a_file(tmp_path, capsys):
    (tmp_path / "x").write_text("mine")
    pattern = r"Error: safemerge demo-models: folder .*x is a file"
    _command_fails(["demo-models", str(tmp_path / "x")], pattern, capsys, tmp_path)


def test_demo_models_needs_one_layer(tmp_path, capsys):
    before = tree_snapshot(tmp_path)
    assert safemerge_main(["demo-models", str(tmp_path / "m"), "--layers", "0"]) == 2
    assert "Invalid value for '--layers': 0 is not in the range 1<=x<=64" in capsys.readouterr().err
    assert tree_snapshot(tmp_path) == before


# ---------------------------------------------------------------- a real subprocess
@pytest.mark.slow
def test_console_script_error_is_one_line_on_stderr(roles, tmp_path):
    config = write_config(tmp_path / "c.yml", roles, targets=TARGETS, threshold=True)
    result = subprocess.run(
        [sys.executable, "-m", "mergekit.scripts.run_yaml", config, str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 1
    assert error_line(result.stderr) == (
        "Error: safemerge: parameters.threshold: true is a YAML boolean; threshold takes a number "
        "in [0, 1]"
    )
    assert not (tmp_path / "out").exists()
    assert load_state(roles["aligned"])  # inputs still load
