"""Weight updates of one matrix, dense or as LoRA factors, and their inner products. Pure torch.

An update (``D`` of the fine-tune, ``S`` of the safety model; ``out x in``) is either a dense
float32 tensor or :class:`LoraFactors` ``L R`` (``out x r`` times ``r x in``). Norms and inner
products never form a factored update densely:

* ``<L R, X>_F       = <L^T X, R>_F``                 (``O(out * in * r)``)
* ``<L1 R1, L2 R2>_F = <L1^T L2, R1 R2^T>_F``         (``O((out + in) * r1 * r2)``)

Whole-matrix passes (:func:`difference`, :func:`dense_inner_product`, :func:`weight_plus`) go by
row blocks of about :data:`BLOCK_ELEMENTS` entries: each block is converted to float32 and used
while it is in cache, so a 16-bit weight is never copied to float32 whole, and sums run in
float32 within a block and in float64 across blocks (docs/performance.md, "Precision of each
step").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

WORK_DTYPE = torch.float32
"""Every figure of the method is computed in float32, whatever the dtype of the inputs."""

BLOCK_ELEMENTS = 1 << 20
"""Entries per block of a blocked pass: 4 MiB of float32, within a CPU's last-level cache."""


def row_blocks(shape: tuple[int, ...] | torch.Size, elements: int = BLOCK_ELEMENTS) -> list[slice]:
    """Row slices of an ``out x in`` matrix of about ``elements`` entries each (at least one
    row; one slice for anything that is not a matrix)."""
    if len(shape) != 2:
        return [slice(None)]
    rows, columns = int(shape[0]), int(shape[1])
    step = max(1, elements // max(1, columns))
    return [slice(start, min(rows, start + step)) for start in range(0, rows, step)]


def subtract_block(
    out: torch.Tensor, minuend: torch.Tensor, subtrahend: torch.Tensor, scratch: torch.Tensor
) -> torch.Tensor:
    """``out = minuend - subtrahend`` in float32 for one block (``out``: float32, the block's
    shape; ``scratch``: float32, at least as many rows).

    Each operand is converted to float32 first and the subtraction runs in float32: exact for
    two bfloat16 or float16 numbers (unless their exponents are more than 16 apart: then
    correctly rounded), where ``torch.sub`` of two 16-bit tensors subtracts in 16 bits. float64
    operands are subtracted in float64 and rounded once.
    """
    if torch.float64 in (minuend.dtype, subtrahend.dtype):
        return out.copy_(minuend.to(torch.float64) - subtrahend.to(torch.float64))
    out.copy_(minuend)
    if subtrahend.dtype != WORK_DTYPE:
        subtrahend = scratch[: subtrahend.shape[0]].copy_(subtrahend)
    return out.sub_(subtrahend)


def block_scratch(shape: tuple[int, ...] | torch.Size, device: torch.device) -> torch.Tensor:
    """A float32 buffer for the largest row block of a matrix of ``shape`` (:func:`row_blocks`)."""
    blocks = row_blocks(shape)
    if len(shape) != 2 or not blocks:
        return torch.empty(shape, dtype=WORK_DTYPE, device=device)
    return torch.empty(blocks[0].stop - blocks[0].start, shape[1], dtype=WORK_DTYPE, device=device)


def difference(
    minuend: torch.Tensor, subtrahend: torch.Tensor, *, with_squared_norm: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``X = minuend - subtrahend`` (float32, the operands' shape, :func:`subtract_block` by row
    blocks) and, when asked, ``||X||_F^2`` (a float64 scalar tensor, summed per block by
    :func:`block_sum_of_squares`; else None)."""
    if minuend.shape != subtrahend.shape:
        raise ValueError(
            f"difference of {tuple(minuend.shape)} and {tuple(subtrahend.shape)}: shapes differ"
        )
    out = torch.empty(minuend.shape, dtype=WORK_DTYPE, device=minuend.device)
    total = None
    if with_squared_norm:
        total = torch.zeros((), dtype=torch.float64, device=minuend.device)
    scratch = block_scratch(out.shape, out.device)
    for rows in row_blocks(out.shape):
        block = subtract_block(out[rows], minuend[rows], subtrahend[rows], scratch)
        if total is not None:
            total += block_sum_of_squares(block, scratch)
    return out, total


def block_sum_of_squares(block: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``sum_ij X_ij^2`` of one float32 block (a float32 scalar), the squares written into
    ``scratch`` (float32, at least ``block``'s entries): torch's ``sum`` adds in a cascade of
    partial sums (accurate to a few float32 roundings), where a float32 ``vdot`` over many
    entries drifts (about ``1e-4`` relative at 16M entries)."""
    squares = scratch.view(-1)[: block.numel()].view(block.shape)
    return torch.mul(block, block, out=squares).sum()


def dense_inner_product(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``<X, Y>_F`` of two dense tensors of one shape (a float64 scalar tensor): the products of
    each block of :data:`BLOCK_ELEMENTS` entries summed by torch's ``sum`` in float32, the blocks
    in float64. No temporary of the whole size."""
    x, y = first.reshape(-1), second.reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"inner product of {tuple(first.shape)} and {tuple(second.shape)}")
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, x.numel(), BLOCK_ELEMENTS):
        end = start + BLOCK_ELEMENTS
        total += torch.sum(x[start:end].to(WORK_DTYPE) * y[start:end].to(WORK_DTYPE))
    return total


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


def weight_plus(
    weight: torch.Tensor,
    terms: Sequence[tuple[Update, float]],
    dtype: torch.dtype = WORK_DTYPE,
) -> torch.Tensor:
    """``W + sum_k w_k X_k`` for ``terms = ((X_k, w_k), ...)``, computed in float32 and returned
    in ``dtype`` (a new tensor; ``weight`` and the updates are left alone).

    One pass over ``W`` by row blocks: each block is converted from ``weight`` (any dtype) and
    gets every update while it is in cache: ``add_`` of each dense update's block, and the
    factored updates joined into one product ``[w_1 L_1, w_2 L_2, ...][rows] [R_1; R_2; ...]``
    (one ``addmm_`` of rank ``sum_k r_k``). A ``dtype`` other than float32 is rounded once, from
    the float32 block. Terms of weight 0 and factors of rank 0 are skipped.
    """
    dense_terms = [(x, w) for x, w in terms if w != 0.0 and not isinstance(x, LoraFactors)]
    factored = [(x, w) for x, w in terms if w != 0.0 and isinstance(x, LoraFactors) and x.rank]
    left = right = None
    if factored:
        left = torch.cat([w * x.left.to(WORK_DTYPE) for x, w in factored], 1)
        right = torch.cat([x.right.to(WORK_DTYPE) for x, _ in factored], 0)
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    scratch = None if dtype == WORK_DTYPE else block_scratch(weight.shape, weight.device)
    for rows in row_blocks(weight.shape):
        block = out[rows] if scratch is None else scratch[: out[rows].shape[0]]
        block.copy_(weight[rows])
        for update, w in dense_terms:
            block.add_(update[rows].to(WORK_DTYPE), alpha=w)
        if left is not None:
            block.addmm_(left[rows], right)
        if scratch is not None:
            out[rows].copy_(block)
    return out


def inner_product(first: Update, second: Update) -> torch.Tensor:
    """``<X, Y>_F`` for dense or factored updates (a scalar tensor: float64 for two dense
    updates, :func:`dense_inner_product`; float32 through the ``r x r`` Grams otherwise)."""
    if isinstance(first, LoraFactors) and isinstance(second, LoraFactors):
        return torch.sum((first.left.T @ second.left) * (first.right @ second.right.T))
    if isinstance(second, LoraFactors):
        first, second = second, first
    if isinstance(first, LoraFactors):
        return torch.sum((first.left.T @ second.to(WORK_DTYPE)) * first.right)
    return dense_inner_product(first, second)


def squared_norm(update: Update) -> torch.Tensor:
    """``||X||_F^2`` (a scalar tensor, as :func:`inner_product`)."""
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
