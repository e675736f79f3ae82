"""The training data of a safety LoRA: read, checked, deduplicated and split. Pure Python.

A data file (``--data``) holds one example a line (JSONL), or a JSON array of the same records:

* ``{"prompt": "...", "response": "..."}``: a harmful request and its refusal;
* ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}``: a chat, optional system
  turns first, ending with the assistant's refusal (the loss is on that last turn only);
* ``{"instruction": "...", "input": "...", "output": "..."}``: Alpaca form (the safety-only data of
  Bianchi et al.); ``input`` is appended to the instruction after a blank line;
* prompts only (``{"prompt": "..."}``, or a plain-text file with one prompt a line): with
  ``--self-refusals``, where the aligned model writes each response itself.

Every malformed record is one error naming the file and line; duplicated prompts (compared with
case and whitespace runs ignored) are dropped and counted, the first kept, so that no held-out
prompt is ever trained on. The file is only read, never written.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mergekit_safemerge.errors import SafeMergeError

ROLES = ("system", "user", "assistant")
Message = dict[str, str]


@dataclass(frozen=True)
class Example:
    """One training example: the chat before the response, and the response (None: to be
    written by the aligned model). ``line`` is its line in the file (its index, 1-based, in a
    JSON array)."""

    line: int
    prompt: tuple[tuple[str, str], ...]  # (role, content) turns, the last one the user's
    response: str | None

    @property
    def messages(self) -> list[Message]:
        return [{"role": role, "content": content} for role, content in self.prompt]

    @property
    def key(self) -> str:
        """What makes two prompts duplicates: every turn, case and whitespace runs ignored."""
        return "\x00".join(
            f"{role}:{' '.join(text.split()).casefold()}" for role, text in self.prompt
        )


@dataclass
class DataSet:
    """The examples of a data file, after duplicates were dropped, with what was counted."""

    path: str
    sha256: str
    records: int
    examples: list[Example]
    duplicates: int = 0
    ignored_responses: int = 0  # responses in the file replaced by --self-refusals
    kinds: dict[str, int] = field(default_factory=dict)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fp:
        for block in iter(lambda: fp.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _text(record: dict[str, Any], key: str, where: str, *, required: bool = True) -> str | None:
    value = record.get(key)
    if value is None:
        if not required:
            return None
        raise SafeMergeError(f'{where}: needs "{key}"')
    if not isinstance(value, str):
        raise SafeMergeError(f'{where}: "{key}" must be a string')
    if not value.strip():
        raise SafeMergeError(f'{where}: "{key}" is empty')
    return value


def _from_messages(record: dict[str, Any], where: str) -> tuple[list[tuple[str, str]], str]:
    messages = record["messages"]
    if not isinstance(messages, list) or len(messages) < 2:
        raise SafeMergeError(
            f'{where}: "messages" must be a list of turns ending with a user turn and the '
            "assistant's response"
        )
    turns = []
    for number, message in enumerate(messages, 1):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise SafeMergeError(
                f'{where}: "messages" turn {number} needs a "role" of {", ".join(ROLES)}'
            )
        content = _text(message, "content", f'{where}: "messages" turn {number}')
        turns.append((message["role"], content))
    if turns[-1][0] != "assistant" or turns[-2][0] != "user":
        raise SafeMergeError(
            f'{where}: "messages" must end with a user turn followed by the assistant\'s response'
        )
    return turns[:-1], turns[-1][1]


def _example(record: Any, where: str, line: int, prompts_only: bool) -> tuple[Example, str]:
    """One record as an :class:`Example` and its kind (pair, messages, alpaca, prompt)."""
    if not isinstance(record, dict):
        raise SafeMergeError(f"{where}: a record must be a JSON object")
    if "messages" in record:
        prompt, response = _from_messages(record, where)
        return Example(line, tuple(prompt), response), "messages"
    if "instruction" in record:
        instruction = _text(record, "instruction", where)
        extra = record.get("input")
        if extra is not None and not isinstance(extra, str):
            raise SafeMergeError(f'{where}: "input" must be a string')
        text = instruction + (f"\n\n{extra}" if extra and extra.strip() else "")
        response = _text(record, "output", where, required=not prompts_only)
        return Example(line, (("user", text),), response), "alpaca"
    if "prompt" in record:
        prompt = _text(record, "prompt", where)
        response = _text(record, "response", where, required=not prompts_only)
        return Example(line, (("user", prompt),), response), "pair" if response else "prompt"
    wanted = '"prompt"' if prompts_only else '"prompt" and "response"'
    raise SafeMergeError(
        f'{where}: needs {wanted} (strings), "messages" (a chat ending with the assistant\'s '
        'response) or "instruction" and "output"'
    )


def _records(path: str, self_refusals: bool) -> list[tuple[int, Any]]:
    """(line, decoded record) pairs: a JSON array, JSON lines, or plain text lines (as prompts,
    with ``self_refusals`` only)."""
    try:
        with open(path, encoding="utf-8") as fp:
            text = fp.read()
    except UnicodeDecodeError:
        raise SafeMergeError(f"--data {path}: not a UTF-8 text file") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            array = json.loads(text)
        except json.JSONDecodeError as error:
            raise SafeMergeError(f"--data {path}: not valid JSON ({error.msg})") from None
        return list(enumerate(array, 1))
    found = []
    as_json = path.endswith((".jsonl", ".json")) or stripped.startswith("{")
    if stripped and not as_json and not self_refusals:
        raise SafeMergeError(
            f'--data {path}: plain text (prompts only); give JSONL of {{"prompt", "response"}} '
            "or chat messages, or add --self-refusals to have the aligned model answer them"
        )
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if not as_json:
            found.append((number, {"prompt": line.strip()}))
            continue
        try:
            found.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise SafeMergeError(f"{path}:{number}: not a JSON line ({error.msg})") from None
    return found


def read_data(path: str, *, self_refusals: bool = False) -> DataSet:
    """Every example of ``path`` (read only), duplicates of a prompt dropped (the first kept).

    Without ``self_refusals`` every record needs a response; with it, responses in the file are
    ignored (and counted) because the aligned model writes its own.
    """
    if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "no such file"
        raise SafeMergeError(f"--data {path}: {what}; give a JSONL file")
    records = _records(path, self_refusals)
    if not records:
        raise SafeMergeError(f"--data {path}: no examples in the file (it is empty or blank)")
    examples: list[Example] = []
    seen: set[str] = set()
    duplicates = ignored = 0
    kinds: dict[str, int] = {}
    for line, record in records:
        example, kind = _example(record, f"{path}:{line}", line, self_refusals)
        if example.key in seen:
            duplicates += 1
            continue
        seen.add(example.key)
        if self_refusals and example.response is not None:
            ignored += 1
            example = Example(example.line, example.prompt, None)
        kinds[kind] = kinds.get(kind, 0) + 1
        examples.append(example)
    return DataSet(
        path=path,
        sha256=file_sha256(path),
        records=len(records),
        examples=examples,
        duplicates=duplicates,
        ignored_responses=ignored,
        kinds=kinds,
    )


def split_held_out(
    examples: Sequence[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """``(train, held_out)``: a seeded sample of ``round(fraction * n)`` examples held out (at
    least one when ``fraction > 0``), both in file order; prompts are unique, so no held-out
    prompt is in ``train``."""
    n = len(examples)
    count = 0 if fraction <= 0 else max(1, round(fraction * n))
    if count >= n:
        raise SafeMergeError(
            f"--eval-fraction {fraction} holds out all {n} examples; give more data or a "
            "smaller fraction"
        )
    chosen = set(random.Random(seed).sample(range(n), count))
    train = [e for i, e in enumerate(examples) if i not in chosen]
    held = [e for i, e in enumerate(examples) if i in chosen]
    return train, held
