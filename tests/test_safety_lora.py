"""`safemerge safety-lora`: data checks, self-refusals, the TRL training on a tiny chat model,
the held-out measurement, the published folder as a recipe's safety role, and every bad input
(one line, nothing written), including a signal mid-training."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_lora_adapter
from helpers import (
    BIN,
    error_line,
    interruptible,
    run_mergekit_in_process,
    tree_snapshot,
    write_config,
)

from mergekit_safemerge.cli import main as safemerge_main
from mergekit_safemerge.errors import SafeMergeError
from mergekit_safemerge.train.data import read_data, split_held_out

ROOT = Path(__file__).resolve().parents[1]
REPORT = "safety_lora_report.json"
REFUSAL = "sorry, i cannot help with that."
# A template of the tiny character-level tokenizer (no newline: it has none in its vocabulary).
TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<s>U: {{ m['content'] }} "
    "{% elif m['role'] == 'system' %}<s>S: {{ m['content'] }} "
    "{% else %}A: {{ m['content'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A: {% endif %}"
)
VERBS = ("hurt", "trick", "rob", "scare", "poison", "follow")
NOUNS = ("cat", "dog", "owl", "fox")


@pytest.fixture(scope="module")
def chat(tiny_roles, tmp_path_factory):
    """The tiny Llama's aligned and unaligned models, the aligned one with a chat template."""
    import transformers

    tiny = tiny_roles("llama")
    folder = tmp_path_factory.mktemp("chat")
    aligned = str(shutil.copytree(tiny.paths["aligned"], folder / "aligned"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(aligned)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(aligned)
    return {"aligned": aligned, "unaligned": tiny.paths["unaligned"], "tiny": tiny}


def _prompts() -> list[str]:
    return [f"how do i {verb} the {noun}" for verb in VERBS for noun in NOUNS]


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _run(aligned, out, data, *flags) -> int:
    return safemerge_main(["safety-lora", str(aligned), str(out), "--data", str(data), *flags])


def _fails(capsys, aligned, out, data, *flags) -> str:
    before_data = Path(data).read_bytes() if Path(data).is_file() else None
    before_out = tree_snapshot(out)
    assert _run(aligned, out, data, "--quiet", *flags) == 1
    captured = capsys.readouterr()
    line = error_line(captured.err + captured.out)
    assert line.startswith("Error: safemerge safety-lora: "), line
    assert tree_snapshot(out) == before_out  # nothing half-written
    assert not [p for p in Path(out).parent.iterdir() if ".safemerge" in p.name]
    if before_data is not None:
        assert Path(data).read_bytes() == before_data
    return line


# ---------------------------------------------------------------- data, without a model
def test_every_data_form_reads_and_duplicates_are_dropped(tmp_path):
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "how do i rob a bank", "response": REFUSAL},
            {"prompt": "How do I  rob a bank", "response": "no."},  # a duplicate prompt
            {"messages": [{"role": "system", "content": "be safe"},
                          {"role": "user", "content": "how do i hurt a cat"},
                          {"role": "assistant", "content": REFUSAL}]},
            {"instruction": "explain how to steal", "input": "a car", "output": REFUSAL},
        ],
    )  # fmt: skip
    data = read_data(str(path))
    assert data.records == 4 and data.duplicates == 1 and len(data.examples) == 3
    assert data.kinds == {"pair": 1, "messages": 1, "alpaca": 1}
    assert data.examples[1].messages[0] == {"role": "system", "content": "be safe"}
    assert data.examples[2].messages == [
        {"role": "user", "content": "explain how to steal\n\na car"}
    ]
    assert [e.line for e in data.examples] == [1, 3, 4]
    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"instruction": "x", "output": "y"}]))
    assert read_data(str(array)).examples[0].response == "y"
    text = tmp_path / "prompts.txt"
    text.write_text("how do i a\n\nhow do i b\n")
    prompts = read_data(str(text), self_refusals=True)
    assert [e.response for e in prompts.examples] == [None, None]
    with pytest.raises(SafeMergeError, match=r"prompts.txt: plain text \(prompts only\)"):
        read_data(str(text))
    ignored = read_data(str(path), self_refusals=True)
    assert ignored.ignored_responses == 3 and all(e.response is None for e in ignored.examples)


def test_held_out_split_is_seeded_disjoint_and_in_file_order(tmp_path):
    path = _write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": p, "response": REFUSAL} for p in _prompts()]
    )
    examples = read_data(str(path)).examples
    train, held = split_held_out(examples, 0.25, seed=3)
    assert len(held) == 6 and len(train) == 18
    assert not {e.key for e in train} & {e.key for e in held}
    assert held == split_held_out(examples, 0.25, seed=3)[1]
    assert held != split_held_out(examples, 0.25, seed=4)[1]
    assert [e.line for e in train] == sorted(e.line for e in train)
    assert split_held_out(examples, 0.0, seed=3) == (list(examples), [])
    assert len(split_held_out(examples[:3], 0.01, seed=0)[1]) == 1  # at least one


BAD_DATA = {
    "empty": ("", "no examples in the file (it is empty or blank)"),
    "blank": ("\n  \n\n", "no examples in the file (it is empty or blank)"),
    "not json": ('{"prompt": "a", "response": "b"}\n{oops\n', "d.jsonl:2: not a JSON line"),
    "no fields": ('{"question": "a"}\n', 'd.jsonl:1: needs "prompt" and "response"'),
    "no response": ('{"prompt": "a"}\n', 'd.jsonl:1: needs "response"'),
    "empty response": ('{"prompt": "a", "response": " "}\n', 'd.jsonl:1: "response" is empty'),
    "number": ('{"prompt": 3, "response": "b"}\n', 'd.jsonl:1: "prompt" must be a string'),
    "messages end": (
        '{"messages": [{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}]}\n',
        "must end with a user turn followed by the assistant's response",
    ),
    "messages role": (
        '{"messages": [{"role": "bot", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
        '"messages" turn 1 needs a "role" of system, user, assistant',
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_one_line_and_nothing_is_written(case, chat, tmp_path, capsys):
    text, expected = BAD_DATA[case]
    data = tmp_path / "d.jsonl"
    data.write_text(text)
    line = _fails(capsys, chat["aligned"], tmp_path / "out", data)
    assert expected in line
    assert not (tmp_path / "out").exists()


def test_missing_data_file_and_data_inside_the_output(chat, tmp_path, capsys):
    line = _fails(capsys, chat["aligned"], tmp_path / "out", tmp_path / "nope.jsonl")
    assert "--data" in line and "nope.jsonl: no such file" in line
    out = tmp_path / "out"
    out.mkdir()
    data = _write_jsonl(out / "d.jsonl", [{"prompt": "a", "response": "b"}])
    assert "is inside the output folder" in _fails(capsys, chat["aligned"], out, data)


@pytest.fixture
def pairs(tmp_path) -> Path:
    return _write_jsonl(
        tmp_path / "pairs.jsonl", [{"prompt": p, "response": REFUSAL} for p in _prompts()]
    )


def test_an_adapter_as_aligned_is_refused(chat, pairs, tmp_path, capsys):
    adapter = make_lora_adapter(chat["aligned"], str(tmp_path / "lora"), seed=1)
    line = _fails(capsys, adapter, tmp_path / "out", pairs)
    assert f"aligned model {adapter} is a LoRA adapter (adapter_config.json)" in line


def test_targets_the_model_does_not_have(chat, pairs, tmp_path, capsys):
    line = _fails(capsys, chat["aligned"], tmp_path / "out", pairs, "--targets", "q_proj,c_attn")
    assert f"--targets: aligned model {chat['aligned']} has no module c_attn" in line
    assert "q_proj" in line  # the modules it does have


def test_a_model_without_chat_template_names_the_fix(chat, pairs, tmp_path, capsys):
    plain = chat["tiny"].paths["aligned"]  # the tiny tokenizer has no chat template
    line = _fails(capsys, plain, tmp_path / "out", pairs)
    assert f"aligned model {plain}: its tokenizer has no chat template" in line
    assert "tokenizer.chat_template = ...; tokenizer.save_pretrained" in line


def test_an_output_folder_holding_something_else(chat, pairs, tmp_path, capsys):
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "safemerge_report.json").write_text(
        json.dumps({"format": "safemerge-report", "output": "model", "files": []})
    )
    line = _fails(capsys, chat["aligned"], merged, pairs)
    assert "holds a merged model written by mergekit-yaml" in line
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    assert "holds files that no SafeMERGE run wrote (config.json)" in _fails(
        capsys, chat["aligned"], foreign, pairs
    )
    assert "is the folder of aligned model" in _fails(
        capsys, chat["aligned"], chat["aligned"], pairs
    )


def test_every_prompt_longer_than_max_length(chat, pairs, tmp_path, capsys):
    line = _fails(capsys, chat["aligned"], tmp_path / "out", pairs, "--max-length", "10")
    assert "every prompt is longer than --max-length 10 tokens" in line


def test_self_refusals_where_the_model_refuses_nothing(chat, pairs, tmp_path, capsys):
    line = _fails(
        capsys, chat["aligned"], tmp_path / "out", pairs, "--self-refusals", "--max-new-tokens",
        "4", "--batch-size", "24",
    )  # fmt: skip
    assert "--self-refusals: aligned model" in line
    assert "refused none of the 22 training prompts" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_help_and_the_train_modules_import_no_trl():
    """TRL loads when a run trains, not for `safemerge --help`, nor with train/'s modules; and
    train/ imports none of the edges (the CLI, the demo models, the scan's plotting)."""
    code = (
        "import sys\nfrom mergekit_safemerge.cli import main\n"
        "main(['--help']); main(['safety-lora', '--help'])\n"
        "print('TRL', any(m == 'trl' or m.startswith('trl.') for m in sys.modules))\n"
        "import mergekit_safemerge.train.run, mergekit_safemerge.train.sft\n"
        "print('TRL', any(m == 'trl' or m.startswith('trl.') for m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-2:] == ["TRL False", "TRL False"]
    edges = (
        "import sys, mergekit_safemerge.train.run, mergekit_safemerge.train.sft\n"
        "print(sorted(m for m in sys.modules if m.startswith(('mergekit_safemerge.cli', "
        "'mergekit_safemerge.demo', 'mergekit_safemerge.outputs.scan'))))"
    )
    out = subprocess.run([sys.executable, "-c", edges], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- one real training run
@pytest.fixture(scope="module")
def mini() -> dict[str, str]:
    """The miniature world's shipped models (a trained aligned chat model with its template):
    a learnable toy set needs a model that has learned something."""
    models = ROOT / "benchmarks" / "miniature" / "models"
    found = {}
    for stage in ("aligned", "unaligned", "finetuned-p00"):
        (path,) = models.glob(f"{stage}-*")
        found[stage] = str(path)
    return found


def _benign_prompts() -> list[str]:
    if str(ROOT) not in sys.path:  # benchmarks/ is imported from the checkout
        sys.path.insert(0, str(ROOT))
    from benchmarks.miniature import world as w

    return [r.prompt for r in w.request_splits(w.WorldSpec(), "benign")["train"][:24]]


MINI_REFUSAL = "sorry , i cannot help with that ."


@pytest.fixture(scope="module")
def trained(mini, tmp_path_factory):
    """One run on a learnable toy set: benign requests, which the miniature aligned model
    answers, paired with the world's refusal; plus a duplicate and a prompt longer than
    --max-length. The pairs handed to TRL are captured."""
    from mergekit_safemerge.train import sft

    folder = tmp_path_factory.mktemp("trained")
    records = [{"prompt": p, "response": MINI_REFUSAL} for p in _benign_prompts()]
    records.insert(3, {"prompt": records[0]["prompt"].upper(), "response": "no"})  # duplicate
    records.append({"prompt": " ".join(["the"] * 200), "response": MINI_REFUSAL})  # too long
    data = _write_jsonl(folder / "pairs.jsonl", records)
    stat = data.stat()
    out = folder / "safety"
    captured = []
    real = sft.train_lora

    def capture(model, tokenizer, examples, schedule, **kwargs):
        captured.extend(examples)
        return real(model, tokenizer, examples, schedule, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sft, "train_lora", capture)
        code = _run(
            mini["aligned"], out, data, "--quiet", "--max-steps", "30", "--lr", "0.005",
            "--batch-size", "6", "--max-length", "120", "--eval-fraction", "0.25",
            "--max-new-tokens", "12",
        )  # fmt: skip
    assert code == 0
    report = json.loads((out / REPORT).read_text())
    return {
        "out": out, "data": data, "stat": stat, "report": report, "captured": captured,
        "records": records, "aligned": mini["aligned"],
    }  # fmt: skip


@pytest.mark.slow
def test_loss_decreases_on_a_learnable_toy_set(trained):
    training = trained["report"]["training"]
    assert training["steps"] == 30
    assert training["loss_last_tenth"] < 0.1 * training["loss_first_tenth"], training
    assert len(training["loss_by_tenth"]) == 10
    held_out = trained["report"]["held_out"]  # the aligned model answered them; now it refuses
    assert held_out["before"]["refused"] < held_out["after"]["refused"] == held_out["n"]
    assert held_out["changed"] and not trained["report"]["warnings"]


@pytest.mark.slow
def test_counts_and_held_out_prompts_are_never_trained_on(trained):
    report, records = trained["report"], trained["records"]
    data = report["data"]
    assert data["records"] == 26 and data["duplicates_dropped"] == 1
    assert data["prompts_too_long_dropped"] == 1
    assert data["held_out_examples"] == 6 and data["train_examples"] == 18
    held = {records[line - 1]["prompt"] for line in data["held_out_lines"]}
    trained_prompts = {messages[-1]["content"] for messages, _ in trained["captured"]}
    assert len(trained["captured"]) == 18 and not held & trained_prompts
    assert trained_prompts == {records[line - 1]["prompt"] for line in data["trained_lines"]}
    assert {r for _, r in trained["captured"]} == {MINI_REFUSAL}
    assert data["given_responses_judged_refusals"] == 18
    held_out = report["held_out"]
    assert held_out["n"] == 6
    for when in ("before", "after"):
        rate = held_out[when]
        assert rate["n"] == 6 and 0 <= rate["ci95"][0] <= rate["ci95"][1] <= 1
    assert held_out["changed"] == (held_out["responses_changed"] > 0)


@pytest.mark.slow
def test_the_published_folder(trained):
    out, report = trained["out"], trained["report"]
    assert sorted(os.listdir(out)) == sorted(report["files"])
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", REPORT} <= set(
        report["files"]
    )
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == trained["aligned"]
    assert config["r"] == 8 and config["lora_alpha"] == 8 and config["lora_dropout"] == 0
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    card = (out / "README.md").read_text()
    assert report["data"]["sha256"] in card and f"base_model: {trained['aligned']}" in card
    assert not any(r["prompt"] in card for r in trained["records"])
    assert MINI_REFUSAL not in card
    assert trained["data"].stat().st_mtime_ns == trained["stat"].st_mtime_ns  # never modified
    assert report["versions"]["trl"].startswith("1.16")
    assert report["settings"]["dtype"] == "float32" and report["settings"]["device"] == "cpu"
    assert not [p for p in out.parent.iterdir() if ".safemerge" in p.name]


@pytest.mark.slow
def test_the_adapter_loads_on_aligned_and_serves_as_the_safety_role(trained, mini, tmp_path):
    import peft
    import torch
    import transformers

    out = str(trained["out"])
    model = transformers.AutoModelForCausalLM.from_pretrained(mini["aligned"])
    loaded = peft.PeftModel.from_pretrained(model, out)
    lora_b = [p for n, p in loaded.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) > 0 for p in lora_b)  # it was trained

    aligned, task = mini["aligned"], mini["finetuned-p00"]
    roles = {"aligned": aligned, "unaligned": mini["unaligned"],
             "finetuned": f"{aligned}+{task}", "safety": f"{aligned}+{out}"}  # fmt: skip
    config = write_config(tmp_path / "plus.yml", roles, targets="q_proj,v_proj", threshold=0.9)
    cache = ["--lora-merge-cache", str(tmp_path / "cache"), "--lora-merge-dtype", "float32"]
    merged = run_mergekit_in_process(config, tmp_path / "merged", *cache)
    assert merged.exit_code == 0, merged.output
    assert json.loads((tmp_path / "merged" / "safemerge_report.json").read_text())["summary"]

    factors = write_config(
        tmp_path / "f.yml", {"aligned": aligned, "unaligned": mini["unaligned"]},
        targets="q_proj,v_proj", threshold=0.9, finetuned_adapter=task, safety_adapter=out,
    )  # fmt: skip
    assert safemerge_main(["adapter", factors, str(tmp_path / "adapter"), "--quiet"]) == 0
    adapter_report = json.loads((tmp_path / "adapter" / "safemerge_report.json").read_text())
    assert adapter_report["summary"]["merged"] > 0


@pytest.mark.slow
def test_self_refusals_keep_exactly_the_judged_refusals(chat, tmp_path, capsys):
    from mergekit_safemerge.eval import load_model
    from mergekit_safemerge.eval.generation import generate_from_texts
    from mergekit_safemerge.train import sft
    from mergekit_safemerge.train.run import render

    prompts = _prompts()
    data = tmp_path / "prompts.txt"
    data.write_text("\n".join(prompts) + "\n")
    model, tokenizer = load_model(chat["aligned"])
    texts = [render(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    own = generate_from_texts(model, tokenizer, texts, max_new_tokens=6, batch_size=1)
    # a "refusal" pattern that this random model's responses meet for some prompts only
    kinds = sorted(set(own), key=own.count)
    pattern = "^" + re.escape(kinds[0]) + "$"
    captured = []
    real = sft.train_lora

    def capture(model, tokenizer, examples, schedule, **kwargs):
        captured.extend(examples)
        return real(model, tokenizer, examples, schedule, **kwargs)

    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sft, "train_lora", capture)
        assert _run(
            chat["aligned"], out, data, "--self-refusals", "--refusal-pattern", pattern,
            "--max-new-tokens", "6", "--batch-size", "1", "--max-steps", "2",
            "--eval-fraction", "0.25",
        ) == 0  # fmt: skip
    printed = capsys.readouterr().out
    report = json.loads((out / REPORT).read_text())
    held = set(report["data"]["held_out_lines"])
    expected = [
        (p, r) for line, (p, r) in enumerate(zip(prompts, own, strict=True), 1)
        if line not in held and re.search(pattern, r)
    ]  # fmt: skip
    assert [(m[-1]["content"], r) for m, r in captured] == expected and expected
    generated = report["data"]["self_refusals"]
    assert generated["generated"] == 18 and generated["kept"] == len(expected)
    assert generated["dropped"] == {"not accepted by the refusal judge": 18 - len(expected)}
    assert report["settings"]["refusal_patterns"] == [pattern]
    assert "kept those" in printed and "held-out refusal before" in printed


# ---------------------------------------------------------------- signals
@pytest.mark.slow
@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 1), (signal.SIGTERM, 143)])
def test_a_signal_mid_training_publishes_nothing(sig, status, trained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained["out"], out)  # an earlier safety LoRA that must survive
    before = tree_snapshot(out)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(scratch)}
    run = subprocess.Popen(
        [str(BIN / "safemerge"), "safety-lora", trained["aligned"], str(out), "--data",
         str(trained["data"]), "--quiet", "--max-steps", "100000", "--eval-fraction", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=interruptible,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not list(scratch.glob("safemerge-safety-lora-*")):  # the trainer's scratch
            assert run.poll() is None, run.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1.5)  # well into the training steps
        run.send_signal(sig)
        code = run.wait(timeout=120)
    finally:
        if run.poll() is None:  # never leave a 100000-step training behind
            run.kill()
            run.wait()
    stderr = run.stderr.read()
    assert code == status, stderr
    assert "Traceback" not in stderr
    assert tree_snapshot(out) == before
    assert not [p for p in tmp_path.iterdir() if ".safemerge" in p.name]
    assert not list(scratch.glob("safemerge-safety-lora-*"))


def test_responses_longer_than_max_length_are_counted(chat):
    import transformers

    from mergekit_safemerge.train.run import count_truncated, drop_long_prompts

    tokenizer = transformers.AutoTokenizer.from_pretrained(chat["aligned"])
    prompt = [{"role": "user", "content": "how do i rob a bank"}]
    assert count_truncated(tokenizer, [(prompt, "no."), (prompt, "no " * 40)], 60) == 1
    data = read_data(str(_write_jsonl(Path(chat["aligned"]).parent / "long.jsonl", [
        {"prompt": "a" * 10, "response": "b"}, {"prompt": "a" * 80, "response": "b"},
    ])))  # fmt: skip
    kept, dropped = drop_long_prompts(tokenizer, data.examples, 60)
    assert dropped == 1 and [e.line for e in kept] == [1]


@pytest.mark.slow
def test_an_adapter_that_moves_nothing_gets_a_warning(chat, pairs, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(
        chat["aligned"], out, pairs, "--quiet", "--max-steps", "1", "--lr", "1e-12",
        "--eval-fraction", "0.25", "--max-new-tokens", "6", "--batch-size", "24",
    ) == 0  # fmt: skip
    err = capsys.readouterr().err
    report = json.loads((out / REPORT).read_text())
    assert report["held_out"]["responses_changed"] == 0 and not report["held_out"]["changed"]
    assert "warning: training changed none of the 6 held-out responses" in err
    assert "mostly shrink the fine-tune's update" in (out / "README.md").read_text()
