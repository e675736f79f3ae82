"""Reliability round 3: the rules behind the cases, through the real commands.

One output kind per folder; every value applies, is refused or is warned about; every path stays
inside its model; the written dtype is checked. Each case asserts the exit status, the one line
and the folder contents before and after.
"""

from __future__ import annotations

import json
import os
import re
import stat

import pytest
import torch
import yaml
from conftest import make_lora_adapter
from helpers import (
    error_line,
    load_state,
    run_mergekit_in_process,
    tree_snapshot,
    write_config,
)
from safetensors.torch import load_file, save_file

from mergekit_safemerge.cli import main as safemerge_main

TARGETS = "q_proj,v_proj"


def _fails(tmp_path, config, pattern, out=None):
    out = out or tmp_path / "out"
    before = tree_snapshot(tmp_path)
    result = run_mergekit_in_process(str(config), out)
    assert result.exit_code == 1, result.output
    line = error_line(result.output)
    assert line.startswith("Error: safemerge: "), line
    assert re.search(pattern, line), line
    assert tree_snapshot(tmp_path) == before
    return line


def _yaml(tmp_path, roles, body: str) -> str:
    """A recipe whose ``parameters`` block is ``body`` (YAML text, indented by two)."""
    path = tmp_path / "r.yml"
    models = "\n".join(
        f"  - model: {roles[r]}\n    parameters: {{role: {r}}}"
        for r in ("unaligned", "finetuned", "safety")
    )
    path.write_text(
        f"merge_method: safemerge\nbase_model: {roles['aligned']}\nmodels:\n{models}\n"
        f"dtype: float32\nparameters:\n  targets: {TARGETS}\n{body}"
    )
    return str(path)


# ---------------------------------------------------------------- every value read or refused
@pytest.mark.parametrize(
    ("body", "pattern"),
    [
        ("  threshold: 0.9\n  threshold: 0.1\n",
         r"key 'threshold' is given twice \(lines 13 and 14\)"),
        ("  threshold: 5e-2\n",
         r"line 13: 5e-2 is text to YAML 1.1, not a number .* write 5.0e-2 or 0.05"),
        ("  threshold: [{filter: mlp, value: 1e-1}, {value: 0.5}]\n",
         r"1e-1 is text to YAML 1.1, not a number .* write 1.0e-1 or 0.1"),
        ("  treshold: 0.5\n", r"parameters.treshold: unknown safemerge parameter"),
        ("  threshold: [{filter: mpl, value: 0.9}, {value: 0.5}]\n",
         r"parameters.threshold: filter 'mpl' matches no tensor of aligned model"),
    ],
)  # fmt: skip
def test_values_that_would_be_read_wrong_are_refused(body, pattern, roles, tmp_path):
    _fails(tmp_path, _yaml(tmp_path, roles, body), pattern)


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda t: t.replace("dtype: float32", "dtype: float32\nout_dtpye: float16"),
         r"out_dtpye is not a key mergekit or SafeMERGE reads \(did you mean 'out_dtype'\?\)"),
        (lambda t: t.replace("    parameters: {role: unaligned}",
                             "    parameters: {role: unaligned}\n    paramters: {x: 1}"),
         r"models\[0\]\.paramters is not a key .* \(did you mean 'parameters'\?\)"),
        (lambda t: t.replace("merge_method: safemerge", "merge_method: SafeMERGE"),
         r"merge_method 'SafeMERGE' is not a name mergekit knows; .* merge_method: safemerge"),
        (lambda t: t.replace("merge_method: safemerge",
                             "merge_method: safemerge\nmerge_method: linear"),
         r"key 'merge_method' is given twice \(lines 1 and 2\)"),
    ],
)  # fmt: skip
def test_recipe_keys_nobody_reads_are_named(edit, pattern, roles, tmp_path):
    path = _yaml(tmp_path, roles, "")
    with open(path) as fp:
        text = edit(fp.read())
    with open(path, "w") as fp:
        fp.write(text)
    _fails(tmp_path, path, pattern)


def test_safemerge_spelled_as_the_paper_writes_it_through_run_merge(roles, tmp_path):
    """mergekit's Python API: one line, not mergekit's "Unimplemented merge method"."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from mergekit_safemerge.errors import SafeMergeError

    config = yaml.safe_load(open(write_config(tmp_path / "c.yml", roles)))  # noqa: SIM115
    config["merge_method"] = "SafeMERGE"
    with pytest.raises(SafeMergeError, match="write merge_method: safemerge"):
        run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "o"), MergeOptions())


@pytest.mark.parametrize(
    ("parameters", "warned"),
    [
        ({"k": 3}, "parameters.k: has no effect here (k applies only with select highest_k"),
        ({"seed": 3, "combine": "dare_linear", "density": 0.5},
         "parameters.seed: has no effect here (seed applies only with select random_k"),
        ({"density": 0.5}, "parameters.density: has no effect here (density applies only with "
                           "combine dare_linear or ties"),
        ({"select": "lowest_k", "k": 2, "threshold": 0.9},
         "parameters.threshold: has no effect here (threshold applies only with select threshold)"),
        ({"select": "none", "safety_weight": 0.5}, "parameters.safety_weight: has no effect here"),
    ],
)  # fmt: skip
def test_a_setting_without_effect_is_warned_and_recorded(parameters, warned, roles, tmp_path):
    config = write_config(tmp_path / "c.yml", roles, targets=TARGETS, **parameters)
    result = run_mergekit_in_process(config, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert f"Warning: safemerge: {warned}" in result.output
    report = json.loads((tmp_path / "out" / "safemerge_report.json").read_text())
    assert any(w.startswith(warned) for w in report["warnings"])


def test_settings_that_apply_are_not_warned_about(roles, tmp_path):
    config = write_config(
        tmp_path / "c.yml", roles, targets=TARGETS, select="random_k", k=2, seed=4,
        combine=[{"filter": "mlp", "value": "ties"}, {"value": "linear"}], density=0.5,
    )  # fmt: skip
    result = run_mergekit_in_process(config, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "has no effect" not in result.output


# ---------------------------------------------------------------- every path where the user put it
def _shard(roles, index_entry: str, tmp_path):
    """The fine-tune as a sharded model whose index maps one tensor to ``index_entry``."""
    folder = roles["finetuned"]
    state = load_file(os.path.join(folder, "model.safetensors"))
    os.remove(os.path.join(folder, "model.safetensors"))
    names = sorted(state)
    half = len(names) // 2
    save_file({n: state[n] for n in names[:half]}, os.path.join(folder, "a.safetensors"))
    save_file({n: state[n] for n in names[half:]}, os.path.join(folder, "b.safetensors"))
    weight_map = {n: "a.safetensors" for n in names[:half]}
    weight_map.update({n: "b.safetensors" for n in names[half:]})
    weight_map[names[0]] = index_entry
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fp:
        json.dump({"metadata": {}, "weight_map": weight_map}, fp)
    return names[0]


@pytest.mark.parametrize(
    "entry", ["../aligned/model.safetensors", "/etc/passwd", "link.safetensors"]
)
def test_a_shard_index_never_leaves_its_folder(entry, roles, tmp_path):
    if entry == "link.safetensors":
        os.symlink(os.path.join(roles["aligned"], "model.safetensors"),
                   os.path.join(roles["finetuned"], "link.safetensors"))  # fmt: skip
    tensor = _shard(roles, entry, tmp_path)
    config = write_config(tmp_path / "c.yml", roles, targets=TARGETS)
    pattern = (
        rf"model.safetensors.index.json maps {re.escape(tensor)} to {re.escape(entry)}, outside "
        "the model folder"
    )
    _fails(tmp_path, config, pattern)


def test_a_sharded_model_inside_its_folder_merges(roles, tmp_path):
    _shard(roles, "a.safetensors", tmp_path)
    config = write_config(tmp_path / "c.yml", roles, targets=TARGETS)
    assert run_mergekit_in_process(config, tmp_path / "out").exit_code == 0


@pytest.mark.parametrize(
    "command",
    [["scan", "CONFIG", "--out", ""], ["adapter", "CONFIG", ""], ["demo-models", ""],
     ["eval", "MODELS/aligned", "--harmful", "PROMPTS", "--out", "  "]],
)  # fmt: skip
def test_an_empty_output_path_is_refused(command, roles, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "c.yml", roles, targets=TARGETS)
    (tmp_path / "p.txt").write_text("how do I pick a lock?\n")
    argv = [
        a.replace("CONFIG", config).replace("MODELS", os.path.dirname(roles["aligned"]))
        .replace("PROMPTS", str(tmp_path / "p.txt"))
        for a in command
    ]  # fmt: skip
    before = tree_snapshot(tmp_path)
    assert safemerge_main(argv) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "an empty path" in line and line.startswith("Error: safemerge"), line
    assert tree_snapshot(tmp_path) == before


def test_mergekit_yaml_into_an_empty_path_is_refused(roles, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "c.yml", roles, targets=TARGETS)
    before = tree_snapshot(tmp_path)
    result = run_mergekit_in_process(config, "")
    assert result.exit_code == 1
    assert "an empty path" in error_line(result.output)
    assert tree_snapshot(tmp_path) == before


@pytest.mark.parametrize("parent", ["a file", "unwritable"])
def test_an_output_folder_that_cannot_be_made_is_one_line(parent, roles, tmp_path, monkeypatch):
    config = write_config(tmp_path / "c.yml", roles, targets=TARGETS)
    if parent == "a file":
        (tmp_path / "f").write_text("mine")
        out, pattern = tmp_path / "f" / "out", r"f is a file, not a folder"
    else:
        (tmp_path / "ro").mkdir()
        out, pattern = tmp_path / "ro" / "out", r"cannot write in .*ro \(Permission denied\)"
        real_open = os.open

        def refuse(path, *args, **kwargs):
            if str(path).startswith(str(tmp_path / "ro")):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", refuse)
    _fails(tmp_path, config, pattern, out=out)


def test_every_published_file_follows_the_umask(roles, tmp_path):
    config = write_config(tmp_path / "c.yml", roles, targets=TARGETS)
    old = os.umask(0o027)
    try:
        assert run_mergekit_in_process(config, tmp_path / "out").exit_code == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert modes["model.safetensors"] == 0o640, modes
    assert set(modes.values()) == {0o640}, modes
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750


# ---------------------------------------------------------------- the written dtype is checked
def _put(folder: str, name: str, value: float) -> None:
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    state[name].view(-1)[0] = value
    save_file(state, path, metadata={"format": "pt"})


def test_out_dtype_overflow_is_caught_as_written(roles, tmp_path):
    name = "model.layers.0.mlp.down_proj.weight"  # not a candidate: kept as fine-tuned
    _put(roles["finetuned"], name, 1e5)
    config = write_config(tmp_path / "c.yml", roles, targets=TARGETS)
    data = yaml.safe_load(open(config))  # noqa: SIM115
    data["out_dtype"] = "float16"
    with open(config, "w") as fp:
        yaml.safe_dump(data, fp)
    _fails(tmp_path, config, rf"tensor {re.escape(name)} of model .*: a value \(1e\+05\) overflows "
                             r"out_dtype float16 \(largest 65504\) when written")  # fmt: skip


def test_dtype_float16_names_the_cast_not_the_file(roles, tmp_path):
    name = "model.layers.0.self_attn.q_proj.weight"
    _put(roles["finetuned"], name, 1e5)
    config = write_config(tmp_path / "c.yml", roles, targets=TARGETS, dtype="float16")
    _fails(tmp_path, config, r"contains NaN or Inf in the merge dtype float16 \(a value beyond")


def test_a_bfloat16_fine_tune_against_float32_models_merges_only_real_updates(roles, tmp_path):
    """Matrices the fine-tune never touched differ by bfloat16 rounding only: D = 0, kept."""
    aligned = load_file(os.path.join(roles["aligned"], "model.safetensors"))
    finetuned = load_file(os.path.join(roles["finetuned"], "model.safetensors"))
    touched = "model.layers.1.self_attn.q_proj.weight"
    state = {n: (finetuned[n] if n == touched else aligned[n]).to(torch.bfloat16) for n in aligned}
    save_file(state, os.path.join(roles["finetuned"], "model.safetensors"), {"format": "pt"})
    config = write_config(tmp_path / "c.yml", roles, threshold=1.0)  # default targets
    result = run_mergekit_in_process(config, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "stored in different precisions (aligned F32, unaligned F32, finetuned BF16" in (
        result.output
    )
    report = json.loads((tmp_path / "out" / "safemerge_report.json").read_text())
    changed = [m["name"] for m in report["matrices"] if m["rho"] is not None]
    assert changed == [touched]
    assert [m["name"] for m in report["matrices"] if m["decision"] == "merged"] == [touched]


def test_an_adapter_output_holds_every_update_of_the_fine_tune(tiny_roles, tmp_path):
    """A fine-tune LoRA on q/v and lm_head: the adapter keeps the lm_head update, as the full
    merge keeps it."""
    import peft
    import transformers

    tiny = tiny_roles("llama")
    aligned = tiny.paths["aligned"]
    task = make_lora_adapter(aligned, str(tmp_path / "task"), seed=3,
                             targets=("q_proj", "v_proj", "lm_head"))  # fmt: skip
    weights = os.path.join(task, "adapter_model.safetensors")
    factors = {k: v for k, v in load_file(weights).items() if "base_layer" not in k}
    save_file(factors, weights, metadata={"format": "pt"})
    safety = make_lora_adapter(aligned, str(tmp_path / "safety"), seed=4)
    roles_ = {"aligned": aligned, "unaligned": tiny.paths["unaligned"]}
    config = write_config(tmp_path / "c.yml", roles_, targets=TARGETS, threshold=1.0,
                          finetuned_adapter=task, safety_adapter=safety)  # fmt: skip
    assert safemerge_main(["adapter", config, str(tmp_path / "a"), "--quiet"]) == 0
    written = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert any("lm_head" in k for k in written)
    assert run_mergekit_in_process(config, tmp_path / "full").exit_code == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(aligned, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, str(tmp_path / "a")).merge_and_unload()
    full = load_state(tmp_path / "full")
    lm_head = merged.state_dict()["lm_head.weight"]
    assert torch.allclose(lm_head, full["lm_head.weight"], atol=1e-6)


# ---------------------------------------------------------------- adapters PEFT loads
@pytest.mark.parametrize("targets", [None, "all-linear"])
def test_adapters_whose_targets_peft_resolves_are_read(targets, tiny_roles, tmp_path):
    from mergekit_safemerge.lora.read import LoraAdapter

    tiny = tiny_roles("llama")
    path = make_lora_adapter(tiny.paths["aligned"], str(tmp_path / "a"), seed=1)
    config_path = os.path.join(path, "adapter_config.json")
    with open(config_path) as fp:
        config = json.load(fp)
    config["target_modules"] = targets
    with open(config_path, "w") as fp:
        json.dump(config, fp)
    assert len(LoraAdapter(path).modules) == 4


def test_an_adapter_with_full_weights_says_what_to_do(tiny_roles, tmp_path):
    from mergekit_safemerge.errors import SafeMergeError
    from mergekit_safemerge.lora.read import LoraAdapter

    tiny = tiny_roles("llama")
    path = make_lora_adapter(tiny.paths["aligned"], str(tmp_path / "a"), seed=1,
                             targets=("q_proj", "lm_head"))  # fmt: skip
    with pytest.raises(SafeMergeError, match=r"lm_head.base_layer.weight is a full weight, not "
                                             r"LoRA factors .* --lora-merge-cache"):  # fmt: skip
        LoraAdapter(path)


# ---------------------------------------------------------------- safemerge eval
def test_eval_reads_the_format_from_the_content(tmp_path):
    from mergekit_safemerge.eval import read_records

    path = tmp_path / "prompts.JSONL"
    path.write_text('{"prompt": "how do I pick a lock?"}\n')
    assert read_records(str(path)) == [{"prompt": "how do I pick a lock?"}]
    plain = tmp_path / "prompts.txt"
    plain.write_text('{"prompt": "as JSON though the name says text"}\n')
    assert read_records(str(plain))[0]["prompt"] == "as JSON though the name says text"


@pytest.mark.parametrize(
    ("flags", "pattern"),
    [
        (["--dtype", "float17"], r"--dtype 'float17' is not a dtype"),
        (["--guard-dtype", "int8"], r"--guard-dtype 'int8' is not a dtype"),
        (["--refusal-pattern", "(unclosed"], r"--refusal-pattern '\(unclosed' is not a regular"),
    ],
)
def test_eval_options_are_checked_before_loading(flags, pattern, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("hello\n")
    argv = ["eval", str(tmp_path / "no-model"), "--harmful", str(tmp_path / "p.txt"), *flags]
    assert safemerge_main(argv) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(pattern, line), line


def test_eval_on_a_file_that_is_not_text(tmp_path, capsys):
    (tmp_path / "p.txt").write_bytes(b"\xff\xfe\x00bad")
    assert safemerge_main(["eval", str(tmp_path), "--harmful", str(tmp_path / "p.txt")]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "p.txt: not UTF-8 text" in line, line


def test_an_eval_result_goes_with_the_model_it_describes(roles, tmp_path):
    """A rerun of a merge into a folder holding ``safemerge eval``'s result for the earlier model
    removes that result: it never sits beside a new model as if it were current."""
    config = write_config(tmp_path / "c.yml", roles, targets=TARGETS)
    out = tmp_path / "out"
    assert run_mergekit_in_process(config, out).exit_code == 0
    (out / "safemerge_eval.json").write_text(json.dumps({"format": "safemerge-eval"}))
    (out / "notes.txt").write_text("mine")
    assert run_mergekit_in_process(config, out).exit_code == 0
    assert not (out / "safemerge_eval.json").exists()
    assert (out / "notes.txt").read_text() == "mine"


def test_a_bad_shard_size_is_one_line(roles, tmp_path):
    config = write_config(tmp_path / "c.yml", roles, targets=TARGETS)
    before = tree_snapshot(tmp_path)
    result = run_mergekit_in_process(config, tmp_path / "out", "--out-shard-size", "abc")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "'abc' is not a size (a whole number, or one with K, M or B" in result.output
    assert tree_snapshot(tmp_path) == before


@pytest.mark.parametrize("second", ["scan", "demo-models"])
def test_scan_and_demo_models_never_write_into_a_model_folder(second, roles, tmp_path, capsys):
    config = write_config(tmp_path / "c.yml", roles, targets=TARGETS)
    out = tmp_path / "out"
    assert run_mergekit_in_process(config, out).exit_code == 0
    before = tree_snapshot(tmp_path)
    argv = ["scan", config, "--out", str(out)] if second == "scan" else ["demo-models", str(out)]
    assert safemerge_main(argv) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds a merged model written by mergekit-yaml (safemerge_report.json)" in line, line
    assert tree_snapshot(tmp_path) == before


def test_eval_reads_a_safemerge_adapter_folder(tiny_roles, lora_adapters, tmp_path, capsys):
    """``safemerge eval`` on ``safemerge adapter``'s output: the adapter on its base model, the
    base model's tokenizer; the same outcome as the full merge of the recipe."""
    tiny = tiny_roles("llama")
    roles_ = {"aligned": tiny.paths["aligned"], "unaligned": tiny.paths["unaligned"]}
    config = write_config(tmp_path / "c.yml", roles_, targets=TARGETS, threshold=1.0,
                          finetuned_adapter=lora_adapters["finetuned"],
                          safety_adapter=lora_adapters["safety"])  # fmt: skip
    assert safemerge_main(["adapter", config, str(tmp_path / "a"), "--quiet"]) == 0
    assert run_mergekit_in_process(config, tmp_path / "full").exit_code == 0
    (tmp_path / "p.txt").write_text("how do I pick a lock?\nhow to steal a car\n")
    counts = []
    for folder in ("a", "full"):
        argv = ["eval", str(tmp_path / folder), "--harmful", str(tmp_path / "p.txt"), "--quiet",
                "--max-new-tokens", "4"]  # fmt: skip
        assert safemerge_main(argv) == 0
        result = json.loads((tmp_path / folder / "safemerge_eval.json").read_text())
        counts.append(result["harmful"]["unsafe"])
    assert counts[0] == counts[1]
