"""The TRL call: a PEFT LoRA trained with ``SFTTrainer`` on prompt-completion chats.

The only module that imports TRL (and ``datasets``), when :func:`train_lora` runs. Each example
is a conversational prompt-completion row, ``{"prompt": [turns], "completion": [{"role":
"assistant", ...}]}``: TRL renders both with the aligned model's chat template and puts the loss
on the completion tokens only (``completion_only_loss``), which works with every template
(``assistant_only_loss`` needs ``{% generation %}`` markers that Llama-2, Llama-3.1 and Qwen2
templates lack).
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from mergekit_safemerge.train.data import Message


@dataclass(frozen=True)
class LoraSchedule:
    """What the trainer is told: the LoRA's shape and the optimisation."""

    targets: tuple[str, ...]
    rank: int
    alpha: float
    epochs: float
    max_steps: int | None
    lr: float
    batch_size: int
    max_length: int
    seed: int


@dataclass(frozen=True)
class Trained:
    """The trained PEFT model and its per-step training losses."""

    model: object
    losses: list[float]
    steps: int
    epochs: float


def loss_by_tenth(losses: Sequence[float]) -> list[float]:
    """Mean loss of each tenth of the run (``ceil(steps / 10)`` steps per part)."""
    if not losses:
        return []
    size = max(1, math.ceil(len(losses) / 10))
    return [
        sum(losses[i : i + size]) / len(losses[i : i + size]) for i in range(0, len(losses), size)
    ]


def rows(examples: Sequence[tuple[list[Message], str]]) -> list[dict]:
    """Conversational prompt-completion rows for TRL."""
    return [
        {"prompt": prompt, "completion": [{"role": "assistant", "content": response}]}
        for prompt, response in examples
    ]


@contextlib.contextmanager
def _no_datasets_bars() -> Iterator[None]:
    """The ``datasets`` map bars of TRL's data preparation (tokenizing, building labels,
    truncating: a fraction of a second each) hidden for the call; restored."""
    from datasets.utils import logging as ds_logging

    enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            ds_logging.enable_progress_bar()


def train_lora(
    model,
    tokenizer,
    examples: Sequence[tuple[list[Message], str]],
    schedule: LoraSchedule,
    *,
    device: str,
    progress: bool,
) -> Trained:
    """Train a LoRA on ``model`` (already on ``device``) with TRL's ``SFTTrainer``.

    LoRA dropout 0, no bias; bf16 mixed precision and gradient checkpointing on a GPU, float32
    on the CPU; a step's loss is logged every step; no checkpoint is saved (a scratch folder is
    the trainer's ``output_dir`` and is removed).
    """
    import datasets
    import peft
    import transformers
    import trl

    on_cpu = device == "cpu"
    lora = peft.LoraConfig(
        r=schedule.rank,
        lora_alpha=schedule.alpha,
        target_modules=list(schedule.targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with (
        tempfile.TemporaryDirectory(prefix="safemerge-safety-lora-") as scratch,
        _no_datasets_bars(),
    ):
        config = trl.SFTConfig(
            output_dir=scratch,
            num_train_epochs=schedule.epochs,
            max_steps=schedule.max_steps if schedule.max_steps else -1,
            learning_rate=schedule.lr,
            per_device_train_batch_size=schedule.batch_size,
            max_length=schedule.max_length,
            completion_only_loss=True,
            packing=False,
            seed=schedule.seed,
            data_seed=schedule.seed,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            bf16=not on_cpu,
            fp16=False,
            use_cpu=on_cpu,
            gradient_checkpointing=not on_cpu,
            disable_tqdm=not progress,
            dataloader_num_workers=0,
        )
        transformers.set_seed(schedule.seed)  # the LoRA's A factors are drawn at wrapping
        trainer = trl.SFTTrainer(
            model=model,
            args=config,
            train_dataset=datasets.Dataset.from_list(rows(examples)),
            processing_class=tokenizer,
            peft_config=lora,
        )
        # transformers prints every logged step (PrinterCallback, or the bar's write-out);
        # one bar with the loss in its postfix instead
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
        trainer.remove_callback(transformers.trainer_callback.ProgressCallback)
        if progress:
            trainer.add_callback(_loss_bar())
        trainer.train()
    losses = [float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    trained = trainer.model
    trained.eval()
    return Trained(
        model=trained,
        losses=losses,
        steps=int(trainer.state.global_step),
        epochs=float(trainer.state.epoch or 0.0),
    )


def _loss_bar():
    """A tqdm bar over the training steps with the latest loss."""
    from tqdm import tqdm
    from transformers import TrainerCallback

    class LossBar(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, desc="training the safety LoRA", unit="step")

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{float(logs['loss']):.3f}")

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return LossBar()
