"""SafeMERGE's per-matrix criterion, in pure torch.

Notation (one weight matrix, shape ``out x in``):

* ``V = W_aligned - W_unaligned``  the alignment ("safety subspace") matrix;
* ``D = W_finetuned - W_aligned``  the fine-tuning update;
* ``C = V V^T / ||V||_F``          SafeLoRA's projection (``out x out``; not idempotent);
* ``rho = cos(C D, D) = <C D, D>_F / (||C D||_F ||D||_F)``.

``C`` is never built. With the Gram product ``P = V V^T D`` (``= ||V||_F C D``):

* ``<C D, D>_F = <P, D>_F / ||V||_F = ||V^T D||_F^2 / ||V||_F``
* ``||C D||_F  = ||P||_F / ||V||_F``

so ``rho = <P, D>_F / (||P||_F ||D||_F)``: the ``1/||V||_F`` cancels and ``rho`` is invariant to
the scale of ``D`` and to its sign. ``P`` is formed in the cheaper order,
``(V V^T) D`` when ``out < in`` and ``V (V^T D)`` otherwise, so the only intermediate is
``min(out, in)`` squared and the cost is ``2 * out * in * min(out, in)`` multiply-adds.
"""

from __future__ import annotations

import torch

WORK_DTYPE = torch.float32
"""Every criterion figure is computed in float32, whatever the dtype of the inputs."""


def alignment_projection(delta: torch.Tensor, alignment: torch.Tensor) -> torch.Tensor:
    """``P = V V^T D`` (``out x in``, float32), i.e. ``||V||_F * C D``, in the cheaper order."""
    d = delta.to(WORK_DTYPE)
    v = alignment.to(WORK_DTYPE)
    if d.ndim != 2 or d.shape != v.shape:
        raise ValueError(
            f"alignment_projection needs two matrices of one shape; got {tuple(d.shape)} "
            f"and {tuple(v.shape)}"
        )
    out_features, in_features = d.shape
    if out_features < in_features:
        return (v @ v.T) @ d  # out x out Gram, then out*out*in
    return v @ (v.T @ d)  # in x in, then out*in*in


def alignment_cosine(delta: torch.Tensor, alignment: torch.Tensor) -> float:
    """``rho = cos(C D, D)`` for ``D`` = ``delta`` and ``V`` = ``alignment`` (both ``out x in``).

    Exact in float32 without forming ``C``. Conventions for the degenerate cases: ``V = 0``,
    ``D = 0`` or ``C D = 0`` give ``rho = 0``; ``C D`` counts as 0 when
    ``||V V^T D||_F <= eps32 (sqrt(out) + sqrt(in)) ||V||_F^2 ||D||_F``, the size of float32
    rounding (below it the direction of ``C D`` is noise). The result is clamped to ``[0, 1]``,
    the range of the exact value (``<C D, D>_F = ||V^T D||_F^2 / ||V||_F >= 0``).
    """
    d = delta.to(WORK_DTYPE)
    projected = alignment_projection(d, alignment)
    projected_norm = torch.linalg.vector_norm(projected)
    delta_norm = torch.linalg.vector_norm(d)
    alignment_norm = torch.linalg.vector_norm(alignment.to(WORK_DTYPE))
    out_features, in_features = d.shape
    rounding = torch.finfo(WORK_DTYPE).eps * (out_features**0.5 + in_features**0.5)
    if not projected_norm > rounding * alignment_norm**2 * delta_norm:
        return 0.0
    denominator = projected_norm * delta_norm
    rho = torch.sum(projected * d) / denominator
    return float(rho.clamp(0.0, 1.0))


def frobenius_norm(matrix: torch.Tensor) -> float:
    """``||X||_F`` in float32."""
    return float(torch.linalg.vector_norm(matrix.to(WORK_DTYPE)))


def update_cosine(first: torch.Tensor, second: torch.Tensor) -> float:
    """``cos(X, Y) = <X, Y>_F / (||X||_F ||Y||_F)`` in float32; 0 when either is zero.

    Used for the report's ``cos(D, S)``: does the safety update point along the fine-tune?
    """
    x = first.to(WORK_DTYPE)
    y = second.to(WORK_DTYPE)
    denominator = torch.linalg.vector_norm(x) * torch.linalg.vector_norm(y)
    if not denominator > 0:
        return 0.0
    return float(torch.sum(x * y) / denominator)
