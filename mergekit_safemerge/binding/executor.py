"""mergekit's own plan, run in memory with a pass of :mod:`.passes` current; nothing is written.

Same architecture handling, lazy loaders, ``filter:`` values, gradients, dtype and device as the
merge; each tensor's inputs are read, handed to the method and dropped at once, so peak memory
stays at a few tensors, as in a merge. Used by ``safemerge scan`` and the first pass of the
ranking selection modes (:func:`measure_candidates`, a :class:`~.passes.MeasurePass`) and by
``safemerge adapter`` (a :class:`~.passes.FactorPass`). Vocabulary tensors (embeddings,
``lm_head``) are never read.
"""

from __future__ import annotations

from collections.abc import Callable

from mergekit.architecture import get_architecture_info
from mergekit.config import MergeConfiguration
from mergekit.graph import Executor
from mergekit.io.tasks import LoaderCache
from mergekit.merge import _model_out_config
from mergekit.options import MergeOptions
from mergekit.plan import MergePlanner

from mergekit_safemerge.binding.passes import MeasurePass, Pass, running
from mergekit_safemerge.binding.registration import register_method
from mergekit_safemerge.core.records import MatrixRecord, sort_records
from mergekit_safemerge.core.targets import matches_targets, parse_targets


def run_in_memory(
    merge_config: MergeConfiguration,
    options: MergeOptions,
    pass_: Pass,
    *,
    keep: Callable[[str], bool],
    desc: str,
) -> list[str]:
    """Execute the plan's tasks of the non-vocabulary tensors whose name passes ``keep`` with
    ``pass_`` current; returns the names of every non-vocabulary weight of the output model."""
    register_method()
    config = merge_config.model_copy(deep=True)  # the planner rewrites its configuration
    arch_info = get_architecture_info(config, options)
    LoaderCache().setup(options=options)
    out_config = _model_out_config(config, arch_info, trust_remote_code=options.trust_remote_code)
    planner = MergePlanner(config, arch_info, options=options, out_model_config=out_config)
    # plan_in_memory() fails in mergekit 0.1.5 (pydantic cannot validate ReturnTensor's generic
    # task field), so run the per-tensor tasks of the plan directly: the executor streams them
    # and drops each result after use.
    planner._plan()
    weights = [weight for weight, _task in planner._tensors if weight.vocabulary_axis is None]
    tasks = [
        task
        for weight, task in planner._tensors
        if weight.vocabulary_axis is None and keep(weight.name)
    ]
    executor = Executor(
        targets=tasks,
        math_device=options.device,
        storage_device=options.device if options.low_cpu_memory else "cpu",
    )
    with running(pass_):
        for _task, _tensor in executor.run(quiet=options.quiet, desc=desc):
            pass  # each result is dropped at once
    return [weight.name for weight in weights]


def measure_candidates(
    merge_config: MergeConfiguration,
    options: MergeOptions,
    *,
    targets: str | None = None,
    desc: str = "SafeMERGE scan",
) -> list[MatrixRecord]:
    """One record per candidate (threshold decisions), in model order; nothing is written.

    ``targets`` (the plain top-level ``targets`` setting, if any) lets the pass skip reading
    tensors that cannot be candidates; with filters the method decides per tensor.
    """
    modules = parse_targets(targets) if targets else ()
    measuring = MeasurePass()
    run_in_memory(
        merge_config,
        options,
        measuring,
        keep=lambda name: matches_targets(name, modules),
        desc=desc,
    )
    return sort_records(measuring.records)
