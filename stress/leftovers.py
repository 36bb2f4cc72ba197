"""What a run left behind: files in its private /dev/shm and in its spill directory.

Run as ``python -m stress.leftovers DIR`` inside the sandbox once the child has
ended (``sandbox_command(after=...)``): it waits for the child's process group
(its workers) to go, then writes ``DIR/shm-left.json``. Light on purpose: no
torch, no numpy.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Dict, List

__all__ = ["HARNESS_PREFIX", "list_shm", "list_tree", "main"]

#: Files the scenarios themselves put in /dev/shm (a filler, a hog): not the loader's.
HARNESS_PREFIX = "stress-"
GROUP_GRACE_S = 5.0  # orphaned DataLoader workers notice their dead parent within torch's 5 s status check


def list_shm(path: str = "/dev/shm") -> Dict[str, int]:
    """Name -> size of every file in ``path`` that the harness did not make itself."""
    out = {}
    try:
        names = os.listdir(path)
    except OSError:
        return out
    for name in sorted(names):
        if name.startswith(HARNESS_PREFIX):
            continue
        try:
            out[name] = os.lstat(os.path.join(path, name)).st_size
        except OSError:
            pass
    return out


def list_tree(path: str) -> List[str]:
    """Every file and directory under ``path`` (relative paths), ``path`` itself excluded."""
    out = []
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            out.append(os.path.relpath(os.path.join(root, name), path))
    return sorted(out)


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies nobody reaped do not count)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # after "comm)": state, ppid, pgrp
            return True
    return False


def main(directory: str) -> None:
    try:
        with open(os.path.join(directory, "pid")) as f:
            pgid = int(f.read().strip())
    except (OSError, ValueError):
        pgid = 0
    waited, killed = 0.0, False
    if pgid > 0:
        started = time.monotonic()
        while _group_alive(pgid) and time.monotonic() - started < GROUP_GRACE_S:
            time.sleep(0.05)
        if _group_alive(pgid):  # what is still there after the grace is not the loader's to clean up now
            killed = True
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 5
            while _group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
        waited = time.monotonic() - started
    with open(os.path.join(directory, "shm-left.json"), "w") as f:
        json.dump({"files": list_shm(), "waited_s": round(waited, 2), "killed_stragglers": killed}, f)


if __name__ == "__main__":
    main(sys.argv[1])
