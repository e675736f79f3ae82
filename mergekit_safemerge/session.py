"""State of the SafeMERGE pass in progress, shared by the run integration, the scan and the merge
method.

mergekit calls the method once per tensor with no notion of a "run", so what a run needs across
tensors lives here: the records collected for the report, whether this pass only measures (the
scan, and the first pass of a ranking selection mode), and the matrices a ranking mode selected.
The session is process-wide on purpose: mergekit may run tensors in worker threads.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from mergekit_safemerge.records import MatrixRecord
from mergekit_safemerge.updates import LoraFactors


@dataclass
class MergeSession:
    """One pass of mergekit over the tensors."""

    measure_only: bool = False  # record rho and the threshold decision; write nothing merged
    ranking: dict[str, str] | None = None  # tensor name -> reason, from a ranking mode
    factor_output: bool = False  # safemerge adapter: collect each update as LoRA factors
    records: list[MatrixRecord] = field(default_factory=list)
    factors: dict[str, LoraFactors] = field(default_factory=dict)  # tensor name -> its update
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, record: MatrixRecord, factors: LoraFactors | None = None) -> None:
        """Thread-safe: mergekit may execute tensors in several threads."""
        with self._lock:
            self.records.append(record)
            if factors is not None:
                self.factors[record.name] = factors

    def add_factors(self, name: str, factors: LoraFactors) -> None:
        """An update kept as it is (a tensor that is not a candidate), for the adapter output."""
        with self._lock:
            self.factors[name] = factors


_active: MergeSession | None = None


@contextlib.contextmanager
def active_session(session: MergeSession) -> Iterator[MergeSession]:
    global _active
    previous, _active = _active, session
    try:
        yield session
    finally:
        _active = previous


def current_session() -> MergeSession | None:
    """The pass in progress, or None when the method is called outside a SafeMERGE run."""
    return _active
