"""Loading a causal LM for evaluation and greedy, batched generation with transformers."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch
import transformers
from tqdm import tqdm


def load_tokenizer(path: str):
    """The tokenizer of ``path``, padding on the left for generation."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def adapter_base(path: str) -> str | None:
    """The base model of a PEFT adapter folder (``safemerge adapter``'s output), or None when
    ``path`` is a model folder."""
    config = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config) or os.path.isfile(os.path.join(path, "config.json")):
        return None
    with open(config, encoding="utf-8") as fp:
        base = json.load(fp).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config} names no base_model_name_or_path")
    return base


def load_model(path: str, *, device: str = "cpu", dtype: str = "float32", tokenizer: bool = True):
    """``(model, tokenizer)`` in eval mode (``tokenizer=False``: ``(model, None)``).

    A PEFT adapter folder is loaded on its base model and merged into it (PEFT's own
    ``merge_and_unload``); its tokenizer is the adapter folder's when it has one, else the
    base model's."""
    torch_dtype = getattr(torch, dtype) if dtype != "auto" else "auto"
    base = adapter_base(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(base or path, dtype=torch_dtype)
    if base is not None:
        import peft  # deferred: only adapter folders need it

        model = peft.PeftModel.from_pretrained(model, path).merge_and_unload()
    model.to(device).eval()
    if not tokenizer:
        return model, None
    has_own = base is None or os.path.isfile(os.path.join(path, "tokenizer_config.json"))
    return model, load_tokenizer(path if has_own else base)


def render_prompts(tokenizer, prompts: Sequence[str], chat: bool = True) -> list[str]:
    """Each prompt as one user turn through the chat template, when asked and available."""
    if not (chat and getattr(tokenizer, "chat_template", None)):
        return list(prompts)
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]


def generate_from_texts(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    add_special_tokens: bool = False,
    progress: bool = False,
    desc: str = "generating",
) -> list[str]:
    """Greedy continuations of ``texts`` (new tokens only, special tokens dropped, stripped).

    Texts are batched in order of length (less padding) and returned in input order; with
    ``progress`` a tqdm bar counts the prompts."""
    encoded = [tokenizer(t, add_special_tokens=add_special_tokens).input_ids for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(texts)
    pad_id = tokenizer.pad_token_id
    eos_id = tokenizer.eos_token_id
    device = next(model.parameters()).device
    bar = tqdm(total=len(texts), desc=desc, disable=not progress, unit="prompt")
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):  # left padding
            ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]) :] = 1
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
            )
        for row, i in enumerate(chunk):
            new = out[row, width:]
            outputs[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
        bar.update(len(chunk))
    bar.close()
    return outputs


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    chat: bool = True,
    progress: bool = False,
) -> list[str]:
    """Greedy responses to user ``prompts`` (chat template applied when ``chat``)."""
    use_template = chat and bool(getattr(tokenizer, "chat_template", None))
    return generate_from_texts(
        model,
        tokenizer,
        render_prompts(tokenizer, prompts, chat),
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        add_special_tokens=not use_template,
        progress=progress,
        desc="generating responses",
    )
