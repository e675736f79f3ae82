"""Oracles and runners shared by the tests (imported as ``helpers``; fixtures are in conftest)."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

BIN = Path(sys.executable).parent
ROLE_ORDER = ("unaligned", "finetuned", "safety")


# ---------------------------------------------------------------- brute-force oracles (float64)
def dense_projection(v: torch.Tensor) -> torch.Tensor:
    """SafeLoRA's C = V V^T / ||V||_F, formed densely (out x out), in float64."""
    v = v.double()
    return (v @ v.T) / torch.linalg.norm(v)


def oracle_rho(delta: torch.Tensor, alignment: torch.Tensor) -> float:
    """cos(C D, D) with C built densely, flattened Frobenius inner products, float64."""
    d = delta.double()
    if torch.linalg.norm(alignment.double()) == 0:
        return 0.0
    cd = dense_projection(alignment) @ d
    denominator = torch.linalg.norm(cd) * torch.linalg.norm(d)
    if denominator == 0:
        return 0.0
    return float((cd * d).sum() / denominator)


def oracle_state(
    states: dict[str, dict[str, torch.Tensor]],
    *,
    threshold: float,
    safety_weight: float,
    targets: tuple[str, ...],
) -> tuple[dict, dict]:
    """Expected output tensors and rho per candidate for the paper's rule (float64)."""
    expected, rhos = {}, {}
    for name, finetuned in states["finetuned"].items():
        module = name.removesuffix(".weight")
        candidate = (
            finetuned.ndim == 2
            and "embed" not in name
            and "lm_head" not in name
            and (not targets or any(module.endswith("." + t) for t in targets))
        )
        aligned = states["aligned"][name].double()
        delta = finetuned.double() - aligned
        if not candidate or torch.count_nonzero(delta) == 0:
            expected[name] = finetuned
            continue
        alignment = aligned - states["unaligned"][name].double()
        safety = states["safety"][name].double() - aligned
        rho = oracle_rho(delta, alignment)
        rhos[name] = rho
        if rho < threshold:
            expected[name] = aligned + (1 - safety_weight) * delta + safety_weight * safety
        else:
            expected[name] = finetuned
    return expected, rhos


# ---------------------------------------------------------------- models, configs and runs
def load_state(model_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for path in sorted(glob.glob(os.path.join(str(model_dir), "*.safetensors"))):
        state.update(load_file(path))
    return state


def write_config(
    path: str | os.PathLike, roles: dict[str, str], *, dtype: str = "float32", **parameters
) -> str:
    """A safemerge YAML: ``roles`` maps aligned/unaligned/finetuned/safety to model strings."""
    config = {
        "merge_method": "safemerge",
        "base_model": roles["aligned"],
        "models": [
            {"model": roles[role], "parameters": {"role": role}}
            for role in ROLE_ORDER
            if role in roles
        ],
        "dtype": dtype,
    }
    if parameters:
        config["parameters"] = parameters
    Path(path).write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def run_mergekit(
    config: str,
    out_dir: str | os.PathLike,
    *flags: str,
    command: str = "mergekit-yaml",
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """The stock mergekit command in a real subprocess."""
    return subprocess.run(
        [str(BIN / command), config, str(out_dir), *flags],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        timeout=600,
    )


def run_mergekit_in_process(config: str, out_dir: str | os.PathLike, *flags: str):
    """The stock ``mergekit-yaml`` click command, invoked in this process (no 5 s start-up)."""
    from click.testing import CliRunner
    from mergekit.scripts.run_yaml import main

    return CliRunner().invoke(main, [config, str(out_dir), *flags], catch_exceptions=True)


# ---------------------------------------------------------------- failures: what is left behind
def tree_snapshot(folder: str | os.PathLike) -> dict[str, bytes | None]:
    """Every entry under ``folder`` (hidden ones too): relative path -> content (None: folder).

    Two snapshots are equal exactly when nothing was created, removed or changed.
    """
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return {}
    if not folder.is_dir():
        return {".": folder.read_bytes() if folder.exists() else b"<dangling link>"}
    found: dict[str, bytes | None] = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            found[rel] = f"link -> {os.readlink(path)}".encode()
        else:
            found[rel] = None if path.is_dir() else path.read_bytes()
    return found


def error_line(output: str) -> str:
    """The one error line a failed command printed; fails when there is a traceback or none."""
    assert "Traceback" not in output, output
    lines = [line for line in output.strip().splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, output
    return lines[0]


def copy_role_models(tiny, folder: Path) -> dict[str, str]:
    """Copies of the tiny role models under ``folder`` (tests may corrupt them)."""
    import shutil

    return {role: str(shutil.copytree(path, folder / role)) for role, path in tiny.paths.items()}


def interruptible() -> None:
    """``preexec_fn`` for a child that a test interrupts with SIGINT: a shell's background job
    starts with SIGINT ignored, and Python then installs no KeyboardInterrupt handler; the
    child gets the default disposition back, as a process started from a terminal has."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
