"""The record of one candidate matrix: what was measured, every value applied, what was decided.

Pure Python. The rule (:mod:`.rule`) makes one :class:`MatrixRecord` per candidate; the report,
the scan and the adapter output only read them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

MERGED = "merged"
KEPT = "kept"

_BLOCK_PATTERN = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class MatrixRecord:
    """One candidate matrix (``out x in``).

    Measured: ``rho = cos(C D, D)`` (None when ``D = 0``: no criterion is computed), the norms
    ``||D||_F``, ``||S||_F``, ``||V||_F`` and ``cos(D, S)``, and how ``rho`` was computed
    (``dense``, ``low-rank (rank <= r)`` or ``factored``). Applied: every setting that may differ
    per matrix through mergekit's ``filter:`` values (threshold, safety_weight, combine,
    density) and the selection mode.
    """

    name: str
    shape: tuple[int, int]
    rho: float | None
    decision: str  # MERGED or KEPT
    reason: str
    delta_norm: float  # ||D||_F, D = W_finetuned - W_aligned
    safety_norm: float  # ||S||_F, S = W_safety - W_aligned
    alignment_norm: float  # ||V||_F, V = W_aligned - W_unaligned
    delta_safety_cosine: float  # cos(D, S); 0 when either is 0
    criterion: str  # dense, low-rank (rank <= r), factored, or none (D = 0)
    threshold: float
    safety_weight: float
    combine: str
    density: float
    select: str = "threshold"

    @property
    def merged(self) -> bool:
        return self.decision == MERGED

    @property
    def module(self) -> str:
        """The module type, e.g. ``q_proj`` for ``model.layers.3.self_attn.q_proj.weight``."""
        parts = self.name.split(".")
        if len(parts) >= 2 and parts[-1] in ("weight", "bias"):
            return parts[-2]
        return parts[-1]

    @property
    def block(self) -> int | None:
        """The index of the transformer block, when the name has one."""
        match = _BLOCK_PATTERN.search(self.name)
        return int(match.group(1)) if match else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["shape"] = list(self.shape)
        data["module"] = self.module
        data["block"] = self.block
        return data


def sort_records(records: Iterable[MatrixRecord]) -> list[MatrixRecord]:
    """Order by block, then name, so reports read top to bottom like the model."""
    return sorted(records, key=lambda r: (r.block if r.block is not None else -1, r.name))
