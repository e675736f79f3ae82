"""One model in memory for a whole grid: the fine-tuned model as a merge would write it, and
each point's merge swapped in and out of it.

:class:`TunableModel` starts from exactly what ``mergekit-yaml`` writes with ``select: none``
(the fine-tuned model in the recipe's dtype), loaded once in the evaluation dtype. A point
writes, for each selected matrix, what ``mergekit-yaml`` would write for it,
``combine(W_al, D, S)`` from the same inputs by the same functions
(:func:`mergekit_safemerge.core.rule.combine`), and puts the fine-tuned weights back afterwards.
Memory: the model, plus each candidate's ``W_al`` and its fine-tuned and safety inputs (full
weights in the recipe's dtype, or LoRA factors), plus the fine-tuned weights of the matrices a
point changes while it is evaluated.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator, Mapping

import torch

from mergekit_safemerge.binding.resolve import TensorInputs
from mergekit_safemerge.core.rule import combine
from mergekit_safemerge.core.updates import LoraFactors, Update
from mergekit_safemerge.errors import SafeMergeError


def merged_weight(inputs: TensorInputs, safety_weight: float, *, safety: bool = True):
    """What a merge writes for a selected matrix at ``safety_weight``: ``combine(W_al, D, S)``
    in the recipe's dtype; ``safety=False`` leaves the safety update out (``S = 0``)."""
    delta = inputs.delta()
    safety_delta: Update = inputs.safety_delta() if safety else _zero_like(delta)
    settings = dataclasses.replace(inputs.settings, safety_weight=safety_weight)
    aligned = inputs.aligned.tensor
    return combine(settings.combine, aligned, delta, safety_delta, settings, aligned.dtype)


def _zero_like(update: Update) -> Update:
    if isinstance(update, LoraFactors):
        return LoraFactors(update.left[:, :0], update.right[:0])
    return torch.zeros_like(update)


class TunableModel:
    """A transformers model holding the fine-tuned weights, with merges swapped in and out.

    ``candidates``: tensor name -> the inputs a merge of that matrix needs; ``finetuned``:
    tensor name -> the weight ``mergekit-yaml`` writes when it keeps the matrix (for every
    tensor the fine-tune changes that the loaded model does not already hold).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        candidates: Mapping[str, TensorInputs],
        finetuned: Mapping[str, torch.Tensor],
    ):
        self.model = model
        self.candidates = dict(candidates)
        self.parameters = dict(model.named_parameters())
        missing = sorted(set(candidates) - set(self.parameters))
        if missing:
            raise SafeMergeError(
                f"tensor {missing[0]}: the evaluated model has no such parameter (tune needs a "
                "model whose weights are named as in the checkpoint)"
            )
        with torch.no_grad():
            for name, weight in finetuned.items():
                if name in self.parameters:
                    self.parameters[name].copy_(weight.to(self.parameters[name].dtype))

    @contextlib.contextmanager
    def weights(self, replaced: Mapping[str, torch.Tensor]) -> Iterator[torch.nn.Module]:
        """The model with ``replaced`` (tensor name -> weight) written in; restored after."""
        saved = {name: self.parameters[name].detach().clone() for name in replaced}
        try:
            with torch.no_grad():
                for name, weight in replaced.items():
                    target = self.parameters[name]
                    target.copy_(weight.to(device=target.device, dtype=target.dtype))
            yield self.model
        finally:
            with torch.no_grad():
                for name, weight in saved.items():
                    self.parameters[name].copy_(weight)

    def merge(
        self, selected: Iterable[str], safety_weight: float, *, safety: bool = True
    ) -> contextlib.AbstractContextManager[torch.nn.Module]:
        """The model with each ``selected`` matrix merged at ``safety_weight``."""
        return self.weights(
            {n: merged_weight(self.candidates[n], safety_weight, safety=safety) for n in selected}
        )
