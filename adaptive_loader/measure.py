"""Probes: what a batch weighs, and how much shm, fds and RAM are left.

Everything here reads state; nothing decides. ``footprint`` runs in the
workers on every batch, the probes run in the main process.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import psutil
import torch

__all__ = ["footprint", "ShmProbe", "ShmState", "FdState", "read_fds", "host_ram_available", "rss_of"]


def footprint(obj: Any) -> Tuple[int, int]:
    """Bytes and number of distinct storages of the tensors and arrays in ``obj``.

    Walks mappings, sequences and sets; counts each tensor storage once (views
    of one storage share it). Strings and other objects count as zero.
    """
    seen: set = set()
    total = 0
    count = 0
    for leaf in _leaves(obj):
        if isinstance(leaf, torch.Tensor):
            storage = leaf.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            nbytes = storage.nbytes()
        else:
            key = (leaf.__array_interface__["data"][0], leaf.nbytes)
            nbytes = leaf.nbytes
        if key in seen:
            continue
        seen.add(key)
        total += nbytes
        count += 1
    return total, count


def _leaves(obj: Any) -> Iterable[Any]:
    """Tensors and arrays inside mappings, sequences and sets, depth first."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, (torch.Tensor, np.ndarray)):
            yield item
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (Sequence, Set)) and not isinstance(item, (str, bytes, bytearray)):
            stack.extend(item)


@dataclass(frozen=True)
class ShmState:
    """Free and total bytes of the shared-memory filesystem."""

    free: int
    total: int

    @property
    def used(self) -> int:
        return self.total - self.free


class ShmProbe:
    """``os.statvfs`` of the shm mount (``/dev/shm`` unless told otherwise)."""

    def __init__(self, path: str = "/dev/shm") -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"shm_path must be a path, got {type(path).__name__}")
        if not os.path.isdir(path):
            raise ValueError(
                f"shm_path {path!r} does not exist or is not a directory; torch shares memory through "
                f"the POSIX shm mount (normally /dev/shm): pass the path where it is mounted")
        self.path = os.fspath(path)

    def read(self) -> ShmState:
        st = os.statvfs(self.path)
        return ShmState(free=st.f_bavail * st.f_frsize, total=st.f_blocks * st.f_frsize)


@dataclass(frozen=True)
class FdState:
    """Open fds of this process against RLIMIT_NOFILE."""

    in_use: int
    soft_limit: int
    hard_limit: int


def read_fds() -> FdState:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux, or fds exhausted right now
        in_use = soft
    return FdState(in_use, soft, hard)


def host_ram_available() -> int:
    return int(psutil.virtual_memory().available)


def rss_of(pids: List[int]) -> Dict[int, Optional[int]]:
    """Resident set size of each pid (``None`` for one that is gone)."""
    out: Dict[int, Optional[int]] = {}
    for pid in pids:
        try:
            out[pid] = int(psutil.Process(pid).memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            out[pid] = None
    return out
