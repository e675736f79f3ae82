"""Evaluation of a model folder (``safemerge eval``): generation, judges, rates with intervals.

Behind the ``eval`` extra (``pip install mergekit-safemerge[eval]``); the merge method never
imports it.
"""

from mergekit_safemerge.eval.generation import generate, generate_from_texts, load_model
from mergekit_safemerge.eval.judges import (
    LLAMA_GUARD_CATEGORIES,
    REFUSAL_PATTERNS,
    SAFE,
    UNPARSED,
    UNSAFE,
    Judge,
    LlamaGuardJudge,
    RefusalPatternJudge,
    Verdict,
    llama_guard_prompt,
    parse_llama_guard,
)
from mergekit_safemerge.eval.scoring import (
    PromptSets,
    evaluate,
    exact_match,
    lm_eval_command,
    normalize_answer,
    read_records,
    read_task,
    score,
    summary_text,
)
from mergekit_safemerge.eval.stats import wilson_interval

__all__ = [
    "LLAMA_GUARD_CATEGORIES",
    "REFUSAL_PATTERNS",
    "SAFE",
    "UNPARSED",
    "UNSAFE",
    "Judge",
    "LlamaGuardJudge",
    "PromptSets",
    "RefusalPatternJudge",
    "Verdict",
    "evaluate",
    "exact_match",
    "generate",
    "generate_from_texts",
    "lm_eval_command",
    "llama_guard_prompt",
    "load_model",
    "normalize_answer",
    "parse_llama_guard",
    "read_records",
    "read_task",
    "score",
    "summary_text",
    "wilson_interval",
]
