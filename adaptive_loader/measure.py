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


def footprint(obj: Any, *, own_bytes: bool = False) -> Tuple[int, int]:
    """Bytes and number of distinct storages of the tensors and arrays in ``obj``.

    Walks mappings, lists, tuples, sets and other sequences (not strings,
    bytes, memoryviews or ranges; each container once). A tensor counts its
    whole storage once, however many views of it appear: that is what sharing
    it moves to shm. With ``own_bytes`` a tensor counts only the bytes it
    spans (a row of a dataset-wide tensor weighs one row): the better guess of
    what it adds to a batch once collated. A numpy array counts its own bytes,
    since it is pickled by value. Everything else counts as zero.
    """
    seen: set = set()
    storages: set = set()
    total = 0
    for leaf in _leaves(obj):
        if isinstance(leaf, torch.Tensor):
            storage = leaf.untyped_storage()
            storage_key = (storage.data_ptr(), storage.nbytes())
            storages.add(storage_key)
            if own_bytes:
                key, nbytes = (leaf.data_ptr(), leaf.nbytes), leaf.nbytes
            else:
                key, nbytes = storage_key, storage.nbytes()
        else:
            key = (leaf.__array_interface__["data"][0], leaf.nbytes)  # the same key as a tensor on its buffer
            nbytes = leaf.nbytes
            storages.add(key)
        if key not in seen:
            seen.add(key)
            total += nbytes
    return total, len(storages)


_NOT_CONTAINERS = (str, bytes, bytearray, memoryview, range)


def _leaves(obj: Any) -> Iterable[Any]:
    """Tensors and arrays inside mappings, sequences and sets, depth first."""
    stack = [obj]
    visited: set = set()
    while stack:
        item = stack.pop()
        if isinstance(item, (torch.Tensor, np.ndarray)):
            yield item
        elif isinstance(item, (Mapping, Sequence, Set)) and not isinstance(item, _NOT_CONTAINERS):
            if id(item) in visited:  # shared or self-containing containers
                continue
            visited.add(id(item))
            stack.extend(item.values() if isinstance(item, Mapping) else item)


@dataclass(frozen=True)
class ShmState:
    """Free and total bytes of the shared-memory filesystem."""

    free: int
    total: int


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


_PROCESSES: Dict[int, psutil.Process] = {}  # opening a Process reads /proc: keep them


def rss_of(pids: List[int]) -> Dict[int, Optional[int]]:
    """Resident set size of each pid (``None`` for one that is gone)."""
    out: Dict[int, Optional[int]] = {}
    for pid in pids:
        try:
            process = _PROCESSES.get(pid)
            if process is None:
                process = _PROCESSES[pid] = psutil.Process(pid)
            out[pid] = int(process.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            _PROCESSES.pop(pid, None)
            out[pid] = None
    if len(_PROCESSES) > 256:
        _PROCESSES.clear()
    return out
