"""LoRA roles read as factors (``finetuned_adapter`` / ``safety_adapter``), against PEFT itself."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import make_lora_adapter
from helpers import load_state, run_mergekit, run_mergekit_in_process, write_config

from mergekit_safemerge.errors import SafeMergeError
from mergekit_safemerge.lora.read import AdapterReader, LoraAdapter

TARGETS = "q_proj,v_proj"


def _peft_merged(aligned_dir: str, adapter_dir: str) -> dict[str, torch.Tensor]:
    import peft
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(aligned_dir, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"use_rslora": True},
        {"alpha_pattern": {"v_proj": 3}, "rank_pattern": {"q_proj": 2}},
    ],
    ids=["plain", "rslora", "patterns"],
)
def test_factors_reproduce_peft_merge_and_unload(options, tiny_roles, tmp_path):
    tiny = tiny_roles("llama")
    adapter = make_lora_adapter(tiny.paths["aligned"], str(tmp_path / "a"), seed=5, **options)
    expected = _peft_merged(tiny.paths["aligned"], adapter)
    aligned = load_state(tiny.paths["aligned"])
    lora = LoraAdapter(adapter)
    touched = 0
    for name, weight in aligned.items():
        factors = lora.factors(name)
        if factors is None:
            assert torch.equal(expected[name], weight), name
            continue
        touched += 1
        assert torch.allclose(weight + factors.dense(), expected[name], atol=1e-7, rtol=0), name
    assert touched == 2 * 2  # 2 blocks x (q_proj, v_proj): target_modules honoured


def test_unsupported_adapters_are_refused(tiny_roles, tmp_path):
    tiny = tiny_roles("llama")
    dora = make_lora_adapter(tiny.paths["aligned"], str(tmp_path / "dora"), seed=1, use_dora=True)
    with pytest.raises(SafeMergeError, match="use_dora=True is not a plain low-rank update"):
        LoraAdapter(dora)
    with pytest.raises(SafeMergeError, match="no adapter_config.json"):
        LoraAdapter(str(tmp_path))


def test_a_run_opens_an_adapter_once_and_a_retrained_one_again(tiny_roles, tmp_path):
    tiny = tiny_roles("llama")
    path = make_lora_adapter(tiny.paths["aligned"], str(tmp_path / "a"), seed=1)
    reader = AdapterReader()
    first = reader.open(path)
    assert reader.open(path) is first
    assert AdapterReader().open(path) is not first  # nothing outlives its run
    make_lora_adapter(tiny.paths["aligned"], path, seed=2)
    assert reader.open(path) is not first


def _roles_with_adapters(tiny, adapters):
    return {"aligned": tiny.paths["aligned"], "unaligned": tiny.paths["unaligned"]}, {
        "finetuned_adapter": adapters["finetuned"],
        "safety_adapter": adapters["safety"],
    }


@pytest.mark.slow
def test_adapter_route_equals_the_lora_merge_cache_route(tiny_roles, lora_adapters, tmp_path):
    tiny = tiny_roles("llama")
    roles, adapter_parameters = _roles_with_adapters(tiny, lora_adapters)
    fast = write_config(tmp_path / "fast.yml", roles, targets=TARGETS, threshold=0.27,
                        **adapter_parameters)  # fmt: skip
    result = run_mergekit(fast, tmp_path / "fast", "--no-copy-tokenizer")
    assert result.returncode == 0, result.stderr

    aligned = tiny.paths["aligned"]
    slow_roles = {
        **roles,
        "finetuned": f"{aligned}+{lora_adapters['finetuned']}",
        "safety": f"{aligned}+{lora_adapters['safety']}",
    }
    slow = write_config(tmp_path / "slow.yml", slow_roles, targets=TARGETS, threshold=0.27)
    result = run_mergekit(slow, tmp_path / "slow", "--no-copy-tokenizer", "--lora-merge-cache",
                          str(tmp_path / "cache"), "--lora-merge-dtype", "float32")  # fmt: skip
    assert result.returncode == 0, result.stderr

    fast_state, slow_state = load_state(tmp_path / "fast"), load_state(tmp_path / "slow")
    assert fast_state.keys() == slow_state.keys()
    for name in fast_state:
        assert torch.allclose(fast_state[name], slow_state[name], atol=1e-6, rtol=0), name
    fast_report = json.loads((tmp_path / "fast" / "safemerge_report.json").read_text())
    slow_report = json.loads((tmp_path / "slow" / "safemerge_report.json").read_text())
    for a, b in zip(fast_report["matrices"], slow_report["matrices"], strict=True):
        assert a["name"] == b["name"] and a["decision"] == b["decision"]
        assert a["rho"] == pytest.approx(b["rho"], rel=1e-5)
        assert a["criterion"] == "factored (rank <= 4)"
    assert fast_report["models"]["finetuned"].endswith("(LoRA factors)")
    assert {m["decision"] for m in fast_report["matrices"]} == {"merged", "kept"}


def test_adapter_on_fewer_modules_leaves_the_others_aligned(tiny_roles, tmp_path):
    tiny = tiny_roles("llama")
    aligned = tiny.paths["aligned"]
    q_only = make_lora_adapter(aligned, str(tmp_path / "q"), seed=3, targets=("q_proj",))
    both = make_lora_adapter(aligned, str(tmp_path / "qv"), seed=4)
    roles = {"aligned": aligned, "unaligned": tiny.paths["unaligned"]}
    config = write_config(tmp_path / "c.yml", roles, targets=TARGETS, threshold=1.0,
                          finetuned_adapter=q_only, safety_adapter=both)  # fmt: skip
    out = tmp_path / "out"
    result = run_mergekit_in_process(config, out, "--no-copy-tokenizer")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "safemerge_report.json").read_text())
    v_rows = [m for m in report["matrices"] if m["module"] == "v_proj"]
    assert all(m["rho"] is None and m["decision"] == "kept" for m in v_rows)
    merged, aligned_state = load_state(out), load_state(aligned)
    assert torch.equal(merged["model.layers.0.self_attn.v_proj.weight"],
                       aligned_state["model.layers.0.self_attn.v_proj.weight"])  # fmt: skip
    assert report["summary"]["merged"] == 2  # the two q_proj, threshold 1


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c, a: c["models"].append({"model": a, "parameters": {"role": "safety"}}),
         "exactly 1 models besides base_model"),
        (lambda c, a: c["parameters"].update(safety_adapter="/nonexistent/adapter"),
         "parameters.safety_adapter: adapter folder /nonexistent/adapter not found"),
        (lambda c, a: c["parameters"].update(safety_adapter=[{"filter": "q", "value": a}]),
         "parameters.safety_adapter: safety_adapter applies to the whole merge"),
    ],
)  # fmt: skip
def test_bad_adapter_configs(mutate, message, tiny_roles, lora_adapters, tmp_path):
    import yaml

    tiny = tiny_roles("llama")
    roles, adapter_parameters = _roles_with_adapters(tiny, lora_adapters)
    path = write_config(tmp_path / "c.yml", roles, targets=TARGETS, **adapter_parameters)
    config = yaml.safe_load(open(path))  # noqa: SIM115
    mutate(config, tiny.paths["safety"])
    (tmp_path / "c.yml").write_text(yaml.safe_dump(config))
    result = run_mergekit_in_process(path, tmp_path / "out")
    assert result.exit_code == 1
    assert message in result.output.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_adapter_for_another_model_is_caught_before_loading(tiny_roles, tmp_path):
    llama, qwen = tiny_roles("llama"), tiny_roles("qwen2", 3)
    alien = make_lora_adapter(qwen.paths["aligned"], str(tmp_path / "alien"), seed=1)
    roles = {"aligned": llama.paths["aligned"], "unaligned": llama.paths["unaligned"],
             "safety": llama.paths["safety"]}  # fmt: skip
    config = write_config(tmp_path / "c.yml", roles, finetuned_adapter=alien)
    result = run_mergekit_in_process(config, tmp_path / "out")
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert "model.layers.2.self_attn.q_proj.weight, which aligned model" in last


def _fill_hub_cache(cache: Path, repo_id: str, folder: str, commit: str) -> None:
    """Put an adapter folder into huggingface_hub's cache layout (blobs, snapshot links, ref)."""
    import hashlib
    import shutil

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        data = Path(folder, name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        shutil.copyfile(Path(folder, name), blob)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


@pytest.mark.slow
def test_hub_adapter_ids_resolve_offline_from_the_hub_cache(tiny_roles, lora_adapters, tmp_path):
    """``org/name`` and ``org/name@revision`` go through huggingface_hub, honouring
    HF_HUB_OFFLINE and its cache; the merge equals the one from local folders."""
    tiny = tiny_roles("llama")
    cache, commit = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    _fill_hub_cache(cache, "tiny-org/task-lora", lora_adapters["finetuned"], commit)
    _fill_hub_cache(cache, "tiny-org/safety-lora", lora_adapters["safety"], commit)
    roles = {"aligned": tiny.paths["aligned"], "unaligned": tiny.paths["unaligned"]}
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    hub = write_config(tmp_path / "hub.yml", roles, targets=TARGETS, threshold=0.6,
                       finetuned_adapter="tiny-org/task-lora",
                       safety_adapter=f"tiny-org/safety-lora@{commit}")  # fmt: skip
    result = run_mergekit(hub, tmp_path / "from-hub", env=env)
    assert result.returncode == 0, result.stderr
    local = write_config(tmp_path / "local.yml", roles, targets=TARGETS, threshold=0.6,
                         finetuned_adapter=lora_adapters["finetuned"],
                         safety_adapter=lora_adapters["safety"])  # fmt: skip
    assert run_mergekit_in_process(local, tmp_path / "from-folders").exit_code == 0
    from_hub, from_folders = (
        load_state(tmp_path / "from-hub"),
        load_state(tmp_path / "from-folders"),
    )
    assert all(torch.equal(from_hub[name], from_folders[name]) for name in from_folders)
    report = json.loads((tmp_path / "from-hub" / "safemerge_report.json").read_text())
    assert report["models"]["finetuned"].endswith("+tiny-org/task-lora (LoRA factors)")
    # an id that is not in the cache, offline: one line
    missing = write_config(tmp_path / "missing.yml", roles, targets=TARGETS,
                           finetuned_adapter="tiny-org/absent-lora",
                           safety_adapter="tiny-org/safety-lora")  # fmt: skip
    result = run_mergekit(missing, tmp_path / "out", env=env)
    assert result.returncode == 1 and not (tmp_path / "out").exists()
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: safemerge: parameters.finetuned_adapter: no folder tiny-org/absent-lora, and Hub "
        "adapter tiny-org/absent-lora is not in the local Hub cache (offline, or the Hub is "
        "unreachable)"
    )
