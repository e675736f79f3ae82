"""Stock ``mergekit-yaml`` in a real subprocess on tiny models, checked against the oracle."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_state, oracle_state, run_mergekit, write_config

from mergekit_safemerge.outputs.report import REPORT_FILENAME

TARGETS = ("q_proj", "v_proj")


def _check_merge(out_dir, roles_paths, *, threshold, safety_weight, targets, atol=1e-6):
    states = {role: load_state(path) for role, path in roles_paths.items()}
    expected, rhos = oracle_state(
        states, threshold=threshold, safety_weight=safety_weight, targets=targets
    )
    merged = load_state(out_dir)
    assert set(merged) == set(expected)
    for name, tensor in expected.items():
        assert torch.allclose(merged[name].double(), tensor.double(), atol=atol, rtol=0), name
    report = json.loads((out_dir / REPORT_FILENAME).read_text())
    by_name = {m["name"]: m for m in report["matrices"]}
    assert {name for name, m in by_name.items() if m["rho"] is not None} == set(rhos)
    for m in by_name.values():
        if m["rho"] is None:  # untouched by the fine-tune: listed, kept
            assert m["decision"] == "kept" and m["delta_norm"] == 0
    for name, rho in rhos.items():
        assert by_name[name]["rho"] == pytest.approx(rho, rel=1e-5, abs=1e-6)
        assert by_name[name]["decision"] == ("merged" if rho < threshold else "kept")
    return report, rhos


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_stock_cli_merge_equals_oracle(arch, tiny_roles, tmp_path):
    import transformers

    tiny = tiny_roles(arch)
    # pick a threshold between two measured rhos so both decisions occur
    config = write_config(
        tmp_path / "c.yml", tiny.paths, threshold=0.5, safety_weight=0.2, targets="q_proj,v_proj"
    )
    out = tmp_path / "out"
    result = run_mergekit(config, out)
    assert result.returncode == 0, result.stderr
    report, rhos = _check_merge(out, tiny.paths, threshold=0.5, safety_weight=0.2, targets=TARGETS)
    decisions = {m["decision"] for m in report["matrices"]}
    assert decisions == {"merged", "kept"}, rhos
    assert report["summary"]["candidates"] == 2 * 2  # 2 blocks x (q_proj, v_proj)
    assert "SafeMERGE: merged" in result.stdout
    assert "## SafeMERGE" in (out / "README.md").read_text()
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_key_value_heads == 2
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None


@pytest.mark.slow
def test_default_targets_take_every_changed_matrix(tiny_roles, tmp_path):
    tiny = tiny_roles("llama")
    config = write_config(tmp_path / "c.yml", tiny.paths, threshold=0.6)
    out = tmp_path / "out"
    result = run_mergekit(config, out, "--no-copy-tokenizer")
    assert result.returncode == 0, result.stderr
    report, _ = _check_merge(out, tiny.paths, threshold=0.6, safety_weight=0.2, targets=())
    summary = report["summary"]
    assert summary["candidates"] == 2 * 7  # q, k, v, o, gate, up, down per block
    assert summary["changed"] == 2 * 2  # the fine-tune only touched q_proj and v_proj
    assert summary["by_module"]["k_proj"]["merged"] == 0


@pytest.mark.slow
def test_lora_inputs_through_lora_merge_cache(tiny_roles, lora_adapters, tmp_path):
    import peft
    import transformers

    tiny = tiny_roles("llama")
    aligned = tiny.paths["aligned"]
    roles = {
        "aligned": aligned,
        "unaligned": tiny.paths["unaligned"],
        "finetuned": f"{aligned}+{lora_adapters['finetuned']}",
        "safety": f"{aligned}+{lora_adapters['safety']}",
    }
    config = write_config(tmp_path / "c.yml", roles, threshold=0.6, targets="q_proj,v_proj")
    out = tmp_path / "out"
    result = run_mergekit(
        config, out, "--lora-merge-cache", str(tmp_path / "cache"), "--lora-merge-dtype", "float32"
    )
    assert result.returncode == 0, result.stderr

    # the oracle merges the adapters with PEFT itself
    expected_paths = {"aligned": aligned, "unaligned": tiny.paths["unaligned"]}
    for role in ("finetuned", "safety"):
        base = transformers.AutoModelForCausalLM.from_pretrained(aligned, dtype=torch.float32)
        merged = peft.PeftModel.from_pretrained(base, lora_adapters[role]).merge_and_unload()
        merged.save_pretrained(tmp_path / f"peft-{role}")
        expected_paths[role] = str(tmp_path / f"peft-{role}")
    report, rhos = _check_merge(
        out, expected_paths, threshold=0.6, safety_weight=0.2, targets=TARGETS, atol=1e-5
    )
    assert report["summary"]["changed"] == 4
    assert report["models"]["finetuned"] == roles["finetuned"]


@pytest.mark.slow
def test_dare_linear_reproducible_under_random_seed(tiny_roles, tmp_path):
    tiny = tiny_roles("llama")
    config = write_config(
        tmp_path / "c.yml",
        tiny.paths,
        threshold=1.0,
        combine="dare_linear",
        density=0.5,
        targets="q_proj,v_proj",
    )
    outs = []
    for i, seed in enumerate(("7", "7", "8")):
        out = tmp_path / f"out{i}"
        result = run_mergekit(config, out, "--random-seed", seed, "--no-copy-tokenizer")
        assert result.returncode == 0, result.stderr
        outs.append(load_state(out))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(outs[0][name], outs[1][name])
    assert not torch.equal(outs[0][name], outs[2][name])
    finetuned = load_state(tiny.paths["finetuned"])
    k_name = "model.layers.0.self_attn.k_proj.weight"  # not a target: untouched
    assert torch.equal(outs[0][k_name], finetuned[k_name])
