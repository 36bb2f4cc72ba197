"""BudgetBatchSampler: batches capped by total cost and by size, every sample once."""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
from torch.utils.data import Sampler

from .costs import as_cost_array, as_group_array
from .packing import pack_padded, pack_pool

__all__ = ["BudgetBatchSampler"]

DEFAULT_WINDOW = 8192
_NO_SIZE_CAP = 2**62  # max_batch_size=None
_STATE_VERSION = 1
COST_MODES = ("sum", "padded")
# The kind of a budget_schedule() entry: plain strings, so that a checkpoint holding the schedule
# loads with torch.load(weights_only=True).
BUDGET = "budget"
REQUEUE = "requeue"


class BudgetBatchSampler(Sampler[List[int]]):
    """Yield lists of dataset indices whose total cost stays under a budget.

    Use it as ``DataLoader(dataset, batch_sampler=sampler)`` (not ``sampler=``).

    Args:
        costs: one non-negative number per sample (objects per image, voxels,
            frames...), a callable ``costs(index)`` (give ``num_samples``), or
            ``None`` for cost 1 each (then give ``num_samples``).
        max_cost: cap on the summed cost of a batch (``None``: no cost cap).
        max_batch_size: cap on the number of samples in a batch (``None``: none).
        shuffle: shuffle with ``seed`` and the epoch (see :meth:`set_epoch`).
        seed: base seed; the same seed and epoch give the same batches anywhere.
        drop_last: drop the epoch's final batch when it is short: without
            ``max_cost``, when it has fewer than ``max_batch_size`` samples (as
            DataLoader); with ``max_cost``, when it is under half full (fewer than
            half of ``max_batch_size`` samples and under half of ``max_cost``).
        window: how many samples the planner looks ahead to pack tightly.
        num_samples: dataset length when ``costs`` is ``None``.
        num_replicas, rank: for distributed training (default: from an initialized
            ``torch.distributed``, else one replica). Every rank plans the same
            batches and takes every ``num_replicas``-th one, so each rank yields
            the same number of batches and together they cover every index once.
        group_ids: one int per sample (e.g. :func:`~adaptive_loader.costs.aspect_ratio_groups`);
            a batch never mixes two groups. ``None``: one group.
        cost: how a batch's cost is counted against ``max_cost``: ``"sum"`` of
            the samples' costs (a collate that keeps samples apart or
            concatenates them), or ``"padded"``: ``len(batch) * max(cost)`` (a
            collate that pads every sample to the largest).
        quadratic: each sample counts ``c + quadratic * c**2`` instead of ``c``
            (attention-like costs), in both modes; so a padded batch counts
            ``len(batch) * (m + quadratic * m**2)`` with ``m`` its largest cost.

    Every index comes exactly once per epoch (``drop_last`` aside). A sample
    whose own cost exceeds ``max_cost`` gets a batch of its own, with one
    warning per epoch. ``max_cost`` and ``max_batch_size`` may be changed at
    any time; the next batch formed obeys the new values.
    """

    def __init__(
        self,
        costs: Any,
        *,
        max_cost: Optional[float] = None,
        max_batch_size: Optional[int] = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        window: int = DEFAULT_WINDOW,
        num_samples: Optional[int] = None,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
        group_ids: Any = None,
        cost: str = "sum",
        quadratic: float = 0.0,
    ) -> None:
        cost_array = as_cost_array(costs, expected_len=num_samples)
        if cost_array is None:
            if num_samples is None:
                raise ValueError("costs=None needs num_samples (the dataset length)")
            num_samples = _check_int("num_samples", num_samples, minimum=0)
            cost_array = np.ones(num_samples)
            cost_array.setflags(write=False)
        if max_cost is None and max_batch_size is None:
            raise ValueError("give max_cost, max_batch_size or both: otherwise a batch has no bound")
        if not isinstance(cost, str):
            raise TypeError(f"cost must be one of {COST_MODES}, got {type(cost).__name__}")
        if cost not in COST_MODES:
            raise ValueError(f"cost must be one of {COST_MODES}, got {cost!r}")
        self.cost = cost
        self.quadratic = _check_quadratic(quadratic)
        self.group_ids = as_group_array(group_ids, expected_len=len(cost_array))
        self._costs = cost_array
        self._unit = cost_array
        if self.quadratic:
            with np.errstate(over="ignore"):
                self._unit = cost_array + self.quadratic * cost_array**2
            bad = np.flatnonzero(~np.isfinite(self._unit))
            if len(bad):
                raise ValueError(f"quadratic={self.quadratic!r} makes costs[{int(bad[0])}] = "
                                 f"{cost_array[bad[0]]:g} count as infinity")
            self._unit.setflags(write=False)
        self._max_cost = math.inf
        self._max_batch_size = _NO_SIZE_CAP
        self._budget = (self._max_cost, self._max_batch_size)
        if max_batch_size is not None:
            self.max_batch_size = max_batch_size
        if max_cost is not None:
            self.max_cost = max_cost
        self.shuffle = bool(shuffle)
        self.seed = _check_int("seed", seed)
        self.drop_last = bool(drop_last)
        self.window = _check_int("window", window, minimum=1)
        self.epoch = 0
        self._uniform = bool(len(cost_array) == 0 or np.all(self._unit == self._unit[0]))
        self.num_replicas, self.rank = _replicas_and_rank(num_replicas, rank)
        if self.num_replicas > 1 and self.drop_last:
            raise ValueError("drop_last=True is not supported with several replicas: each rank already gets "
                             "the same number of batches")
        if 1 < self.num_replicas > len(cost_array):
            raise ValueError(f"{len(cost_array)} samples cannot give each of {self.num_replicas} ranks a batch")
        # (BUDGET, global batch, max_cost, max_batch_size) or (REQUEUE, global batch, indices, epoch, number
        # in the order scheduled), by batch
        self._schedule: List[tuple] = []
        self._ran_out = False  # the last plan yielded its last batch: budgets scheduled past it start the next
        self._requeues = 0
        self._budget_log: List[tuple] = []  # the entries applied this epoch
        self.epoch_budget = (_finite_or_none(self._max_cost), self.max_batch_size)  # at the epoch's start
        self.warn_oversized = True
        self._plan: Optional[_EpochPlan] = None
        self._resume = False
        self._len_cache: Optional[tuple] = None

    # -- budget ---------------------------------------------------------------
    @property
    def max_cost(self) -> float:
        """Cap on the summed cost of one batch (``math.inf`` when uncapped)."""
        return self._max_cost

    @max_cost.setter
    def max_cost(self, value: Optional[float]) -> None:
        if value is None:
            if self._max_batch_size == _NO_SIZE_CAP:
                raise ValueError("max_cost=None needs a max_batch_size")
            self._max_cost = math.inf
            self._budget = (self._max_cost, self._max_batch_size)
            return
        self._max_cost = _check_max_cost(value)
        self._budget = (self._max_cost, self._max_batch_size)

    @property
    def max_batch_size(self) -> Optional[int]:
        """Cap on the number of samples in one batch (``None`` when uncapped)."""
        return None if self._max_batch_size == _NO_SIZE_CAP else self._max_batch_size

    @max_batch_size.setter
    def max_batch_size(self, value: Optional[int]) -> None:
        if value is None:
            if math.isinf(self._max_cost):
                raise ValueError("max_batch_size=None needs a max_cost")
            self._max_batch_size = _NO_SIZE_CAP
        else:
            self._max_batch_size = _check_int("max_batch_size", value, minimum=1)
        self._budget = (self._max_cost, self._max_batch_size)

    @property
    def costs(self) -> np.ndarray:
        """The validated per-sample costs (read-only)."""
        return self._costs

    @property
    def unit_costs(self) -> np.ndarray:
        """Each sample's cost in the budget's units, ``c + quadratic * c**2``: what a batch of it alone costs."""
        return self._unit

    def batch_cost(self, indices: Any) -> float:
        """What a batch of these indices counts against ``max_cost`` under this sampler's ``cost`` mode."""
        unit = self._unit[np.asarray(indices, dtype=np.int64)]
        if len(unit) == 0:
            return 0.0
        if self.cost == "padded":
            return float(len(unit) * unit.max())
        return float(unit.sum())

    # -- epochs and iteration -------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle the next iteration uses."""
        self.epoch = _check_int("epoch", epoch, minimum=0)

    def __iter__(self) -> Iterator[List[int]]:
        if not (self._resume and self._plan is not None and self._plan.epoch == self.epoch):
            # A budget scheduled past the end of an epoch that ran out starts the next one, on every rank:
            # whether a rank's plan looked at it before running out depends on how far ahead it planned.
            # Give-backs scheduled for another epoch (one left before its end) have nothing to give back.
            carried = [e for e in self._schedule if e[0] == BUDGET] if self._ran_out else []
            self._schedule = [e for e in self._schedule if e not in carried and (e[0] == BUDGET or e[3] == self.epoch)]
            self._plan, self._ran_out = self._new_plan(), False
            for entry in carried:
                self.set_budget(*entry[2:])
            self._apply_schedule(0)
            self.epoch_budget = (_finite_or_none(self._max_cost), self.max_batch_size)
            self._budget_log = []
        self._resume = False
        return self.iter_remaining()

    def iter_remaining(self) -> Iterator[List[int]]:
        """Continue the current epoch where it stands (used for recovery)."""
        if self._plan is None:
            self._plan = self._new_plan()
        plan = self._plan
        warned = False
        replicas, rank = self.num_replicas, self.rank
        while True:
            self._apply_schedule(plan.global_taken)
            budget = self._budget
            ready = plan.ready(budget, self.drop_last, replicas)
            if len(plan.evened_out):  # also when they were all the epoch had left
                warnings.warn(f"{len(plan.evened_out)} single-sample batches dropped at the end of epoch "
                              f"{self.epoch} so that {replicas} ranks get as many batches: indices "
                              f"{self._plan.order[plan.evened_out].tolist()}", stacklevel=2)
                plan.evened_out = plan.evened_out[:0]
            if not ready:
                if self._requeue_at_end():
                    continue
                self._ran_out = True
                return
            indices, bounds, n_batches = plan.chunk_idx, plan.bounds, plan.chunk_batches
            k = plan.next_k
            stop = n_batches if not self._schedule else min(n_batches, self._schedule[0][1] - plan.chunk_first)
            while k < stop and budget is self._budget:  # the setters and the schedule make a new tuple
                batch = indices[bounds[k] : bounds[k + 1]]
                k += 1
                plan.next_k = k
                if replicas > 1 and (plan.chunk_first + k - 1) % replicas != rank:
                    continue  # another rank's batch
                if len(batch) == 1 and not warned and self._unit[batch[0]] > self._max_cost:
                    warned = True
                    if self.warn_oversized:
                        self._warn_oversized(batch[0])
                yield batch

    def schedule_budget(self, at_batch: int, max_cost: Optional[float],
                        max_batch_size: Optional[int]) -> None:
        """Change the budget from global batch ``at_batch`` of this epoch on.

        Batches are counted over all ranks; with several, the change waits for the
        next multiple of ``num_replicas``. In distributed training every rank must
        schedule the same change at the same batch (``AdaptiveLoader`` agrees on
        both with a collective); setting ``max_cost`` directly changes the budget
        at whatever batch each rank happens to plan next.
        """
        at_batch = _check_int("at_batch", at_batch, minimum=self.global_position)
        at_batch = -(-at_batch // self.num_replicas) * self.num_replicas  # windows start at multiples of it
        if max_cost is not None:  # plain numbers: the schedule goes into checkpoints
            max_cost = _check_max_cost(max_cost)
        if max_batch_size is not None:
            max_batch_size = _check_int("max_batch_size", max_batch_size, minimum=1)
        if max_cost is None and max_batch_size is None:
            raise ValueError("give max_cost, max_batch_size or both: otherwise a batch has no bound")
        self._add_entry((BUDGET, at_batch, max_cost, max_batch_size))

    def schedule_requeue(self, at_batch: int, indices: Any) -> None:
        """Give ``indices`` back to this epoch from global batch ``at_batch`` on: they are
        re-planned with what is left, as :meth:`requeue` does, when the plan reaches it.

        Like :meth:`schedule_budget`, batches are counted over all ranks and the give-back
        waits for the next multiple of ``num_replicas``: every rank that schedules the same
        indices at the same batch keeps the same plan. ``at_batch`` must be at least
        :attr:`global_position` and at least 1. One left pending at the epoch's end is
        applied there (the one scheduled first, then the plan goes on), so its indices
        still come in this epoch.
        """
        at_batch = _check_int("at_batch", at_batch, minimum=max(1, self.global_position))
        at_batch = -(-at_batch // self.num_replicas) * self.num_replicas
        self._requeues += 1
        self._add_entry((REQUEUE, at_batch, _check_indices(indices, len(self._costs)), self.epoch, self._requeues))

    def replay_schedule(self, entries: Any) -> None:
        """Schedule again the entries of a :meth:`budget_schedule` (e.g. from a checkpoint).

        Takes ``("budget", at, max_cost, max_batch_size)`` and ``("requeue", at, indices)``
        entries, and the ``(at, max_cost, max_batch_size)`` budget entries of older checkpoints.
        """
        for entry in entries:
            entry = tuple(entry)
            if len(entry) == 3 and not isinstance(entry[0], str):
                entry = (BUDGET, *entry)
            if entry and entry[0] == BUDGET and len(entry) == 4:
                self.schedule_budget(*entry[1:])
            elif entry and entry[0] == REQUEUE and len(entry) == 3:
                self.schedule_requeue(*entry[1:])
            else:
                raise ValueError(f"not a budget_schedule() entry: {entry!r}")

    @property
    def global_position(self) -> int:
        """Batches of the current epoch planned and handed out so far, over all ranks."""
        return 0 if self._plan is None else self._plan.global_taken

    def budget_schedule(self) -> List[tuple]:
        """This epoch's schedule by global batch, applied entries first, then pending ones:
        ``("budget", at, max_cost, max_batch_size)`` and ``("requeue", at, indices)``.
        :meth:`replay_schedule` takes it back."""
        return [_public(entry) for entry in self._budget_log + self._schedule]

    def max_cost_at(self, at_batch: int) -> float:
        """The cost budget the schedule gives global batch ``at_batch`` of this epoch: the last
        budget entry at or before it, else the epoch's starting budget (inf for none). Every
        rank that scheduled the same entries gets the same answer, wherever its plan stands."""
        max_cost = self.epoch_budget[0]
        for entry in sorted(self._budget_log + self._schedule, key=lambda e: e[1]):
            if entry[0] == BUDGET and entry[1] <= at_batch:
                max_cost = entry[2]
        return math.inf if max_cost is None else float(max_cost)

    def _add_entry(self, entry: tuple) -> None:
        self._schedule.append(entry)
        self._schedule.sort(key=lambda e: e[1])  # stable: entries at one batch apply in the order given
        # A new tuple: an iteration under way stops to look at the schedule before its next batch.
        self._budget = (self._max_cost, self._max_batch_size)

    def _apply_schedule(self, position: int) -> None:
        while self._schedule and self._schedule[0][1] <= position and self._plan is not None:
            self._apply(self._schedule.pop(0))

    def _apply(self, entry: tuple) -> None:
        self._budget_log.append(entry)
        if entry[0] == REQUEUE:
            self._plan.requeue(np.asarray(entry[2], dtype=np.int64))
        else:
            self.set_budget(*entry[2:])

    def _requeue_at_end(self) -> bool:
        """At the epoch's end, apply the give-back scheduled first of those past it (their indices
        would be lost). Only that one: a rank whose plan got here before a later one was scheduled
        did the same, and the later ones wait for their own batch again."""
        pending = [e for e in self._schedule if e[0] == REQUEUE]
        if not pending:
            return False
        first = min(pending, key=lambda e: e[4])
        self._schedule.remove(first)
        self._apply(first)
        return True

    def set_budget(self, max_cost: Optional[float], max_batch_size: Optional[int]) -> None:
        """Set both caps at once (in the order the setters allow: one must stay set)."""
        if max_cost is None:
            self.max_batch_size = max_batch_size
            self.max_cost = None
        else:
            self.max_cost = max_cost
            self.max_batch_size = max_batch_size

    def requeue(self, indices: List[int]) -> None:
        """Give indices that were yielded but never used back to the running epoch;
        :meth:`iter_remaining` then yields them again."""
        if self._plan is None:
            raise RuntimeError("requeue() before any iteration")
        self._plan.requeue(np.asarray(indices, dtype=np.int64))

    def __len__(self) -> int:
        if self._resume and self._plan is not None:  # the rest of a restored epoch
            return self._plan.copy().count_remaining(self._max_cost, self._max_batch_size, self.drop_last,
                                                     self.num_replicas, self.rank)
        return self.epoch_length()

    def epoch_length(self) -> int:
        """Batches this rank gets in the whole current epoch at the current budget."""
        key = (self.epoch, self._max_cost, self._max_batch_size, self.drop_last, self.window,
               self.shuffle, self.seed)
        if self._len_cache is None or self._len_cache[0] != key:
            count = self._new_plan().count_remaining(self._max_cost, self._max_batch_size, self.drop_last,
                                                     self.num_replicas, self.rank)
            self._len_cache = (key, count)
        return self._len_cache[1]

    # -- resumption -----------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Where the epoch stands: enough for a fresh sampler to finish it.

        ``consumed`` (a bitmap by index) is what counts; ``chunk`` lets a
        sampler with the same settings continue with the very same batches.
        """
        state: Dict[str, Any] = {
            "version": _STATE_VERSION,
            "epoch": self.epoch,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_samples": len(self._costs),
            "consumed": _pack_bits(np.zeros(len(self._costs), bool)),
            "chunk": None,
            "global_taken": 0,
            "num_replicas": self.num_replicas,
            "rank": self.rank,
        }
        if self._plan is not None and self._plan.epoch == self.epoch:
            state["consumed"] = _pack_bits(self._plan.consumed_by_index())
            state["chunk"] = self._plan.chunk_state()
            state["global_taken"] = self._plan.global_taken
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the next iteration yields the rest of that epoch."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported BudgetBatchSampler state version {state.get('version')!r}")
        if state["num_samples"] != len(self._costs):
            raise ValueError(
                f"state is for {state['num_samples']} samples, this sampler has {len(self._costs)}")
        self.epoch, self.seed, self.shuffle = int(state["epoch"]), int(state["seed"]), bool(state["shuffle"])
        consumed = _unpack_bits(state["consumed"], len(self._costs))
        if (state.get("num_replicas", 1), state.get("rank", 0)) != (self.num_replicas, self.rank):
            raise ValueError(f"state is for rank {state.get('rank', 0)} of {state.get('num_replicas', 1)}, this "
                             f"sampler is rank {self.rank} of {self.num_replicas}")
        self._plan = self._new_plan(consumed_by_index=consumed)
        self._plan.chunk_first = int(state.get("global_taken", 0))
        chunk = state.get("chunk")
        if chunk is not None:
            replay = self._new_plan(consumed_by_index=_unpack_bits(chunk["start"], len(self._costs)))
            if replay.replay_chunk(chunk, self.drop_last, self.num_replicas) \
                    and np.array_equal(replay.consumed_by_index(), consumed):
                self._plan = replay
        self._resume = True

    # -- internals ------------------------------------------------------------
    def _new_plan(self, consumed_by_index: Optional[np.ndarray] = None) -> "_EpochPlan":
        n = len(self._costs)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
        else:
            order = np.arange(n)
        return _EpochPlan(order, self._unit, self.window, self.shuffle, self._uniform,
                          seed=(self.seed, self.epoch), epoch=self.epoch,
                          consumed_by_index=consumed_by_index, padded=self.cost == "padded",
                          groups=self.group_ids)

    def _warn_oversized(self, index: int) -> None:
        n_over = int(np.count_nonzero(self._unit > self._max_cost))
        warnings.warn(
            f"sample {index} has cost {self._unit[index]:g} > max_cost {self._max_cost:g}; it gets a "
            f"batch of its own ({n_over} sample(s) exceed max_cost; warned once per epoch)",
            stacklevel=3,
        )


class _EpochPlan:
    """The rest of one epoch: a permutation, what is consumed, a pool, a planned chunk.

    The pool is always the first ``window`` unconsumed samples in permutation
    order, so the plan is a function of the consumed set alone. A planned
    chunk is one array of positions grouped by batch plus the batch bounds;
    yielding a batch is a list slice, and the consumed bits of a chunk are
    written lazily (``_sync_consumed``) to keep the per-batch path short.
    """

    def __init__(self, order, costs, window, shuffle, uniform, *, seed, epoch, consumed_by_index=None,
                 padded=False, groups=None):
        self.order = order
        self.costs_at = costs[order]
        self.padded = padded
        self.groups_at = None if groups is None else groups[order]
        self.window = window
        self.shuffle = shuffle
        self.uniform = uniform
        self.seed = seed
        self.epoch = epoch
        self.consumed = np.zeros(len(order), bool)  # by permutation position
        if consumed_by_index is not None:
            self.consumed = consumed_by_index[order].copy()
        self.cursor = 0  # positions below it have been pulled into the pool
        # Where the first chunk planned at global batch base[0] began (cursor base[1]), and what its planning
        # dropped: a give-back at that batch undoes it, so that a plan that had looked ahead (at the epoch's
        # end) and one that had not go on alike.
        self.base = (-1, 0)
        self.base_dropped = np.empty(0, np.int64)
        self.pool = np.empty(0, np.int64)
        self.chunk_first = self.next_k = 0
        self._clear_chunk()

    def copy(self) -> "_EpochPlan":
        other = object.__new__(_EpochPlan)
        other.__dict__.update(self.__dict__)
        other.consumed = self.consumed.copy()
        return other

    def consumed_by_index(self) -> np.ndarray:
        self._sync_consumed()
        out = np.zeros(len(self.order), bool)
        out[self.order] = self.consumed
        return out

    def chunk_state(self) -> Optional[Dict[str, Any]]:
        """The current chunk as (consumed before it, batches yielded from it, its budget)."""
        if self.chunk_budget is None:
            return None
        start = self.consumed_by_index()
        start[self.order[self.chunk_pos[: self.bounds[self.next_k]]]] = False
        start[self.order[self.dropped]] = False
        return {"start": _pack_bits(start), "yielded": self.next_k, "budget": self.chunk_budget,
                "first": self.chunk_first}

    def replay_chunk(self, chunk: Dict[str, Any], drop_last: bool, replicas: int) -> bool:
        """Plan the chunk again from its start and skip what was yielded."""
        self.chunk_first = chunk["first"]
        self._plan_chunk(*chunk["budget"], drop_last, replicas)
        if chunk["yielded"] > self.chunk_batches:
            return False
        self.next_k = chunk["yielded"]
        return True

    def requeue(self, indices: np.ndarray) -> None:
        self._sync_consumed()
        if self.base[0] == self.global_taken:  # a chunk planned here and not begun: as if never planned
            self.consumed[self.base_dropped] = False
            self.cursor = self.base[1]
            self.base = (-1, 0)
        position = np.empty(len(self.order), np.int64)
        position[self.order] = np.arange(len(self.order))
        self.consumed[position[indices]] = False
        self._clear_chunk()
        self.pool = np.flatnonzero(~self.consumed[: self.cursor])

    @property
    def global_taken(self) -> int:
        """Batches of the epoch handed out so far (all ranks)."""
        return self.chunk_first + self.next_k

    def ready(self, budget: tuple, drop_last: bool, replicas: int = 1) -> bool:
        """Make sure unyielded batches planned at ``budget`` exist; False at epoch end."""
        if self.next_k < self.chunk_batches and self.chunk_budget == budget:
            return True
        self._return_unyielded()
        self._plan_chunk(*budget, drop_last, replicas)
        return self.chunk_batches > 0

    def count_remaining(self, max_cost: float, max_batch_size: int, drop_last: bool, replicas: int = 1,
                        rank: int = 0) -> int:
        """Batches the rest of the epoch gives ``rank`` at this budget (consumes this plan)."""
        start = self.global_taken
        if self.chunk_budget == (max_cost, max_batch_size):
            self.next_k = self.chunk_batches
        while True:
            self._return_unyielded()
            self._plan_chunk(max_cost, max_batch_size, drop_last, replicas)
            if self.chunk_batches == 0:
                break
            self.next_k = self.chunk_batches
        return len(range(start + (rank - start) % replicas, self.global_taken, replicas))

    def _clear_chunk(self) -> None:
        self.chunk_first += self.next_k  # the global index of the next chunk's first batch
        self.chunk_pos = np.empty(0, np.int64)
        self.chunk_idx: List[int] = []
        self.bounds: List[int] = [0]
        self.chunk_batches = 0
        self.next_k = 0
        self.synced_k = 0
        self.chunk_budget: Optional[tuple] = None
        self.dropped = np.empty(0, np.int64)  # positions drop_last dropped in this chunk
        self.evened_out = np.empty(0, np.int64)  # positions dropped so that ranks get equal counts

    def _sync_consumed(self) -> None:
        if self.next_k > self.synced_k:
            self.consumed[self.chunk_pos[self.bounds[self.synced_k] : self.bounds[self.next_k]]] = True
            self.synced_k = self.next_k

    def _return_unyielded(self) -> None:
        """Put the planned but unyielded batches back into the pool."""
        self._sync_consumed()
        rest = self.chunk_pos[self.bounds[self.next_k] :]
        if len(rest):
            self.pool = np.sort(np.concatenate([self.pool, rest]))
        self._clear_chunk()

    def _pull_fresh(self, target: int) -> np.ndarray:
        """The pool topped up to ``target`` unconsumed positions."""
        n = len(self.order)
        parts = [self.pool]
        size = len(self.pool)
        while size < target and self.cursor < n:
            stop = min(n, self.cursor + target - size)
            span = np.arange(self.cursor, stop)
            span = span[~self.consumed[span]]
            parts.append(span)
            size += len(span)
            self.cursor = stop
        return np.concatenate(parts) if len(parts) > 1 else self.pool

    def _plan_chunk(self, max_cost: float, max_batch_size: int, drop_last: bool, replicas: int = 1) -> None:
        if self.base[0] != self.chunk_first:
            self.base, self.base_dropped = (self.chunk_first, self.cursor), np.empty(0, np.int64)
        target = self.window
        while True:
            pool = self._pull_fresh(target)
            last = self.cursor >= len(self.order)
            pos, batch, self.pool = self._pack(pool, max_cost, max_batch_size, last)
            while last and len(self.pool):  # end of epoch: pack the leftovers too
                more_pos, more_batch, self.pool = self._pack(self.pool, max_cost, max_batch_size, last)
                offset = int(batch.max()) + 1 if len(batch) else 0
                pos, batch = np.concatenate([pos, more_pos]), np.concatenate([batch, more_batch + offset])
            if replicas > 1 and len(pos):
                pos, batch, spare = _make_multiple(pos, batch, replicas)
                if last:
                    self.evened_out = spare
                    self.consumed[spare] = True
                    self.dropped = np.concatenate([self.dropped, spare])
                    self.base_dropped = np.concatenate([self.base_dropped, spare])
                else:
                    self.pool = np.sort(np.concatenate([self.pool, spare]))
            if len(pos) or last:
                break
            target *= 2  # equal costs, or too few batches for the ranks: look further
        n_batches = int(batch.max()) + 1 if len(batch) else 0
        if n_batches == 0:
            return
        rank = self._batch_rank(pos, batch, n_batches)
        if last and drop_last:  # the least filled batch of the epoch goes last, to be dropped
            fill = _batch_totals(self.costs_at[pos], batch, n_batches, self.padded) / max_cost
            fill += np.bincount(batch, minlength=n_batches) / max_batch_size
            least = np.flatnonzero(fill <= fill.min() * (1 + 1e-9))
            worst = int(least[np.argmax(rank[least])])  # of equally filled ones the latest: no move
            rank[rank > rank[worst]] -= 1
            rank[worst] = n_batches - 1
        grouped = np.argsort(rank[batch] * len(self.order) + pos)  # by batch rank, then position
        self.chunk_pos = pos[grouped]
        sizes = np.bincount(batch, minlength=n_batches)[np.argsort(rank)]
        self.bounds = [0, *np.cumsum(sizes).tolist()]
        if last and drop_last and _short(self.chunk_pos[self.bounds[-2] :], self.costs_at, max_cost,
                                         max_batch_size, self.padded):
            self.dropped = self.chunk_pos[self.bounds[-2] :]
            self.consumed[self.dropped] = True  # dropped: counts as used
            self.base_dropped = np.concatenate([self.base_dropped, self.dropped])
            self.chunk_pos = self.chunk_pos[: self.bounds[-2]]
            self.bounds.pop()
        self.chunk_idx = self.order[self.chunk_pos].tolist()
        self.chunk_batches = len(self.bounds) - 1
        self.chunk_budget = (max_cost, max_batch_size)

    def _pack(self, pool: np.ndarray, max_cost: float, max_batch_size: int, last: bool):
        """:func:`_pack_positions` for each group of the pool apart; batch ids run on across groups."""
        if self.groups_at is None:
            return _pack_positions(pool, self.costs_at, max_cost, max_batch_size, self.uniform, last, self.padded)
        groups = self.groups_at[pool]
        by_group = np.argsort(groups, kind="stable")  # keeps each group's positions ascending
        cuts = np.flatnonzero(np.diff(groups[by_group])) + 1
        positions, batches, leftovers = [], [], []
        offset = 0
        for members in np.split(pool[by_group], cuts):
            pos, batch, rest = _pack_positions(members, self.costs_at, max_cost, max_batch_size, self.uniform,
                                               last, self.padded)
            positions.append(pos)
            batches.append(batch + offset)
            leftovers.append(rest)
            offset += int(batch.max()) + 1 if len(batch) else 0
        if not positions:
            return pool, pool, pool
        return np.concatenate(positions), np.concatenate(batches), np.sort(np.concatenate(leftovers))

    def _batch_rank(self, pos: np.ndarray, batch: np.ndarray, n_batches: int) -> np.ndarray:
        """Yield rank of each batch: random with the epoch's seed, or by first position."""
        if self.shuffle:
            return np.random.default_rng([*self.seed, self.cursor, len(self.pool)]).permutation(n_batches)
        first = np.full(n_batches, len(self.order), np.int64)
        np.minimum.at(first, batch, pos)
        return np.argsort(np.argsort(first, kind="stable"), kind="stable")


def _make_multiple(pos: np.ndarray, batch: np.ndarray, replicas: int):
    """Make the number of batches a multiple of ``replicas`` so that every rank gets as many:
    split the largest batches; when every batch is down to one sample, take the last few
    out. Returns ``(positions, batch ids 0..k-1, positions taken out)``."""
    sizes = np.bincount(batch)
    n = len(sizes)
    members = [list(pos[batch == b]) for b in range(n)] if n % replicas else None
    while members is not None and len(members) % replicas:
        largest = max(range(len(members)), key=lambda b: len(members[b]))
        if len(members[largest]) < 2:
            break
        half = len(members[largest]) // 2
        members.append(members[largest][half:])
        members[largest] = members[largest][:half]
    if members is None:
        return pos, batch, pos[:0]
    extra = len(members) % replicas
    spare = np.array([p for group in members[len(members) - extra:] for p in group], np.int64)
    members = members[: len(members) - extra]
    pos = np.array([p for group in members for p in group], np.int64)
    batch = np.repeat(np.arange(len(members)), [len(group) for group in members])
    return pos, batch, spare


def _pack_positions(pool: np.ndarray, costs_at: np.ndarray, max_cost: float, max_batch_size: int,
                    uniform: bool, last: bool, padded: bool = False):
    """Pack pool positions into batches.

    Returns ``(positions, batch_ids, leftover)``: the placed positions with the
    batch number of each (``0..k-1``), and the positions left for later.
    """
    costs = costs_at[pool]
    oversized = costs > max_cost
    alone = pool[oversized]
    fits, fit_costs = pool[~oversized], costs[~oversized]
    if uniform or math.isinf(max_cost):  # without a cost cap, runs of max_batch_size in order, as DataLoader
        per_batch = max_batch_size
        if len(fits) and fit_costs[0] > 0 and not math.isinf(max_cost):
            per_batch = max(1, int(min(per_batch, max_cost // fit_costs[0])))
        batch_of = np.arange(len(fits)) // per_batch
        if not last:  # a partial batch waits for the next pool
            batch_of[len(fits) - len(fits) % per_batch :] = -1
    elif padded:
        batch_of = pack_padded(fit_costs, max_cost, max_batch_size, leave_partial=not last)
    else:
        batch_of = pack_pool(fit_costs, max_cost, max_batch_size)
    placed = batch_of >= 0
    first_alone = int(batch_of.max()) + 1 if placed.any() else 0
    pos = np.concatenate([fits[placed], alone])
    batch = np.concatenate([batch_of[placed], np.arange(first_alone, first_alone + len(alone))])
    return pos, batch, fits[~placed]


def _pack_bits(mask: np.ndarray) -> bytes:
    return np.packbits(mask).tobytes()


def _unpack_bits(data: bytes, count: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count).astype(bool)


def _short(positions: np.ndarray, costs_at: np.ndarray, max_cost: float, max_batch_size: int,
           padded: bool = False) -> bool:
    """Whether drop_last drops this final batch: not full where the cost cap cannot bind (none, or a
    budget above what ``max_batch_size`` of the largest samples cost: as DataLoader), under half full
    where it can (a cost-capped batch is rarely exactly full)."""
    if max_batch_size * float(costs_at.max(initial=0.0)) <= max_cost:  # an infinite max_cost too
        return len(positions) < max_batch_size
    costs = costs_at[positions]
    total = len(costs) * float(costs.max(initial=0.0)) if padded else float(costs.sum())
    return len(positions) < max_batch_size / 2 and total < max_cost / 2


def _batch_totals(costs: np.ndarray, batch: np.ndarray, n_batches: int, padded: bool) -> np.ndarray:
    """Each batch's cost: the sum of its costs, or (padded) its size times its largest cost."""
    if not padded:
        return np.bincount(batch, costs, n_batches)
    largest = np.zeros(n_batches)
    np.maximum.at(largest, batch, costs)
    return largest * np.bincount(batch, minlength=n_batches)


def _check_quadratic(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"quadratic must be a number, got {type(value).__name__}")
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"quadratic must be finite and >= 0, got {value!r}")
    return float(value)


def _public(entry: tuple) -> tuple:
    """A schedule entry as budget_schedule() gives it: a give-back without its epoch."""
    return entry[:3] if entry[0] == REQUEUE else entry


def _check_indices(indices: Any, n: int) -> tuple:
    """Dataset indices as a tuple of ints, each in ``[0, n)``."""
    if isinstance(indices, (str, bytes)) or not hasattr(indices, "__len__"):
        raise TypeError(f"indices must be a sequence of ints, got {type(indices).__name__}")
    values = np.asarray(indices)
    if values.dtype == bool or not (values.size == 0 or np.issubdtype(values.dtype, np.integer)):
        raise TypeError(f"indices must be ints, got {values.dtype}")
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"indices must be a non-empty one-dimensional sequence, got shape {values.shape}")
    bad = np.flatnonzero((values < 0) | (values >= n))
    if len(bad):
        raise ValueError(f"indices[{int(bad[0])}] = {int(values[bad[0]])} is not an index of {n} samples")
    return tuple(values.tolist())


def _finite_or_none(value: float) -> Optional[float]:
    return None if math.isinf(value) else value


def _check_max_cost(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"max_cost must be a number, got {type(value).__name__}")
    if not value > 0 or math.isnan(value):
        raise ValueError(f"max_cost must be > 0, got {value!r}")
    return float(value)


def _replicas_and_rank(num_replicas: Optional[int], rank: Optional[int]):
    """Explicit values, else those of an initialized torch.distributed, else (1, 0)."""
    import torch.distributed as dist

    initialized = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialized else 1
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    num_replicas = _check_int("num_replicas", num_replicas, minimum=1)
    rank = _check_int("rank", rank, minimum=0)
    if rank >= num_replicas:
        raise ValueError(f"rank must be < num_replicas ({num_replicas}), got {rank}")
    return num_replicas, rank


def _check_int(name: str, value: Any, minimum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)
