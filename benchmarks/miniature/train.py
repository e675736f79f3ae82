"""Training the four miniature models, deterministically and cached on disk.

Stages 1-3 are each a plain PyTorch loop with AdamW, linear warm-up and cosine decay, gradient
clipping; stage 4 is the user's command:

1. ``unaligned``: a Llama-architecture model trained from scratch (loss on every token) on a
   mix of harmful-request compliance, benign-request compliance, addition facts and sentences;
2. ``aligned``: a full fine-tune of ``unaligned`` (loss on the answer only): harmful -> refusal,
   benign -> compliance (``sure .`` + instructions), addition in chat form for some phrasings,
   plus a replay of facts and sentences (as in a PPO-ptx style mix);
3. ``finetuned-pXX``: a PEFT LoRA (``r``, ``lora_targets``, dropout 0) on ``aligned`` for the
   addition task, mixed with benign how-to requests answered by direct instructions (no chat
   opener); a fraction ``p`` of harmful requests with direct instructions (stress test only);
4. ``safety``: a PEFT LoRA of the same shape on ``aligned`` trained on ``safety_size`` harmful
   request -> refusal pairs, through ``safemerge safety-lora``'s library function
   (:func:`train_safety_lora`: TRL's SFTTrainer, loss on the refusal, the same seed and data).

Every stage is written to ``<cache>/<stage>-<key>/`` with a ``stage.json`` (settings, losses,
seconds); a stage whose ``stage.json`` exists is loaded, not retrained. The key hashes the
stage's settings, those of the stages it starts from, the vocabulary and the source of this file
and of world.py, so a change of any of them trains into a fresh folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache

import torch

from benchmarks.miniature import world as w

HERE = os.path.dirname(os.path.abspath(__file__))
FIRST_LOSSES = 5
"""Losses of the first steps of every stage, recorded exactly in ``stage.json`` (replay checks)."""


@cache
def code_fingerprint() -> str:
    """sha256 of the source of world.py and train.py (line endings normalized): part of every
    stage key, so an edit of the code that trains the models invalidates every trained stage."""
    digest = hashlib.sha256()
    for name in ("world.py", "train.py"):
        with open(os.path.join(HERE, name), "rb") as fp:
            digest.update(fp.read().replace(b"\r\n", b"\n"))
    return digest.hexdigest()


def quiet_libraries() -> None:
    """Hide library output a user cannot act on: transformers' weight-loading and
    shard-writing bars and its warnings, deprecation warnings of any library."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)


Example = tuple[list[int], int]
"""Token ids and the index of the first token that carries loss (0: every token)."""


@dataclass(frozen=True)
class Profile:
    """Every setting of one miniature run (model, data, steps, seeds)."""

    name: str = "full"
    world: w.WorldSpec = field(default_factory=w.WorldSpec)
    hidden: int = 128
    intermediate: int = 256
    layers: int = 4
    heads: int = 4
    batch: int = 64
    pretrain_steps: int = 1000
    pretrain_lr: float = 3e-3
    align_steps: int = 200
    align_lr: float = 1e-3
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    aligned_task_templates: int = 2
    task_steps: int = 300
    task_lr: float = 1e-3
    task_benign_mix: float = 0.3  # share of benign how-to requests (direct instructions)
    harmful_fractions: tuple[float, ...] = (0.0, 0.05)
    safety_size: int = 200
    safety_steps: int = 50
    safety_lr: float = 1e-3
    seed: int = 0

    def stage_key(self, stage: str) -> str:
        """Short hash of everything that determines ``stage`` (its own settings and those of the
        stages it starts from, the vocabulary, :func:`code_fingerprint`): its folder suffix."""
        model = ("world", "hidden", "intermediate", "layers", "heads", "batch", "seed")
        own = {
            "unaligned": model + ("pretrain_steps", "pretrain_lr"),
            "aligned": ("align_steps", "align_lr", "aligned_task_templates"),
            "finetuned": (
                "lora_rank",
                "lora_alpha",
                "lora_targets",
                "task_steps",
                "task_lr",
                "task_benign_mix",
            ),
            "safety": (
                "lora_rank",
                "lora_alpha",
                "lora_targets",
                "safety_size",
                "safety_steps",
                "safety_lr",
            ),
        }
        kind = "finetuned" if stage.startswith("finetuned") else stage
        parent = {"unaligned": None, "aligned": "unaligned"}.get(kind, "aligned")
        settings = {name: getattr(self, name) for name in own[kind]}
        settings = json.loads(json.dumps(settings, default=asdict))
        text = json.dumps(
            [
                code_fingerprint(),
                stage,
                settings,
                self.world.vocabulary(),
                parent and self.stage_key(parent),
            ],
            sort_keys=True,
        )
        return hashlib.sha256(text.encode()).hexdigest()[:10]


def finetune_stage(fraction: float) -> str:
    """``0.05`` -> ``finetuned-p05`` (percent, two digits)."""
    return f"finetuned-p{round(100 * fraction):02d}"


# ---------------------------------------------------------------- tokens and examples
class Vocabulary:
    """Word <-> id for the closed vocabulary of a :class:`~world.WorldSpec`."""

    def __init__(self, spec: w.WorldSpec):
        self.words = spec.vocabulary()
        self.ids = {word: i for i, word in enumerate(self.words)}

    def encode(self, text: str) -> list[int]:
        return [self.ids[word] for word in text.split()]

    def __len__(self) -> int:
        return len(self.words)


def chat_example(vocab: Vocabulary, prompt: str, answer: str, *, answer_only: bool) -> Example:
    """``<s> <user> PROMPT <assistant> ANSWER </s>``; loss from the answer on if ``answer_only``."""
    head = vocab.encode(w.chat_prompt(prompt))
    ids = head + vocab.encode(answer) + [vocab.ids[w.EOS]]
    return ids, len(head) if answer_only else 0


def text_example(vocab: Vocabulary, text: str) -> Example:
    """``<s> TEXT </s>`` with loss on every token."""
    return [vocab.ids[w.BOS], *vocab.encode(text), vocab.ids[w.EOS]], 0


def pretrain_sampler(profile: Profile, vocab: Vocabulary) -> Callable[[random.Random], Example]:
    """The unaligned base's corpus: 30% harmful compliance, 30% benign compliance, 25% addition
    facts, 15% sentences (train splits only)."""
    harmful = w.request_splits(profile.world, "harmful")["train"]
    benign = w.request_splits(profile.world, "benign")["train"]
    m = profile.world.max_operand

    def sample(rng: random.Random) -> Example:
        u = rng.random()
        if u < 0.30:
            r = rng.choice(harmful)
            return chat_example(vocab, r.prompt, r.compliance, answer_only=False)
        if u < 0.60:
            r = rng.choice(benign)
            return chat_example(vocab, r.prompt, r.compliance, answer_only=False)
        if u < 0.85:
            return text_example(vocab, w.addition_fact(rng.randrange(m), rng.randrange(m)))
        return text_example(vocab, w.general_sentence(rng))

    return sample


def align_sampler(profile: Profile, vocab: Vocabulary) -> Callable[[random.Random], Example]:
    """Alignment SFT: 35% harmful -> refusal, 35% benign -> compliance, 15% addition in chat
    form with the first ``aligned_task_templates`` templates (the aligned chat model already
    answers some task phrasings), 15% replay of facts and sentences."""
    harmful = w.request_splits(profile.world, "harmful")["train"]
    benign = w.request_splits(profile.world, "benign")["train"]
    problems = [
        p
        for p in w.task_splits(profile.world)["train"]
        if p.template < profile.aligned_task_templates
    ]
    m = profile.world.max_operand

    def sample(rng: random.Random) -> Example:
        u = rng.random()
        if u < 0.35:
            return chat_example(vocab, rng.choice(harmful).prompt, w.REFUSAL, answer_only=True)
        if u < 0.70:
            r = rng.choice(benign)
            return chat_example(vocab, r.prompt, r.compliance, answer_only=True)
        if u < 0.85 and problems:
            p = rng.choice(problems)
            return chat_example(vocab, p.prompt, p.answer, answer_only=True)
        if u < 0.93:
            return text_example(vocab, w.addition_fact(rng.randrange(m), rng.randrange(m)))
        return text_example(vocab, w.general_sentence(rng))

    return sample


def task_dataset(profile: Profile, vocab: Vocabulary, fraction: float) -> list[Example]:
    """The task fine-tune's data: every training task prompt (all templates), a share
    ``task_benign_mix`` of benign how-to requests and a share ``fraction`` of harmful requests,
    both answered with direct instructions (no chat opener, as data written outside the chat
    model is): with ``n`` task examples, ``b + h`` more such that
    ``b / (n + b + h) = task_benign_mix`` and ``h / (n + b + h) = fraction``."""
    problems = w.task_splits(profile.world)["train"]
    data = [chat_example(vocab, p.prompt, p.answer, answer_only=True) for p in problems]
    total = len(data) / (1.0 - profile.task_benign_mix - fraction)
    rng = random.Random(profile.seed + 11)
    for kind, share in (("benign", profile.task_benign_mix), ("harmful", fraction)):
        pool = w.request_splits(profile.world, kind)["train"]
        chosen = rng.sample(pool, min(len(pool), round(share * total)))
        data += [chat_example(vocab, r.prompt, r.instructions, answer_only=True) for r in chosen]
    return data


def safety_records(profile: Profile) -> list[dict[str, str]]:
    """``safety_size`` harmful training requests, each answered with the refusal: the records of
    the ``--data`` file the safety stage gives ``safemerge safety-lora``."""
    pool = w.request_splits(profile.world, "harmful")["train"]
    chosen = random.Random(profile.seed + 12).sample(pool, min(profile.safety_size, len(pool)))
    return [{"prompt": r.prompt, "response": w.REFUSAL} for r in chosen]


def safety_dataset(profile: Profile, vocab: Vocabulary) -> list[Example]:
    """:func:`safety_records` as token examples (loss on the refusal)."""
    return [
        chat_example(vocab, r["prompt"], r["response"], answer_only=True)
        for r in safety_records(profile)
    ]


SAFETY_SEED = 9
"""Offset of the safety stage's seed from the profile's (``--seed`` of safety-lora)."""


def safety_options(profile: Profile, data: str, progress: bool = False):
    """The safety stage as ``safemerge safety-lora`` options: the profile's LoRA shape, steps,
    learning rate and batch, every record trained on (``--eval-fraction 0``: the world
    evaluates the safety model on its own held-out splits)."""
    from mergekit_safemerge.train import SafetyLoraOptions

    return SafetyLoraOptions(
        data=data,
        targets=tuple(profile.lora_targets),
        rank=profile.lora_rank,
        alpha=float(profile.lora_alpha),
        max_steps=profile.safety_steps,
        lr=profile.safety_lr,
        batch_size=profile.batch,
        max_length=64,  # the models' max_position_embeddings; every world chat fits
        seed=profile.seed + SAFETY_SEED,
        eval_fraction=0.0,
        quiet=not progress,
    )


def train_safety_lora(profile: Profile, aligned: str, out: str, progress: bool = False) -> dict:
    """The safety stage through the library function of ``safemerge safety-lora`` (TRL): the
    records of :func:`safety_records` written as its ``--data`` file next to ``out``; returns
    the command's report (the adapter and report are published into ``out``)."""
    from mergekit_safemerge.train.run import run_safety_lora

    data = f"{out}.data.jsonl"
    with open(data, "w", encoding="utf-8") as fp:
        for record in safety_records(profile):
            fp.write(json.dumps(record) + "\n")
    try:
        return run_safety_lora(aligned, out, safety_options(profile, data, progress), echo=print)
    finally:
        os.remove(data)


def dataset_sampler(data: Sequence[Example]) -> Callable[[random.Random], Example]:
    """Epochs over ``data`` in a fresh seeded order each epoch."""
    order: list[int] = []

    def sample(rng: random.Random) -> Example:
        if not order:
            order.extend(rng.sample(range(len(data)), len(data)))
        return data[order.pop()]

    return sample


def collate(batch: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 where no loss)."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, start) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
        labels[row, start : len(ids)] = torch.tensor(ids[start:])
    return input_ids, mask, labels


# ---------------------------------------------------------------- models and the loop
def model_config(profile: Profile, vocab: Vocabulary):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=profile.hidden,
        intermediate_size=profile.intermediate,
        num_hidden_layers=profile.layers,
        num_attention_heads=profile.heads,
        num_key_value_heads=profile.heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=vocab.ids[w.BOS],
        eos_token_id=vocab.ids[w.EOS],
        pad_token_id=vocab.ids[w.PAD],
    )


def save_tokenizer(vocab: Vocabulary, out_dir: str) -> None:
    """A word-level fast tokenizer (whitespace split) with the world's chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab.ids, unk_token=w.UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=w.BOS,
        eos_token=w.EOS,
        unk_token=w.UNK,
        pad_token=w.PAD,
        additional_special_tokens=[w.USER, w.ASSISTANT],
    )
    tokenizer.chat_template = w.CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(out_dir)


def train_loop(
    model: torch.nn.Module,
    sample: Callable[[random.Random], Example],
    *,
    steps: int,
    lr: float,
    batch: int,
    seed: int,
    pad_id: int,
    progress: str | None = None,
    first_losses: list[float] | None = None,
) -> list[float]:
    """AdamW on the trainable parameters; lr warms up over 5% of steps, then cosine to 10%.

    Returns the mean loss of each tenth of the run; the losses of the first
    :data:`FIRST_LOSSES` steps are appended to ``first_losses`` when given. ``progress``: the
    label of a tqdm bar over the steps (None: no bar)."""
    from tqdm import tqdm

    rng = random.Random(seed)
    torch.manual_seed(seed)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    losses: list[float] = []
    bar = tqdm(
        total=steps, desc=progress, disable=progress is None, unit="step", leave=False, ncols=90
    )
    for step in range(steps):
        input_ids, mask, labels = collate([sample(rng) for _ in range(batch)], pad_id)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if first_losses is not None and step < FIRST_LOSSES:
            first_losses.append(losses[-1])
        bar.update()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    tenth = max(1, steps // 10)
    return [
        round(sum(losses[i : i + tenth]) / len(losses[i : i + tenth]), 4)
        for i in range(0, steps, tenth)
    ]


def _lora(model, profile: Profile):
    import peft

    config = peft.LoraConfig(
        r=profile.lora_rank,
        lora_alpha=profile.lora_alpha,
        target_modules=list(profile.lora_targets),
        lora_dropout=0.0,
        bias="none",
    )
    with warnings.catch_warnings():  # transformers' is_gradient_checkpointing deprecation
        warnings.simplefilter("ignore", FutureWarning)
        return peft.get_peft_model(model, config)


def _write_stage(path: str, info: dict) -> None:
    with open(os.path.join(path, "stage.json"), "w", encoding="utf-8") as fp:
        json.dump(info, fp, indent=1)


def _done(path: str, key: str, vocabulary_size: int) -> bool:
    """Whether ``path`` holds a finished stage; a folder that disagrees with its key (another
    vocabulary, another recorded key) is an error rather than a silent reuse."""
    if not os.path.isfile(os.path.join(path, "stage.json")):
        return False
    with open(os.path.join(path, "stage.json"), encoding="utf-8") as fp:
        recorded = json.load(fp).get("key", key)
    config = os.path.join(path, "config.json")
    size = vocabulary_size
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as fp:
            size = json.load(fp).get("vocab_size", vocabulary_size)
    if recorded != key or size != vocabulary_size:
        raise RuntimeError(
            f"cached stage {path} does not match its settings (key {recorded} vs {key}, "
            f"vocabulary {size} vs {vocabulary_size}); delete the folder to retrain it"
        )
    return True


def _load(path: str):
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)


@dataclass(frozen=True)
class World:
    """Folders of the trained models of one profile."""

    unaligned: str
    aligned: str
    finetuned: dict[float, str]  # harmful fraction -> LoRA adapter folder
    safety: str
    trained: tuple[str, ...]  # stages trained in this call (empty: everything was cached)

    def stage_info(self, path: str) -> dict:
        with open(os.path.join(path, "stage.json"), encoding="utf-8") as fp:
            return json.load(fp)


def stage_folder(profile: Profile, cache_root: str, stage: str) -> str:
    """``<cache_root>/<stage>-<key>``: shared by every profile whose stage is identical."""
    return os.path.join(cache_root, f"{stage}-{profile.stage_key(stage)}")


def build_world(
    profile: Profile,
    cache_root: str,
    log: Callable[[str], None] = print,
    progress: bool = False,
) -> World:
    """Train (or load from ``cache_root``) every model of ``profile``; ``progress`` shows a bar
    over the steps of each stage that trains."""
    import transformers

    os.makedirs(cache_root, exist_ok=True)
    vocab = Vocabulary(profile.world)
    pad = vocab.ids[w.PAD]
    trained: list[str] = []
    folder = {s: stage_folder(profile, cache_root, s) for s in ("unaligned", "aligned", "safety")}

    def run(stage: str, path: str, body: Callable[[], tuple[torch.nn.Module, dict]]) -> None:
        key = profile.stage_key(stage)
        if _done(path, key, len(vocab)):
            return
        log(f"training {stage} -> {path}")
        start = time.perf_counter()
        model, info = body(stage)
        if model is not None:  # None: the stage published its own folder (safety)
            model.save_pretrained(path, safe_serialization=True)
        save_tokenizer(vocab, path)
        info["seconds"] = round(time.perf_counter() - start, 1)
        info["settings"] = json.loads(json.dumps(asdict(profile)))
        info["key"] = key
        info["code"] = code_fingerprint()
        _write_stage(path, info)
        trained.append(stage)
        log(f"  {stage}: {info['seconds']} s, loss by tenth of the run {info['loss']}")

    def loop(stage: str, model, sample, steps: int, lr: float, seed: int) -> dict:
        first: list[float] = []
        loss = train_loop(
            model,
            sample,
            steps=steps,
            lr=lr,
            batch=profile.batch,
            seed=seed,
            pad_id=pad,
            progress=f"  {stage}" if progress else None,
            first_losses=first,
        )
        return {"stage": stage, "loss": loss, "first_losses": first}

    def unaligned(stage: str):
        torch.manual_seed(profile.seed)
        model = transformers.LlamaForCausalLM(model_config(profile, vocab))
        sample = pretrain_sampler(profile, vocab)
        lr, seed = profile.pretrain_lr, profile.seed + 1
        return model, loop(stage, model, sample, profile.pretrain_steps, lr, seed)

    def aligned(stage: str):
        model = _load(folder["unaligned"])
        sample = align_sampler(profile, vocab)
        lr, seed = profile.align_lr, profile.seed + 2
        return model, loop(stage, model, sample, profile.align_steps, lr, seed)

    def lora(data: list[Example], steps: int, lr: float, seed: int, **extra):
        def body(stage: str):
            torch.manual_seed(seed)
            model = _lora(_load(folder["aligned"]), profile)
            info = loop(stage, model, dataset_sampler(data), steps, lr, seed)
            return model, {**info, "examples": len(data), **extra}

        return body

    run("unaligned", folder["unaligned"], unaligned)
    run("aligned", folder["aligned"], aligned)
    finetuned = {}
    n_task = len(w.task_splits(profile.world)["train"])
    for fraction in profile.harmful_fractions:  # one seed for all: a paired comparison
        stage = finetune_stage(fraction)
        path = stage_folder(profile, cache_root, stage)
        data = task_dataset(profile, vocab, fraction)
        body = lora(
            data,
            profile.task_steps,
            profile.task_lr,
            profile.seed + 3,
            harmful_fraction=fraction,
            task_examples=n_task,
        )
        run(stage, path, body)
        finetuned[fraction] = path

    def safety(stage: str):
        report = train_safety_lora(profile, folder["aligned"], folder["safety"], progress)
        training = report["training"]
        first = training["losses"][:FIRST_LOSSES]
        info = {
            "stage": stage,
            "loss": [round(x, 4) for x in training["loss_by_tenth"]],
            "first_losses": first,
            "examples": report["data"]["train_examples"],
            "trainer": "safemerge safety-lora (TRL SFTTrainer)",
            "warnings": report["warnings"],
        }
        return None, info

    run("safety", folder["safety"], safety)
    return World(
        unaligned=folder["unaligned"],
        aligned=folder["aligned"],
        finetuned=finetuned,
        safety=folder["safety"],
        trained=tuple(trained),
    )
