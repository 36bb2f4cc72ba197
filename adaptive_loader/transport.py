"""Worker side: collate, measure, and put each batch on shm or, if it cannot fit, off it.

Vanilla DataLoader lets the worker's queue feeder thread copy a batch into
fresh shm while pickling it; when ``/dev/shm`` is full that thread fails, the
batch is dropped and the main process waits forever. Here the worker's main
thread moves the batch into shm itself, so an allocation failure is caught
where it happens and the batch travels off shm instead (pickled by value
through the worker's pipe). The feeder then only passes handles.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import resource
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional

import torch
import torch.multiprocessing
from torch.utils.data import get_worker_info
from torch.utils.data._utils import worker as _torch_worker
from torch.utils.data._utils.pin_memory import pin_memory as _pin_memory

from .measure import _leaves, footprint

__all__ = ["BatchStats", "Envelope", "MeasuredCollate", "WorkerSetup"]

SHM = "shm"
PIPE = "pipe"
INLINE = "inline"  # num_workers=0: the batch never leaves the process

_RESOURCE_ERRNOS = {errno.ENOSPC, errno.ENOMEM, errno.EMFILE, errno.ENFILE}
_RESOURCE_MESSAGES = ("shared memory", "No space left", "Too many open files", "unable to write to file",
                      "unable to mmap", "unable to open shared memory", "error 28", "error 24")


@dataclass
class BatchStats:
    """Measured in the worker, travels with the batch."""

    sample_bytes: List[int]
    sample_storages: List[int]
    batch_bytes: int
    batch_storages: int
    transport: str
    off_shm_reason: Optional[str]
    worker_id: int
    worker_pid: int
    collate_seconds: float


class Envelope:
    """A batch and its stats. A batch sent off shm is a pickle until :meth:`open`."""

    __slots__ = ("payload", "stats", "pickled")

    def __init__(self, payload: Any, stats: BatchStats, pickled: bool = False) -> None:
        self.payload = payload
        self.stats = stats
        self.pickled = pickled

    def open(self) -> Any:
        if self.pickled:
            self.payload = pickle.loads(self.payload)
            self.pickled = False
        return self.payload

    def pin_memory(self, device: Optional[str] = None) -> "Envelope":
        """Called by DataLoader's pin-memory thread."""
        return Envelope(_pin_memory(self.open(), device), self.stats)


class MeasuredCollate:
    """Wraps the user's ``collate_fn``; runs in the workers.

    Args:
        collate_fn: the user's collate function.
        shm_path: where shm is mounted, to check free space before a batch goes there.
        shm_keep_free: bytes of shm never to fill from here (room for others).
    """

    def __init__(self, collate_fn: Callable[[List[Any]], Any], shm_path: str, shm_keep_free: int = 0) -> None:
        self.collate_fn = collate_fn
        self.shm_path = shm_path
        self.shm_keep_free = shm_keep_free

    def __call__(self, samples: List[Any]) -> Envelope:
        start = time.perf_counter()
        sizes = [footprint(s) for s in samples]
        sample_bytes = [b for b, _ in sizes]
        info = get_worker_info()
        if info is None:  # num_workers=0: no shm involved
            batch = self.collate_fn(samples)
            return Envelope(batch, self._stats(sizes, batch, INLINE, None, -1, start))
        needed = sum(sample_bytes)
        free = self._shm_free()
        if needed > free - self.shm_keep_free:
            reason = f"batch needs {needed} B, shm has {free} B free"
            return self._off_shm(samples, sizes, reason, info.id, start)
        try:
            batch = self.collate_fn(samples)
            _share(batch)
        except (RuntimeError, OSError) as exc:
            if not _is_resource_error(exc):
                raise
            return self._off_shm(samples, sizes, f"shm allocation failed: {exc}", info.id, start)
        return Envelope(batch, self._stats(sizes, batch, SHM, None, info.id, start))

    def _off_shm(self, samples, sizes, reason, worker_id, start) -> Envelope:
        with _collate_without_shm():
            batch = self.collate_fn(samples)
        stats = self._stats(sizes, batch, PIPE, reason, worker_id, start)
        return Envelope(pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL), stats, pickled=True)

    def _shm_free(self) -> int:
        st = os.statvfs(self.shm_path)
        return st.f_bavail * st.f_frsize

    @staticmethod
    def _stats(sizes, batch, transport, reason, worker_id, start) -> BatchStats:
        batch_bytes, batch_storages = footprint(batch)
        return BatchStats(
            sample_bytes=[b for b, _ in sizes], sample_storages=[s for _, s in sizes],
            batch_bytes=batch_bytes, batch_storages=batch_storages, transport=transport,
            off_shm_reason=reason, worker_id=worker_id, worker_pid=os.getpid(),
            collate_seconds=time.perf_counter() - start)


def _share(batch: Any) -> None:
    """Move every CPU tensor of the batch into shm now, in this thread."""
    for leaf in _leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.device.type == "cpu" and not leaf.is_shared():
            leaf.share_memory_()


@contextlib.contextmanager
def _collate_without_shm() -> Iterator[None]:
    """Run collate as if in the main process.

    ``default_collate`` stacks straight into fresh shm when it sees a worker;
    hiding the worker info for the duration makes it allocate ordinary memory.
    """
    saved = _torch_worker._worker_info
    _torch_worker._worker_info = None
    try:
        yield
    finally:
        _torch_worker._worker_info = saved


def _is_resource_error(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS:
        return True
    text = str(exc)
    return any(marker in text for marker in _RESOURCE_MESSAGES)


class WorkerSetup:
    """``worker_init_fn`` wrapper: sharing strategy and fd limit first, then the user's own."""

    def __init__(self, user_fn: Optional[Callable[[int], None]], sharing_strategy: str,
                 fd_soft_limit: Optional[int]) -> None:
        self.user_fn = user_fn
        self.sharing_strategy = sharing_strategy
        self.fd_soft_limit = fd_soft_limit

    def __call__(self, worker_id: int) -> None:
        if torch.multiprocessing.get_sharing_strategy() != self.sharing_strategy:
            torch.multiprocessing.set_sharing_strategy(self.sharing_strategy)
        if self.fd_soft_limit is not None:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            if soft < self.fd_soft_limit <= hard:
                resource.setrlimit(resource.RLIMIT_NOFILE, (self.fd_soft_limit, hard))
        if self.user_fn is not None:
            self.user_fn(worker_id)
