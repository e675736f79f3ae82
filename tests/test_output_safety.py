"""A user's data is never lost and no partial output is ever left looking finished.

Real runs of the commands with failures injected where they hurt: a failing merge into a folder
that holds the user's files, two runs into one folder, SIGTERM / SIGINT / SIGKILL in the middle
of a merge, a full disk (a small tmpfs where one can be mounted, else skipped; plus an injected
ENOSPC that always runs), a model card that cannot be written, a rerun with another shard count.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    error_line,
    interruptible,
    load_state,
    run_mergekit_in_process,
    tree_snapshot,
    write_config,
)
from safetensors.torch import load_file, save_file

from mergekit_safemerge.errors import SafeMergeError
from mergekit_safemerge.outputs.folder import MODEL, DestinationLock, OutputFolder

HERE = Path(__file__).parent
TARGETS = "q_proj,v_proj"
REPORT = "safemerge_report.json"


@pytest.fixture
def config(roles, tmp_path):
    return write_config(tmp_path / "c.yml", roles, targets=TARGETS)


def _poison(roles, role="finetuned", name="model.layers.1.self_attn.q_proj.weight"):
    path = os.path.join(roles[role], "model.safetensors")
    state = load_file(path)
    state[name][0, 0] = float("nan")
    save_file(state, path, metadata={"format": "pt"})


def _leftovers(folder: Path) -> list[str]:
    """Staging folders and lock files of ours next to an output."""
    return sorted(p.name for p in folder.iterdir() if ".safemerge" in p.name)


def _published(out: Path) -> list[str]:
    return sorted(json.loads((out / REPORT).read_text())["files"])


def _merge_ok(config, out, *flags):
    result = run_mergekit_in_process(config, out, *flags)
    assert result.exit_code == 0, result.output
    return result


# ---------------------------------------------------------------- failures keep what was there
@pytest.mark.slow
def test_failed_run_keeps_the_users_log_and_its_own_error_message(roles, config, tmp_path):
    """``mergekit-yaml bad.yml out >> out/merge.log 2>&1`` leaves the log, error appended."""
    _poison(roles)
    out = tmp_path / "out"
    out.mkdir()
    (out / "merge.log").write_text("old\n")
    command = (
        f"{sys.executable} -m mergekit.scripts.run_yaml {config} {out} >> {out}/merge.log 2>&1"
    )
    result = subprocess.run(
        command, shell=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert result.returncode == 1
    log = (out / "merge.log").read_text()
    assert log.startswith("old\n")
    assert "contains NaN or Inf" in error_line(log)
    assert sorted(os.listdir(out)) == ["merge.log"]
    assert _leftovers(tmp_path) == []


def test_failed_rerun_keeps_the_previous_output_untouched(roles, config, tmp_path):
    import shutil

    out = tmp_path / "out"
    _merge_ok(config, out)
    (out / "notes.txt").write_text("mine")
    before = tree_snapshot(out)
    # a poisoned copy (mergekit caches open model files per process, so not the same path)
    poisoned = {**roles, "finetuned": str(shutil.copytree(roles["finetuned"], tmp_path / "ft2"))}
    _poison(poisoned)
    result = run_mergekit_in_process(
        write_config(tmp_path / "c2.yml", poisoned, targets=TARGETS), out
    )
    assert result.exit_code == 1 and "contains NaN or Inf" in error_line(result.output)
    assert tree_snapshot(out) == before
    assert _leftovers(tmp_path) == []


def test_rerun_replaces_the_previous_output_whole(config, tmp_path):
    """No stale shard survives a rerun with another shard count; the user's file stays."""
    out = tmp_path / "out"
    _merge_ok(config, out, "--out-shard-size", "100K")
    sharded = _published(out)
    assert sum(name.startswith("model-") for name in sharded) > 1
    (out / "merge.log").write_text("mine")
    _merge_ok(config, out)
    assert sorted(os.listdir(out)) == sorted([*_published(out), "merge.log"])
    assert "model.safetensors" in os.listdir(out)
    assert not any(name.startswith("model-") for name in os.listdir(out))
    assert _leftovers(tmp_path) == []


def test_a_folder_written_by_plain_mergekit_is_not_ours_to_replace(roles, config, tmp_path):
    linear = tmp_path / "linear.yml"
    linear.write_text(
        f"merge_method: linear\nmodels:\n  - model: {roles['aligned']}\n"
        "    parameters: {weight: 1.0}\ndtype: float32\n"
    )
    out = tmp_path / "out"
    _merge_ok(str(linear), out)
    before = tree_snapshot(out)
    result = run_mergekit_in_process(config, out)
    assert result.exit_code == 1
    assert "holds files that no SafeMERGE run wrote" in error_line(result.output)
    assert tree_snapshot(out) == before


# ---------------------------------------------------------------- one run at a time
def test_a_second_run_into_a_busy_folder_is_refused(config, tmp_path):
    out = tmp_path / "out"
    lock = DestinationLock(str(out))
    lock.acquire("output folder")
    try:
        result = run_mergekit_in_process(config, out)
    finally:
        lock.release()
    assert result.exit_code == 1
    assert error_line(result.output) == (
        f"Error: safemerge: output folder {out} is being written by another SafeMERGE run "
        f"(pid {os.getpid()}); wait for it to finish or choose another folder"
    )
    assert not out.exists() and _leftovers(tmp_path) == []
    _merge_ok(config, out)  # free again


def test_a_stale_lock_file_does_not_block(config, tmp_path):
    (tmp_path / ".out.safemerge.lock").write_text("99999999")  # its process died long ago
    _merge_ok(config, tmp_path / "out")
    assert _leftovers(tmp_path) == []


def _slow_run(config, out, *flags, seconds="0.2"):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SLOW_TENSOR_SECONDS": seconds}
    return subprocess.Popen(
        [sys.executable, str(HERE / "slow_merge.py"), config, str(out), "--quiet", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=interruptible,
    )  # fmt: skip


def _wait_for(predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def _staging_has_shards(parent: Path) -> bool:
    return any(p.name.startswith("model-") for s in parent.glob(".out.safemerge-staging-*")
               for p in s.rglob("*"))  # fmt: skip


@pytest.mark.slow
def test_two_runs_into_one_new_folder(config, tmp_path):
    """Run B starts; run A starts while B works and is refused; B finishes; nothing is lost."""
    out = tmp_path / "out"
    first = _slow_run(config, out)
    _wait_for(lambda: (tmp_path / ".out.safemerge.lock").exists())
    second = run_mergekit_in_process(config, out)
    assert second.exit_code == 1
    assert f"pid {first.pid}" in error_line(second.output)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert sorted(os.listdir(out)) == _published(out)
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------- signals
@pytest.mark.slow
@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, None)])
def test_a_signal_mid_merge_leaves_nothing(sig, status, config, tmp_path):
    out = tmp_path / "out"
    run = _slow_run(config, out, "--out-shard-size", "50K")
    _wait_for(lambda: _staging_has_shards(tmp_path))
    run.send_signal(sig)
    code = run.wait(timeout=120)
    stderr = run.stderr.read()
    assert code != 0 and (status is None or code == status), stderr
    assert "Traceback" not in stderr
    assert not out.exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
def test_sigkill_then_rerun_with_another_shard_count(config, tmp_path):
    out = tmp_path / "out"
    _merge_ok(config, out)  # a finished output that the killed rerun must not damage
    before = tree_snapshot(out)
    run = _slow_run(config, out, "--out-shard-size", "50K")
    _wait_for(lambda: _staging_has_shards(tmp_path))
    run.kill()
    run.wait(timeout=60)
    assert tree_snapshot(out) == before  # the killed run never touched the destination
    assert any(name.startswith(".out.safemerge-staging-") for name in _leftovers(tmp_path))
    _merge_ok(config, out, "--out-shard-size", "100K")
    assert sorted(os.listdir(out)) == _published(out)
    assert "model.safetensors" not in os.listdir(out)
    assert _leftovers(tmp_path) == []  # the dead run's staging folder was cleaned up


# ---------------------------------------------------------------- full disk, model card
def test_disk_full_while_writing_the_report(config, tmp_path, monkeypatch):
    import mergekit_safemerge.outputs.folder as output

    def full(path, document):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(output, "write_json_atomic", full)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = tree_snapshot(tmp_path)
    result = run_mergekit_in_process(config, out)
    assert result.exit_code == 1
    assert error_line(result.output) == (
        "Error: safemerge: disk full while writing the report and model card (No space left on "
        f"device); nothing was written to {out}"
    )
    assert tree_snapshot(tmp_path) == before


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                            capture_output=True, text=True)  # fmt: skip
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'not permitted'})")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_disk_full_on_a_real_small_filesystem(config, small_tmpfs):
    out = small_tmpfs / "out"
    result = run_mergekit_in_process(config, out)
    assert result.exit_code == 1
    assert error_line(result.output).startswith(
        "Error: safemerge: disk full while writing the merged model (No space left on device)"
    )
    assert sorted(os.listdir(small_tmpfs)) == []


def test_a_model_card_failure_keeps_the_finished_merge(config, tmp_path, monkeypatch):
    import mergekit.card

    def broken(**_kwargs):
        raise RuntimeError("the Hub is unreachable")

    monkeypatch.setattr(mergekit.card, "generate_card", broken)
    out = tmp_path / "out"
    result = _merge_ok(config, out)
    assert "Warning: safemerge: model card not written (RuntimeError: the Hub is unreachable)" in (
        result.output
    )
    report = json.loads((out / REPORT).read_text())
    assert report["warnings"] == ["model card not written (RuntimeError: the Hub is unreachable)"]
    assert sorted(os.listdir(out)) == sorted(report["files"])
    assert "README.md" not in report["files"] and load_state(out)


# ---------------------------------------------------------------- the output folder itself
def test_manifest_never_reaches_outside_the_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "precious.txt").write_text("mine")
    (out / REPORT).write_text(json.dumps(
        {"format": "safemerge-report", "files": ["../precious.txt", REPORT]}
    ))  # fmt: skip
    folder = OutputFolder(str(out), MODEL)
    with folder:
        folder.publish({"format": "safemerge-report"})
    assert (tmp_path / "precious.txt").read_text() == "mine"


def test_a_file_appearing_during_the_run_is_never_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    folder = OutputFolder(str(out), MODEL)
    with folder:
        (Path(folder.staging) / "config.json").write_text("new")
        (out / "config.json").write_text("the user's, written meanwhile")
        with pytest.raises(SafeMergeError, match="config.json appeared there during the run"):
            folder.publish({"format": "safemerge-report"})
    assert (out / "config.json").read_text() == "the user's, written meanwhile"
    kept = tmp_path / "out.unpublished"
    assert (kept / "config.json").read_text() == "new"
