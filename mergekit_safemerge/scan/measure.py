"""The measuring pass: mergekit's own plan, run in memory with the method measuring only.

Same architecture handling, LoRA merging, lazy loaders, ``filter:`` values, dtype and device as
the merge: each candidate's ``rho`` and norms are recorded and its tensor dropped at once, so peak
memory stays at a few tensors, as in a merge. Vocabulary tensors (embeddings, ``lm_head``) are
never candidates and are not even read; with a plain ``targets`` string neither are the tensors
outside it.
"""

from __future__ import annotations

from typing import Any

from mergekit_safemerge.records import MatrixRecord, sort_records
from mergekit_safemerge.session import MergeSession, active_session
from mergekit_safemerge.targets import matches_targets, parse_targets


def plain_targets(settings: dict[str, Any]) -> str | None:
    """The top-level ``targets`` when it is one plain string (not filters)."""
    targets = settings.get("targets")
    return targets if isinstance(targets, str) else None


def measure_candidates(
    merge_config, options, *, targets: str | None = None, desc: str = "SafeMERGE scan"
) -> list[MatrixRecord]:
    """One record per candidate (threshold decisions), in model order; nothing is written."""
    from mergekit.architecture import get_architecture_info
    from mergekit.graph import Executor
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import _model_out_config
    from mergekit.plan import MergePlanner

    from mergekit_safemerge.registration import register_method

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
    modules = parse_targets(targets) if targets else ()
    tasks = [
        task
        for weight, task in planner._tensors
        if weight.vocabulary_axis is None and matches_targets(weight.name, modules)
    ]
    executor = Executor(
        targets=tasks,
        math_device=options.device,
        storage_device=options.device if options.low_cpu_memory else "cpu",
    )
    with active_session(MergeSession(measure_only=True)) as session:
        for _task, _tensor in executor.run(quiet=options.quiet, desc=desc):
            pass
    return sort_records(session.records)
