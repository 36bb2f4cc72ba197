"""Run a scenario in a sandbox with a watchdog; turn what it left into a result."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any, Dict, List, Optional

from .sandbox import sandbox_command
from .scenarios import get

__all__ = ["run_case", "RESULT_FIELDS"]

#: The keys of every result, in order (documented in docs/stress.md).
RESULT_FIELDS = ("scenario", "loader", "outcome", "expected", "delivered", "missing", "duplicated",
                 "shm_size_bytes", "peak_shm_used_bytes", "seconds", "samples_per_s", "fallbacks", "error")

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_case(scenario: str, loader: str, *, shm_bytes: int, workers: int = 2, quick: bool = False,
             hang_after: float = 20.0, max_seconds: float = 600.0, telemetry: Optional[str] = None,
             log_path: Optional[str] = None, on_progress=None) -> Dict[str, Any]:
    """Run one scenario with one loader in a private /dev/shm of ``shm_bytes``.

    A run that delivers nothing new for ``hang_after`` seconds (after it has
    started) is killed and reported as a ``hang``. ``on_progress(delivered)``
    is called as batches arrive.
    """
    spec = get(scenario)
    with tempfile.TemporaryDirectory(prefix="adaptive-stress-") as work:
        argv = [sys.executable, "-m", "stress.child", "--scenario", scenario, "--loader", loader,
                "--shm-bytes", str(shm_bytes), "--workers", str(workers), "--dir", work]
        if quick:
            argv.append("--quick")
        if telemetry and loader != "vanilla":
            argv += ["--telemetry", os.path.abspath(telemetry)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_REPO_ROOT, os.environ.get("PYTHONPATH")])),
                   PYTHONUNBUFFERED="1")
        log = open(log_path or os.path.join(work, "log"), "w")
        started = time.monotonic()
        proc = subprocess.Popen(sandbox_command(argv, shm_bytes, nofile=spec.nofile), cwd=_REPO_ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        hung = _watch(proc, os.path.join(work, "progress"), hang_after, max_seconds, on_progress)
        seconds = time.monotonic() - started
        log.close()
        delivered = _read_progress(os.path.join(work, "progress"))
        child = _read_json(os.path.join(work, "result.json"))
        peak = _read_int(os.path.join(work, "peak"))
        tail = _tail(log_path or os.path.join(work, "log"))
    expected = len(spec.build(shm_bytes, workers, quick).dataset)
    counts = Counter(delivered)
    if hung:
        outcome, error = "hang", f"no batch for {hang_after:g} s; killed. Last error in its log: {tail}"
    elif child is None:
        outcome, error = "crash", f"exit status {proc.returncode} before reporting. Last error in its log: {tail}"
    else:
        outcome, error = child["outcome"], child["error"]
        seconds = child["seconds"]
    return {
        "scenario": scenario, "loader": loader, "outcome": outcome, "expected": expected,
        "delivered": len(counts), "missing": len(set(range(expected)) - set(counts)),
        "duplicated": sum(c - 1 for c in counts.values()), "shm_size_bytes": shm_bytes,
        "peak_shm_used_bytes": peak, "seconds": round(seconds, 3),
        "samples_per_s": round(len(delivered) / seconds, 1) if seconds > 0 else None,
        "fallbacks": (child or {}).get("fallbacks", {}), "error": error,
    }


def _watch(proc: subprocess.Popen, progress: str, hang_after: float, max_seconds: float, on_progress) -> bool:
    """Wait for ``proc``; kill its process group on a stall. True if it hung."""
    begun = time.monotonic()
    last_size, last_change, started = -1, time.monotonic(), False
    while proc.poll() is None:
        time.sleep(0.1)
        size = os.path.getsize(progress) if os.path.exists(progress) else 0
        now = time.monotonic()
        if size != last_size:
            last_size, last_change = size, now
            started = started or size > 0
            if on_progress is not None and size > 0:
                on_progress(len(_read_progress(progress)))
        limit = hang_after if started else max(hang_after, 120.0)  # imports and worker start are slow
        if now - last_change > limit or now - begun > max_seconds:
            _kill_group(proc)
            return True
    return False


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _read_progress(path: str) -> List[int]:
    out: List[int] = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.startswith("["):
                    try:
                        out += json.loads(line)
                    except json.JSONDecodeError:  # a line cut short by a kill
                        pass
    return out


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return None


def _tail(path: str) -> str:
    """The last line of the log that names an exception, else its last line."""
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Killed)\b", line)]
    return (errors or lines or [""])[-1][:500]
