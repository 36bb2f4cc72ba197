"""Run a command inside a fresh memory cgroup that this module makes and always removes.

cgroup v1 (``/sys/fs/cgroup/memory``) or v2 (``/sys/fs/cgroup`` with the memory
controller enabled for child groups). The command joins the group before it
execs (``sh -c 'echo $$ > .../cgroup.procs && exec "$@"'``), so every process
it starts is inside from the first instruction: put :meth:`MemoryCgroup.command`
outermost, before ``unshare``. Where no group can be made,
:func:`memory_cgroup_available` says why and nothing runs.

    with MemoryCgroup(768 << 20) as group:
        subprocess.run(group.command(argv))
        usage = group.usage()  # limit, peak, OOM kills
    # the group is gone here: what was still in it was killed after a grace period
"""

from __future__ import annotations

import errno
import functools
import os
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

__all__ = ["GROUP_PREFIX", "MemoryUsage", "MemoryCgroup", "CgroupRun", "memory_cgroup_available", "list_groups",
           "run_in_memory_cgroup", "exit_on_sigterm"]

#: Every group this module makes is named GROUP_PREFIX + "<pid of its maker>-<random hex>".
GROUP_PREFIX = "adaptive-stress-"
V1_ROOT = "/sys/fs/cgroup/memory"
V2_ROOT = "/sys/fs/cgroup"
GRACE_S = 5.0  # what is still in the group when it is removed gets this long to end by itself
KILL_WAIT_S = 10.0  # then, after SIGKILL, this long to be gone


@dataclass
class MemoryUsage:
    """What a group's counters say: its limit, its peak (None where the kernel has no peak
    file) and how many processes the OOM killer killed in it (None where it does not count)."""

    limit_bytes: int
    peak_bytes: Optional[int]
    oom_kills: Optional[int]


@dataclass
class CgroupRun(MemoryUsage):
    """A finished command (:func:`run_in_memory_cgroup`): its exit status as ``subprocess`` gives
    it (-9 for a SIGKILL, the OOM killer's signal), what it wrote to pipes asked for, its group's counters."""

    returncode: int = 0
    stdout: Any = None
    stderr: Any = None


def _hierarchy() -> Tuple[Optional[str], str, str]:
    """("v1" or "v2", the directory to make groups in, "") or (None, "", why there is none)."""
    if os.path.isfile(os.path.join(V1_ROOT, "memory.limit_in_bytes")):
        return "v1", V1_ROOT, ""
    controllers = os.path.join(V2_ROOT, "cgroup.controllers")
    if not os.path.isfile(controllers):
        return None, "", (f"no memory cgroup hierarchy: neither {V1_ROOT} (v1) nor a cgroup v2 mount at {V2_ROOT}")
    try:
        with open(os.path.join(V2_ROOT, "cgroup.subtree_control")) as f:
            enabled = f.read().split()
    except OSError as exc:
        return None, "", f"cannot read {V2_ROOT}/cgroup.subtree_control: {exc}"
    if "memory" not in enabled:
        return None, "", (f"cgroup v2 at {V2_ROOT} does not enable the memory controller for child groups "
                          f"(cgroup.subtree_control: {' '.join(enabled) or 'empty'})")
    return "v2", V2_ROOT, ""


@functools.lru_cache(maxsize=None)
def memory_cgroup_available() -> Tuple[bool, str]:
    """(True, '') if a memory cgroup can be made, limited and removed here, else (False, why)."""
    version, root, why = _hierarchy()
    if version is None:
        return False, why
    try:
        with MemoryCgroup(64 << 20, grace_s=0.0):
            pass
    except (OSError, RuntimeError) as exc:
        user = "" if os.geteuid() == 0 else f" (not root: uid {os.geteuid()})"
        return False, f"cannot make a memory cgroup under {root}{user}: {exc}"
    return True, ""


def list_groups(pid: Optional[int] = None) -> List[str]:
    """The paths of the groups this module made that still exist (made by ``pid``, if given)."""
    version, root, _ = _hierarchy()
    if version is None:
        return []
    prefix = GROUP_PREFIX + (f"{pid}-" if pid is not None else "")
    try:
        names = os.listdir(root)
    except OSError:
        return []
    return sorted(os.path.join(root, name) for name in names if name.startswith(prefix))


def _maker_alive(path: str) -> bool:
    try:
        pid = int(os.path.basename(path)[len(GROUP_PREFIX):].split("-")[0])
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


class MemoryCgroup:
    """A fresh memory cgroup of ``limit_bytes`` (swap off where the kernel counts it): made on
    entry; on exit, once the processes in it have ended (``grace_s``; killed after that), removed.
    Entering also removes the empty groups of makers that died without removing theirs."""

    def __init__(self, limit_bytes: int, grace_s: float = GRACE_S) -> None:
        version, root, why = _hierarchy()
        if version is None:
            raise RuntimeError(why)
        if limit_bytes <= 0:
            raise ValueError(f"a memory limit must be positive, not {limit_bytes}")
        self.version, self.limit_bytes, self.grace_s = version, int(limit_bytes), grace_s
        self.path = os.path.join(root, f"{GROUP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")

    # -- making and removing ------------------------------------------------------------------------

    def __enter__(self) -> "MemoryCgroup":
        for stale in list_groups():
            if not _maker_alive(stale) and not _pids(stale):  # its maker was SIGKILLed; a group that
                try:  # still has processes may be another pid namespace's: left alone
                    os.rmdir(stale)
                except OSError:
                    pass
        os.mkdir(self.path)
        try:
            if self.version == "v1":
                self._write("memory.limit_in_bytes", self.limit_bytes)
                self._write("memory.memsw.limit_in_bytes", self.limit_bytes, optional=True)  # memory + swap
            else:
                self._write("memory.max", self.limit_bytes)
                self._write("memory.swap.max", 0, optional=True)
        except BaseException:
            os.rmdir(self.path)
            raise
        return self

    def __exit__(self, *exc) -> None:
        _remove(self.path, self.version, self.grace_s)

    def _write(self, name: str, value: int, optional: bool = False) -> None:
        target = os.path.join(self.path, name)
        if optional and not os.path.exists(target):  # no swap accounting in this kernel
            return
        with open(target, "w") as f:
            f.write(str(value))

    # -- using it ---------------------------------------------------------------------------------

    def command(self, argv: Sequence[str]) -> List[str]:
        """``argv`` as a command that joins this group first, then execs (same pid, same process)."""
        procs = shlex.quote(os.path.join(self.path, "cgroup.procs"))
        return ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *argv]

    def pids(self) -> List[int]:
        return _pids(self.path)

    def kill(self) -> None:
        """SIGKILL every process in the group and wait (up to ``KILL_WAIT_S``) until they are gone."""
        _kill_all(self.path, self.version)

    def usage(self) -> MemoryUsage:
        """The limit, the peak (all processes together, page cache and tmpfs pages included, as the
        kernel charges them) and the OOM kills, read now: call it before leaving the ``with``."""
        if self.version == "v1":
            peak = _read_int(os.path.join(self.path, "memory.max_usage_in_bytes"))
            kills = _read_key(os.path.join(self.path, "memory.oom_control"), "oom_kill")
        else:
            peak = _read_int(os.path.join(self.path, "memory.peak"))  # Linux 5.19 and later
            kills = _read_key(os.path.join(self.path, "memory.events"), "oom_kill")
        return MemoryUsage(self.limit_bytes, peak, kills)


def run_in_memory_cgroup(argv: Sequence[str], limit_bytes: int, timeout: Optional[float] = None,
                         grace_s: float = GRACE_S, **popen) -> CgroupRun:
    """Run ``argv`` in a fresh group of ``limit_bytes``; after ``timeout`` s every process in the group
    is killed (returncode -9). Keywords go to ``subprocess.Popen`` (``stdout=subprocess.PIPE``: read into
    the result)."""
    with MemoryCgroup(limit_bytes, grace_s=grace_s) as group:
        proc = subprocess.Popen(group.command(argv), start_new_session=True, **popen)
        try:
            out, err = proc.communicate(timeout=timeout)  # drains the pipes: a full one cannot stall it
        except subprocess.TimeoutExpired:
            group.kill()  # all of it: a process of another session could hold a pipe open
            out, err = proc.communicate()
        except BaseException:  # e.g. Ctrl-C: nothing of the run outlives it
            group.kill()
            proc.wait()
            raise
        usage = group.usage()
    return CgroupRun(usage.limit_bytes, usage.peak_bytes, usage.oom_kills, returncode=proc.returncode, stdout=out,
                     stderr=err)


def exit_on_sigterm() -> None:
    """Make SIGTERM end this program as Ctrl-C does, by an exception, so that the ``with`` blocks
    remove their groups (by default SIGTERM ends Python at once). For a command line's ``main``; a
    group whose maker died anyway (SIGKILL) is removed by the next :class:`MemoryCgroup`."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _remove(path: str, version: str, grace_s: float) -> None:
    """Wait up to ``grace_s`` for the group to empty, kill what is left, then rmdir it."""
    deadline = time.monotonic() + grace_s
    while _pids(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    _kill_all(path, version)
    deadline = time.monotonic() + KILL_WAIT_S
    while True:  # the kernel may still be tearing the last process down: EBUSY for a moment
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                left = _pids(path)
                raise RuntimeError(f"could not remove the memory cgroup {path}: {exc}"
                                   + (f"; processes still in it: {left}" if left else "")
                                   + f". Kill them, then rmdir {path}") from exc
            time.sleep(0.05)


def _kill_all(path: str, version: str) -> None:
    """SIGKILL what is in the group until it is empty (at most ``KILL_WAIT_S``); new forks included."""
    deadline = time.monotonic() + KILL_WAIT_S
    while _pids(path) and time.monotonic() < deadline:
        kill_all = os.path.join(path, "cgroup.kill")  # v2, Linux 5.14 and later: the whole group at once
        if version == "v2" and os.path.exists(kill_all):
            with open(kill_all, "w") as f:
                f.write("1")
        else:
            for pid in _pids(path):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(0.05)


def _pids(path: str) -> List[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(line) for line in f if line.strip()]
    except OSError:
        return []


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _read_key(path: str, key: str) -> Optional[int]:
    """The value of the ``key N`` line of a flat-keyed cgroup file."""
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return None
