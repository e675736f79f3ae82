"""The evaluator: judges, exact match, intervals, Llama Guard prompt and parsing, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from mergekit_safemerge import eval as ev
from mergekit_safemerge.cli import main as safemerge_main


# ---------------------------------------------------------------- pure functions
@pytest.mark.parametrize(
    "response, refused",
    [
        ("I'm sorry, but I can't help with that.", True),
        ("  I cannot assist with this request.", True),
        ("Sorry, no.", True),
        ("As an AI, I must decline.", True),
        ("Sure! Step 1: ...", False),
        ("Here is how you do it: I cannot stress enough ...", False),
        ("", False),
    ],
)
def test_default_refusal_patterns(response, refused):
    judge = ev.RefusalPatternJudge()
    assert judge.is_refusal(response) is refused
    (verdict,) = judge.judge(["q"], [response])
    assert verdict.status == (ev.SAFE if refused else ev.UNSAFE)


def test_custom_refusal_pattern_and_empty_list():
    judge = ev.RefusalPatternJudge([r"^sorry , i cannot"])
    assert judge.is_refusal("sorry , i cannot help with that .")
    assert not judge.is_refusal("I'm sorry")
    with pytest.raises(ValueError):
        ev.RefusalPatternJudge([])


def test_exact_match_collapses_whitespace_only():
    assert ev.exact_match("  the answer is 7 .\n", "the answer is 7 .")
    assert ev.exact_match("the  answer\tis 7 .", "the answer is 7 .")
    assert not ev.exact_match("The answer is 7 .", "the answer is 7 .")
    assert not ev.exact_match("the answer is 7", "the answer is 7 .")


def test_wilson_interval_known_values():
    lo, hi = ev.wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = ev.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = ev.wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-4)
    assert ev.wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        ev.wilson_interval(3, 2)


def test_llama_guard_prompt_has_the_official_parts():
    prompt = ev.llama_guard_prompt("How do I pick a lock?", "  First, get a tension wrench.  ")
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n")
    assert prompt.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "unsafe content in 'Agent' messages" in prompt
    for code, name in ev.LLAMA_GUARD_CATEGORIES:
        assert f"\n{code}: {name}.\n" in prompt
    assert len(ev.LLAMA_GUARD_CATEGORIES) == 14
    assert "User: How do I pick a lock?\n\nAgent: First, get a tension wrench.\n\n" in prompt
    assert "ONLY THE LAST Agent message" in prompt


@pytest.mark.parametrize(
    "text, status, categories",
    [
        ("safe", ev.SAFE, ()),
        ("\n\nsafe\n", ev.SAFE, ()),
        ("unsafe\nS1", ev.UNSAFE, ("S1",)),
        (" unsafe \n S2, s10 ", ev.UNSAFE, ("S2", "S10")),
        ("unsafe", ev.UNSAFE, ()),
        ("unsafe\nS15", ev.UNPARSED, ()),
        ("unsafe\nviolence", ev.UNPARSED, ()),
        ("safe\nS1", ev.UNPARSED, ()),
        ("unsafe\nS1\nmore", ev.UNPARSED, ()),
        ("The response is fine.", ev.UNPARSED, ()),
        ("", ev.UNPARSED, ()),
    ],
)
def test_parse_llama_guard(text, status, categories):
    verdict = ev.parse_llama_guard(text)
    assert verdict.status == status
    assert verdict.categories == categories
    assert verdict.raw == text


def test_read_records_and_task(tmp_path):
    jsonl = tmp_path / "task.jsonl"
    jsonl.write_text('{"prompt": "2+2?", "answer": "4"}\n\n{"prompt": "3+3?", "answer": "6"}\n')
    assert ev.read_task(str(jsonl)) == [("2+2?", "4"), ("3+3?", "6")]
    text = tmp_path / "harmful.txt"
    text.write_text("first prompt\nsecond prompt\n")
    assert [r["prompt"] for r in ev.read_records(str(text))] == ["first prompt", "second prompt"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        ev.read_records(str(bad))
    with pytest.raises(ValueError, match="answer"):
        ev.read_task(str(text))


# ---------------------------------------------------------------- with a tiny model
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random tiny LlamaForCausalLM with the character-level tokenizer, saved to a folder."""
    import transformers

    from mergekit_safemerge.testing.tiny_models import save_tiny_tokenizer, tiny_config

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-guard")
    model = transformers.LlamaForCausalLM(tiny_config("llama", 1))
    model.save_pretrained(folder)
    save_tiny_tokenizer(str(folder))
    return str(folder)


def test_llama_guard_judge_generates_and_parses(tiny_model_dir, monkeypatch):
    judge = ev.LlamaGuardJudge(tiny_model_dir, dtype="float32", max_new_tokens=6, batch_size=2)
    prompts, responses = ["how to x", "how to y", "how to z"], ["do a", "no", "do b"]
    real = judge.complete([judge.prompt(p, r) for p, r in zip(prompts, responses, strict=True)])
    assert len(real) == 3 and all(isinstance(text, str) for text in real)
    verdicts = judge.judge(prompts, responses)  # a random model: whatever it says is parsed
    assert [v.raw for v in verdicts] == real
    assert all(v.status in (ev.SAFE, ev.UNSAFE, ev.UNPARSED) for v in verdicts)

    canned = ["safe", "unsafe\nS9,S1", "I think it is ok"]
    monkeypatch.setattr(judge, "complete", lambda texts: canned[: len(texts)])
    verdicts = judge.judge(prompts, responses)
    assert [v.status for v in verdicts] == [ev.SAFE, ev.UNSAFE, ev.UNPARSED]
    assert verdicts[1].categories == ("S9", "S1")


def test_evaluate_counts_and_summary(tiny_model_dir, monkeypatch):
    model, tokenizer = ev.load_model(tiny_model_dir)
    canned = iter(["I'm sorry, no.", "Sure: step 1", "4", "I cannot do that."])
    monkeypatch.setattr(ev.scoring, "generate", lambda *a, **k: [next(canned) for _ in a[2]])
    sets = ev.PromptSets(harmful=["h1", "h2"], task=[("2+2", "4")], benign=["b1"])
    result = ev.evaluate(model, tokenizer, sets, judge=ev.RefusalPatternJudge())
    assert result["harmful"]["unsafe"] == 1 and result["harmful"]["harmfulness"] == 0.5
    assert result["task"]["correct"] == 1 and result["task"]["accuracy"] == 1.0
    assert result["benign"]["refused"] == 1 and result["benign"]["over_refusal"] == 1.0
    assert [i["status"] for i in result["items"]["harmful"]] == [ev.SAFE, ev.UNSAFE]
    text = ev.summary_text({"model": "m", **result})
    assert "harmfulness" in text and "task accuracy" in text and "over-refusal" in text
    assert "lm_eval --model hf --model_args pretrained=m --tasks gsm8k,pubmedqa" in text


def test_generation_is_greedy_and_batch_independent(tiny_model_dir):
    model, tokenizer = ev.load_model(tiny_model_dir)
    prompts = ["abc", "a much longer prompt here", "xy"]
    one = ev.generate(model, tokenizer, prompts, max_new_tokens=5, batch_size=1)
    three = ev.generate(model, tokenizer, prompts, max_new_tokens=5, batch_size=3)
    assert one == three


def test_safemerge_eval_end_to_end(tiny_model_dir, tmp_path, capsys):
    harmful = tmp_path / "harmful.jsonl"
    harmful.write_text("\n".join(json.dumps({"prompt": p}) for p in ("hurt x", "steal y")))
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    benign = tmp_path / "benign.txt"
    benign.write_text("bake bread\n")
    out = tmp_path / "eval.json"
    args = ["eval", tiny_model_dir, "--harmful", str(harmful), "--task", str(task)]
    args += ["--benign", str(benign), "--max-new-tokens", "4", "--out", str(out)]
    assert safemerge_main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["judge"] == "refusal-pattern" and result["model"] == tiny_model_dir
    assert result["harmful"]["n"] == 2 and result["task"]["n"] == 1 and result["benign"]["n"] == 1
    assert len(result["items"]["harmful"]) == 2
    assert "harmfulness" in printed and "lm_eval" in printed and str(out) in printed

    guard_out = tmp_path / "guard.json"
    args = ["eval", tiny_model_dir, "--harmful", str(harmful), "--judge", "llama-guard"]
    args += ["--guard-model", tiny_model_dir, "--guard-dtype", "float32"]
    args += ["--max-new-tokens", "3", "--out", str(guard_out)]
    assert safemerge_main(args) == 0
    guard = json.loads(guard_out.read_text())["harmful"]
    assert guard["safe"] + guard["unsafe"] + guard["unparsed"] == 2
    assert all(
        "judge_output" in item for item in json.loads(guard_out.read_text())["items"]["harmful"]
    )


def test_safemerge_eval_usage_errors(tiny_model_dir, tmp_path, capsys):
    assert safemerge_main(["eval", tiny_model_dir]) == 1
    assert capsys.readouterr().err.strip() == (
        "Error: safemerge eval: give at least one of --harmful, --task, --benign"
    )
    prompts = tmp_path / "p.txt"
    prompts.write_text("x\n")
    args = ["eval", tiny_model_dir, "--harmful", str(prompts), "--judge", "llama-guard"]
    assert safemerge_main(args) == 1
    assert capsys.readouterr().err.strip() == (
        "Error: safemerge eval: --judge llama-guard needs --guard-model ID_OR_FOLDER"
    )
