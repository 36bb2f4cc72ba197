"""The controller: measurements in, the next budget and fallbacks out.

Pure logic, no processes and no I/O, so every rule is unit-testable with plain
numbers. The loader feeds it an :class:`Observation` after each batch and
applies the :class:`Decision` it returns.
"""

from __future__ import annotations

import math
import resource
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np

__all__ = ["CostModel", "Observation", "Decision", "Controller", "arena_capacity"]


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
                 max_sample_cost: float = math.inf) -> None:
        self.user_max_cost = user_max_cost
        self.max_batch_size = max_batch_size
        self.min_cost = max(min_cost, 1e-9)  # a budget stays positive even when every cost is 0
        self.max_sample_cost = max_sample_cost
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.safety = safety
        self.fd_headroom = fd_headroom
        self.hysteresis = hysteresis
        self.model = model or CostModel()
        self.max_cost = user_max_cost
        self.strategy_switched = False

    def decide(self, obs: Observation) -> Decision:
        reasons: List[str] = []
        usable = self.safety * (obs.shm_free / max(1, obs.local_world_size) + obs.ours_in_shm)
        per_batch = usable / self._slots(self.num_workers, self.prefetch_factor, obs)
        prefetch, workers = self._shrink_pipeline(usable, obs.held_batches, reasons)
        if prefetch is not None or workers is not None:
            per_batch = usable / self._slots(workers or self.num_workers, prefetch or self.prefetch_factor, obs)
        if obs.arena_capacity:  # an arena at its share of shm: batches must fit it instead
            per_batch = min(per_batch, obs.arena_capacity / ((prefetch or self.prefetch_factor) + 2))
        target = self._max_cost_for(per_batch)
        self._move_budget(target, per_batch, reasons)
        fd_limit, strategy = self._fd_plan(obs, reasons)
        return Decision(self.max_cost, per_batch, prefetch, workers, fd_limit, strategy, reasons)

    def batch_bytes_bound(self) -> float:
        """The cost model's bound on one batch's bytes under the current budget
        (0 while unknown: nothing measured, or neither cap bounds it)."""
        fit = self.model.coefficients()
        if fit is None:
            return 0.0
        a, b, m = fit
        count = self.max_batch_size
        if count is None and math.isfinite(self.max_cost):
            count = self.max_cost / self.min_cost
        cost = min(self.max_cost, count * self.max_sample_cost) if count is not None else self.max_cost
        if count is None or (b > 0 and not math.isfinite(cost)):
            return 0.0
        return count * (a + m) + (b * cost if b > 0 else 0.0)

    @staticmethod
    def _slots(workers: int, prefetch: int, obs: Observation) -> int:
        """Batches the usable shm must hold at once. Each arena is one worker's share: it holds
        that worker's batches in flight, one the user still holds, and the room a batch skips
        when it does not fit before the ring's end."""
        if obs.arenas:
            return workers * (prefetch + 2)
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

    def _move_budget(self, target: float, per_batch: float, reasons: List[str]) -> None:
        current = self.max_cost
        # shrink on a small drop, grow only on a clear rise: batches in flight make the
        # free space jitter by a batch or so from one observation to the next
        if target < current * (1 - self.hysteresis / 2) or target > current * (1 + self.hysteresis) \
                or (target == self.user_max_cost and current != target):
            direction = "lower" if target < current else "raise"
            reasons.append(f"{direction} max_cost {current:.4g} -> {target:.4g}: "
                           f"{per_batch / 2**20:.1f} MiB of shm per batch in flight")
            self.max_cost = target

    # -- fewer in flight ------------------------------------------------------
    def _shrink_pipeline(self, usable: float, held: int, reasons: List[str]):
        """Fewer batches in flight when even one smallest sample per slot does not fit."""
        if self.model.coefficients() is None or self.num_workers == 0:
            return None, None
        smallest = self.model.sample_bytes(self.min_cost)
        if smallest < 1:  # nothing to fit, or an estimate below one byte
            return None, None
        fitting_slots = int(usable // smallest) - max(1, held)
        if fitting_slots >= self.num_workers * self.prefetch_factor:
            return None, None
        prefetch = max(1, fitting_slots // self.num_workers)
        workers = self.num_workers if fitting_slots >= self.num_workers else max(1, fitting_slots)
        if (prefetch, workers) == (self.prefetch_factor, self.num_workers):
            return None, None  # already as low as it goes: the workers send batches off shm
        reasons.append(
            f"fewer batches in flight: {self.num_workers}x{self.prefetch_factor} -> {workers}x{prefetch}; "
            f"a one-sample batch needs {smallest / 2**20:.1f} MiB, {usable / 2**20:.1f} MiB usable")
        changed_prefetch = prefetch if prefetch != self.prefetch_factor else None
        changed_workers = workers if workers != self.num_workers else None
        self.prefetch_factor, self.num_workers = prefetch, workers
        return changed_prefetch, changed_workers

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


# -- the shm arena ---------------------------------------------------------------
ARENA_MIN_BYTES = 16 << 20  # below this a ring of small batches grows too often to be worth reserving


def arena_capacity(batch_bytes: float, batches_in_flight: int, room: float, workers: int) -> int:
    """Bytes to reserve for one worker's arena (0: none).

    Room for its ``batches_in_flight`` batches plus two the user may still hold,
    each as large as the largest batch expected (``batch_bytes``: measured in the
    worker, or the cost model's bound for the budget), plus 25%; at least
    ``ARENA_MIN_BYTES``; at most an equal share of ``room``, the shm this loader
    may still fill. 0 when that share cannot hold two batches: the batches
    would mostly miss the arena and it would only take space.
    """
    wanted = max((batches_in_flight + 2) * batch_bytes * 1.25, ARENA_MIN_BYTES)
    share = room / max(1, workers)
    capacity = min(wanted, share)
    if capacity < 2 * batch_bytes or capacity <= 0:
        return 0
    return int(capacity) // (1 << 20) << 20 if capacity >= 1 << 20 else int(capacity)
