"""Probes: what a batch weighs, and how much shm, fds and RAM are left.

Everything here reads state; nothing decides. ``footprint`` runs in the
workers on every batch, the probes run in the main process.
"""

from __future__ import annotations

import ctypes
import os
import resource
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import psutil
import torch

from . import _torch

__all__ = ["footprint", "leaves", "dense_parts", "byte_span", "ShmProbe", "ShmState", "FdState", "read_fds",
           "host_ram_available", "rss_of", "anon_bytes", "private_bytes", "HeapMeter", "mark_heap_base",
           "heap_growth", "heap_before_batch", "release_free_heap"]


def footprint(obj: Any, *, own_bytes: bool = False) -> Tuple[int, int]:
    """Bytes and number of distinct storages of the tensors and arrays in ``obj``.

    Walks mappings, lists, tuples, sets and other sequences (not strings,
    bytes, memoryviews or ranges; each container once). A tensor counts its
    whole storage once, however many views of it appear: that is what sharing
    it moves to shm. With ``own_bytes`` a tensor counts only the bytes it
    spans in its storage, views of one storage counted once where they
    overlap (a row of a dataset-wide tensor weighs one row, an expanded tensor
    its storage, not its expansion): the better guess of what it adds to a
    batch. Sparse and nested tensors count the tensors that hold their values
    and indices. A numpy array counts its own bytes, since it is pickled by
    value. Everything else counts as zero.
    """
    storages: Dict[tuple, int] = {}  # storage key -> its bytes
    spans: Dict[tuple, List[Tuple[int, int]]] = {}  # storage key -> byte ranges of it that tensors span
    arrays: Dict[tuple, int] = {}
    for leaf in leaves(obj):
        if not isinstance(leaf, torch.Tensor):
            key = (leaf.__array_interface__["data"][0], leaf.nbytes)  # the same key as a tensor on its buffer
            arrays[key] = leaf.nbytes
            continue
        for part in dense_parts(leaf):
            try:
                storage = part.untyped_storage()
                key = (storage.data_ptr(), storage.nbytes())
                size = storage.nbytes()
                span = byte_span(part)
            except (RuntimeError, NotImplementedError):  # a tensor without a storage of its own
                key, size, span = ("object", id(part)), part.nbytes, (0, part.nbytes)
            storages[key] = size
            spans.setdefault(key, []).append(span)
    total = 0
    for key, size in storages.items():
        total += _union(spans[key]) if own_bytes else size
    for key, size in arrays.items():
        if key not in storages:
            total += size
    return total, len(storages) + sum(1 for key in arrays if key not in storages)


def _union(ranges: List[Tuple[int, int]]) -> int:
    total, end = 0, None
    for lo, hi in sorted(ranges):
        if end is None or lo > end:
            total += hi - lo
            end = hi
        elif hi > end:
            total += hi - end
            end = hi
    return total


def byte_span(tensor: torch.Tensor) -> Tuple[int, int]:
    """The bytes ``[lo, hi)`` of its storage that a strided tensor reads (empty for no elements)."""
    itemsize = tensor.element_size()
    lo = tensor.storage_offset() * itemsize
    if tensor.numel() == 0:
        return lo, lo
    extent = 1 + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride()))
    return lo, lo + extent * itemsize


def dense_parts(tensor: torch.Tensor) -> List[torch.Tensor]:
    """The strided tensors that hold a tensor's data: itself if strided; the indices and values of
    a sparse tensor; the components of a nested one."""
    layout = tensor.layout
    if tensor.is_nested:
        if _torch.JAGGED is not None and layout == _torch.JAGGED:
            return [tensor.values(), tensor.offsets()] + ([tensor.lengths()] if tensor.lengths() is not None else [])
        return list(tensor.unbind())
    if layout == torch.strided:
        return [tensor]
    if layout == torch.sparse_coo:
        return list(_torch.coo_parts(tensor))
    if layout in (torch.sparse_csr, torch.sparse_bsr):
        return [tensor.crow_indices(), tensor.col_indices(), tensor.values()]
    if layout in (torch.sparse_csc, torch.sparse_bsc):
        return [tensor.ccol_indices(), tensor.row_indices(), tensor.values()]
    return []  # mkldnn and other opaque layouts: nothing we can count


_NOT_CONTAINERS = (str, bytes, bytearray, memoryview, range)


def leaves(obj: Any) -> Iterable[Any]:
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


_leaves = leaves  # the old name, until every caller uses ``leaves``


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


_SELF: Optional[psutil.Process] = None  # this process (a forked worker makes its own)


def read_fds() -> FdState:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    global _SELF
    if _SELF is None or _SELF.pid != os.getpid():
        _SELF = psutil.Process()
    try:
        in_use = _SELF.num_fds()
    except (OSError, psutil.Error):  # fds exhausted right now
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


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
PRIVATE_EVERY = 32  # batches between readings of the private pages (smaps_rollup: 2-4 ms each)


def anon_bytes() -> Optional[int]:
    """This process's resident anonymous memory (statm: resident less file and shmem pages), ~20 us;
    ``None`` without /proc. Arena pages are shmem: not counted."""
    try:
        with open("/proc/self/statm", "rb") as f:
            fields = f.read().split()
        return (int(fields[1]) - int(fields[2])) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def private_bytes() -> Optional[int]:
    """This process's private pages (smaps_rollup), pages it copied on write included; 2-4 ms."""
    try:
        total = 0
        with open("/proc/self/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Private_"):
                    total += int(line.split()[1]) << 10
        return total
    except (OSError, IndexError, ValueError):
        return None


class HeapMeter:
    """The memory a process took since :meth:`mark`: what a worker charges to the memory limit while
    it makes a batch. A forked worker starts with its parent's pages counted as its own, so it
    counts growth: of its anonymous pages at every batch (cheap), plus the parent's pages it has
    copied on write, which that misses, read from its private pages every ``PRIVATE_EVERY`` batches."""

    def __init__(self) -> None:
        self.copies = False
        self._anon0: Optional[int] = None
        self._private0: Optional[int] = None
        self._copied = 0
        self._reads = 0

    def mark(self, copies: bool = True) -> None:
        """Count from now on; ``copies``: the parent's pages copied on write too (a forked worker's)."""
        self.copies = copies
        self._anon0, self._private0 = anon_bytes(), private_bytes() if copies else None
        self._copied, self._reads = 0, 0

    def growth(self) -> int:
        """Bytes taken since :meth:`mark` (0 when unknown)."""
        anon = anon_bytes() if self._anon0 is not None else None
        if anon is None or self._anon0 is None:
            return 0
        grown = anon - self._anon0
        if self._reads % PRIVATE_EVERY == 0 and self._private0 is not None:
            private = private_bytes()
            if private is not None:
                self._copied = max(0, private - self._private0 - grown)
        self._reads += 1
        return max(0, grown) + self._copied


_HEAP = HeapMeter()


def mark_heap_base(copies: bool = True) -> None:
    """From here on, :func:`heap_growth` counts this process's heap (a worker calls it as it starts;
    ``copies``, under a memory limit: with the parent's pages it copies on write, which costs a few ms
    every 32 batches, and :func:`heap_before_batch` gives the free pages back)."""
    _HEAP.mark(copies)


def heap_before_batch() -> None:
    """Under a memory limit (``mark_heap_base(copies=True)``), give the C heap's free pages back before
    the worker makes a batch: glibc keeps what the last batch freed, and the memory cgroup counts it
    as used (the detection stream in 768 MiB: a worker's extra beside its batch 90-120 MiB without,
    35-45 MiB with)."""
    if _HEAP.copies:
        release_free_heap()


def heap_growth() -> int:
    """Bytes of memory this process took since :func:`mark_heap_base` (0 when unknown): what a worker
    holds while it makes a batch, the batch's samples included."""
    return _HEAP.growth()


def release_free_heap() -> None:
    """Give the C heap's free pages back to the kernel (glibc's ``malloc_trim``; elsewhere nothing).
    Before workers fork: pages the parent freed but kept would be reused by each worker, each
    copy charged again to the memory limit, and unseen by the workers' growth of anonymous pages."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None  # glibc's, once looked up (False: this C library has none)
