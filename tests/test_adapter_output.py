"""``safemerge adapter``: the adapter it writes, loaded with PEFT and merged, is the full model
``mergekit-yaml`` writes for the same recipe; ``authors_linear`` is PEFT's own linear
combination; bad inputs stop with one line and write nothing."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import make_lora_adapter
from helpers import error_line, load_state, run_mergekit_in_process, tree_snapshot, write_config

from mergekit_safemerge.cli import main as safemerge_main

TARGETS = "q_proj,v_proj"


@pytest.fixture(scope="module")
def setup(tiny_roles, tmp_path_factory):
    """The tiny 3-block Llama and three adapters on its aligned model: a task LoRA (r = 4), a
    safety LoRA of another rank (r = 6), and one of the task's rank (for authors_linear)."""
    tiny = tiny_roles("llama", 3)
    folder = tmp_path_factory.mktemp("adapters")
    aligned = tiny.paths["aligned"]
    adapters = {
        "task": make_lora_adapter(aligned, str(folder / "task"), seed=11, rank=4),
        "safety": make_lora_adapter(aligned, str(folder / "safety"), seed=12, rank=6),
        "safety4": make_lora_adapter(aligned, str(folder / "safety4"), seed=13, rank=4),
    }
    return tiny, adapters


def _roles(tiny):
    return {"aligned": tiny.paths["aligned"], "unaligned": tiny.paths["unaligned"]}


def _peft_merged(base_dir, adapter_dir):
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def _relative_error(got, expected):
    return float(
        (got.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)
    )


def _adapter(config, out, *flags):
    code = safemerge_main(["adapter", str(config), str(out), "--quiet", *flags])
    assert code == 0
    return json.loads((out / "safemerge_report.json").read_text())


def _same_as_full_merge(setup, tmp_path, *flags, **parameters):
    """Write the adapter and the full model for one recipe; compare weights and decisions."""
    tiny, _ = setup
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = write_config(tmp_path / "c.yml", _roles(tiny), targets=TARGETS, **parameters)
    full = run_mergekit_in_process(config, tmp_path / "full")
    assert full.exit_code == 0, full.output
    report = _adapter(config, tmp_path / "adapter", *flags)
    merged = _peft_merged(tiny.paths["aligned"], str(tmp_path / "adapter"))
    expected = load_state(tmp_path / "full")
    for name, tensor in expected.items():
        assert _relative_error(merged[name], tensor) <= 1e-6, name
    full_report = json.loads((tmp_path / "full" / "safemerge_report.json").read_text())
    decisions = [(m["name"], m["decision"], m["reason"]) for m in report["matrices"]]
    assert decisions == [(m["name"], m["decision"], m["reason"]) for m in full_report["matrices"]]
    return report, full_report


def test_round_trip_equals_the_full_merge(setup, tmp_path):
    tiny, adapters = setup
    report, _ = _same_as_full_merge(
        setup,
        tmp_path,
        threshold=0.3,
        finetuned_adapter=adapters["task"],
        safety_adapter=adapters["safety"],
    )
    assert {m["decision"] for m in report["matrices"]} == {"merged", "kept"}
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    weights = load_state(tmp_path / "adapter")
    rank = 4 + 6  # one merged module has rank r_f + r_s; every module is padded to it
    assert config["r"] == config["lora_alpha"] == rank and not config["rank_pattern"]
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == tiny.paths["aligned"]
    assert all(t.shape[0] == rank for n, t in weights.items() if "lora_A" in n)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == sorted(report["files"])
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "library_name: peft" in card and "## SafeMERGE" in card
    assert "| model.layers.0.self_attn.q_proj |" in card


def test_compact_adapter_has_per_module_ranks_and_the_same_weights(setup, tmp_path):
    _, adapters = setup
    report, _ = _same_as_full_merge(
        setup,
        tmp_path,
        "--compact",
        threshold=0.3,
        finetuned_adapter=adapters["task"],
        safety_adapter=adapters["safety"],
    )
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    merged = [
        m["name"].removesuffix(".weight") for m in report["matrices"] if m["decision"] == "merged"
    ]
    kept = [
        m["name"].removesuffix(".weight") for m in report["matrices"] if m["decision"] == "kept"
    ]
    ranks = {**{m: 10 for m in merged}, **{m: 4 for m in kept}}
    weights = load_state(tmp_path / "adapter")
    for module, rank in ranks.items():
        assert weights[f"base_model.model.{module}.lora_A.weight"].shape[0] == rank
        assert config["rank_pattern"].get(module, config["r"]) == rank
    assert config["alpha_pattern"] == config["rank_pattern"]  # scaling 1 everywhere


def test_aligned_plus_adapter_references_are_read_as_factors(setup, tmp_path):
    tiny, adapters = setup
    aligned = tiny.paths["aligned"]
    roles = {**_roles(tiny), "finetuned": f"{aligned}+{adapters['task']}",
             "safety": f"{aligned}+{adapters['safety']}"}  # fmt: skip
    config = write_config(tmp_path / "plus.yml", roles, targets=TARGETS, threshold=0.3)
    report = _adapter(config, tmp_path / "plus")
    factors = write_config(
        tmp_path / "f.yml",
        _roles(tiny),
        targets=TARGETS,
        threshold=0.3,
        finetuned_adapter=adapters["task"],
        safety_adapter=adapters["safety"],
    )
    other = _adapter(factors, tmp_path / "factors")
    assert [m["decision"] for m in report["matrices"]] == [m["decision"] for m in other["matrices"]]
    plus, direct = load_state(tmp_path / "plus"), load_state(tmp_path / "factors")
    assert all(torch.equal(plus[k], direct[k]) for k in direct)


@pytest.mark.parametrize(
    "options",
    [{"use_rslora": True}, {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3}}],
    ids=["rslora", "patterns"],
)
def test_rslora_and_pattern_inputs(options, setup, tmp_path):
    tiny, adapters = setup
    task = make_lora_adapter(tiny.paths["aligned"], str(tmp_path / "t"), seed=21, **options)
    _same_as_full_merge(
        setup, tmp_path, threshold=0.3, finetuned_adapter=task, safety_adapter=adapters["safety"]
    )


def test_adapters_on_different_module_sets(setup, tmp_path):
    """Safety touches q_proj only: v_proj has S = 0, merged means (1 - a) D there."""
    tiny, adapters = setup
    q_only = make_lora_adapter(
        tiny.paths["aligned"], str(tmp_path / "q"), seed=31, rank=3, targets=("q_proj",)
    )
    report, _ = _same_as_full_merge(
        setup, tmp_path, threshold=1.0, finetuned_adapter=adapters["task"], safety_adapter=q_only
    )
    v_rows = [m for m in report["matrices"] if m["module"] == "v_proj"]
    assert v_rows and all(m["safety_norm"] == 0 and m["decision"] == "merged" for m in v_rows)


def test_filters_and_ranking_modes_decide_as_mergekit_yaml_does(setup, tmp_path):
    _, adapters = setup
    shared = {"finetuned_adapter": adapters["task"], "safety_adapter": adapters["safety"]}
    _same_as_full_merge(
        setup,
        tmp_path / "filter",
        threshold=[{"filter": "v_proj", "value": 0.9}, {"value": 0.2}],
        **shared,
    )
    _same_as_full_merge(setup, tmp_path / "lowest", select="lowest_k", k=2, **shared)


def test_authors_linear_is_peft_add_weighted_adapter(setup, tmp_path):
    import peft
    import transformers

    tiny, adapters = setup
    a = 0.2
    config = write_config(
        tmp_path / "c.yml",
        _roles(tiny),
        targets=TARGETS,
        threshold=0.3,
        combine="authors_linear",
        safety_weight=a,
        finetuned_adapter=adapters["task"],
        safety_adapter=adapters["safety4"],
    )
    report = _adapter(config, tmp_path / "authors")
    ours = _peft_merged(tiny.paths["aligned"], str(tmp_path / "authors"))

    model = transformers.AutoModelForCausalLM.from_pretrained(
        tiny.paths["aligned"], dtype=torch.float32
    )
    model = peft.PeftModel.from_pretrained(model, adapters["task"], adapter_name="task")
    model.load_adapter(adapters["safety4"], adapter_name="safety")
    model.add_weighted_adapter(["task", "safety"], [1 - a, a], "both", combination_type="linear")
    model.set_adapter("both")
    theirs = {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}
    task_only = _peft_merged(tiny.paths["aligned"], adapters["task"])
    for m in report["matrices"]:
        expected = theirs if m["decision"] == "merged" else task_only  # [1, 0] elsewhere
        assert _relative_error(ours[m["name"]], expected[m["name"]]) <= 1e-6, m["name"]
    assert {m["decision"] for m in report["matrices"]} == {"merged", "kept"}
    # it is not the paper's formula: the cross terms differ from (1 - a) D + a S
    paper = write_config(
        tmp_path / "p.yml",
        _roles(tiny),
        targets=TARGETS,
        threshold=0.3,
        safety_weight=a,
        finetuned_adapter=adapters["task"],
        safety_adapter=adapters["safety4"],
    )
    assert run_mergekit_in_process(paper, tmp_path / "paper").exit_code == 0
    merged = next(m["name"] for m in report["matrices"] if m["decision"] == "merged")
    assert _relative_error(ours[merged], load_state(tmp_path / "paper")[merged]) > 1e-4


# ---------------------------------------------------------------- bad inputs
def _adapter_fails(config, out, pattern, capsys, tmp_path):
    before = tree_snapshot(tmp_path)
    assert safemerge_main(["adapter", str(config), str(out), "--quiet"]) == 1
    line = error_line(capsys.readouterr().err)
    assert re.search(pattern, line), line
    assert tree_snapshot(tmp_path) == before


@pytest.mark.parametrize("combine", ["dare_linear", "ties"])
def test_rules_without_a_low_rank_form_are_refused(combine, setup, tmp_path, capsys):
    _, adapters = setup
    config = write_config(
        tmp_path / "c.yml",
        _roles(setup[0]),
        targets=TARGETS,
        combine=combine,
        density=0.5,
        finetuned_adapter=adapters["task"],
        safety_adapter=adapters["safety"],
    )
    _adapter_fails(
        config,
        tmp_path / "out",
        rf"parameters.combine: {combine} has no exact "
        r"low-rank form .* use combine: linear or authors_linear",
        capsys,
        tmp_path,
    )


def test_a_full_model_role_is_refused(setup, tmp_path, capsys):
    tiny, adapters = setup
    config = write_config(
        tmp_path / "c.yml",
        {**_roles(tiny), "finetuned": tiny.paths["finetuned"]},
        targets=TARGETS,
        safety_adapter=adapters["safety"],
    )
    _adapter_fails(
        config,
        tmp_path / "out",
        r"models\[1\] .*: safemerge adapter writes a LoRA "
        r"adapter, so the finetuned role must be a LoRA",
        capsys,
        tmp_path,
    )


def test_an_adapter_on_another_model_is_refused(setup, tmp_path, capsys):
    tiny, adapters = setup
    roles = {**_roles(tiny), "finetuned": f"{tiny.paths['unaligned']}+{adapters['task']}"}
    config = write_config(
        tmp_path / "c.yml", roles, targets=TARGETS, safety_adapter=adapters["safety"]
    )
    _adapter_fails(
        config,
        tmp_path / "out",
        r"the finetuned adapter must sit on the aligned model",
        capsys,
        tmp_path,
    )


def test_an_adapter_for_another_base_is_refused(setup, tmp_path, capsys, tiny_roles):
    tiny, adapters = setup
    alien = make_lora_adapter(
        tiny_roles("qwen2", 4).paths["aligned"], str(tmp_path / "alien"), seed=1
    )
    config = write_config(
        tmp_path / "c.yml",
        _roles(tiny),
        targets=TARGETS,
        finetuned_adapter=alien,
        safety_adapter=adapters["safety"],
    )
    _adapter_fails(
        config,
        tmp_path / "out",
        r"parameters.finetuned_adapter: adapter .*alien "
        r"changes model.layers.3.self_attn.q_proj.weight, which aligned model .* does "
        r"not have",
        capsys,
        tmp_path,
    )


def test_an_adapter_of_the_wrong_shape_is_refused(setup, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    tiny, adapters = setup
    wrong = shutil.copytree(adapters["task"], tmp_path / "wrong")
    weights = wrong / "adapter_model.safetensors"
    state = load_file(weights)
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    state[key] = torch.zeros(state[key].shape[0] + 8, state[key].shape[1])
    save_file(state, weights)
    config = write_config(
        tmp_path / "c.yml",
        _roles(tiny),
        targets=TARGETS,
        finetuned_adapter=str(wrong),
        safety_adapter=adapters["safety"],
    )
    _adapter_fails(
        config,
        tmp_path / "out",
        r"tensor model.layers.1.self_attn.q_proj.weight: "
        r"adapter .*wrong \(finetuned\) makes an update of shape \(72, 64\)",
        capsys,
        tmp_path,
    )


def test_dora_is_refused(setup, tmp_path, capsys):
    tiny, adapters = setup
    dora = make_lora_adapter(tiny.paths["aligned"], str(tmp_path / "dora"), seed=2, use_dora=True)
    config = write_config(
        tmp_path / "c.yml",
        _roles(tiny),
        targets=TARGETS,
        finetuned_adapter=dora,
        safety_adapter=adapters["safety"],
    )
    _adapter_fails(
        config, tmp_path / "out", r"use_dora=True is not a plain low-rank update", capsys, tmp_path
    )


def test_an_output_folder_holding_someone_elses_adapter_is_refused(setup, tmp_path, capsys):
    import shutil

    tiny, adapters = setup
    out = tmp_path / "out"
    shutil.copytree(adapters["task"], out)  # a copy: not an input of the recipe
    config = write_config(
        tmp_path / "c.yml",
        _roles(tiny),
        targets=TARGETS,
        finetuned_adapter=adapters["task"],
        safety_adapter=adapters["safety"],
    )
    _adapter_fails(
        config,
        out,
        r"output folder .*out holds files that no SafeMERGE run wrote "
        r"\(.*adapter_config.json",
        capsys,
        tmp_path,
    )
    _adapter_fails(config, adapters["task"], r"is the folder of adapter", capsys, tmp_path)


@pytest.mark.slow
def test_one_output_kind_per_folder(setup, tmp_path, capsys):
    """An adapter never replaces a merged model (nor the reverse): one line naming what is there
    and the two ways out; the folder is left exactly as it was."""
    tiny, adapters = setup
    parameters = {"finetuned_adapter": adapters["task"], "safety_adapter": adapters["safety"]}
    config = write_config(tmp_path / "c.yml", _roles(tiny), targets=TARGETS, **parameters)
    model, adapter = tmp_path / "model", tmp_path / "adapter"
    assert run_mergekit_in_process(config, model).exit_code == 0
    _adapter(config, adapter)
    for out, command in ((model, "adapter"), (adapter, "merge")):
        before = tree_snapshot(out)
        if command == "adapter":
            code = safemerge_main(["adapter", str(config), str(out), "--quiet"])
            line = capsys.readouterr().err.strip().splitlines()[-1]
            what, other = "merged model written by mergekit-yaml", "adapter"
        else:
            result = run_mergekit_in_process(config, out)
            code, line = result.exit_code, error_line(result.output)
            what, other = "adapter written by safemerge adapter", "merged model"
        assert code == 1
        assert f"holds a {what} (safemerge_report.json); write the {other} to another folder, " \
               "or remove that folder yourself first" in line, line  # fmt: skip
        assert tree_snapshot(out) == before
    _adapter(config, adapter)  # a rerun of the same kind replaces its own output
