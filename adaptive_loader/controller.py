"""The controller: measurements in, the next budget and fallbacks out.

Pure logic, no processes and no I/O, so every rule is unit-testable with plain
numbers. The loader feeds it an :class:`Observation` after each batch and
applies the :class:`Decision` it returns.
"""

from __future__ import annotations

import math
import resource
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, List, Optional, Tuple

import numpy as np

__all__ = ["CostModel", "Observation", "Decision", "Controller", "arena_capacity", "arena_plan", "decision_due",
           "fds_due", "memory_due", "fd_pressure", "strategy_after_failure", "format_cost", "HELD_BATCHES",
           "held_per_worker", "arena_batches_needed"]


#: Batches the user may hold at once besides those in flight: the one in hand, and the last one,
#: which a ``for`` loop's variable keeps while the next is handed over. Every rule that sizes for
#: them reads this (see :func:`held_per_worker` for an arena's share).
HELD_BATCHES = 2


def held_per_worker(workers: int) -> int:
    """Of the ``HELD_BATCHES``, how many lie on one worker's arena: batches come from the workers
    in turn, so with two workers or more the two held batches are on different arenas."""
    return -(-HELD_BATCHES // max(1, workers))


class CostModel:
    """Bytes of one sample as ``intercept + slope * cost``, learned online.

    Over the most recent ``window`` samples it fits a line (least squares once
    it has ``min_samples`` samples whose costs vary; before that, bytes
    proportional to cost at the mean ratio) and keeps the largest residual
    as a margin. :meth:`sample_bytes` adds the margin, so it bounds every
    sample seen from above; :meth:`expected_bytes` is the central estimate.
    """

    def __init__(self, window: int = 512, min_samples: int = 16, refit_every: int = 64) -> None:
        self.window = window
        self.min_samples = min_samples
        self.refit_every = refit_every  # once the window is full; refitting is ~40 us
        self._costs = np.zeros(window)
        self._bytes = np.zeros(window)
        self._n = 0  # samples seen in all
        self._fit: Optional[Tuple[float, float, float]] = None
        self._fitted_at = 0

    @property
    def seen(self) -> int:
        return self._n

    def observe(self, costs, nbytes) -> None:
        """Record samples: their costs and measured bytes."""
        costs = np.asarray(costs, dtype=np.float64)
        nbytes = np.asarray(nbytes, dtype=np.float64)
        kept = min(len(costs), self.window)  # only the newest fit in the window
        slots = (self._n + len(costs) - kept + np.arange(kept)) % self.window
        self._costs[slots], self._bytes[slots] = costs[len(costs) - kept:], nbytes[len(costs) - kept:]
        self._n += len(costs)
        if self._fit is None or self._n - self._fitted_at >= min(self.refit_every, self.window) \
                or self._n <= self.min_samples:
            self._fit = None  # refit lazily
        elif len(costs):  # between refits, widen the margin so the bound still covers every sample
            a, b, m = self._fit
            m = max(m, float(np.max(nbytes - (a + b * costs))))
            self._fit = (a, b, m)

    def coefficients(self) -> Optional[Tuple[float, float, float]]:
        """``(intercept, slope, margin)`` bytes, or ``None`` before any sample."""
        if self._n == 0:
            return None
        if self._fit is None:
            self._fit = self._compute_fit()
            self._fitted_at = self._n
        return self._fit

    def sample_bytes(self, cost: float) -> float:
        """Upper estimate of one sample's bytes at ``cost``."""
        a, b, m = self.coefficients() or (0.0, 0.0, 0.0)
        return a + m + b * cost

    def expected_bytes(self, samples: int, total_cost: float) -> float:
        """Central estimate of a batch's bytes."""
        a, b, _ = self.coefficients() or (0.0, 0.0, 0.0)
        return samples * a + b * total_cost

    def _compute_fit(self) -> Tuple[float, float, float]:
        k = min(self._n, self.window)
        c, y = self._costs[:k], self._bytes[:k]
        c_mean = c.mean()
        spread = c.max() - c.min()
        if k >= self.min_samples and spread > 0.1 * max(c.max(), 1e-12):  # least squares, closed form
            dc = c - c_mean
            slope = max(0.0, float(dc @ (y - y.mean()) / (dc @ dc)))
            intercept = max(0.0, float(y.mean() - slope * c_mean))
        elif c_mean > 0:  # proportional at the mean ratio; the margin covers the rest
            slope, intercept = float(y.sum() / c.sum()), 0.0
        else:
            slope, intercept = 0.0, float(y.mean())
        margin = max(0.0, float(np.max(y - (intercept + slope * c))))
        return intercept, slope, margin


@dataclass(frozen=True)
class Observation:
    """What the loader knows right after a batch.

    ``ours_in_shm`` is the bytes of this loader's batches that sit in shm now
    (held by the user, or predicted for those in flight); they count as space
    the loader may use, since it will get them back.
    """

    shm_free: int
    ours_in_shm: int
    held_batches: int  # yielded batches the user still holds
    fds_in_use: int
    fd_soft_limit: int
    fd_hard_limit: int
    fds_per_batch: float  # shm handles one batch brings to the main process
    local_world_size: int = 1
    arenas: bool = False  # batches go through the workers' arenas (rings), not new blocks
    arena_capacity: int = 0  # the smallest arena that cannot grow to hold the batches in flight, else 0
    shm_total: int = 0
    memory_available: Optional[int] = None  # bytes still allocatable (memory cgroup or host), for all local ranks
    memory_budget: Optional[int] = None  # the user's cap on what the loader holds, for all local ranks
    ours_in_memory: int = 0  # what the loader holds on every road: arenas, batches in flight and held
    shm_road: bool = True  # batches go through /dev/shm (its arena or blocks), so its size binds too
    worker_heaps: int = 0  # what the running workers hold besides (their heaps): memory that comes back with them


@dataclass(frozen=True)
class Decision:
    """What to do before the next batch. ``None`` fields mean: leave as is."""

    max_cost: float
    per_batch_bytes: float
    prefetch_factor: Optional[int] = None
    num_workers: Optional[int] = None
    fd_soft_limit: Optional[int] = None
    sharing_strategy: Optional[str] = None
    reasons: List[str] = field(default_factory=list)
    limit: str = ""  # the limit that set the budget: "memory", "memory_budget" or "/dev/shm"
    deeper: bool = False  # the depth asked for comes back (the first batch under memory_budget was measured)
    smaller_buffer: bool = False  # a stream's workers pack from one batch's samples from now on

    def reason(self, keyword: str) -> str:
        """The reason that mentions ``keyword`` (all of them if none does)."""
        return next((r for r in self.reasons if keyword in r), "; ".join(self.reasons))


class Controller:
    """Turns observations into the budget of the next batches.

    Args:
        user_max_cost: the user's own cap; the budget never exceeds it.
        max_batch_size: the user's size cap (``None``: none).
        min_cost: smallest positive sample cost (so a budget never goes below
            one sample).
        max_sample_cost: the largest sample cost (bounds a batch with the size cap).
        num_workers, prefetch_factor: the loader's pipeline depth now.
        safety: fraction of the usable shm that batches may fill.
        fd_headroom: fraction of the fd soft limit that may be in use.
        hysteresis: the budget drops when the target falls below
            ``(1 - hysteresis / 2)`` of it and rises when the target exceeds
            ``(1 + hysteresis)`` of it; in between it stays put.
    """

    def __init__(self, *, user_max_cost: float, max_batch_size: Optional[int], min_cost: float,
                 num_workers: int, prefetch_factor: int, safety: float = 0.8, fd_headroom: float = 0.8,
                 hysteresis: float = 0.2, model: Optional[CostModel] = None,
                 max_sample_cost: float = math.inf, floor_cost: float = 0.0, fixed_workers: bool = False,
                 buffered_batches: float = 0.0) -> None:
        self.user_max_cost = user_max_cost
        self.max_batch_size = max_batch_size
        self.min_cost = max(min_cost, 1e-9)  # a budget stays positive even when every cost is 0
        self.max_sample_cost = max_sample_cost
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.asked_depth = (num_workers, prefetch_factor)
        self.fixed_workers = fixed_workers  # a stream's workers own its shards: fewer workers is no rung
        # per worker, the batches' worth of samples a stream's buffer holds to pack from besides the batch it makes;
        # under a memory limit it is the first thing given up (``buffer_capped``: one batch's samples, no more)
        self.buffered_batches = buffered_batches
        self.buffer_capped = False
        self.floor_cost = max(floor_cost, self.min_cost)  # the budget never goes below it (min_batch_size)
        self.limit = "shm"  # which limit bound the last decision
        self.safety = safety
        self.fd_headroom = fd_headroom
        self.hysteresis = hysteresis
        self.model = model or CostModel()
        self.max_cost = user_max_cost  # the budget in force: memory's, under the other caps
        self.memory_max_cost = user_max_cost  # what memory allows, moved with hysteresis
        self.strategy_switched = False
        self.external_cap = math.inf  # the smallest cap from another limit (e.g. the device), see loader._cap_budget
        self.probing = False  # the probe is under way: nothing measured yet (see start_probe)
        self._probe_left = 0  # batches the probe still makes
        self.per_batch_bytes = 0.0  # what the last decision left each batch in flight
        # a stream's first batches under a memory limit: how many were measured, and the costliest of them
        self._batches_measured, self._costliest_batch = 0, 0.0
        # the depth a memory limit (a decision bound by memory, or an OOM kill) left: no later epoch starts deeper,
        # its arenas and heaps being still there when it starts
        self.depth_cap: Optional[Tuple[int, int]] = None
        # what a worker holds besides its batch's samples while it makes a batch (its heap as measured,
        # less the batch), over the last batches; empty until a batch tells its heap
        self._heap_extras: Deque[float] = deque(maxlen=HEAP_WINDOW)

    def observe_heap(self, heap: int, batch_bytes: int) -> None:
        """A batch's maker held ``heap`` bytes of its own as it made the batch (0: not measured): the
        batch's samples, a stream's buffer (counted as ``buffered_batches`` batches), and the rest."""
        if heap > 0:
            self._heap_extras.append(max(0.0, float(heap - batch_bytes * (1 + self._buffer_batches()))))

    def observe_batch(self, cost: float) -> None:
        """A batch of ``cost`` (in the budget's units) was delivered and measured."""
        self._batches_measured += 1
        self._costliest_batch = max(self._costliest_batch, float(cost))

    @property
    def slow_starting(self) -> bool:
        """A stream's first ``SLOW_START_BATCHES`` under a memory cgroup's limit, decided after each batch:
        the budget rises to at most ``SLOW_START_RISE`` times the costliest batch measured. The first
        decision rests on one batch's heap and a second of memory readings; a stream's workers pack with
        the budget they were given, so batches at a budget too high are in memory before the next
        readings can lower it, and the OOM killer comes first (docs/performance.md, a stream at 640 MiB)."""
        return self.fixed_workers and self.limit == "memory" and self._batches_measured < SLOW_START_BATCHES

    def _slow_start(self, target: float) -> Tuple[float, str]:
        """``target`` under the slow start's cap, and what to say of the cap where it binds."""
        if not self.slow_starting or self._costliest_batch <= 0:
            return target, ""
        cap = max(SLOW_START_RISE * self._costliest_batch, self.floor_cost)
        if cap >= target:
            return target, ""
        return cap, (f" (slow start, for a stream's first {SLOW_START_BATCHES} batches under a memory limit: at most "
                     f"{SLOW_START_RISE:g}x the costliest batch measured, {format_cost(self._costliest_batch)})")

    def _buffer_batches(self) -> float:
        return 0.0 if self.buffer_capped else self.buffered_batches

    def decide(self, obs: Observation) -> Decision:
        """The next budget and fallbacks. What is given up, in order: the road (the workers'
        own choice, per batch; a stream's read-ahead buffer under a memory limit), then batches in
        flight, then workers (under a memory limit down to none: the main process rather than one
        worker with smaller batches), and only then the cost budget (never below ``floor_cost``)."""
        reasons: List[str] = []
        usable, self.limit = self.usable_bytes(obs)
        smaller_buffer = self._buffer_gives_way(usable, obs)
        if smaller_buffer:
            self.buffer_capped = True
            reasons.append(f"smaller buffer: a stream's workers pack from one batch's samples, not from "
                           f"{1 + self.buffered_batches:g} batches' worth read ahead, so that batches keep the size "
                           f"asked for; {usable / 2**20:.1f} MiB usable ({self.limit})")
        measured = self.probing and self.model.coefficients() is not None
        self._probe_left -= measured
        probed = measured and self._probe_left <= 0
        probe_depth = (self.num_workers, self.prefetch_factor)
        if probed:  # the first batch is measured: from here on, as if the depth asked for had run
            self.probing = False
            self.num_workers, self.prefetch_factor = self.asked_depth
        if self.num_workers == 0 and not self.probing:  # batches made in the main process: no arena, no worker
            return self._in_process_budget(usable, reasons, smaller_buffer=smaller_buffer)
        workers, prefetch = self._depth_for(usable, obs)
        batches_per_worker, bytes_per_worker = self._worker_heap(self.limit)
        per_batch = max(0.0, usable - workers * bytes_per_worker) / (
            self._slots(workers, prefetch, obs) + workers * batches_per_worker)
        if obs.arena_capacity:  # an arena at its share of memory: batches must fit it instead
            per_batch = min(per_batch, obs.arena_capacity / _arena_batches(prefetch, workers))
        if self._in_process_due(workers, prefetch, per_batch):
            return self._load_in_process(usable, reasons)
        changed_prefetch = prefetch if prefetch != self.prefetch_factor else None
        changed_workers = workers if workers != self.num_workers else None
        deeper = probed and changed_prefetch is None and changed_workers is None and (workers, prefetch) != probe_depth
        if changed_prefetch is not None or changed_workers is not None:
            reasons.append(
                f"fewer batches in flight: {self.num_workers}x{self.prefetch_factor} -> {workers}x{prefetch} "
                f"(workers x prefetch), so that batches keep the size asked for; {usable / 2**20:.1f} MiB "
                f"usable ({self.limit})")
            self.num_workers, self.prefetch_factor = workers, prefetch
            if self.limit != "/dev/shm":  # /dev/shm frees as batches are dropped; memory holds arenas and heaps
                self.depth_cap = (workers, prefetch)
        elif deeper:
            reasons.append(f"first batch measured: the depth asked for, {workers}x{prefetch} (workers x prefetch), "
                           f"fits {usable / 2**20:.1f} MiB usable ({self.limit})")
        target, why = self._slow_start(max(self._max_cost_for(per_batch), min(self.floor_cost, self.user_max_cost)))
        self._move_budget(target, per_batch, reasons, why)
        self.max_cost = self.capped(self.memory_max_cost)
        self.per_batch_bytes = per_batch
        fd_limit, strategy = self._fd_plan(obs, reasons)
        return Decision(self.max_cost, per_batch, changed_prefetch, changed_workers, fd_limit, strategy, reasons,
                        self.limit, deeper, smaller_buffer)

    def _worker_heap(self, limit: str) -> Tuple[float, float]:
        """What each worker holds besides its batches in flight, under a real memory limit, as
        ``(batches, bytes)``: the samples it buffers (a stream's), and once measured its heap: the
        batch's samples while it makes the batch, and the largest extra lately. Not on /dev/shm's
        account, nor on ``memory_budget``'s: heaps are not there."""
        if limit != "memory":
            return 0.0, 0.0
        if not self._heap_extras:
            return self._buffer_batches(), 0.0
        return self._buffer_batches() + 1.0, max(self._heap_extras)

    def _buffer_gives_way(self, usable: float, obs: Observation) -> bool:
        """Whether a stream's buffer goes down to one batch's samples now: under a memory limit, with
        the heaps measured, when the batches in flight at the size asked for do not fit beside it."""
        if self.buffer_capped or self.buffered_batches <= 0 or not self._heaps_count():
            return False
        full = self.batch_bytes_at(self.user_max_cost)
        if full <= 0:
            return False
        workers = self.num_workers
        batches_per_worker, bytes_per_worker = self._worker_heap(self.limit)
        needed = (self._slots(workers, self.prefetch_factor, obs) + workers * batches_per_worker) * full
        return usable < needed + workers * bytes_per_worker

    def _heaps_count(self) -> bool:
        """Whether the last decision was bound by a real memory limit, with the makers' heaps measured."""
        return self.limit == "memory" and bool(self._heap_extras)

    def _in_process_due(self, workers: int, prefetch: int, per_batch: float) -> bool:
        """Under a memory limit, one worker with one batch in flight would cut the batches asked for.
        The main process needs no arena and no second heap: it makes larger ones, whole where they fit."""
        if self.fixed_workers or (workers, prefetch) != (1, 1) or not self._heaps_count():
            return False
        full = self.batch_bytes_at(self.user_max_cost)
        return full > 0 and per_batch < full

    def _load_in_process(self, usable: float, reasons: List[str]) -> Decision:
        """Taken before the OOM killer comes: no workers; the main process holds the batch it makes
        (with its heap) and, while it makes it, the one the user still keeps."""
        reasons.append(f"loading in the main process (num_workers=0): one worker with one batch in flight would cut "
                       f"the batches asked for in {usable / 2**20:.1f} MiB usable ({self.limit})")
        self.num_workers, self.probing = 0, False
        self.depth_cap = (0, self.prefetch_factor)
        return self._in_process_budget(usable, reasons, num_workers=0)

    def _in_process_budget(self, usable: float, reasons: List[str], num_workers: Optional[int] = None,
                           smaller_buffer: bool = False) -> Decision:
        """The budget of batches made in the main process: it holds the batch it makes (with its heap, under
        a memory cgroup's limit) and, meanwhile, the one the user still keeps. (A stream's read-ahead there is
        in what memory reads as used already.)"""
        heap = max(self._heap_extras, default=0.0) if self.limit == "memory" else 0.0
        per_batch = max(0.0, usable - heap) / HELD_BATCHES
        target = max(self._max_cost_for(per_batch), min(self.floor_cost, self.user_max_cost))
        self._move_budget(target, per_batch, reasons)
        self.max_cost = self.capped(self.memory_max_cost)
        self.per_batch_bytes = per_batch
        return Decision(self.max_cost, per_batch, None, num_workers, None, None, reasons, self.limit,
                        smaller_buffer=smaller_buffer)

    def usable_bytes(self, obs: Observation) -> Tuple[float, str]:
        """Bytes this rank's batches may fill, and which limit sets it: a safety fraction of
        the smallest of the real memory left (plus what the loader already holds), the user's
        ``memory_budget`` and, for batches that go through it, ``/dev/shm``; each shared
        among the ranks of this machine."""
        ranks = max(1, obs.local_world_size)
        bounds = _memory_bounds(obs.memory_available, obs.memory_budget, ranks, obs.ours_in_memory, obs.worker_heaps)
        if obs.shm_road or not bounds:
            bounds.append((obs.shm_free / ranks + obs.ours_in_shm, "/dev/shm"))
        room, limit = min(bounds)
        return self.safety * room, limit

    def memory_room(self, memory_available: Optional[int], memory_budget: Optional[int], local_world_size: int,
                    ours: int, workers: int = 0, batch_bytes: float = 0.0) -> Optional[float]:
        """Bytes this rank may hold off ``/dev/shm`` (memfd arenas, their batches): the memory part
        of :meth:`usable_bytes`, less what ``workers`` hold besides (their heaps making batches of
        ``batch_bytes``); None when neither memory nor a budget is known."""
        bounds = _memory_bounds(memory_available, memory_budget, max(1, local_world_size), ours)
        if not bounds:
            return None
        room, limit = min(bounds)
        batches_per_worker, bytes_per_worker = self._worker_heap(limit)
        room = self.safety * room - workers * (bytes_per_worker + batches_per_worker * batch_bytes)
        if bytes_per_worker and self.per_batch_bytes and workers:  # the heaps were planned for: so are the arenas
            room = min(room, workers * _arena_batches(self.prefetch_factor, workers) * self.per_batch_bytes)
        return max(0.0, room)

    def _depth_for(self, usable: float, obs: Observation) -> Tuple[int, int]:
        """The deepest pipeline, no deeper than now, whose batches in flight fit ``usable`` at
        the budget asked: first fewer batches per worker, then fewer workers."""
        workers, prefetch = self.num_workers, self.prefetch_factor
        full = self.batch_bytes_at(self.user_max_cost)
        if workers == 0 or full <= 0:
            return workers, prefetch
        batches_per_worker, bytes_per_worker = self._worker_heap(self.limit)
        for w, p in _shallower(workers, prefetch, self.fixed_workers):
            if usable >= (self._slots(w, p, obs) + w * batches_per_worker) * full + w * bytes_per_worker:
                return w, p
        return (workers, 1) if self.fixed_workers else (1, 1)

    def restore_pipeline(self, num_workers: int, prefetch_factor: int) -> bool:
        """Each epoch starts with the depth the user asked for, no deeper than a memory limit left it
        (``depth_cap``); True if it changed."""
        if self.depth_cap is not None:
            num_workers, prefetch_factor = min(num_workers, self.depth_cap[0]), min(prefetch_factor, self.depth_cap[1])
        changed = (num_workers, prefetch_factor) != (self.num_workers, self.prefetch_factor)
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        return changed

    def step_down_after_oom(self) -> Tuple[str, str, Optional[float]]:
        """The OOM killer took a worker: give up the next thing, in the order promised (batches in
        flight, then workers: under a memory limit whose heaps were measured, down to none before the
        budget; else half the budget down to ``floor_cost``, then the workers altogether), and keep it
        for the epochs to come. ``(what, sentence, cap)``: ``what`` is ``"fewer_in_flight"``,
        ``"budget"`` (``cap``: the budget's new cap, for the loader to apply as a cap of its own) or
        ``"in_process"``."""
        before = f"{self.num_workers}x{self.prefetch_factor}"
        if self.prefetch_factor > 1 or (self.num_workers > 1 and not self.fixed_workers):
            if self.prefetch_factor > 1:
                self.prefetch_factor = 1
            else:
                self.num_workers -= 1
            self.depth_cap = (self.num_workers, self.prefetch_factor)
            return "fewer_in_flight", (f"fewer batches in flight: {before} -> {self.num_workers}x"
                                       f"{self.prefetch_factor} (workers x prefetch)"), None
        if not self.fixed_workers and self._heaps_count():
            self.num_workers = 0
            self.depth_cap = (0, self.prefetch_factor)
            return "in_process", ("loading in the main process (num_workers=0), which needs no arena and no "
                                  "worker's heap, rather than smaller batches"), None
        floor = min(self.floor_cost, self.user_max_cost)
        whole_batch = (self.max_batch_size or math.inf) * self.max_sample_cost
        current = min(self.max_cost, self.user_max_cost, whole_batch)
        if current > floor and math.isfinite(current):
            cap = max(floor, current / 2)
            where = "one batch in flight per worker" if self.fixed_workers else "one worker and one batch in flight"
            return "budget", f"lower max_cost {format_cost(current)} -> {format_cost(cap)} with {where}", cap
        if self.fixed_workers:
            return "budget", (f"nothing left to give up: max_cost {format_cost(current)} is at its floor with one "
                              f"batch in flight per worker, and a stream's workers own their shards"), None
        self.num_workers = 0
        self.depth_cap = (0, self.prefetch_factor)
        return "in_process", ("loading in the main process (num_workers=0): one worker with the smallest "
                              "batches did not fit"), None

    def start_probe(self, in_process: bool = False) -> int:
        """Before anything is measured under a memory limit: one batch in flight (one worker, prefetch 1;
        a stream's workers own its shards, so each keeps one), so the batches planned blind are not all
        in memory at once. With ``in_process`` (a memory cgroup's limit, which the workers' heaps count
        against) the first ``PROBE_BATCHES`` batches are made in the main process instead, where their
        bytes and heap are measured before any worker holds one, and the second after the training step
        on the first, whose memory the loader has then seen. The decision after the probe gives back the
        deepest depth asked for that fits. Returns the batches the probe makes (0: no probe needed)."""
        if in_process and not self.fixed_workers and self.num_workers:
            self.num_workers, self.probing, self._probe_left = 0, True, PROBE_BATCHES
            return PROBE_BATCHES
        if self.num_workers == 0 and not self.fixed_workers:
            return 0  # loading in the main process already: nothing in flight
        if (self.num_workers <= 1 or self.fixed_workers) and self.prefetch_factor <= 1:
            return 0
        workers = self.num_workers if self.fixed_workers else min(1, self.num_workers)
        self.num_workers, self.prefetch_factor, self.probing, self._probe_left = workers, 1, True, 1
        return 1

    def batch_bytes_bound(self) -> float:
        """The cost model's bound on one batch's bytes under the current budget
        (0 while unknown: nothing measured, or neither cap bounds it)."""
        return self.batch_bytes_at(self.max_cost)

    def batch_bytes_at(self, max_cost: float) -> float:
        """The cost model's bound on one batch's bytes under the budget ``max_cost``."""
        fit = self.model.coefficients()
        if fit is None:
            return 0.0
        a, b, m = fit
        count = self.max_batch_size
        if count is None and math.isfinite(max_cost):
            count = max_cost / self.min_cost
        cost = min(max_cost, count * self.max_sample_cost) if count is not None else max_cost
        if count is None or (b > 0 and not math.isfinite(cost)):
            return 0.0
        return count * (a + m) + (b * cost if b > 0 else 0.0)

    @staticmethod
    def _slots(workers: int, prefetch: int, obs: Observation) -> float:
        """Batches the usable shm must hold at once. Each arena is one worker's share: it holds
        that worker's batches in flight and its share of those the user holds, with the arena's margin."""
        if obs.arenas and workers:  # without workers (loading in the main process) no arena fills
            return workers * _arena_batches(prefetch, workers)
        return workers * prefetch + max(1, obs.held_batches)

    # -- budget ---------------------------------------------------------------
    def _max_cost_for(self, per_batch_bytes: float) -> float:
        """The largest cost cap whose worst-case batch fits in ``per_batch_bytes``."""
        fit = self.model.coefficients()
        if fit is None:
            return self.user_max_cost  # nothing measured yet: the workers' off-shm check guards
        a, b, m = fit
        per_sample = a + m  # bytes a sample brings whatever its cost
        candidates = []
        if self.min_cost > 0 or b > 0:  # count bounded by cost: n <= X / min_cost
            denominator = b + (per_sample / self.min_cost if self.min_cost > 0 else 0.0)
            if denominator > 0:
                candidates.append(per_batch_bytes / denominator)
        if self.max_batch_size is not None:  # count bounded by size
            rest = per_batch_bytes - per_sample * self.max_batch_size
            if rest >= 0:
                candidates.append(rest / b if b > 0 else math.inf)
        if not candidates:
            return self.user_max_cost if per_sample == 0 else self.min_cost
        return min(self.user_max_cost, max(self.min_cost, max(candidates)))

    def capped(self, max_cost: float) -> float:
        """``max_cost`` under the caps of other limits (the device's), applied at once both ways."""
        return min(max_cost, max(self.external_cap, self.min_cost))

    def _move_budget(self, target: float, per_batch: float, reasons: List[str], why: str = "") -> None:
        current = self.memory_max_cost
        # shrink on a small drop, grow only on a clear rise: batches in flight make the
        # free space jitter by a batch or so from one observation to the next
        if target < current * (1 - self.hysteresis / 2) or target > current * (1 + self.hysteresis) \
                or (target == self.user_max_cost and current != target):
            direction = "lower" if target < current else "raise"
            reasons.append(f"{direction} max_cost {format_cost(current)} -> {format_cost(target)}: "
                           f"{per_batch / 2**20:.1f} MiB per batch in flight fit in the {self.limit} limit{why}")
            self.memory_max_cost = target

    # -- file descriptors -----------------------------------------------------
    def _fd_plan(self, obs: Observation, reasons: List[str]):
        if obs.fd_soft_limit == resource.RLIM_INFINITY:
            return None, None
        incoming = obs.fds_per_batch * (self.num_workers * self.prefetch_factor + 1)
        projected = obs.fds_in_use + incoming
        if projected <= self.fd_headroom * obs.fd_soft_limit or self.strategy_switched:
            return None, None
        if obs.fd_hard_limit == resource.RLIM_INFINITY or obs.fd_soft_limit < obs.fd_hard_limit:
            wanted = int(max(2 * obs.fd_soft_limit, projected / self.fd_headroom * 2))
            new_limit = wanted if obs.fd_hard_limit == resource.RLIM_INFINITY else min(obs.fd_hard_limit, wanted)
            reasons.append(f"raise fd soft limit {obs.fd_soft_limit} -> {new_limit}: "
                           f"{obs.fds_in_use} open + ~{incoming:.0f} incoming")
            return new_limit, None
        self.strategy_switched = True
        reasons.append(f"switch to the file_system sharing strategy: {obs.fds_in_use} fds open + "
                       f"~{incoming:.0f} incoming against a hard limit of {obs.fd_hard_limit}")
        return None, "file_system"


def _memory_bounds(available: Optional[int], budget: Optional[int], ranks: int, ours: int,
                   heaps: int = 0) -> List[Tuple[float, str]]:
    """The memory limits on one rank's share, each with its name: what is available (plus what
    the loader and its workers' heaps hold already, which it would get back) and the user's budget
    (on what the loader holds: the heaps are not in it)."""
    bounds = []
    if available is not None:
        bounds.append((available / ranks + ours + heaps, "memory"))
    if budget is not None:
        bounds.append((budget / ranks, "memory_budget"))
    return bounds


# -- the shm arena ---------------------------------------------------------------
ARENA_MIN_BYTES = 16 << 20  # below this a ring of small batches grows too often to be worth reserving
#: Room above the batches measured. With the ring mapped twice nothing is lost at its end; 1.25 before
#: that covered the skipped slot too. With 1.1 no batch of the seed, detection and uniform 32 MiB
#: workloads missed its arena (docs/performance.md).
ARENA_MARGIN = 1.1


def arena_batches_needed(batches_in_flight: int, workers: int) -> int:
    """Batches one worker's arena must hold at once: those in flight and its share of the held ones."""
    return batches_in_flight + held_per_worker(workers)


def _arena_batches(batches_in_flight: int, workers: int) -> float:
    """One worker's arena, in batches: what it must hold, with the margin."""
    return arena_batches_needed(batches_in_flight, workers) * ARENA_MARGIN


def arena_capacity(batch_bytes: float, batches_in_flight: int, room: float, workers: int) -> int:
    """Bytes to reserve for one worker's arena (0: none).

    Room for its ``batches_in_flight`` batches plus its share of the ``HELD_BATCHES`` (the ring is
    mapped twice, so no slot is lost where it wraps), each as large as the largest batch expected
    (``batch_bytes``: measured in the worker, or the cost model's bound for the budget), plus
    ``ARENA_MARGIN``; at least ``ARENA_MIN_BYTES``; at most an equal share of ``room``, the shm this loader
    may still fill. 0 when that share cannot hold two batches: the batches
    would mostly miss the arena and it would only take space.
    """
    wanted = max(_arena_batches(batches_in_flight, workers) * batch_bytes, ARENA_MIN_BYTES)
    share = room / max(1, workers)
    capacity = min(wanted, share)
    if capacity < 2 * batch_bytes or capacity <= 0:
        return 0
    return int(capacity) // (1 << 20) << 20 if capacity >= 1 << 20 else int(capacity)


# -- when to decide, and what to do on a failure ----------------------------------------
DECIDE_EVERY_WHEN_AMPLE = 8  # batches between decisions while shm is ample
AMPLE_TARGET_OVER_LARGEST = 2  # "ample": the last target is at least this many largest batches
FDS_EVERY = 16  # batches between fd readings (listing /proc/self/fd costs ~0.2 ms)
FDS_PRESSING = 8  # read fds every batch once a batch's fds exceed 1/8 of the soft limit
FDS_FAR = 64  # the fds are "far from their limit" while a batch's fds are under 1/64 of it
PROBE_BATCHES = 2  # made in the main process under a memory limit before any worker starts (start_probe)
HEAP_WINDOW = 32  # batches whose makers' heaps bound the next ones'
SLOW_START_BATCHES = 8  # a stream's first batches under a memory limit, whose budget follows the batches measured
SLOW_START_RISE = 1.25  # how far above the costliest batch measured the budget may rise meanwhile
MEMORY_EVERY_SECONDS = 0.05  # reading the memory cgroup and /proc/meminfo costs ~0.2 ms: at most 20 a second
ARENA_REPLACE_BELOW = 0.95  # an idle arena under this fraction of the planned capacity is replaced,
ARENA_REPLACE_ABOVE = 2.0  # and one above this many times it (the batches got smaller: give memory back)


def decision_due(step: int, last_target: float, largest_batch: int, through_shm: bool, fds_per_batch: int,
                 fd_soft_limit: Optional[int]) -> bool:
    """While memory is tight, decide after every batch; with ample room (the last target at
    least twice the largest batch seen, the fds far from their limit) every 8th batch is
    enough: the decision would not change, and the workers' own free-space check guards
    the batches in between."""
    ample = (last_target >= AMPLE_TARGET_OVER_LARGEST * largest_batch and through_shm
             and (fd_soft_limit is None or fds_per_batch * FDS_FAR < fd_soft_limit))
    return not ample or step % DECIDE_EVERY_WHEN_AMPLE == 0


def fds_due(step: int, fds_per_batch: int, fd_soft_limit: Optional[int]) -> bool:
    """Whether to list the open fds now: every 16 batches, or every batch once a
    batch's fds are a noticeable part of the limit."""
    return fd_soft_limit is None or fds_per_batch * FDS_PRESSING > fd_soft_limit or step % FDS_EVERY == 0


def memory_due(seconds_since_last_reading: float) -> bool:
    """Whether to read the memory limits again (what is left changes slower than batches come)."""
    return seconds_since_last_reading >= MEMORY_EVERY_SECONDS


def fd_pressure(fds_per_batch: int, batches_in_flight: int, fds_in_use: int, fd_soft_limit: int,
                headroom: float = 0.8) -> Optional[str]:
    """Evidence that fds ran out: a sentence when the batches in flight carry enough fds to
    reach the limit (on top of what is open), else None."""
    incoming = fds_per_batch * (batches_in_flight + 1)
    if fd_soft_limit <= 0 or fds_in_use + incoming <= headroom * fd_soft_limit:
        return None
    return (f"batches carry ~{fds_per_batch} fds each, {batches_in_flight} in flight, {fds_in_use} open: "
            f"within reach of the fd limit {fd_soft_limit}")


def strategy_after_failure(cause: str, strategy: str) -> Optional[str]:
    """The sharing strategy to switch to after a failure, if any: only fds running out
    while a batch was handed over call for ``file_system`` (one fd per batch, not per tensor)."""
    return "file_system" if cause == "fds" and strategy != "file_system" else None


def arena_plan(recent_batch_bytes: int, batches_in_flight: int, room: float, workers: int,
               current: dict, idle: Callable[[int], bool]):
    """Before new workers start: ``(capacity, workers to give a new arena)``, or None.

    Each worker's arena is sized for the batches measured (see :func:`arena_capacity`);
    a worker without one, or whose idle arena is clearly too small or twice too large,
    gets a new one.
    An arena a batch still lives on stays: replacing it would not give its room back."""
    if not recent_batch_bytes or workers == 0:
        return None
    wanted = arena_capacity(recent_batch_bytes, batches_in_flight, room, workers)
    stale = [w for w in range(workers) if w not in current or (idle(w) and not (
             ARENA_REPLACE_BELOW * wanted <= current[w].capacity <= ARENA_REPLACE_ABOVE * wanted))]
    if not wanted or not stale:
        return None
    return wanted, stale


def _shallower(workers: int, prefetch: int, fixed_workers: bool = False):
    """Pipeline depths from ``(workers, prefetch)`` down to ``(1, 1)``: fewer batches per
    worker first, then fewer workers (unless they are fixed)."""
    for p in range(prefetch, 0, -1):
        yield workers, p
    for w in range(workers - 1 if not fixed_workers else 0, 0, -1):
        yield w, 1


def format_cost(value: float) -> str:
    """A cost cap for people: ``no cap`` rather than ``inf``."""
    if math.isinf(value):
        return "no cap"
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"
