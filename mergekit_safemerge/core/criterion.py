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
``(V V^T) D`` when ``out <= in`` (from the blocks of ``V V^T`` on and above the diagonal) and
``V (V^T D)`` otherwise, so the only intermediate is ``min(out, in)`` squared and the cost is at
most ``2 * out * in * min(out, in)`` multiply-adds (about ``1.6 * out^2 * in`` when
``out <= in``).

Low-rank path. When ``D = L R`` with ``L`` (``out x r``) and ``R`` (``r x in``), every term
reduces to ``r x r`` Gram matrices (``M = V^T L``, ``G = R R^T``):

* ``||V^T D||_F^2 = <M^T M, G>``, ``||V V^T D||_F^2 = <(V M)^T (V M), G>``,
  ``||D||_F^2 = <L^T L, G>``

for ``O(out * in * r)``. A dense ``D`` that is low rank (a merged LoRA) is detected with a
randomized range finder and an explicit residual check, so the result stays exact to
floating-point tolerance; anything else takes the dense route. The detection is only tried
where it can succeed (:func:`may_be_exactly_low_rank`): an update recovered from 16-bit weights
carries rounding noise far above the residual tolerance, so it always takes the dense route.

``V`` is an :class:`Alignment`: formed from the two weights in float32 row blocks as a pass reads
it. The factored route makes two such passes and never stores ``V``; the dense and low-rank
routes form it whole once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from mergekit_safemerge.core.updates import (
    WORK_DTYPE,
    LoraFactors,
    Update,
    block_scratch,
    block_sum_of_squares,
    dense_inner_product,
    difference,
    row_blocks,
    subtract_block,
)


class Alignment:
    """``V = aligned - unaligned`` (``out x in``), formed in float32 as it is read.

    :meth:`row_blocks` forms one row block of ``V`` at a time into a reused cache-sized buffer
    (:func:`~mergekit_safemerge.core.updates.subtract_block`): a pass reads the two weights in
    their own dtype and no ``out x in`` float32 tensor is made (a fresh one costs its page faults,
    more than the pass itself). :meth:`dense` forms ``V`` whole. ``||V||_F^2`` is summed on the
    first pass and kept (:meth:`squared_norm`). ``Alignment(v)`` wraps a ``V`` already formed
    (converted to float32 once).
    """

    def __init__(self, aligned: torch.Tensor, unaligned: torch.Tensor | None = None):
        if aligned.ndim != 2 or (unaligned is not None and unaligned.shape != aligned.shape):
            shapes = [tuple(x.shape) for x in (aligned, unaligned) if x is not None]
            raise ValueError(f"an alignment matrix needs matrices of one shape; got {shapes}")
        self.aligned, self.unaligned = aligned, unaligned
        self._squared_norm: torch.Tensor | None = None
        self._dense = aligned.to(WORK_DTYPE) if unaligned is None else None

    @property
    def shape(self) -> torch.Size:
        return self.aligned.shape

    def row_blocks(self) -> Iterator[tuple[slice, torch.Tensor]]:
        """``(rows, V[rows])`` (float32) over the row blocks; a block is valid until the next one
        is asked for (one buffer serves them all, unless ``V`` is formed: then views)."""
        scratch = block_scratch(self.shape, self.aligned.device)
        buffer = None if self._dense is not None else torch.empty_like(scratch)
        total = None
        if self._squared_norm is None:
            total = torch.zeros((), dtype=torch.float64, device=self.aligned.device)
        for rows in row_blocks(self.shape):
            if self._dense is not None:
                block = self._dense[rows]
            else:
                count = rows.stop - rows.start
                minuend, subtrahend = self.aligned[rows], self.unaligned[rows]
                block = subtract_block(buffer[:count], minuend, subtrahend, scratch)
            if total is not None:
                total += block_sum_of_squares(block, scratch)
            yield rows, block
        if total is not None:
            self._squared_norm = total

    def dense(self) -> torch.Tensor:
        """``V`` whole (float32), formed once."""
        if self._dense is None:
            self._dense, total = difference(self.aligned, self.unaligned, with_squared_norm=True)
            self._squared_norm = total if self._squared_norm is None else self._squared_norm
        return self._dense

    def squared_norm(self) -> torch.Tensor:
        """``||V||_F^2`` (a float64 scalar tensor; a pass of its own unless one has run)."""
        if self._squared_norm is None:
            for _ in self.row_blocks():
                pass
        return self._squared_norm


def as_alignment(alignment: torch.Tensor | Alignment) -> Alignment:
    """``alignment`` as an :class:`Alignment` (a tensor is ``V`` itself)."""
    return alignment if isinstance(alignment, Alignment) else Alignment(alignment)


def gram_product(matrix: torch.Tensor, other: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """``X X^T Y`` (``rows x cols``) from the blocks of the symmetric ``X X^T`` on and above the
    diagonal only.

    With row blocks ``X_i`` and ``Y_i``: ``G_ij = X_i X_j^T`` for ``i <= j`` (``blocks (blocks + 1)
    / 2`` of the ``blocks^2`` products, about 62% of ``X @ X.T`` for 4 blocks), then
    ``P_i += G_ij Y_j`` and ``P_j += G_ij^T Y_i`` (BLAS reads the transpose in place: no copy,
    and ``X X^T`` is never stored whole). Small matrices take the plain products.
    """
    rows = matrix.shape[0]
    if rows < 512:
        return (matrix @ matrix.T) @ other
    edges = [round(i * rows / blocks) for i in range(blocks + 1)]
    parts = [slice(edges[i], edges[i + 1]) for i in range(blocks)]
    product = torch.zeros(rows, other.shape[1], dtype=other.dtype, device=other.device)
    for i, rows_i in enumerate(parts):
        for rows_j in parts[i:]:
            block = matrix[rows_i] @ matrix[rows_j].T
            product[rows_i].addmm_(block, other[rows_j])
            if rows_j != rows_i:
                product[rows_j].addmm_(block.T, other[rows_i])
    return product


def alignment_projection(delta: torch.Tensor, alignment: torch.Tensor) -> torch.Tensor:
    """``P = V V^T D`` (``out x in``, float32), i.e. ``||V||_F * C D``, in the cheaper order:
    ``(V V^T) D`` from the upper blocks of the symmetric Gram when ``out <= in``, else
    ``V (V^T D)``."""
    d = delta.to(WORK_DTYPE)
    v = alignment.to(WORK_DTYPE)
    if d.ndim != 2 or d.shape != v.shape:
        raise ValueError(
            f"alignment_projection needs two matrices of one shape; got {tuple(d.shape)} "
            f"and {tuple(v.shape)}"
        )
    out_features, in_features = d.shape
    if out_features <= in_features:
        return gram_product(v, d)  # ~0.6 out*out*in for V V^T, then out*out*in
    return v @ (v.T @ d)  # in x in, then out*in*in


def _rounding(shape: torch.Size) -> float:
    """Relative size of float32 rounding in ``V V^T D``; below it ``C D`` counts as 0."""
    out_features, in_features = shape
    return torch.finfo(WORK_DTYPE).eps * (out_features**0.5 + in_features**0.5)


def _cosine_from_squares(
    inner: torch.Tensor,
    projected_sq: torch.Tensor,
    delta_sq: torch.Tensor,
    alignment_sq: torch.Tensor,
    shape: torch.Size,
) -> float:
    """``rho = <P, D> / (||P|| ||D||)`` from ``<P, D>``, ``||P||^2``, ``||D||^2``, ``||V||^2``."""
    projected_norm = projected_sq.clamp_min(0).sqrt()
    delta_norm = delta_sq.clamp_min(0).sqrt()
    if not projected_norm > _rounding(shape) * alignment_sq * delta_norm:
        return 0.0
    return float((inner / (projected_norm * delta_norm)).clamp(0.0, 1.0))


def dense_alignment_cosine(
    delta: torch.Tensor,
    alignment: torch.Tensor | Alignment,
    *,
    delta_sq: torch.Tensor | None = None,
    alignment_sq: torch.Tensor | None = None,
) -> float:
    """``rho = cos(C D, D)`` for ``D`` = ``delta`` and ``V`` = ``alignment`` (both ``out x in``).

    Exact in float32 without forming ``C``. Conventions for the degenerate cases: ``V = 0``,
    ``D = 0`` or ``C D = 0`` give ``rho = 0``; ``C D`` counts as 0 when
    ``||V V^T D||_F <= eps32 (sqrt(out) + sqrt(in)) ||V||_F^2 ||D||_F``, the size of float32
    rounding (below it the direction of ``C D`` is noise). The result is clamped to ``[0, 1]``,
    the range of the exact value (``<C D, D>_F = ||V^T D||_F^2 / ||V||_F >= 0``).
    ``delta_sq`` / ``alignment_sq`` (``||D||_F^2``, ``||V||_F^2``) save a pass when known. The
    inner products are summed by blocks (:func:`.updates.dense_inner_product`): a float32
    ``vdot`` over a whole matrix drifts by about ``1e-4``.
    """
    d = delta.to(WORK_DTYPE)
    v = as_alignment(alignment)
    matrix = v.dense()
    if alignment_sq is None:
        alignment_sq = v.squared_norm()
    if not torch.isfinite(alignment_sq):  # a NaN or Inf in V: no products (the caller raises)
        return 0.0
    projected = alignment_projection(d, matrix)
    if delta_sq is None:
        delta_sq = dense_inner_product(d, d)
    return _cosine_from_squares(
        dense_inner_product(projected, d),
        dense_inner_product(projected, projected),
        delta_sq,
        alignment_sq,
        d.shape,
    )


def factored_alignment_cosine(
    left: torch.Tensor,
    right: torch.Tensor,
    alignment: torch.Tensor | Alignment,
    *,
    alignment_sq: torch.Tensor | None = None,
) -> float:
    """``rho`` for ``D = left @ right`` (``out x r`` times ``r x in``) in ``O(out * in * r)``.

    Same value and conventions as :func:`dense_alignment_cosine`, through ``r x r`` Grams:
    ``<P, D> = <M^T M, G>``, ``||P||^2 = <(V M)^T (V M), G>``, ``||D||^2 = <L^T L, G>`` with
    ``M = V^T L`` and ``G = R R^T``. Two passes over the row blocks ``V_i`` of ``V`` (``M``
    needs all of ``V`` before ``V M`` can start): ``M^T = sum_i L_i^T V_i`` (``||V||_F^2`` on the
    way), then ``(V M)_i = V_i M``. Both products are written with ``V`` on the right of a few
    rows or on the left of a few columns, BLAS's fast orders (``V^T L`` with the transposed ``V``
    on the left is several times slower). ``alignment_sq`` (``||V||_F^2``) is used when given.
    """
    v = as_alignment(alignment)
    lhs = left.to(WORK_DTYPE)
    rhs = right.to(WORK_DTYPE)
    if lhs.shape[0] != v.shape[0] or rhs.shape[1] != v.shape[1] or lhs.shape[1] != rhs.shape[0]:
        raise ValueError(
            f"factors {tuple(lhs.shape)} x {tuple(rhs.shape)} do not make a {tuple(v.shape)} matrix"
        )
    gram_right = rhs @ rhs.T
    m_t = torch.zeros(lhs.shape[1], v.shape[1], dtype=WORK_DTYPE, device=lhs.device)  # M^T
    for rows, block in v.row_blocks():
        m_t.addmm_(lhs[rows].T, block)
    vm = torch.empty(v.shape[0], lhs.shape[1], dtype=WORK_DTYPE, device=lhs.device)  # V M
    for rows, block in v.row_blocks():
        torch.mm(block, m_t.T, out=vm[rows])
    if alignment_sq is None:
        alignment_sq = v.squared_norm()
    return _cosine_from_squares(
        torch.sum((m_t @ m_t.T) * gram_right),
        torch.sum((vm.T @ vm) * gram_right),
        torch.sum((lhs.T @ lhs) * gram_right),
        alignment_sq,
        v.shape,
    )


LOW_RANK_TOLERANCE = 1e-5
"""Accept ``D = Q (Q^T D)`` when ``||D - Q Q^T D||_F <= 1e-5 ||D||_F``."""


def _range_basis(sketch: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (``out x k``, ``k <= columns``) of the column space of ``sketch``.

    Through the eigen-decomposition of the small Gram matrix ``Y^T Y`` in float64, dropping
    directions below ``1e-14`` of the largest eigenvalue. It handles a rank-deficient sketch (a
    ``D`` of rank below the sketch width) and avoids ``torch.linalg.qr``, which is far slower on
    tall-skinny CPU matrices. Orthonormality only speeds acceptance up: the final residual check
    is exact for any basis.
    """
    gram = (sketch.T @ sketch).to(torch.float64)
    values, vectors = torch.linalg.eigh(gram)
    keep = values > 1e-14 * values[-1].clamp_min(torch.finfo(torch.float64).tiny)
    transform = (vectors[:, keep] / values[keep].sqrt()).to(sketch.dtype)
    return sketch @ transform


def low_rank_factors(
    delta: torch.Tensor, *, max_rank: int = 64, tolerance: float = LOW_RANK_TOLERANCE
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Factors ``(Q, Q^T D)`` of a low-rank ``D`` (``out x in``), or None when it is not.

    Randomized range finder: ``Q = orth(D Omega)`` with a Gaussian ``Omega`` of 16, 32, 64
    columns (fixed seed, the caller's RNG untouched). Each try is first judged on four Gaussian
    probes, ``e = ||(I - Q Q^T) D w|| / ||D w||``, a few matrix-vector products; only a promising
    try (``e <= 10 tolerance``) pays for the exact residual ``||D - Q Q^T D||_F``, and ``Q`` is
    accepted only when that is within ``tolerance`` of ``||D||_F``. The search stops when
    doubling the sketch leaves ``e`` nearly unchanged (``> 0.9`` of the previous try: no low-rank
    structure, e.g. rounding noise), or at ``min(max_rank, min(out, in) / 4)`` columns, beyond
    which the dense route is as cheap; ``min(out, in) < 64`` always takes the dense route.
    """
    d = delta.to(WORK_DTYPE)
    out_features, in_features = d.shape
    limit = min(max_rank, min(out_features, in_features) // 4)
    if limit < 16:  # small matrices: the dense route is cheap enough
        return None
    generator = torch.Generator(device=d.device).manual_seed(0)
    probes = d @ torch.randn(in_features, 4, generator=generator, device=d.device)
    probe_norm = torch.linalg.vector_norm(probes)
    if not probe_norm > 0:
        return None
    columns, previous = min(16, limit), None
    while True:
        sketch = torch.randn(in_features, columns, generator=generator, device=d.device)
        q = _range_basis(d @ sketch)
        estimate = float(torch.linalg.vector_norm(probes - q @ (q.T @ probes)) / probe_norm)
        if estimate <= 10 * tolerance:
            coefficients = q.T @ d
            residual = torch.linalg.vector_norm(d - q @ coefficients)
            if residual <= tolerance * torch.linalg.vector_norm(d):
                return q, coefficients
        if columns >= limit or (previous is not None and estimate > 0.9 * previous):
            return None
        columns, previous = min(2 * columns, limit), estimate


@dataclass(frozen=True)
class Criterion:
    """``rho`` and how it was computed: ``dense``, ``low-rank`` (detected) or ``factored``."""

    rho: float
    path: str
    rank: int | None = None  # columns of the factors on the low-rank paths

    def describe(self) -> str:
        return self.path if self.rank is None else f"{self.path} (rank <= {self.rank})"


_SIXTEEN_BIT = (torch.bfloat16, torch.float16)


def may_be_exactly_low_rank(finetuned: torch.Tensor, samples: int = 1024) -> bool:
    """False when ``D = W_ft - W_al`` cannot pass the low-rank residual check.

    Weights held in a 16-bit dtype, or float32 values that are all bfloat16 numbers (a sample
    of ``samples`` entries with zero low 16 bits), round every entry of ``W_ft`` to a relative
    precision ``u`` (``2^-8`` for bfloat16, ``2^-11`` for float16), so ``D`` carries full-rank
    noise of about ``u ||W_ft||_F / 2``, far above ``LOW_RANK_TOLERANCE * ||D||_F`` for any
    update smaller than the weight itself. Only float32-precision weights try the detection.
    """
    if finetuned.dtype in _SIXTEEN_BIT:
        return False
    if finetuned.dtype != torch.float32 or finetuned.numel() == 0:
        return True
    flat = finetuned.reshape(-1)
    step = max(1, flat.numel() // samples)
    sample = flat[::step].contiguous().view(torch.int32)
    return bool(torch.any(sample & 0xFFFF))


def alignment_criterion(
    delta: Update,
    alignment: torch.Tensor | Alignment,
    *,
    detect_low_rank: bool = True,
    delta_sq: torch.Tensor | None = None,
    alignment_sq: torch.Tensor | None = None,
) -> Criterion:
    """``rho`` by the cheapest exact route: factored for LoRA factors; for a dense ``D`` the
    low-rank route when ``detect_low_rank`` and the detection succeeds, else the dense route."""
    if isinstance(delta, LoraFactors):
        rho = factored_alignment_cosine(
            delta.left, delta.right, alignment, alignment_sq=alignment_sq
        )
        return Criterion(rho, "factored", delta.rank)
    if delta.ndim != 2 or delta.shape != alignment.shape:
        raise ValueError(
            f"the criterion needs two matrices of one shape; got {tuple(delta.shape)} "
            f"and {tuple(alignment.shape)}"
        )
    factors = low_rank_factors(delta) if detect_low_rank else None
    if factors is None:
        rho = dense_alignment_cosine(delta, alignment, delta_sq=delta_sq, alignment_sq=alignment_sq)
        return Criterion(rho, "dense")
    left, right = factors
    return Criterion(factored_alignment_cosine(left, right, alignment), "low-rank", left.shape[1])


def alignment_cosine(delta: torch.Tensor, alignment: torch.Tensor) -> float:
    """``rho = cos(C D, D)`` by the cheapest exact route (see :func:`alignment_criterion`)."""
    return alignment_criterion(delta, alignment).rho
