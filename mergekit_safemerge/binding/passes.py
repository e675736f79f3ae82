"""The passes of a run: what is done with each tensor once the method has resolved its inputs.

mergekit calls the method once per output tensor and has no notion of a run, so the run in
progress says what each tensor is for by making one pass current (:func:`running`):

* :class:`MergePass`, the default: the merged weight goes back to mergekit, which writes it;
* :class:`MeasurePass`: every candidate's ``rho`` and threshold decision are recorded, nothing
  is merged (``safemerge scan`` and the first pass of a ranking selection mode);
* :class:`FactorPass`: every update is collected as LoRA factors (``safemerge adapter``);
* :class:`CollectPass`: every candidate's inputs are kept, to form many merges in memory
  (``safemerge tune``).

Each pass keeps the run's records (and factors) and an :class:`~mergekit_safemerge.lora.read.
AdapterReader`, so adapters are opened once per run. Outside a run (mergekit's own Python API,
``run_merge`` without our wrapper) every tensor gets a fresh :class:`MergePass`. The current
pass is process-wide on purpose: mergekit's multi-GPU executor runs tensors in worker threads,
which do not inherit context variables.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator, Mapping

import torch

from mergekit_safemerge.binding.resolve import TensorInputs
from mergekit_safemerge.core.records import MatrixRecord
from mergekit_safemerge.core.rule import NonFiniteInput, Output, all_finite, apply_rule
from mergekit_safemerge.core.updates import LoraFactors
from mergekit_safemerge.errors import SafeMergeError
from mergekit_safemerge.lora.read import AdapterReader


class Pass:
    """One pass of mergekit over the tensors: records (thread-safe) and what a tensor yields."""

    output: Output = "weight"
    uses_ranking = True  # False: decide by threshold whatever select says (a measuring pass)

    def __init__(self, ranking: Mapping[str, str] | None = None):
        self.ranking = ranking
        self.records: list[MatrixRecord] = []
        self.adapters = AdapterReader()
        self._lock = threading.Lock()

    def _add(self, record: MatrixRecord) -> None:
        with self._lock:
            self.records.append(record)

    def tensor(self, inputs: TensorInputs) -> torch.Tensor:
        """The tensor handed back to mergekit for one output tensor."""
        if not inputs.candidate:
            return self.kept(inputs)
        settings = inputs.settings
        if not self.uses_ranking:
            settings = dataclasses.replace(settings, select="threshold")
        try:
            result = apply_rule(
                inputs.name,
                inputs.aligned.tensor,
                inputs.unaligned,
                inputs.delta(),
                inputs.safety_delta(),
                settings,
                ranking=self.ranking,
                detect_low_rank=inputs.may_be_low_rank(),
                output=self.output,
                dtype=inputs.aligned.tensor.dtype,
            )
        except NonFiniteInput:
            raise inputs.non_finite_error() from None
        self._add(result.record)
        return self.candidate(inputs, result.output, result.record)

    def kept(self, inputs: TensorInputs) -> torch.Tensor:
        """A tensor that is not a candidate."""
        raise NotImplementedError

    def candidate(
        self,
        inputs: TensorInputs,
        output: torch.Tensor | LoraFactors | None,
        record: MatrixRecord,
    ) -> torch.Tensor:
        """A candidate, once the rule has decided it (``output`` None: kept as fine-tuned)."""
        raise NotImplementedError


def _finite(
    name: str, tensor: torch.Tensor, source: str, written: torch.dtype | None = None
) -> torch.Tensor:
    """``tensor``, checked as it will be written (in ``written``, mergekit's ``out_dtype``, when
    that differs): a non-finite weight stops the run."""
    if not all_finite(tensor):
        raise SafeMergeError(
            f"tensor {name} of {source} contains NaN or Inf; SafeMERGE does not write a "
            "model with non-finite weights"
        )
    if written is not None and written != tensor.dtype and tensor.is_floating_point():
        low, high = torch.aminmax(tensor)
        if not bool(torch.isfinite(low.to(written)) & torch.isfinite(high.to(written))):
            largest = torch.finfo(written).max
            raise SafeMergeError(
                f"tensor {name} of {source}: a value ({float(max(-low, high)):.4g}) overflows "
                f"out_dtype {str(written).removeprefix('torch.')} (largest {largest:.6g}) when "
                "written; SafeMERGE does not write a model with non-finite weights (write "
                "bfloat16 or float32)"
            )
    return tensor


class MergePass(Pass):
    """A merge: the merged weight of a selected matrix, the fine-tuned weight otherwise, each
    checked as written (``written``: mergekit's ``out_dtype``, when the run has one)."""

    def __init__(
        self, ranking: Mapping[str, str] | None = None, written: torch.dtype | None = None
    ):
        super().__init__(ranking)
        self.written = written

    def kept(self, inputs: TensorInputs) -> torch.Tensor:
        weight = inputs.finetuned_weight()
        return _finite(inputs.name, weight, inputs.finetuned_source, self.written)

    def candidate(self, inputs, output, record) -> torch.Tensor:
        if output is None:  # its D was measured finite, so only the cast can overflow
            weight = inputs.finetuned_weight()
            if self.written is None:
                return weight
            return _finite(inputs.name, weight, inputs.finetuned_source, self.written)
        # the rule returns the merged weight in the model's dtype (``apply_rule(dtype=...)``)
        return _finite(
            inputs.name, output, "the merge (overflow in the output dtype)", self.written
        )


class MeasurePass(Pass):
    """Records only. mergekit requires a tensor of the input's shape from every call of a group
    method (``GroupMergeMethod._execute`` checks it), so the aligned tensor goes back as it came
    (no copy); the in-memory executor drops it at once."""

    output: Output = "none"
    uses_ranking = False

    def kept(self, inputs: TensorInputs) -> torch.Tensor:
        return inputs.aligned.tensor

    def candidate(self, inputs, output, record) -> torch.Tensor:
        return inputs.aligned.tensor


class FactorPass(Pass):
    """``safemerge adapter``: each module's update as LoRA factors (tensor name -> factors): a
    merged module's ``mix(D, S)``, a kept one the fine-tune's update. Like :class:`MeasurePass`
    it hands the aligned tensor back to mergekit, which requires one."""

    output: Output = "update"

    def __init__(self, ranking: Mapping[str, str] | None = None):
        super().__init__(ranking)
        self.factors: dict[str, LoraFactors] = {}

    def _keep_factors(self, name: str, factors: LoraFactors) -> None:
        with self._lock:
            self.factors[name] = factors

    def kept(self, inputs: TensorInputs) -> torch.Tensor:
        if inputs.delta_factors is not None:  # kept as fine-tuned: its update goes out as is
            self._keep_factors(inputs.name, inputs.delta_factors)
        return inputs.aligned.tensor

    def candidate(self, inputs, output, record) -> torch.Tensor:
        if record.delta_norm > 0:
            update = output if output is not None else inputs.delta()
            self._keep_factors(inputs.name, update)
        return inputs.aligned.tensor


class CollectPass(Pass):
    """``safemerge tune``: each candidate's inputs are kept (:class:`TensorInputs`, without the
    unaligned weight, which only ``rho`` needs), with its record, so that any threshold and
    safety weight can be merged in memory later exactly as a merge would; the fine-tuned weight
    of every other tensor the pass sees (those an adapter changes) is kept too. Hands the
    aligned tensor back to mergekit, which requires one."""

    output: Output = "none"
    uses_ranking = False

    def __init__(self) -> None:
        super().__init__()
        self.inputs: dict[str, TensorInputs] = {}
        self.finetuned: dict[str, torch.Tensor] = {}

    def kept(self, inputs: TensorInputs) -> torch.Tensor:
        if inputs.delta_factors is not None:
            weight = inputs.finetuned_weight()
            with self._lock:
                self.finetuned[inputs.name] = weight
        return inputs.aligned.tensor

    def candidate(self, inputs, output, record) -> torch.Tensor:
        inputs.entries.pop("unaligned", None)
        with self._lock:
            self.inputs[inputs.name] = inputs
            self.finetuned[inputs.name] = inputs.finetuned_weight()
        return inputs.aligned.tensor


_current: Pass | None = None
_current_lock = threading.Lock()


@contextlib.contextmanager
def running(pass_: Pass) -> Iterator[Pass]:
    """Make ``pass_`` the pass of the run in progress while the block runs."""
    global _current
    with _current_lock:
        previous, _current = _current, pass_
    try:
        yield pass_
    finally:
        with _current_lock:
            _current = previous


def current_pass() -> Pass | None:
    """The pass of the run in progress, or None outside a run."""
    return _current
