"""The per-matrix arithmetic of the rule (``rule.apply_rule``) against floors measured in the run.

For Llama-2-7B-shaped matrices (``4096 x 4096`` q/v, ``14336 x 4096`` MLP) with the aligned and
unaligned weights in bfloat16 (like real checkpoints) and in float32, it times ``apply_rule``
exactly as a merge calls it, per route of the criterion:

* ``factored``: ``D`` and ``S`` as :class:`LoraFactors` of rank 8 (adapter roles);
* ``low-rank``: ``D`` dense ``= L R`` in float32 (a LoRA merged in float32: the detection
  succeeds), ``S`` dense;
* ``dense``: ``D`` and ``S`` dense, full rank, recovered from fine-tuned weights in the model dtype
  (``detect_low_rank`` as the binding sets it); bfloat16 only unless ``--dense-dtypes``.

Each route runs with a threshold that keeps the matrix (``kept``: measure and decide) and one
that merges it (``merged``: also forms the float32 ``W = W_al + (1 - a) D + a S``). Floors, timed
in the same run on the same tensors:

* ``floor``: ``torch.add(aligned, unaligned, out=...)`` in the weights' dtype: one read of the
  inputs and one write of a matrix, the least any per-matrix pass over the weights costs;
* ``gemms``: the dense route's two products alone (``criterion.alignment_projection`` on a
  float32 ``V`` and ``D`` formed beforehand);
* ``products``: for reading, the factored route's two rank-8 products alone on a float32 ``V``
  formed beforehand (``L^T V``, then ``V M``): what the BLAS takes for them on this machine.

Every figure is the median of several repeats that alternate between the cases; the machine
may be shared, so each timed call first waits for idle CPUs and is timed again when another
process ran during it (:class:`IdleGate`, ``--quiet-wait 0`` to turn it off). Targets:
``factored / floor <= 3`` and ``dense / gemms <= 1.2``. It also checks ``rho`` and ``||V||`` against
float64 references (the dense route's only on matrices up to 4096 x 4096) and shows the error of
one float32 ``vdot`` over a whole matrix, the way ``||V||^2`` was summed before.

Usage::

    .venv/bin/python benchmarks/bench_rule.py [--shapes default|tiny] [--repeats 7]
                                              [--dense-repeats 3] [--results FILE]

Prints the table, the ratios and PASS/MISS per target, and writes them with the machine
description and the command to ``benchmarks/RESULTS-rule.md`` (``--results FILE`` elsewhere).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mergekit_safemerge.core import criterion
from mergekit_safemerge.core.criterion import may_be_exactly_low_rank
from mergekit_safemerge.core.rule import RuleSettings, apply_rule
from mergekit_safemerge.core.updates import LoraFactors

HERE = Path(__file__).parent
SHAPES = {
    "default": [(4096, 4096), (14336, 4096)],
    "tiny": [(128, 128), (448, 128)],
}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
RANK = 8
KEEP = RuleSettings(threshold=0.0, safety_weight=0.2)  # rho < 0 never: measure and decide
MERGE = RuleSettings(threshold=1.0, safety_weight=0.2)  # every rho < 1: also the merged matrix
FACTORED_LIMIT, DENSE_LIMIT = 3.0, 1.2
DENSE_REFERENCE_MAX = 4096 * 4096  # entries; the float64 dense reference costs seconds beyond


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fp:
            names = (line.split(":", 1)[1].strip() for line in fp if line.startswith("model name"))
            cpu = next(names)
    except (OSError, StopIteration):
        pass
    blas = "mkl" if torch.backends.mkl.is_available() else "non-MKL BLAS"
    return (
        f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} ({blas}, "
        f"{torch.get_num_threads()} threads), python {sys.version.split()[0]}"
    )


class Inputs:
    """The tensors of one shape and dtype, built once (seeded)."""

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, seed: int = 0):
        out_features, in_features = shape
        g = torch.Generator().manual_seed(seed)

        def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
            return scale * torch.randn(*size, generator=g)

        # weights of Llama's scale; V about a tenth of W (chat vs base)
        aligned32 = randn(out_features, in_features, scale=0.02)
        self.aligned = aligned32.to(dtype)
        self.unaligned = (aligned32 + randn(out_features, in_features, scale=0.002)).to(dtype)
        del aligned32

        def factors() -> LoraFactors:
            return LoraFactors(
                randn(out_features, RANK, scale=0.01), randn(RANK, in_features, scale=0.01)
            )

        self.delta_factors, self.safety_factors = factors(), factors()
        self.delta_low_rank = self.delta_factors.dense()
        self.safety_low_rank = self.safety_factors.dense()
        base = self.aligned.to(torch.float32)
        self.finetuned = (base + randn(out_features, in_features, scale=0.001)).to(dtype)
        self.delta_dense = self.finetuned.to(torch.float32) - base
        self.safety_dense = (base + randn(out_features, in_features, scale=0.001)).to(dtype)
        self.safety_dense = self.safety_dense.to(torch.float32) - base
        self.alignment = base - self.unaligned  # float32 V, for the floors and references only
        del base
        self.floor_out = torch.empty_like(self.aligned)


def route_args(inputs: Inputs, route: str) -> tuple[object, object, bool]:
    """``(D, S, detect_low_rank)`` as a merge passes them for ``route``."""
    if route == "factored":  # adapter roles: the binding has no fine-tuned weight to check
        return inputs.delta_factors, inputs.safety_factors, True
    if route == "low-rank":
        return inputs.delta_low_rank, inputs.safety_low_rank, True
    return inputs.delta_dense, inputs.safety_dense, may_be_exactly_low_rank(inputs.finetuned)


def rule_case(
    inputs: Inputs, route: str, settings: RuleSettings, cast: bool = False
) -> Callable[[], object]:
    """``apply_rule`` on the inputs of ``route`` as the binding calls it (the merged weight in
    the weights' dtype); ``cast``: the aligned weight converted to float32 first, inside the
    timing (what the mergekit binding handed it before)."""
    delta, safety, detect = route_args(inputs, route)

    def run() -> object:
        aligned = inputs.aligned.to(torch.float32) if cast else inputs.aligned
        return apply_rule(
            "model.layers.0.self_attn.q_proj.weight",
            aligned,
            inputs.unaligned,
            delta,
            safety,
            settings,
            detect_low_rank=detect,
            dtype=inputs.aligned.dtype,
        )

    return run


def products_case(inputs: Inputs) -> Callable[[], object]:
    left = inputs.delta_factors.left
    v = inputs.alignment

    def run() -> torch.Tensor:
        m_t = left.T @ v  # r x in
        return v @ m_t.T  # out x r

    return run


def gemms_case(inputs: Inputs) -> Callable[[], object]:
    return lambda: criterion.alignment_projection(inputs.delta_dense, inputs.alignment)


def cases_of(inputs: Inputs, dense: bool) -> dict[str, Callable[[], object]]:
    cases = {
        "floor": lambda: torch.add(inputs.aligned, inputs.unaligned, out=inputs.floor_out),
        "floor, fresh output": lambda: torch.add(inputs.aligned, inputs.unaligned),
        "products": products_case(inputs),
    }
    for route in ("factored", "low-rank"):
        cases[f"{route} kept"] = rule_case(inputs, route, KEEP)
        cases[f"{route} merged"] = rule_case(inputs, route, MERGE)
    if inputs.aligned.dtype != torch.float32:
        cases["factored kept, aligned cast first"] = rule_case(inputs, "factored", KEEP, cast=True)
    if dense:
        cases["gemms"] = gemms_case(inputs)
        cases["dense kept"] = rule_case(inputs, "dense", KEEP)
        cases["dense merged"] = rule_case(inputs, "dense", MERGE)
    return cases


def _cpu_times() -> tuple[int, int] | None:
    """``(busy, idle)`` jiffies of all CPUs from /proc/stat (None where there is none)."""
    try:
        with open("/proc/stat") as fp:
            fields = [int(x) for x in fp.readline().split()[1:8]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]
    return sum(fields) - idle, idle


class IdleGate:
    """Times calls on a shared machine: another process's bursts would land in the timings.

    Before a call it waits until the CPUs are idle (at most ``per_call`` s); after it, it
    compares the CPU time all processes used during the call (/proc/stat) with this process's
    own: when the others used more than ``other_share`` of the machine, the call is timed again
    (at most ``attempts`` times). All waiting and retrying stops once ``budget`` s are spent; the
    counts say how many calls overlapped other work and how many were kept anyway.
    """

    def __init__(self, per_call: float, budget: float, attempts: int = 4):
        self.per_call, self.budget, self.attempts = per_call, budget, attempts
        self.idle_share, self.other_share = 0.9, 0.1
        self.calls = self.retried = self.kept_busy = 0

    def time(self, run: Callable[[], object]) -> float:
        """Seconds of one clean call of ``run`` (or of the last try)."""
        self.calls += 1
        for attempt in range(self.attempts):
            self._wait_for_idle()
            before, own_before = _cpu_times(), _own_cpu()
            start = time.perf_counter()
            run()
            seconds = time.perf_counter() - start
            after, own_after = _cpu_times(), _own_cpu()
            if self.per_call <= 0 or before is None or after is None:
                return seconds
            others = (after[0] - before[0]) / TICKS - (own_after - own_before)
            if others <= self.other_share * seconds * (os.cpu_count() or 1) + 1.5 / TICKS:
                return seconds
            if attempt + 1 == self.attempts or self.budget <= 0:
                self.kept_busy += 1
                return seconds
            self.retried += 1
            self.budget -= seconds
        return seconds

    def _wait_for_idle(self, sample: float = 0.25) -> None:
        started = time.monotonic()
        while self.per_call > 0 and self.budget > 0:
            before = _cpu_times()
            time.sleep(sample)
            after = _cpu_times()
            if before is None or after is None:
                break
            busy, idle = after[0] - before[0], after[1] - before[1]
            if (
                idle >= self.idle_share * (busy + idle)
                or time.monotonic() - started > self.per_call
            ):
                break
        self.budget -= time.monotonic() - started

    def describe(self) -> str:
        if self.per_call <= 0:
            return "timed calls do not wait for idle CPUs (`--quiet-wait 0`)"
        return (
            f"each timed call first waits for idle CPUs (up to {self.per_call:g} s) and is timed "
            f"again when other processes used over {self.other_share:.0%} of the CPUs during it: "
            f"{self.retried} retries for {self.calls} calls, {self.kept_busy} kept busy"
        )


TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _own_cpu() -> float:
    """CPU seconds of this process, all threads."""
    times = os.times()
    return times.user + times.system


def time_cases(
    cases: dict[str, Callable[[], object]], repeats: int, dense_repeats: int, gate: IdleGate
) -> dict[str, float]:
    """Median seconds per case over alternating repeats (dense cases: ``dense_repeats``, no
    warm-up: their products take seconds)."""

    def slow(name: str) -> bool:
        return name == "gemms" or name.startswith("dense")

    for name, run in cases.items():  # warm-up: allocator, BLAS buffers
        if not slow(name):
            run()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for repeat in range(max(repeats, dense_repeats)):
        for name, run in cases.items():
            if repeat < (dense_repeats if slow(name) else repeats):
                times[name].append(gate.time(run))
    return {name: statistics.median(values) for name, values in times.items()}


def oracle_rho(delta: torch.Tensor, alignment: torch.Tensor) -> float:
    """``rho`` in float64 from ``P = V (V^T D)`` (``D`` dense)."""
    projected = alignment @ (alignment.T @ delta)
    return float((projected * delta).sum() / (projected.norm() * delta.norm()))


def oracle_factored_rho(factors: LoraFactors, alignment: torch.Tensor) -> float:
    """``rho`` in float64 for ``D = L R`` through the ``r x r`` Grams (cheap at any size)."""
    left, right = factors.left.double(), factors.right.double()
    m = alignment.T @ left
    vm = alignment @ m
    gram = right @ right.T
    inner, projected_sq = ((m.T @ m) * gram).sum(), ((vm.T @ vm) * gram).sum()
    return float(inner / (projected_sq.sqrt() * ((left.T @ left) * gram).sum().sqrt()))


def precision(inputs: Inputs, dense: bool) -> dict[str, float]:
    """Relative errors against float64 references."""
    v64 = inputs.aligned.double() - inputs.unaligned.double()
    sq64 = float((v64 * v64).sum())
    flat = inputs.alignment.reshape(-1)
    factored = rule_case(inputs, "factored", KEEP)().record
    low_rank = rule_case(inputs, "low-rank", KEEP)().record
    reference = oracle_factored_rho(inputs.delta_factors, v64)
    errors = {
        "squared norm of V, one float32 vdot": abs(float(torch.vdot(flat, flat)) / sq64 - 1),
        "squared norm of V, apply_rule": abs(factored.alignment_norm**2 / sq64 - 1),
        "rho, factored": abs(factored.rho / reference - 1),
        "rho, low-rank": abs(low_rank.rho / reference - 1),
    }
    if dense and inputs.aligned.numel() <= DENSE_REFERENCE_MAX:
        reference = oracle_rho(inputs.delta_dense.double(), v64)
        errors["rho, dense"] = abs(rule_case(inputs, "dense", KEEP)().record.rho / reference - 1)
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="default", choices=sorted(SHAPES))
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument(
        "--dense-dtypes", default="bfloat16", help="dtypes that time the dense route"
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dense-repeats", type=int, default=3)
    parser.add_argument("--results", default=str(HERE / "RESULTS-rule.md"))
    parser.add_argument(
        "--quiet-wait", type=float, default=20.0,
        help="seconds each timed call may wait for idle CPUs (0: do not wait)",
    )  # fmt: skip
    parser.add_argument("--quiet-budget", type=float, default=300.0,
                        help="seconds of such waiting and retrying in all")  # fmt: skip
    args = parser.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    dense_dtypes = {d.strip() for d in args.dense_dtypes.split(",") if d.strip()}
    command = " ".join([".venv/bin/python benchmarks/bench_rule.py", *(argv or sys.argv[1:])])
    load_before = os.getloadavg()[0]
    started = time.perf_counter()

    gate = IdleGate(args.quiet_wait, args.quiet_budget)
    rows, targets, errors = [], [], []
    for shape in SHAPES[args.shapes]:
        for dtype_name in dtypes:
            inputs = Inputs(shape, DTYPES[dtype_name])
            dense = dtype_name in dense_dtypes
            cases = cases_of(inputs, dense)
            medians = time_cases(cases, args.repeats, args.dense_repeats, gate)
            label = f"{shape[0]}x{shape[1]} {dtype_name}"
            floor, gemms = medians["floor"], medians.get("gemms")
            fresh, products = medians["floor, fresh output"], medians["products"]
            for name, seconds in medians.items():
                of_gemms = f"{seconds / gemms:.2f}" if gemms and name.startswith("dense") else "-"
                of_fresh = f"{seconds / fresh:.2f}" if "merged" in name else "-"
                of_products = f"{seconds / products:.2f}" if name.startswith("factored") else "-"
                rows.append(
                    (label, name, seconds * 1e3, seconds / floor, of_fresh, of_products, of_gemms)
                )
            for kept in ("kept", "merged"):
                ratio = medians[f"factored {kept}"] / floor
                targets.append((f"{label}: factored {kept} / floor", ratio, FACTORED_LIMIT))
                if dense:
                    ratio = medians[f"dense {kept}"] / gemms
                    targets.append((f"{label}: dense {kept} / gemms", ratio, DENSE_LIMIT))
            ratio = medians["factored merged"] / fresh
            targets.append(
                (f"{label}: factored merged / floor, fresh output", ratio, FACTORED_LIMIT)
            )
            errors.append((label, precision(inputs, dense)))
            del inputs

    elapsed = time.perf_counter() - started
    lines = [
        "# Per-matrix cost of the rule: `rule.apply_rule` against floors of the same run",
        "",
        f"Generated by `{command}` on {time.strftime('%Y-%m-%d')} ({elapsed:.0f} s).",
        f"Machine: {machine()}; load average {load_before:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after; {gate.describe()} (waiting and retrying stop after "
        f"{args.quiet_budget:g} s in all).",
        f"Inputs: aligned/unaligned weights in the dtype shown (V about a tenth of W), rank-{RANK} "
        f"factors; medians of {args.repeats} alternating repeats ({args.dense_repeats} for the "
        "dense route and `gemms`), after a warm-up of each other case; every ratio from this run.",
        "",
        "| matrix | case | median ms | / floor | / floor, fresh output | / products | / gemms |",
        "|---|---|---:|---:|---:|---:|---:|",
        *(
            f"| {m} | {c} | {ms:.1f} | {f:.2f} | {fo} | {pr} | {g} |"
            for m, c, ms, f, fo, pr, g in rows
        ),
        "",
        "`floor`: `torch.add(aligned, unaligned, out=...)` in the weights' dtype (one read of the "
        "inputs, one write of a matrix). `floor, fresh output`: the same `torch.add` returning a "
        "new tensor (the page faults of a new output, which every merged matrix pays). "
        "`products`: `L^T V` and `V M` (rank 8) alone on a float32 "
        "`V` formed beforehand. `gemms`: `criterion.alignment_projection` alone on float32 `V`, "
        "`D`. `kept`: measure and decide; `merged`: also the merged matrix (a new tensor in the "
        "weights' dtype, as the binding asks). `aligned cast first`: the aligned weight converted "
        "to float32 before the call, inside the timing (what the mergekit binding did before). "
        "The dense route is timed in the dtypes "
        f"{', '.join(sorted(dense_dtypes)) or 'none'}.",
        "",
        "## Targets",
        "",
        *(
            f"- {name} = {ratio:.2f} (target <= {limit:g}): {'PASS' if ratio <= limit else 'MISS'}"
            for name, ratio, limit in targets
        ),
        "",
        "## Precision (relative error against float64 references)",
        "",
        "| matrix | quantity | relative error |",
        "|---|---|---:|",
        *(f"| {m} | {q} | {e:.1e} |" for m, found in errors for q, e in found.items()),
        "",
        "`one float32 vdot`: `torch.vdot` over the whole float32 `V`, as `measure` summed it "
        'before; `apply_rule` sums per block (docs/performance.md, "Precision of each step").',
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.results).write_text(text)
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
