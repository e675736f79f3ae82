"""Weight updates of one matrix, dense or as LoRA factors, and their inner products. Pure torch.

An update (``D`` of the fine-tune, ``S`` of the safety model; ``out x in``) is either a dense
float32 tensor or :class:`LoraFactors` ``L R`` (``out x r`` times ``r x in``). Norms and inner
products never form a factored update densely:

* ``<L R, X>_F       = <L^T X, R>_F``                 (``O(out * in * r)``)
* ``<L1 R1, L2 R2>_F = <L1^T L2, R1 R2^T>_F``         (``O((out + in) * r1 * r2)``)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WORK_DTYPE = torch.float32
"""Every figure of the method is computed in float32, whatever the dtype of the inputs."""


@dataclass(frozen=True)
class LoraFactors:
    """``D = left @ right`` with ``left = s B`` (``out x r``) and ``right = A`` (``r x in``).

    ``scaling`` is the adapter's ``s`` (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA),
    already folded into ``left``; kept for rules that need ``B`` itself (``B = left / s``).
    """

    left: torch.Tensor
    right: torch.Tensor
    scaling: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.right.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.left.shape[0]), int(self.right.shape[1])

    def dense(self) -> torch.Tensor:
        """The dense update ``L R`` (float32)."""
        return self.left.to(WORK_DTYPE) @ self.right.to(WORK_DTYPE)

    @classmethod
    def empty(cls, like: torch.Tensor) -> LoraFactors:
        """Rank-0 factors of ``like``'s shape: the update of an adapter that skips the module."""
        out_features, in_features = like.shape
        device = like.device
        return cls(
            torch.zeros(out_features, 0, dtype=WORK_DTYPE, device=device),
            torch.zeros(0, in_features, dtype=WORK_DTYPE, device=device),
        )

    def to(self, device: torch.device | str) -> LoraFactors:
        return LoraFactors(
            self.left.to(device=device, dtype=WORK_DTYPE),
            self.right.to(device=device, dtype=WORK_DTYPE),
            self.scaling,
        )


Update = torch.Tensor | LoraFactors


def dense(update: Update) -> torch.Tensor:
    """``update`` as a dense float32 matrix."""
    return update.dense() if isinstance(update, LoraFactors) else update.to(WORK_DTYPE)


def inner_product(first: Update, second: Update) -> torch.Tensor:
    """``<X, Y>_F`` (a float32 scalar tensor) for dense or factored updates."""
    if isinstance(first, LoraFactors) and isinstance(second, LoraFactors):
        return torch.sum((first.left.T @ second.left) * (first.right @ second.right.T))
    if isinstance(second, LoraFactors):
        first, second = second, first
    if isinstance(first, LoraFactors):
        return torch.sum((first.left.T @ second.to(WORK_DTYPE)) * first.right)
    return torch.vdot(first.reshape(-1), second.reshape(-1))


def squared_norm(update: Update) -> torch.Tensor:
    """``||X||_F^2`` (a float32 scalar tensor)."""
    return inner_product(update, update)


def frobenius_norm(update: Update) -> float:
    """``||X||_F``; NaN or Inf when an entry is (the caller's NaN/Inf check relies on it)."""
    return float(squared_norm(update).clamp_min(0).sqrt())


def update_cosine(first: Update, second: Update, first_norm: float, second_norm: float) -> float:
    """``cos(X, Y) = <X, Y>_F / (||X||_F ||Y||_F)`` given both norms; 0 when either is 0."""
    denominator = first_norm * second_norm
    if not denominator > 0:
        return 0.0
    return max(-1.0, min(1.0, float(inner_product(first, second)) / denominator))
