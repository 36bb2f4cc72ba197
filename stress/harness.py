"""Run a scenario in a sandbox with a watchdog; turn what it left into a result."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any, Dict, List, Optional, Tuple

from .cgroup import MemoryCgroup, MemoryUsage
from .child import VANILLA_LOADERS
from .leftovers import list_tree
from .sandbox import sandbox_command
from .scenarios import get

__all__ = ["run_case", "RESULT_FIELDS"]

#: The keys of every result, in order (documented in docs/stress.md).
RESULT_FIELDS = ("scenario", "loader", "outcome", "epochs", "expected", "delivered", "missing", "duplicated",
                 "batches", "mean_batch_size", "shm_size_bytes", "peak_shm_used_bytes", "memory_limit_bytes",
                 "peak_memory_bytes", "oom_kills", "shm_left", "spill_left", "seconds", "samples_per_s", "fallbacks",
                 "notes", "error")

_HERE = os.path.dirname(os.path.abspath(__file__))
# From a clone the harness is the top-level package ``stress`` (its parent goes on the child's path);
# installed, it is ``adaptive_loader.stress`` and already importable.
_PACKAGE = __package__ or "stress"
_PATH_FOR_CHILD = os.path.dirname(_HERE) if _PACKAGE == "stress" else None


def run_case(scenario: str, loader: str, *, shm_bytes: int, workers: int = 2, quick: bool = False,
             epochs: int = 1, hang_after: float = 20.0, max_seconds: float = 600.0, telemetry: Optional[str] = None,
             log_path: Optional[str] = None, timeline: Optional[str] = None, on_progress=None,
             on_tick=None, memory_bytes: Optional[int] = None) -> Dict[str, Any]:
    """Run one scenario with one loader in a private /dev/shm of ``shm_bytes`` and, given
    ``memory_bytes``, in a fresh memory cgroup of that size (:mod:`.cgroup`; it is joined before
    the sandbox is made, so every process of the run is inside, and removed afterwards).

    A run that delivers nothing new for ``hang_after`` seconds (after it has
    started) is killed and reported as a ``hang``. ``on_progress(delivered)``
    is called as batches arrive, ``on_tick(delivered, idle_s, limit_s)`` every
    0.1 s; ``timeline`` names a JSON file to write the run's time series to
    (for :mod:`picture`). A run the OOM killer ends is a ``crash`` whose error says so.
    """
    spec = get(scenario)
    with tempfile.TemporaryDirectory(prefix="adaptive-stress-") as work:
        spill = os.path.join(work, "spill")  # this run's own spill_dir: whatever is in it afterwards was left
        os.mkdir(spill)
        argv = [sys.executable, "-m", f"{_PACKAGE}.child", "--scenario", scenario, "--loader", loader,
                "--shm-bytes", str(shm_bytes), "--workers", str(workers), "--epochs", str(epochs), "--dir", work,
                "--spill-dir", spill]
        if quick:
            argv.append("--quick")
        if telemetry and loader not in VANILLA_LOADERS:
            argv += ["--telemetry", os.path.abspath(telemetry)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if _PATH_FOR_CHILD:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PATH_FOR_CHILD, os.environ.get("PYTHONPATH")]))
        log = open(log_path or os.path.join(work, "log"), "w")
        started = time.monotonic()
        after = [sys.executable, "-m", f"{_PACKAGE}.leftovers", work]  # lists /dev/shm before the namespace goes
        command = sandbox_command(argv, shm_bytes, nofile=spec.nofile, after=after)
        with MemoryCgroup(memory_bytes) if memory_bytes else contextlib.nullcontext() as group:
            proc = subprocess.Popen(group.command(command) if group else command, cwd=_PATH_FOR_CHILD or work,
                                    env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            try:
                hung, ended = _watch(proc, os.path.join(work, "progress"), hang_after, max_seconds, on_progress,
                                     on_tick, os.path.join(work, "pid"))
            except BaseException:  # e.g. Ctrl-C: the run must not outlive the harness
                _kill_group(proc, os.path.join(work, "pid"))
                raise
            memory = group.usage() if group else None
        child_start = (_read_json(os.path.join(work, "limits.json")) or {}).get("start")
        # the same clock in the child: a hang's seconds count from its loop's start, like an ok run's
        seconds = ended - (child_start if child_start and child_start > started else started)
        log.close()
        per_epoch = _read_epochs(os.path.join(work, "progress"))
        child = _read_json(os.path.join(work, "result.json"))
        peak = _read_int(os.path.join(work, "peak"))
        tail = _tail(log_path or os.path.join(work, "log"))
        series = _read_series(work) if timeline else None
        shm_left = (_read_json(os.path.join(work, "shm-left.json")) or {}).get("files")
        spill_left = list_tree(spill)
        notes = _read_json(os.path.join(work, "notes.json")) or {}
    n = spec.build(shm_bytes, workers, quick).samples()
    if hung:
        outcome, error = "hang", f"no batch for {hang_after:g} s; killed. Last error in its log: {tail}"
    elif child is None:
        outcome, error = "crash", f"exit status {proc.returncode} before reporting. Last error in its log: {tail}"
    else:
        outcome, error = child["outcome"], child["error"]
        seconds = child["seconds"]
    if memory is not None and memory.oom_kills:
        outcome, error = _oom_outcome(outcome, error, hung, child is None, proc.returncode, memory, tail)
    per_epoch += [[] for _ in range(epochs - len(per_epoch))]
    counts = [Counter(indices) for indices in per_epoch[:epochs]]
    received = sum(len(indices) for indices in per_epoch)
    batches = sum(len(b) for b in per_epoch.batches)
    result = {
        "scenario": scenario, "loader": loader, "outcome": outcome, "epochs": epochs, "expected": n * epochs,
        "delivered": sum(len(c) for c in counts), "missing": sum(len(set(range(n)) - set(c)) for c in counts),
        "duplicated": sum(v - 1 for c in counts for v in c.values()), "batches": batches,
        "mean_batch_size": round(received / batches, 2) if batches else None, "shm_size_bytes": shm_bytes,
        "peak_shm_used_bytes": peak, **_memory_fields(memory), "shm_left": shm_left, "spill_left": spill_left,
        "seconds": round(seconds, 3),
        "samples_per_s": round(received / seconds, 1) if seconds > 0 else None,
        "fallbacks": (child or {}).get("fallbacks", {}), "notes": (child or {}).get("notes", notes), "error": error,
    }
    if timeline:
        with open(timeline, "w") as f:
            json.dump(dict(series, scenario=scenario, loader=loader, outcome=outcome, error=error,
                           hang_after=hang_after, shm_size_bytes=shm_bytes, seconds=seconds,
                           samples_per_s=result["samples_per_s"], mean_batch_size=result["mean_batch_size"]), f)
    return result


def _oom_outcome(outcome: str, error: Optional[str], hung: bool, unreported: bool, returncode: int,
                 memory: MemoryUsage, tail: str) -> Tuple[str, Optional[str]]:
    """The outcome and error of a run in whose cgroup the OOM killer killed: a child killed before it
    reported is a ``crash`` named so; a hang or a crash it reported keeps its kind and gains the kills in its
    error; an ``ok`` run (e.g. a worker killed and its batches loaded again) stays as it is."""
    kills = (f"the OOM killer killed {memory.oom_kills} process(es) in its memory cgroup of "
             f"{memory.limit_bytes / 2**20:.0f} MiB (peak {_mib(memory.peak_bytes)})")
    if unreported and not hung:
        return "crash", f"OOM-killed: {kills}; exit status {returncode}. Last error in its log: {tail}"
    if outcome == "ok":
        return outcome, error
    return outcome, f"{error}; {kills}" if error else kills[0].upper() + kills[1:]


def _memory_fields(memory: Optional[MemoryUsage]) -> Dict[str, Optional[int]]:
    if memory is None:
        return {"memory_limit_bytes": None, "peak_memory_bytes": None, "oom_kills": None}
    return {"memory_limit_bytes": memory.limit_bytes, "peak_memory_bytes": memory.peak_bytes,
            "oom_kills": memory.oom_kills}


def _mib(nbytes: Optional[int]) -> str:
    return "unknown" if nbytes is None else f"{nbytes / 2**20:.0f} MiB"


def _watch(proc: subprocess.Popen, progress: str, hang_after: float, max_seconds: float, on_progress,
           on_tick=None, pid_file: Optional[str] = None) -> Tuple[bool, float]:
    """Wait for ``proc``; kill its process group on a stall. (Whether it hung, when it ended or was killed.)"""
    begun = time.monotonic()
    last_size, last_change, started, delivered = -1, time.monotonic(), False, 0
    while proc.poll() is None:
        time.sleep(0.1)
        size = os.path.getsize(progress) if os.path.exists(progress) else 0
        now = time.monotonic()
        if size != last_size:
            last_size, last_change = size, now
            started = started or size > 0
            if size > 0:
                delivered = len(_read_progress(progress))
                if on_progress is not None:
                    on_progress(delivered)
        limit = hang_after if started else max(hang_after, 120.0)  # imports and worker start are slow
        if on_tick is not None:
            on_tick(delivered, now - last_change, limit)
        finished = pid_file is not None and os.path.exists(os.path.join(os.path.dirname(pid_file), "result.json"))
        if (now - last_change > limit and not finished) or now - begun > max_seconds:  # finished: leftovers listed
            _kill_group(proc, pid_file)
            return True, now
    return False, time.monotonic()


class _Epochs(list):
    """Indices received, one list per epoch; ``batches``: the batches' sizes, per epoch."""

    batches: List[List[int]]


def _read_epochs(path: str) -> _Epochs:
    out = _Epochs()
    out.batches = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.startswith("epoch "):
                    out.append([])
                    out.batches.append([])
                elif line.startswith("[") and out:
                    try:
                        indices = json.loads(line)
                    except json.JSONDecodeError:  # a line cut short by a kill
                        continue
                    out[-1] += indices
                    out.batches[-1].append(len(indices))
    return out


def _read_series(work: str) -> Dict[str, Any]:
    """The child's time series: batches ``[s, epoch, samples, shm used]``, usage ``[s, shm, memory]``."""
    def rows(name: str) -> List[list]:
        out = []
        try:
            with open(os.path.join(work, name)) as f:
                for line in f:
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
        except OSError:
            pass
        return out

    limits = _read_json(os.path.join(work, "limits.json")) or {}
    return {"batches": rows("timeline"), "usage": rows("usage"), "memory_limit": limits.get("memory_limit")}


def _kill_group(proc: subprocess.Popen, pid_file: Optional[str] = None) -> None:
    """Kill the child's process group (it and its workers); the sandbox's shell then lists what they
    left and exits. Where the child has no group of its own yet, or the shell lingers, kill the shell's."""
    child = _read_int(pid_file) if pid_file else None
    if child:
        try:
            os.killpg(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            pass
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
