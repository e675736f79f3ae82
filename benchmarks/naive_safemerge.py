"""The naive SafeMERGE baseline: the projection C = V V^T / ||V||_F formed densely, as the
authors' script does, then rho = cos(C D, D) and the paper's linear rule.

Registered as ``safemerge_naive`` and run through stock mergekit's own ``mergekit-yaml``
command in this process, so that it pays exactly the same I/O as ``safemerge``::

    python benchmarks/naive_safemerge.py CONFIG.yml OUT [mergekit-yaml options]
"""

from __future__ import annotations

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    PerInputValues,
    TensorGroup,
)

from mergekit_safemerge.binding.method import PARAMETER_SPECS
from mergekit_safemerge.core.targets import is_candidate, parse_targets

NAME = "safemerge_naive"


class NaiveDenseSafeMerge(GroupMergeMethod):
    """Same inputs and parameters as ``safemerge``; only the criterion is computed naively."""

    spec = MergeMethodSpec(
        name=NAME,
        parameters=tuple(p for p in PARAMETER_SPECS
                         if p.name in ("role", "threshold", "safety_weight", "targets")),
        contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=3, max_non_base=3),
    )  # fmt: skip

    def merge_group(self, group: TensorGroup, /, *, role: PerInputValues, threshold: float,
                    safety_weight: float, targets: str) -> torch.Tensor:  # fmt: skip
        by_role = {role[e.id]: e.tensor for e in group.non_base}
        finetuned = by_role["finetuned"]
        name = group.metadata.name or ""
        if not is_candidate(name, finetuned.ndim, group.metadata.vocabulary_axis,
                            parse_targets(targets)):  # fmt: skip
            return finetuned
        aligned = group.base.tensor.float()
        delta = finetuned.float() - aligned
        alignment = aligned - by_role["unaligned"].float()
        projection = alignment @ alignment.T / torch.linalg.norm(alignment)  # out x out, dense
        projected = projection @ delta
        rho = torch.sum(projected * delta) / (
            torch.linalg.norm(projected) * torch.linalg.norm(delta)
        )
        if not rho < threshold:
            return finetuned
        safety = by_role["safety"].float() - aligned
        merged = aligned + (1 - safety_weight) * delta + safety_weight * safety
        return merged.to(finetuned.dtype)


def main() -> None:
    from mergekit.merge_methods import registry
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    if NAME not in {m.spec.name for m in registry.registered_methods()}:
        registry.register(NaiveDenseSafeMerge())
    mergekit_yaml()


if __name__ == "__main__":
    main()
