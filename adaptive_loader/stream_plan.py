"""Streams, main side: the budget the workers pack under, and what each worker's stream delivered.

The map-style loader's plan is its sampler; a stream's plan is this: the
budget published to the workers (:class:`~adaptive_loader.stream.SharedBudget`)
and, per worker, the commit of what reached the user (:class:`WorkerCommit`).
A batch is committed when it is handed to the user, never before, so a
worker started again after a failure (or a loader resumed from
:meth:`StreamPlan.state_dict` in a new process) delivers exactly the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Set

import numpy as np

from .stream import Resume, SharedBudget, StreamMeta, fold_key

__all__ = ["StreamPlan", "WorkerCommit"]


@dataclass
class WorkerCommit:
    """What one worker's stream delivered this epoch: every position below ``low``, and those in
    ``above``; the dataset's ``state`` at ``state_at`` (a Stateful dataset), the digest of the keys
    below ``low``, and whether the worker's stream ended."""

    low: int = 0
    above: Dict[int, Optional[str]] = field(default_factory=dict)  # position -> key
    state_at: int = 0
    state: Any = None
    digest: str = ""
    done: bool = False
    samples: int = 0

    def commit(self, meta: StreamMeta) -> None:
        for position, key in zip(meta.positions, meta.keys):
            self.above[position] = key
        self.samples += len(meta.positions)
        while self.low in self.above:  # positions below low are folded into the digest and forgotten
            self.digest = fold_key(self.digest, self.above.pop(self.low))
            self.low += 1
        if meta.state is not None or meta.low == 0:
            self.state_at, self.state = meta.low, meta.state
        self.done = self.done or meta.last

    def resume(self, stateful: bool) -> Resume:
        if stateful and (self.state is not None or self.state_at == 0):
            start = self.state_at
            delivered = {p for p in self.above if p >= start} | set(range(start, max(start, self.low)))
            return Resume(start=start, state=self.state, low=start, delivered=delivered,
                          keys={p: self.above.get(p) for p in delivered}, done=self.done)
        return Resume(start=0, state=None, low=self.low, delivered=set(self.above), digest=self.digest,
                      keys=dict(self.above), done=self.done)

    def to_dict(self) -> Dict[str, Any]:
        return {"low": self.low, "above": sorted(self.above.items()), "state_at": self.state_at, "state": self.state,
                "digest": self.digest, "done": self.done, "samples": self.samples}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "WorkerCommit":
        return cls(low=int(d["low"]), above={int(p): k for p, k in d["above"]}, state_at=int(d["state_at"]),
                   state=d["state"], digest=d["digest"], done=bool(d["done"]), samples=int(d.get("samples", 0)))


class StreamPlan:
    """Plays the sampler's part for a stream: the budget (``max_cost``, ``max_batch_size``) the
    actuator sets and the workers read, the epoch, and the commits."""

    def __init__(self, *, max_cost: Optional[float], max_batch_size: Optional[int], num_replicas: int, rank: int,
                 drop_last: bool, stateful: bool) -> None:
        self.user_max_cost = math.inf if max_cost is None else float(max_cost)
        self.max_batch_size = max_batch_size
        self.num_replicas, self.rank = num_replicas, rank
        self.drop_last = drop_last
        self.stateful = stateful
        self.budget = SharedBudget()
        self._max_cost = self.user_max_cost
        self._buffer_cap = math.inf  # samples a worker may buffer (see probe() and cap_buffer())
        self._probing = False
        self._one_batch: Optional[float] = None  # under a memory limit: one batch's samples, no buffer beyond
        self.version = self.budget.publish(self._max_cost, max_batch_size)
        self.epoch = 0
        self.warn_oversized = True
        self.unit_costs = np.zeros(0)  # the costs are the workers' to read, batch by batch
        self.commits: Dict[int, WorkerCommit] = {}
        self.workers = 0  # the number of workers the commits are for (a stream is split among them)
        self.delivered_batches = 0

    # -- the budget ------------------------------------------------------------------------
    @property
    def max_cost(self) -> float:
        return self._max_cost

    @max_cost.setter
    def max_cost(self, value: float) -> None:
        self._max_cost = float(value)
        self._publish()

    def probe(self, on: bool) -> None:
        """Under a memory limit with nothing measured, each worker buffers one batch's samples at
        most (``max_batch_size``, else one), as the map-style loader plans one batch before the
        first is measured; off: the buffer the user asked for (or one batch, after :meth:`cap_buffer`)."""
        self._probing = on
        self._set_buffer_cap()

    def cap_buffer(self, samples: float) -> None:
        """From now on each worker reads ahead one batch at most: ``samples`` (a batch's largest count)
        and, the worker's own rule under a cap, samples worth one budget."""
        self._one_batch = float(self.max_batch_size or max(1.0, samples))
        self._set_buffer_cap()

    @property
    def probing(self) -> bool:
        return self._probing

    @property
    def buffer_capped(self) -> bool:
        return self._one_batch is not None

    def _set_buffer_cap(self) -> None:
        cap = min(float(self.max_batch_size or 1) if self._probing else math.inf,
                  self._one_batch if self._one_batch is not None else math.inf)
        if cap != self._buffer_cap:
            self._buffer_cap = cap
            self._publish()

    def _publish(self) -> None:
        self.version = self.budget.publish(self._max_cost, self.max_batch_size, self._buffer_cap)

    @property
    def global_position(self) -> int:
        return self.delivered_batches

    def schedule_budget(self, at: int, max_cost: float, max_batch_size: Optional[int]) -> None:
        """Ranks agreed on a budget: a stream has no shared plan to keep, so it applies at once."""
        self.max_cost = max_cost

    def max_cost_at(self, at: int) -> float:
        return self._max_cost

    # -- epochs and commits -------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def start_epoch(self, workers: int) -> None:
        self.commits = {}
        self.workers = workers
        self.delivered_batches = 0

    def commit(self, meta: StreamMeta) -> None:
        self.commits.setdefault(meta.worker, WorkerCommit()).commit(meta)
        self.delivered_batches += 1

    def resume_plan(self) -> Dict[int, Resume]:
        return {worker: commit.resume(self.stateful) for worker, commit in self.commits.items()}

    def delivered_samples(self) -> int:
        return sum(c.samples for c in self.commits.values())

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "workers": self.workers, "max_cost": self._max_cost,
                "delivered_batches": self.delivered_batches,
                "commits": {w: c.to_dict() for w, c in self.commits.items()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.workers = int(state["workers"])
        self.delivered_batches = int(state["delivered_batches"])
        self.commits = {int(w): WorkerCommit.from_dict(c) for w, c in state["commits"].items()}
