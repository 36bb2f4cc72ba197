"""Run a command in a private mount namespace with a small tmpfs on /dev/shm.

``unshare -m`` as root, ``unshare -rm`` (a user namespace mapping us to root)
otherwise. Where neither works, :func:`sandbox_available` says why and
nothing runs: never silently on the machine's big /dev/shm.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import subprocess
from typing import List, Optional, Sequence, Tuple

__all__ = ["sandbox_available", "sandbox_command", "parse_size"]


def parse_size(text: str) -> int:
    """'64M' -> 67108864; plain numbers are bytes."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    text = str(text).strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


@functools.lru_cache(maxsize=None)
def _unshare_prefix() -> Tuple[Optional[List[str]], str]:
    """The unshare invocation that works here, or None and why not."""
    if shutil.which("unshare") is None:
        return None, "the unshare command is missing (util-linux)"
    errors = []
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
        if prefix == ["unshare", "-m"] and os.geteuid() != 0:
            continue
        probe = prefix + ["sh", "-c", "mount -t tmpfs -o size=1M tmpfs /dev/shm && test -d /dev/shm"]
        result = subprocess.run(probe, capture_output=True, text=True)
        if result.returncode == 0:
            return prefix, ""
        errors.append(f"{' '.join(prefix)}: {result.stderr.strip() or result.returncode}")
    return None, "cannot make a private mount namespace with a tmpfs on /dev/shm (" + "; ".join(errors) + ")"


def sandbox_available() -> Tuple[bool, str]:
    """(True, '') if a small /dev/shm can be made here, else (False, why)."""
    prefix, why = _unshare_prefix()
    return prefix is not None, why


def sandbox_command(argv: Sequence[str], shm_bytes: int, nofile: Optional[int] = None,
                    after: Optional[Sequence[str]] = None) -> List[str]:
    """``argv`` wrapped to run with ``shm_bytes`` of /dev/shm (and ``ulimit -n nofile``); ``after``,
    if given, runs in the same namespace once ``argv`` has ended (e.g. to list what it left there),
    and the exit status is still ``argv``'s."""
    prefix, why = _unshare_prefix()
    if prefix is None:
        raise RuntimeError(why)
    steps = [f"mount -t tmpfs -o size={int(shm_bytes)} tmpfs /dev/shm"]
    if nofile is not None:
        steps.append(f"ulimit -n {int(nofile)}")
    command = " ".join(shlex.quote(a) for a in argv)
    if after is None:
        steps.append("exec " + command)
    else:
        steps.append(f"{{ {command}; rc=$?; {' '.join(shlex.quote(a) for a in after)}; exit $rc; }}")
    return prefix + ["sh", "-c", " && ".join(steps)]
