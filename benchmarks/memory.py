"""Peak memory of a child process: sampled anonymous memory beside the exact max RSS.

mmap'd safetensors pages count in RSS but are file-backed and reclaimable; RssAnon (sampled from
/proc every ``interval`` seconds) is the memory a process really holds. Max RSS comes from the
kernel's rusage of that one child (``os.wait4``), so it is exact.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time


def _rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fp:
            for line in fp:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _io(pid: int) -> dict[str, int]:
    values = {}
    try:
        with open(f"/proc/{pid}/io") as fp:
            for line in fp:
                key, _, value = line.partition(":")
                values[key] = int(value)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return values


def run_measured(command: list[str], env: dict | None = None, interval: float = 0.02) -> dict:
    """Run ``command``; return wall and CPU time, exit code, peak RssAnon and max RSS (bytes)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True)
        peak_anon = 0
        last_io: dict[str, int] = {}
        done = threading.Event()

        def sample() -> None:
            nonlocal peak_anon
            while not done.is_set():
                peak_anon = max(peak_anon, _rss_anon(process.pid))
                last_io.update(_io(process.pid))
                time.sleep(interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _pid, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {
            "wall_s": wall,
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "returncode": process.returncode,
            "peak_anon_bytes": peak_anon,
            "max_rss_bytes": usage.ru_maxrss * 1024,
            "read_bytes": last_io.get("read_bytes", usage.ru_inblock * 512),
            "written_bytes": last_io.get("write_bytes", usage.ru_oublock * 512),
            "stdout": out.read(),
            "stderr": err.read(),
        }
