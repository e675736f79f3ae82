"""``safemerge safety-lora``: the safety LoRA every recipe's ``safety`` role needs, trained here.

Behind the ``train`` extra (``pip install mergekit-safemerge[train]``: TRL). The aligned model
plus a PEFT LoRA trained once on harmful requests paired with refusals (:mod:`.data`), or on
the aligned model's own judged refusals (``--self-refusals``), through TRL's ``SFTTrainer``
(:mod:`.sft`), measured on held-out prompts before and after, and published as one output
folder (:mod:`.run`, :mod:`.report`).

This module holds only the defaults, so that ``safemerge --help`` imports neither torch's
training stack nor TRL: TRL is imported by :mod:`.sft` when a run trains.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TARGETS = ("q_proj", "v_proj")


@dataclass(frozen=True)
class SafetyLoraOptions:
    """Everything a ``safemerge safety-lora`` run is told (the command's options).

    The LoRA defaults are the authors' setting (r = 8 on q_proj and v_proj, dropout 0); their
    ``lora_alpha`` is unknown because their merge overwrites it with r, so ``alpha`` defaults to
    the rank (scaling 1), which is the update their merge reads.
    """

    data: str
    self_refusals: bool = False
    refusal_patterns: tuple[str, ...] = ()  # empty: the default refusal openings
    targets: tuple[str, ...] = DEFAULT_TARGETS
    rank: int = 8
    alpha: float | None = None  # None: the rank
    epochs: float = 3.0
    max_steps: int | None = None  # set: overrides epochs
    lr: float = 1e-4
    batch_size: int = 8
    max_length: int = 512
    max_new_tokens: int = 128
    seed: int = 0
    eval_fraction: float = 0.1
    device: str = "cpu"
    quiet: bool = False

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


DEFAULTS = SafetyLoraOptions(data="")
"""The defaults the command shows in its help."""
