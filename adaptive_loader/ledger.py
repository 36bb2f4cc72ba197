"""The ledger: the one place that knows what the loader has handed out, holds and has learnt.

Batches handed to DataLoader and not yet delivered (:class:`Feed`), batches
the user still holds (:class:`HeldBatches`), the shm bytes each worker put
there, the sizes of recent batches, the arenas found too small, the last
batch delivered. It records; it never decides.
"""

from __future__ import annotations

import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional

import torch

from .kinds import ARENA_ROADS, Road
from .measure import leaves
from .sampler import BudgetBatchSampler

__all__ = ["Feed", "HeldBatches", "LastBatch", "Ledger"]

RECENT_BATCHES = 64  # batch sizes remembered for sizing arenas


class Feed:
    """The batch sampler DataLoader sees: pulls from the sampler and remembers
    what it handed out, so a yielded batch can be matched to its indices and
    the undelivered ones can be given back."""

    def __init__(self, sampler: BudgetBatchSampler) -> None:
        self.sampler = sampler
        self.source: Iterator[List[int]] = iter(())
        self.outstanding: Deque[List[int]] = deque()
        self.replay: Deque[List[int]] = deque()
        self.delivered = 0  # batches delivered this epoch
        self.exhausted = False  # the source ended: every batch of the epoch was handed out
        # hand out at most this many batches per DataLoader iterator, then end it: under a memory
        # budget with nothing measured, no batch is planned before the first one is measured
        self.hold_after: Optional[int] = None

    def start(self, source: Iterator[List[int]], skip: int = 0) -> None:
        self.source = source
        self.exhausted = False
        self.outstanding.clear()
        self.replay.clear()
        self.delivered = skip
        for _ in range(skip):  # resuming: these were delivered before the restart
            next(self.source, None)

    def requeue_outstanding(self) -> None:
        """Batches handed out but not delivered come again. With one replica they go back to
        the sampler, to be packed under the current budget; across ranks, where every rank must
        keep the same plan, the very same batches are sent again first."""
        self.give_back(list(self.outstanding))
        self.outstanding.clear()

    def give_back(self, batches: List[List[int]]) -> None:
        """These batches' indices come again later in the epoch."""
        if not batches:
            return
        self.exhausted = False
        if self.sampler.num_replicas > 1:
            self.replay.extendleft(reversed(batches))
        else:
            self.sampler.requeue([i for batch in batches for i in batch])
            self.source = self.sampler.iter_remaining()

    def __iter__(self) -> Iterator[List[int]]:
        handed = 0
        while self.hold_after is None or handed < self.hold_after:
            batch = self.replay.popleft() if self.replay else next(self.source, None)
            if batch is None:
                self.exhausted = True
                return
            self.outstanding.append(batch)
            handed += 1
            yield batch

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def done(self) -> bool:
        """Whether every batch of the epoch was handed out and delivered."""
        return self.exhausted and not self.outstanding and not self.replay


class HeldBatches:
    """Yielded batches the user still references (via a weakref on one tensor each), with their bytes."""

    def __init__(self) -> None:
        self._bytes: Dict[int, int] = {}
        self._refs: Dict[int, weakref.ref] = {}
        self._next_id = 0

    def track(self, batch: Any, nbytes: int) -> None:
        anchor = next((leaf for leaf in leaves(batch) if isinstance(leaf, torch.Tensor)), None)
        if anchor is None:
            return
        key = self._next_id
        self._next_id += 1
        self._bytes[key] = nbytes
        self._refs[key] = weakref.ref(anchor, lambda _, key=key: self._release(key))

    def _release(self, key: int) -> None:
        self._bytes.pop(key, None)
        self._refs.pop(key, None)

    def alive(self) -> int:
        return len(self._bytes)

    def bytes_alive(self) -> int:
        return sum(self._bytes.values())


@dataclass(frozen=True)
class LastBatch:
    """The batch most recently yielded to the user (a stream's: ``(worker, position)`` pairs as indices)."""

    indices: List[Any]
    cost: float
    step: int
    epoch: int
    repeat: bool = False  # a stream's rank that ran dry repeats its last batch (uneven="pad")


class Ledger:
    """What is in flight, held and in arenas, and what the recent batches weighed."""

    def __init__(self, sampler: BudgetBatchSampler) -> None:
        self.feed = Feed(sampler)
        self.held = HeldBatches()
        # batches made in the main process (the probe's, num_workers=0) the user still references: their bytes are
        # in its heap, and a budget that plans for the batches held must not count them a second time
        self.held_inline = HeldBatches()
        self.step = 0  # batches delivered in all
        self.last_batch: Optional[LastBatch] = None
        self.allocated: Optional[torch.Tensor] = None  # per-worker shm bytes, written by the workers
        self.delivered_bytes: List[int] = []
        self.largest_batch = 0  # bytes
        self.recent_batches: Deque[int] = deque(maxlen=RECENT_BATCHES)
        self.recent_handles: Deque[int] = deque(maxlen=RECENT_BATCHES)  # fds each recent batch carried
        self.tight_arenas: Dict[int, int] = {}  # worker id -> its arena's capacity if too small, else 0
        self.last_target = 0.0  # the last decision's bytes per batch
        self.arena_misses = 0  # batches that could have gone through an arena and did not, this epoch (epoch_end)
        self.refused_batches = 0  # batches whose stamps did not match: refused and dispatched again, this epoch

    def workers_started(self, workers: int, allocated: Optional[torch.Tensor]) -> None:
        self.allocated = allocated
        self.delivered_bytes = [0] * workers

    def deliver(self, indices: List[int], cost: float, stats: Any, batch: Any, pinned: bool, epoch: int) -> None:
        """A batch reached the user: account for where its bytes are."""
        self.step += 1
        self.feed.delivered += 1
        stream = getattr(stats, "stream", None)
        self.last_batch = LastBatch(list(indices), cost, self.step, epoch, repeat=bool(stream and stream.repeat))
        road = stats.transport
        if road == Road.SHM:
            if stats.worker_id >= 0:
                self.delivered_bytes[stats.worker_id] += stats.batch_bytes
            if not pinned:  # pinned batches are copied out of shm
                self.held.track(batch, stats.batch_bytes)
        elif road in ARENA_ROADS:  # its bytes are the arena's, counted whole
            self.delivered_bytes[stats.worker_id] += stats.arena_new_bytes
            if not pinned:
                self.held.track(batch, 0)
        elif road == Road.INLINE:
            self.held_inline.track(batch, stats.batch_bytes)
        if getattr(stats, "arena_miss", None):
            self.arena_misses += 1
        self.largest_batch = max(self.largest_batch, stats.batch_bytes)
        self.recent_batches.append(stats.batch_bytes)
        self.recent_handles.append(stats.handles)
        if stats.worker_id >= 0:
            self.tight_arenas[stats.worker_id] = stats.arena_capacity

    def in_flight_bytes(self, expected_bytes: Callable[[int, float], float], costs: Any) -> int:
        """Shm taken by batches the workers made but the user has not got yet:
        counted by the workers themselves, else predicted from the cost model."""
        if self.allocated is not None:
            return max(0, sum(self.allocated.tolist()) - sum(self.delivered_bytes))
        if not self.feed.outstanding:
            return 0
        samples = sum(len(batch) for batch in self.feed.outstanding)
        cost = sum(float(costs[batch].sum()) for batch in self.feed.outstanding)
        return int(expected_bytes(samples, cost))

    def smallest_tight_arena(self) -> int:
        return min((c for c in self.tight_arenas.values() if c), default=0)
