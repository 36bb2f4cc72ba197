"""The pipeline: the DataLoader, its workers, their arenas and spill files, and the process settings it needs.

Mechanics only. It builds a DataLoader over the ledger's feed with the
measuring collate, starts and stops iterators, reserves arenas the
controller sized, raises the fd limit and switches the sharing strategy
when told to (and puts the strategy back when the loader closes: it is
process-wide while in force).
"""

from __future__ import annotations

import dataclasses
import logging
import resource
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.multiprocessing
from torch.utils.data import DataLoader, Dataset, default_collate

from . import _torch
from .arena import Arena
from .arena import registry as arena_registry
from .ledger import Ledger
from .measure import ShmProbe
from .region import MEMFD, SHM, SharedRegion, memfd_available
from .routing import UNBOUNDED, WorkerRules
from .spill import SpillDir
from .stream import StreamBatcher, StreamCollate
from .transport import MeasuredCollate, WorkerSetup, forking_workers

__all__ = ["Pipeline", "POLL_SECONDS", "measured_collate", "next_watched"]

logger = logging.getLogger("adaptive_loader")

POLL_SECONDS = 1.0  # how often a waiting loader checks its workers


class Pipeline:
    """Owns the DataLoader the loader iterates, rebuilt whenever its settings change."""

    def __init__(self, dataset: Dataset, ledger: Ledger, *, collate_fn: Optional[Callable], shm: ShmProbe,
                 spill_dir: str, arena_owner: Optional[str], safety: float, stall_timeout: float,
                 user_worker_init: Optional[Callable[[int], None]], dataloader_kwargs: Dict[str, Any],
                 arena_kind: Optional[str] = None) -> None:
        self.dataset = dataset
        self.ledger = ledger
        self.collate_fn = collate_fn
        self.shm = shm
        self.spill_parent = spill_dir
        self._spill: Optional[SpillDir] = None
        self.arena_owner = arena_owner
        self.heap_copies = False  # workers count the pages they copy on write (set under a memory limit)
        self.arena_kind = arena_kind
        self.safety = safety
        self.stall_timeout = stall_timeout
        self.user_worker_init = user_worker_init
        self.dataloader_kwargs = dataloader_kwargs
        self.strategy_at_start = torch.multiprocessing.get_sharing_strategy()
        self.sharing_strategy = self.strategy_at_start
        self.fd_soft_limit: Optional[int] = None
        self.dataloader: Optional[DataLoader] = None
        self.collate: Optional[MeasuredCollate] = None
        self.num_workers = 0
        self.prefetch_factor: Optional[int] = None
        self._stale = False
        self.stream = isinstance(dataset, StreamBatcher)
        self._retiring: List[Any] = []  # iterators whose workers were told to exit and are not reaped yet

    @property
    def spill(self) -> SpillDir:
        """The loader's private (0700) spill directory, made at first use, and again after :meth:`close`
        (a dead run's directories are removed then)."""
        if self._spill is None:
            self._spill = SpillDir.create(self.spill_parent)
        return self._spill

    def set_worker_init(self, fn: Optional[Callable[[int], None]]) -> None:
        """The workers started from now on call ``fn`` (after the loader's own setup)."""
        self.user_worker_init = fn
        self._stale = True

    # -- building and iterating -------------------------------------------------------
    def start_iterator(self, num_workers: int, prefetch_factor: Optional[int], arena_plan: Callable[[], Any],
                       batch_bytes_hint: int, memory_room: int = UNBOUNDED) -> Any:
        """An iterator over the feed, with a DataLoader (re)built if the depth changed. The workers
        started now keep their memfd arenas within ``memory_room`` bytes together. The last epoch's
        workers, told to exit, are joined after the new ones fork (their exit, page tables and all,
        overlaps the forks), or before under a memory limit (``heap_copies``), where what they hold
        must be free first."""
        if self.heap_copies:
            self.reap_retired()
        if self.dataloader is not None and (num_workers, prefetch_factor) != (self.num_workers,
                                                                            self.prefetch_factor):
            self.drop()
        if self._stale and self.live_iterator() is None:
            self.dataloader = None  # e.g. a new worker_init_fn: the next workers must get it
        if self.dataloader is None:
            self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
            with _torch.quiet_worker_number_warning():  # said once, at the loader's construction
                self.dataloader = self._make_dataloader()
            self._stale = False
        workers_running = self.dataloader.persistent_workers and self.live_iterator() is not None
        if self.arena_owner is not None and not workers_running:
            self.reserve_arenas(arena_plan())
            # workers started now continue these arenas
            self.collate.arenas = arena_registry.arenas_of(self.arena_owner)
            self.collate.batch_bytes_hint = batch_bytes_hint
            self.collate.rules = dataclasses.replace(self.collate.rules, memory_room=max(0, int(memory_room)))
        with _torch.quiet_worker_number_warning(), forking_workers():
            try:
                iterator = iter(self.dataloader)
            except BaseException as exc:
                _torch.disarm_half_built_iterator(exc)
                raise
        self.reap_retired()
        if self.collate is not None:
            self.collate.arenas = {}  # the workers have them now; here they would outlive the loader's use
        _torch.detach_sigchld_watch(iterator)  # next_watched() registers them while waiting
        return iterator

    def live_iterator(self) -> Any:
        return _torch.live_iterator(self.dataloader)

    def pinning(self) -> bool:
        """Whether batches really get pinned (torch turns pinning off without an accelerator)."""
        iterator = self.live_iterator()
        if iterator is not None:
            return _torch.iterator_pins(iterator)
        return bool(self.dataloader_kwargs.get("pin_memory")) and torch.cuda.is_available()

    def stop(self, iterator: Any, even_persistent: bool = False, kill: bool = False) -> None:
        """Stop the iterator's workers (persistent ones only when told). ``kill``: they may be
        stuck in the user's code; do not wait for them to notice."""
        persistent = self.dataloader is not None and self.dataloader.persistent_workers
        if even_persistent or not persistent:
            if kill:
                for worker in _torch.iterator_workers(iterator):
                    if worker.is_alive():
                        worker.kill()
            _torch.shutdown_workers(iterator)
            if self.arena_owner is not None:
                arena_registry.writers_stopped(self.arena_owner)

    def retire(self, iterator: Any) -> bool:
        """The epoch's last batch is in: workers that are not persistent are told to exit now and
        reaped later (:meth:`reap_retired`), so the epoch's end does not wait while they unmap and
        exit. False where they must be stopped as before (persistent, pinning)."""
        persistent = self.dataloader is not None and self.dataloader.persistent_workers
        if persistent or not _torch.tell_workers_to_exit(iterator):
            return False
        self._retiring.append(iterator)
        if self.arena_owner is not None:  # the next workers may take the arenas over while these exit
            arena_registry.writers_stopped(self.arena_owner, idle=True)
        return True

    def reap_retired(self) -> None:
        """Join the workers :meth:`retire` told to exit (by now they have, mostly)."""
        while self._retiring:
            _torch.shutdown_workers(self._retiring.pop())

    def reap_exited(self) -> None:
        """Join the retired workers that have exited by now, without waiting for the others: each is a
        zombie until joined, and the next epoch may be far off (validation, a checkpoint)."""
        exiting = []
        for iterator in self._retiring:
            alive = [w for w in _torch.iterator_workers(iterator) if w.is_alive()]  # is_alive() reaps one that exited
            if alive:
                exiting.append(iterator)
            else:
                _torch.shutdown_workers(iterator)
        self._retiring = exiting

    def drop(self, iterator: Any = None, kill: bool = False) -> None:
        """Stop every worker and forget the DataLoader; the next iterator builds a new one."""
        self.reap_retired()
        iterator = iterator if iterator is not None else self.live_iterator()
        if iterator is not None:
            self.stop(iterator, even_persistent=True, kill=kill)
        self.remove_spill_files()
        self.dataloader = None

    def close(self) -> None:
        """Stop the workers, release the arenas, put the sharing strategy back."""
        self.drop()
        if self.arena_owner is not None:
            arena_registry.forget(self.arena_owner)
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        if self.sharing_strategy != self.strategy_at_start:
            torch.multiprocessing.set_sharing_strategy(self.strategy_at_start)
            self.sharing_strategy = self.strategy_at_start

    # -- what the actuator carries out --------------------------------------------------
    def set_fd_soft_limit(self, limit: int) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        self.fd_soft_limit = limit

    def set_sharing_strategy(self, strategy: str) -> None:
        torch.multiprocessing.set_sharing_strategy(strategy)
        self.sharing_strategy = strategy

    def reserve_arenas(self, plan: Any) -> None:
        """Reserve the arenas the controller planned (``plan``: capacity, workers), before workers start."""
        if plan is None:
            return
        capacity, workers = plan
        arena_registry.forget_workers(self.arena_owner, workers)
        for worker in workers:
            try:
                arena = Arena.create(capacity, **self._arena_kind_kwargs())
            except (RuntimeError, OSError) as exc:  # then the worker makes its own
                logger.debug("arena of %d B for worker %d not reserved: %s", capacity, worker, exc)
                return
            arena_registry.receive(arena, arena.id, self.arena_owner, worker)

    def forget_arenas(self) -> None:
        """The workers started next make or get new arenas (after a batch was refused)."""
        if self.arena_owner is not None:
            arena_registry.forget(self.arena_owner)

    def current_arenas(self) -> Dict[int, Any]:
        return arena_registry.arenas_of(self.arena_owner) if self.arena_owner is not None else {}

    def arena_idle(self, worker: int) -> bool:
        return arena_registry.idle(self.arena_owner, worker)

    def arena_bytes(self) -> int:
        return arena_registry.mapped_bytes(self.arena_owner) if self.arena_owner is not None else 0

    def remove_spill_files(self) -> None:
        if self.collate is not None:
            self.collate.remove_spill_files()

    # -- internals -------------------------------------------------------------------------
    def _arena_kind_kwargs(self) -> Dict[str, Any]:
        return {"kind": self.arena_kind} if self.arena_kind is not None else {}

    def _make_dataloader(self) -> DataLoader:
        kwargs = dict(self.dataloader_kwargs)
        workers = self.num_workers
        if workers > 0:
            kwargs.update(prefetch_factor=self.prefetch_factor, timeout=min(POLL_SECONDS, self.stall_timeout),
                          worker_init_fn=WorkerSetup(self.user_worker_init, self.sharing_strategy,
                                                     self.fd_soft_limit, self.heap_copies))
        else:
            for name in ("persistent_workers", "prefetch_factor", "multiprocessing_context"):  # refused without workers
                kwargs.pop(name, None)
            if self.user_worker_init is not None:
                kwargs["worker_init_fn"] = self.user_worker_init
        allocated = _shared_counters(workers)
        arena_sizes = _shared_counters(workers) if self.arena_owner is not None else None
        self.ledger.workers_started(workers, allocated)
        # the workers themselves never fill shm past the safety line: above it a batch goes to a file
        keep_free = int((1 - self.safety) * self.shm.read().total)
        extra = {"arena_kind": self.arena_kind} if self.arena_kind is not None else {}
        self.collate = measured_collate(self.collate_fn or default_collate, self.shm.path, self.spill,
                                        shm_keep_free=keep_free, allocated=allocated, arena_owner=self.arena_owner,
                                        arena_sizes=arena_sizes, batches_in_flight=self.prefetch_factor or 1,
                                        workers=workers, **extra)
        if self.stream:  # the workers batch (stream.StreamBatcher): DataLoader passes each batch on
            return DataLoader(self.dataset, batch_size=None, num_workers=workers,
                              collate_fn=StreamCollate(self.collate), **kwargs)
        return DataLoader(self.dataset, batch_sampler=self.ledger.feed, num_workers=workers,
                          collate_fn=self.collate, **kwargs)


def measured_collate(collate_fn: Callable, shm_path: str, spill_dir: Any, *, shm_keep_free: int = 0,
                     batches_in_flight: int = 2, workers: int = 1, **kwargs: Any) -> MeasuredCollate:
    """The workers' collate with the decide layer's rules for these settings, as the pipeline builds it."""
    rules = WorkerRules(keep_free=int(shm_keep_free), batches_in_flight=max(1, int(batches_in_flight)),
                        workers=max(1, int(workers)))
    return MeasuredCollate(collate_fn, shm_path, spill_dir, shm_keep_free=shm_keep_free,
                           batches_in_flight=batches_in_flight, workers=workers, rules=rules, **kwargs)


def next_watched(iterator: Any) -> Any:
    """``next(iterator)`` with torch's SIGCHLD watch on: a worker dying now
    interrupts even a read blocked on a half-sent message."""
    workers = _torch.iterator_workers(iterator)
    if not workers:
        return next(iterator)
    _torch.watch_workers(iterator, tuple(w.pid for w in workers))
    try:
        return next(iterator)
    finally:
        _torch.unwatch_workers(iterator)


class SharedCounters:
    """``n`` int64 slots in shared memory (a memfd: no /dev/shm needed) that the workers add
    to, each to its own slot, so no lock. Pickling passes the region's fd (spawn, forkserver)."""

    def __init__(self, region: SharedRegion, n: int) -> None:
        self.region, self.n = region, n
        self.values = region.array[:8 * n].view(np.int64)

    def __getitem__(self, worker: int) -> int:
        return int(self.values[worker])

    def __setitem__(self, worker: int, value: int) -> None:
        self.values[worker] = value

    def tolist(self) -> list:
        return self.values.tolist()

    def sum(self) -> int:
        return int(self.values.sum())

    def __reduce__(self):
        return SharedCounters, (self.region, self.n)


def _shared_counters(n: int) -> Optional[SharedCounters]:
    """``n`` counters the workers can add to; None when there are no workers or not even
    that much shared memory can be had (then in-flight bytes are predicted)."""
    if n == 0:
        return None
    for kind in (MEMFD, SHM) if memfd_available() else (SHM,):
        try:
            return SharedCounters(SharedRegion.create(8 * n, kind), n)
        except OSError:
            continue
    return None
