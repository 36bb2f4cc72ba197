"""AdaptiveLoader: a DataLoader whose batch budget follows the memory it has.

A thin facade over the layers (docs/design.md has the picture):
``sampler`` plans batches under the current budget; the ``pipeline`` runs
the DataLoader and its workers, which measure and ship each batch
(``transport``); the ``ledger`` records what is in flight and held; the
probes read memory, shm and fds (``measure``, ``memory``); the
``controller`` decides the next budget and fallbacks; the ``actuator``
carries decisions out; ``telemetry`` shows it all. ``epoch`` runs one
epoch: iterate, recover, catch stalls.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
import uuid
import warnings
import weakref
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import (BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler,
                              default_collate)

from . import controller as rules
from . import distributed
from .actuator import Actuator, finite_or_none
from .arena import first_ring_bytes
from .arena import registry as arena_registry
from .controller import Controller, Observation
from .costs import as_cost_array, as_group_array
from .epoch import EpochIterator, EpochParts, LoaderFailed, LoaderStalled, after_batch
from .kinds import ARENA_ROADS, Fallback, Road
from .ledger import LastBatch, Ledger
from .measure import ShmProbe, host_ram_available, mark_heap_base, read_fds, release_free_heap, rss_of
from .memory import read_memory, read_oom_kills, resolve_memory_budget
from .memory_watch import MemoryWatch
from .options import (check_arena, check_dataloader_options, check_keywords, check_sampling, check_settings,
                      check_spill_dir, refuse_batch_sampler_as_sampler, shuffle_seed, warn_worker_number)
from .pipeline import Pipeline, next_watched
from .routing import UNBOUNDED
from .sampler import DEFAULT_WINDOW, BudgetBatchSampler, _pack_bits, _unpack_bits
from .telemetry import SinkSpec, Telemetry

__all__ = ["AdaptiveLoader", "LoaderStalled", "LoaderFailed"]

logger = logging.getLogger("adaptive_loader")

#: Attributes DataLoader refuses to change after construction; so do we.
_FROZEN = ("batch_size", "batch_sampler", "sampler", "drop_last", "dataset", "persistent_workers")


class AdaptiveLoader:
    """Iterate a map-style dataset in batches that fit the memory at hand.

    Like ``DataLoader(dataset, batch_sampler=BudgetBatchSampler(...))``, plus:
    workers measure each batch, a controller lowers or raises ``max_cost`` so
    the batches in flight fit, and before anything can fail it falls back (fewer
    batches in flight, a batch off shm, more fds or the ``file_system``
    strategy). Every sample is delivered exactly once per epoch; a dead worker
    is replaced; a stall becomes :class:`LoaderStalled`; an exception raised by
    the dataset surfaces and the epoch goes on, as with DataLoader.

    Args:
        dataset: a map-style dataset (``__getitem__`` and ``__len__``).
        costs: per-sample cost (e.g. objects per image); ``None``: 1 each.
        max_cost: your cap on a batch's summed cost; the adaptive budget never
            exceeds it. ``None``: only memory decides.
        max_batch_size: cap on samples per batch (``batch_size`` is accepted too).
        num_workers, collate_fn: as for DataLoader.
        shuffle: shuffle with ``seed`` and the epoch (:meth:`set_epoch`).
        seed: the shuffle's base seed. ``None`` (default): drawn once at
            construction from ``generator`` if given, else from torch's global
            RNG, as ``RandomSampler`` does (so ``torch.manual_seed`` decides it).
        telemetry: where records go besides ``logging``: a JSONL path, a callable
            taking a record dict, ``"dashboard"``, ``"tensorboard:DIR"``, or a list.
        shm_path: where the POSIX shm filesystem is mounted.
        safety: fraction of the usable memory that batches in flight may fill.
        stall_timeout: seconds without a batch before :class:`LoaderStalled`
            (DataLoader's ``timeout``, if given, is used instead).
        max_restarts: recoveries in a row without progress before :class:`LoaderFailed`.
        drop_last, window, group_ids, cost: passed to :class:`BudgetBatchSampler`
            (``group_ids``: batches never mix groups, e.g. aspect-ratio bins;
            ``cost="padded"``: a batch costs ``len(batch) * max(cost)``; ``quadratic=q``: a
            sample costs ``c + q * c**2``; see docs/sampler.md).
        spill_dir: a directory on real disk (not tmpfs) under which a private
            directory is made for batches that cannot go through shared memory
            (default: the system temp directory).
        memory_budget: a cap on the memory the loader holds (arenas, batches in flight
            and held): bytes (int), or a fraction (float in (0, 1]) of the memory limit
            found (the memory cgroup, else the host; see docs/memory.md). ``None``: that
            limit alone. Shared among the ranks of a machine.
        min_batch_size: the budget never drops below what this many samples need (one
            smallest, the rest of average cost). Before it drops at all, fewer batches are
            kept in flight and fewer workers run.
        arena: each worker reserves one region of shared memory and reuses it for
            its batches (see docs/performance.md). ``True``/``"memfd"`` (default):
            in a memfd where the kernel has them, else in ``/dev/shm``;
            ``"shm"``: in ``/dev/shm``; ``False``: a new block per batch.
        num_replicas, rank: distributed training (default: from an initialized
            ``torch.distributed``). Every rank gets the same number of batches;
            the ranks agree on the budget every ``sync_every`` batches over a gloo
            group (see docs/distributed.md).
        **dataloader_kwargs: anything else DataLoader takes (``pin_memory``,
            ``prefetch_factor``, ``worker_init_fn``, ``persistent_workers``,
            ``multiprocessing_context``, ``generator``, ...).
    """

    #: the class that takes an IterableDataset (stream_loader.StreamLoader registers itself)
    _stream_class: Optional[type] = None

    def __new__(cls, dataset: Any = None, *args: Any, **kwargs: Any) -> "AdaptiveLoader":
        if cls is AdaptiveLoader and isinstance(dataset, IterableDataset) and AdaptiveLoader._stream_class is not None:
            cls = AdaptiveLoader._stream_class
        return super().__new__(cls)

    def __init__(self, dataset: Dataset, *, costs: Any = None, max_cost: Optional[float] = None,
                 max_batch_size: Optional[int] = None, num_workers: int = 0,
                 collate_fn: Optional[Callable[[List[Any]], Any]] = None, shuffle: bool = False,
                 seed: Optional[int] = None, telemetry: SinkSpec = None, shm_path: str = "/dev/shm",
                 safety: float = 0.8, stall_timeout: float = 300.0, max_restarts: int = 3, drop_last: bool = False,
                 window: int = DEFAULT_WINDOW, spill_dir: Optional[str] = None, num_replicas: Optional[int] = None,
                 rank: Optional[int] = None, sync_every: int = 8, arena: Any = True,
                 memory_budget: Optional[float] = None, min_batch_size: int = 1, group_ids: Any = None,
                 cost: str = "sum", quadratic: float = 0.0, **dataloader_kwargs: Any) -> None:
        sampling, dataloader_kwargs = check_keywords(dataloader_kwargs)  # in DataLoader's order from here
        opts = check_dataloader_options(num_workers=num_workers, seed=seed, **dataloader_kwargs)
        max_batch_size = check_sampling(dataset, max_batch_size, shuffle, drop_last, sampling)
        check_settings(safety=safety, stall_timeout=stall_timeout, max_restarts=max_restarts, sync_every=sync_every,
                       min_batch_size=min_batch_size)
        arena_kind = check_arena(arena)
        self._check_memory_budget(memory_budget)
        n = len(dataset)
        if max_cost is None and max_batch_size is None:
            max_batch_size = 1  # DataLoader's default batch_size
        sampler_options: Dict[str, Any] = {}
        if group_ids is not None:
            sampler_options["group_ids"] = as_group_array(group_ids, expected_len=n, dataset=dataset)
        if cost != "sum" or quadratic:
            sampler_options.update(cost=cost, quadratic=quadratic)
        self._costs_given = costs
        self._sampler_args = dict(max_cost=max_cost, max_batch_size=max_batch_size, shuffle=shuffle,
                                  seed=shuffle_seed(opts["seed"], opts["generator"]) if shuffle and opts["seed"] is None
                                  else (opts["seed"] or 0), drop_last=drop_last, window=window,
                                  num_replicas=num_replicas, rank=rank, **sampler_options)
        self.sampler = self._make_sampler(n)
        self._setup(dataset, dataset, opts, total_samples=n, collate_fn=collate_fn, telemetry=telemetry,
                    shm_path=shm_path, safety=safety, stall_timeout=stall_timeout, max_restarts=max_restarts,
                    spill_dir=spill_dir, sync_every=sync_every, arena_kind=arena_kind, min_batch_size=min_batch_size)
        if self.sampler.num_replicas > 1 and shuffle and opts["seed"] is None:
            # every rank must shuffle alike: the ranks' draws are agreed on (DistributedSampler's 0 without a group)
            seed = distributed.smallest_int(self._group, self.sampler.seed) if self._group is not None else 0
            self.sampler.seed = self._sampler_args["seed"] = seed

    def _check_memory_budget(self, memory_budget: Optional[float]) -> None:
        self._memory, self._memory_read_at = read_memory(), time.monotonic()
        if memory_budget is not None:
            resolve_memory_budget(memory_budget, self._memory.limit)  # the TypeError/ValueError now
        self.memory_budget = memory_budget

    def _setup(self, dataset: Any, source: Any, opts: Dict[str, Any], *, total_samples: Optional[int],
               collate_fn: Optional[Callable], telemetry: SinkSpec, shm_path: str, safety: float, stall_timeout: float,
               max_restarts: int, spill_dir: Optional[str], sync_every: int, arena_kind: Any,
               min_batch_size: int) -> None:
        """What map-style loaders and streams share, once ``self.sampler`` (the plan) is made: the
        controller, ledger, pipeline over ``source`` (what the DataLoader iterates), actuator, telemetry."""
        if self.sampler.max_batch_size is not None and min_batch_size > self.sampler.max_batch_size:
            raise ValueError(f"min_batch_size={min_batch_size} is above max_batch_size={self.sampler.max_batch_size}")
        self.min_batch_size = min_batch_size
        self.sync_every = sync_every
        self.user_max_cost = self.sampler.max_cost
        self.spill_dir = check_spill_dir(spill_dir if spill_dir is not None else tempfile.gettempdir())
        self._shm = ShmProbe(shm_path)
        self._asked = {key: opts[key] for key in ("num_workers", "prefetch_factor", "in_order", "timeout",
                                                   "worker_init_fn")}
        dataloader_kwargs = {key: opts[key] for key in ("persistent_workers", "pin_memory", "multiprocessing_context",
                                                         "generator", "pin_memory_device")}
        if not dataloader_kwargs["pin_memory_device"]:
            del dataloader_kwargs["pin_memory_device"]  # older torch releases refuse the keyword's default
        warn_worker_number(opts["num_workers"], stacklevel=3)
        self.stall_timeout = float(self._asked["timeout"]) if self._asked["timeout"] else float(stall_timeout)
        self.max_restarts = max_restarts
        self.safety = safety
        self.collate_fn = collate_fn if collate_fn is not None else default_collate
        self._dataloader_kwargs = dataloader_kwargs
        self._telemetry = Telemetry(telemetry, total_samples=total_samples, safety=safety)
        self._group = distributed.budget_group(self.sampler.num_replicas)  # a collective: all args are valid
        if self._group is not None:
            weakref.finalize(self, distributed.destroy_budget_group, self._group)
        self.controller = self._make_controller()
        self._local_world_size = distributed.local_world_size()
        self._ledger = Ledger(self.sampler)
        # names this loader's arenas in the process-wide registry; they are unmapped when it goes
        arena_owner = uuid.uuid4().hex if arena_kind is not False else None
        if arena_owner is not None:
            weakref.finalize(self, arena_registry.forget, arena_owner)
        self._pipeline = Pipeline(source, self._ledger, collate_fn=collate_fn, shm=self._shm,
                                  spill_dir=self.spill_dir, arena_owner=arena_owner, safety=safety,
                                  stall_timeout=self.stall_timeout, user_worker_init=self._asked["worker_init_fn"],
                                  dataloader_kwargs=dataloader_kwargs,
                                  arena_kind=arena_kind if arena_kind is not False else None)
        self._actuator = Actuator(self.sampler, self._pipeline, self._ledger, self._telemetry, self._group,
                                  sync_every, self.user_max_cost)
        self._actuator.whole_batch = self._whole_batch()
        self._dataset = dataset
        self._epochs_started = 0
        self._epoch_iterated = 0
        self._epoch_chosen = self._resuming = False  # set_epoch() called / a state loaded since the last epoch
        self._skip_on_resume = 0
        self._fds = None  # last fd reading
        # the memory a budget may count on: the least left lately, read between batches too under a limit
        self._memory_watch = MemoryWatch(lambda: read_memory().available)
        weakref.finalize(self, self._memory_watch.stop)
        self._worker_heaps: Dict[int, int] = {}  # by pid: each running worker's heap, as its last batch told
        self._ram: Optional[int] = None
        self._caps: Dict[str, float] = {}  # cost caps from other limits (e.g. "device"), by source
        self._oom_kills = read_oom_kills()  # the memory cgroup's OOM kills when the workers last started
        self._active: Optional[weakref.ref] = None  # the epoch iterator in use
        self._pending_give_back: List[List[int]] = []  # batches given back on this rank alone
        self._rebuild_pending = False  # a give-back waits for the next batch
        self._parts = EpochParts(self._pipeline, self._ledger, self._actuator, self._telemetry)
        self._closed = self._warned_superseded = False
        self._initialized = True

    # -- construction from an existing DataLoader ------------------------------
    @classmethod
    def wrap(cls, dataloader: DataLoader, *, costs: Any = None, max_cost: Optional[float] = None,
             **overrides: Any) -> "AdaptiveLoader":
        """An AdaptiveLoader with ``dataloader``'s dataset, collate_fn, workers and keywords.

        Its ``batch_size`` becomes ``max_batch_size``; a ``RandomSampler`` means ``shuffle=True``
        (seeded from the DataLoader's ``generator``); a batch sampler that groups indices
        (torchvision's ``GroupedBatchSampler``: a ``group_ids`` attribute) becomes ``group_ids=``.
        What AdaptiveLoader cannot reproduce is refused with a ``ValueError`` that says what to pass.
        """
        if not isinstance(dataloader, DataLoader):
            raise TypeError(f"wrap() takes a torch DataLoader, got {type(dataloader).__name__}")
        kwargs: Dict[str, Any] = dict(costs=costs, max_cost=max_cost, **_wrapped_sampling(dataloader))
        kwargs.setdefault("drop_last", dataloader.drop_last)
        kwargs.update(
            num_workers=dataloader.num_workers, collate_fn=dataloader.collate_fn,
            pin_memory=dataloader.pin_memory, timeout=dataloader.timeout,
            worker_init_fn=dataloader.worker_init_fn, generator=dataloader.generator,
            persistent_workers=dataloader.persistent_workers,
            multiprocessing_context=dataloader.multiprocessing_context)
        if dataloader.num_workers > 0:
            kwargs["prefetch_factor"] = dataloader.prefetch_factor
        if getattr(dataloader, "pin_memory_device", ""):
            kwargs["pin_memory_device"] = dataloader.pin_memory_device
        if "batch_size" in overrides:
            kwargs["max_batch_size"] = overrides.pop("batch_size")
        kwargs.update(overrides)
        return cls(dataloader.dataset, **kwargs)

    # -- the DataLoader-like surface -------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FROZEN and self.__dict__.get("_initialized"):
            raise ValueError(f"{name} attribute should not be set after {type(self).__name__} is initialized")
        super().__setattr__(name, value)

    def __len__(self) -> int:
        """Batches in a whole epoch at the current budget (exact while the budget does not drop).

        Between epochs it follows the dataset's length now, as DataLoader's does: a dataset that grew
        or shrank gets its sampler re-derived here, as the next epoch would, and that epoch plans over
        every sample. The epoch under way keeps its length until it ends, and so does a resumed epoch
        (counted whole, like DataLoader): they deliver the samples they started with. Where the plan
        cannot follow (``costs=`` or ``group_ids=`` given as numbers for the old length), this raises
        the ValueError the next epoch would. Cheap: ``len(dataset)`` and a cached count."""
        if len(self._dataset) != len(self.sampler.costs):
            active = self._active() if self._active is not None else None
            if active is None or not active.started or active.done:
                self._follow_dataset_length()
        return self.sampler.epoch_length()

    dataset = property(lambda self: self._dataset, doc="The dataset (read-only, as in DataLoader).")
    batch_size = property(lambda self: self.sampler.max_batch_size,
                          doc="The cap on samples per batch (``max_batch_size``); batches may be smaller.")
    drop_last = property(lambda self: self.sampler.drop_last)
    num_workers = property(lambda self: self._asked["num_workers"], doc="The workers asked for.")
    prefetch_factor = property(lambda self: self._asked["prefetch_factor"])
    timeout = property(lambda self: self._asked["timeout"])

    @property
    def worker_init_fn(self) -> Optional[Callable[[int], None]]:
        """Called in each worker with its id; may be set (Lightning does), used from the next workers on."""
        return self._asked["worker_init_fn"]

    @worker_init_fn.setter
    def worker_init_fn(self, fn: Optional[Callable[[int], None]]) -> None:
        fn = check_dataloader_options(worker_init_fn=fn)["worker_init_fn"]
        self._asked["worker_init_fn"] = fn
        self._pipeline.set_worker_init(fn)
    in_order = property(lambda self: self._asked["in_order"])
    pin_memory = property(lambda self: bool(self._dataloader_kwargs.get("pin_memory", False)))
    pin_memory_device = property(lambda self: self._dataloader_kwargs.get("pin_memory_device", ""))
    persistent_workers = property(lambda self: bool(self._dataloader_kwargs.get("persistent_workers", False)))
    multiprocessing_context = property(lambda self: self._dataloader_kwargs.get("multiprocessing_context"))
    generator = property(lambda self: self._dataloader_kwargs.get("generator"))

    @property
    def batch_sampler(self) -> BudgetBatchSampler:
        """The batch sampler (also as ``sampler``); pass it as ``batch_sampler=``, never ``sampler=``."""
        return self.sampler

    @property
    def max_cost(self) -> float:
        """The budget in force now (``<=`` your ``max_cost``)."""
        return self.sampler.max_cost

    @property
    def fallbacks(self) -> Dict[str, int]:
        """How often each fallback fired so far, by kind."""
        return dict(self._actuator.fallbacks)

    @property
    def last_batch(self) -> Optional[LastBatch]:
        """The batch most recently yielded: its indices, cost, step and epoch (``None`` before one)."""
        return self._ledger.last_batch

    def set_epoch(self, epoch: int) -> None:
        """Choose the next epoch's shuffle. Without it, each new iteration takes the next epoch."""
        self.sampler.set_epoch(epoch)
        self._epoch_chosen = True

    def state_dict(self) -> Dict[str, Any]:
        """The epoch's progress counting delivered batches only, plus the budget."""
        feed = self._ledger.feed
        if self.sampler.num_replicas > 1:  # ranks keep one plan: replay it to the batch delivered
            return {"replay": {"epoch": self.sampler.epoch, "delivered": feed.delivered,
                               "budget": self.sampler.epoch_budget, "schedule": self.sampler.budget_schedule()},
                    "max_cost": self.sampler.max_cost}
        state = self.sampler.state_dict()
        consumed = _unpack_bits(state["consumed"], len(self.sampler.costs))
        for batch in list(feed.outstanding) + self._pending_give_back:
            consumed[batch] = False  # dispatched but never delivered, or given back
        state["consumed"] = _pack_bits(consumed)
        state["chunk"] = None
        return {"sampler": state, "max_cost": self.sampler.max_cost}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume: the next iteration delivers exactly what the saved one had not."""
        if "stream" in state:
            raise ValueError("this state was saved by an AdaptiveLoader over a stream (IterableDataset), not over "
                             "a map-style dataset")
        self._resuming = True
        if "replay" in state:
            replay = state["replay"]
            self.sampler.set_epoch(replay["epoch"])
            self.sampler.schedule_budget(0, *replay["budget"])
            self.sampler.replay_schedule(replay["schedule"])
            self._skip_on_resume = replay["delivered"]
            return
        self.sampler.load_state_dict(state["sampler"])
        budget = min(float(state["max_cost"]), self.user_max_cost)
        self._actuator.set_budget(budget)
        self.controller.max_cost = self.controller.memory_max_cost = budget

    def __iter__(self) -> Iterator[Any]:
        previous = self._active() if self._active is not None else None
        if previous is not None:
            self._end_superseded(previous)
        if self._closed:  # iterated again after close(): as a DataLoader would, with everything made anew
            self._telemetry.reopen()
            self._closed = False
        # the epoch starts at its first next(), as a generator's would: Lightning sets the sampler's epoch after iter()
        iterator = EpochIterator(self._parts, self)
        self._active = weakref.ref(iterator)
        return iterator

    def guard(self, **options: Any) -> Any:
        """A context for one training step: an out-of-memory error on the device gives the
        batch's samples back to the epoch and lowers the device budget (see docs/device.md)."""
        from .guard import StepGuard

        return StepGuard(self, **options)

    def close(self) -> None:
        """End the epoch under way, stop the workers (persistent ones too), release the arenas and
        the spill directory, restore the sharing strategy, and close the telemetry sinks it opened.
        Iterating again afterwards works: what it needs is made anew."""
        previous = self._active() if self._active is not None else None
        if previous is not None:
            previous.close()
        self._pipeline.close()
        self._telemetry.close()
        self._memory_watch.stop()
        self._closed = True

    def _end_superseded(self, previous: EpochIterator) -> None:
        """A new ``iter()`` ends the epoch under way (one epoch at a time: its budget, ledger and
        workers are shared); say so once if that epoch had started and not ended."""
        if previous.started and not previous.done and not self._warned_superseded:
            self._warned_superseded = True
            warnings.warn(
                f"iter(loader) was called while an earlier iterator of this AdaptiveLoader was in the middle of "
                f"epoch {previous.epoch}: that iterator has ended and yields nothing more (unlike DataLoader, an "
                f"AdaptiveLoader runs one epoch at a time). Finish or drop the first iterator before starting "
                f"another, or use a second AdaptiveLoader. (Said once per loader.)", RuntimeWarning, stacklevel=3)
        previous.close()  # like a new DataLoader iterator: the old one's workers go

    def __enter__(self) -> "AdaptiveLoader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- hooks for the step guard (and other limits) --------------------------------------
    def _give_back(self, indices: List[int], at_batch: Optional[int] = None) -> None:
        """The batch most recently yielded is undelivered: its indices come again this epoch.

        With several ranks, ``indices`` are every rank's batch of the failed step (the same on
        every rank) and ``at_batch`` a global batch none has planned yet: every rank requeues them
        there, so the plans stay the same, and the failed batch stays counted in the plan."""
        self._ledger.last_batch = None
        if at_batch is None:
            self._ledger.feed.delivered -= 1
            self._pending_give_back.append(list(indices))
        else:
            self.sampler.schedule_requeue(at_batch, list(indices))
        self._rebuild_pending = True

    def _cap_budget(self, source: str, max_cost: Optional[float], at_batch: Optional[int] = None) -> None:
        """A cap on the cost budget from another limit; the smallest in force wins.

        With several ranks the cap reaches the plan through the ranks' next agreement; with
        ``at_batch`` (a global batch none has planned yet, and a cap every rank was given) it
        applies from that batch at once, on every rank alike."""
        if max_cost is None:
            self._caps.pop(source, None)
        else:
            self._caps[source] = float(max_cost)
        controller = self.controller
        controller.external_cap = min(self._caps.values(), default=math.inf)
        controller.max_cost = controller.capped(controller.memory_max_cost)
        sampler = self.sampler
        if sampler.num_replicas == 1:
            if controller.max_cost != sampler.max_cost:
                self._actuator.set_budget(controller.max_cost)
        elif at_batch is not None and max_cost is not None and max_cost < sampler.max_cost_at(at_batch):
            sampler.schedule_budget(at_batch, max(float(max_cost), controller.min_cost), sampler.max_batch_size)

    def _oom_evidence(self) -> Optional[str]:
        """A sentence when the memory cgroup's OOM kill count rose since it was last read, else None."""
        seen, self._oom_kills = self._oom_kills, read_oom_kills()
        if seen is None or self._oom_kills is None or self._oom_kills <= seen:
            return None
        return f"the memory cgroup's OOM killer count rose from {seen} to {self._oom_kills}"

    def _step_down_after_oom(self) -> Tuple[str, str]:
        """A worker was OOM-killed: the controller gives up the next thing; the loader applies it."""
        given_up, sentence, cap = self.controller.step_down_after_oom()
        if cap is not None:
            self._cap_budget("oom_kill", cap)
        # the least memory left lately was the killed worker's doing: held for seconds more, it would cut the
        # budget to its floor behind the step-down, with the room back; fresh readings take over from here
        self._memory_watch.forget()
        if given_up != "budget":  # a budget change is an event of its own kind, not a fallback
            self._actuator.count(Fallback(given_up))
        return given_up, sentence

    def _take_give_backs(self, iterator: Any) -> Any:
        """Before the next batch: batches given back go to the epoch again, with what was in
        flight (the sampler re-plans them under the budget now in force; across ranks the
        batches in flight come again as they were, and the requeue waits for its batch)."""
        if not self._rebuild_pending:
            return iterator
        self._pipeline.drop(iterator)
        feed = self._ledger.feed
        feed.give_back(self._pending_give_back + list(feed.outstanding))
        feed.outstanding.clear()
        feed.source = self.sampler.iter_remaining()  # the old stream may have ended already
        feed.exhausted = False
        self._pending_give_back = []
        self._rebuild_pending = False
        return None

    # -- what the epoch runner uses ----------------------------------------------
    def _start_epoch(self) -> int:
        untouched = self.sampler.epoch == self._epoch_iterated  # nobody set an epoch since the last one
        if self._epochs_started and untouched and not self._epoch_chosen and not self._resuming:
            self.sampler.set_epoch(self.sampler.epoch + 1)  # reshuffle like DataLoader(shuffle=True)
        self._follow_dataset_length()
        self._epochs_started += 1
        self._epoch_chosen = self._resuming = False
        self._epoch_iterated = self.sampler.epoch
        changed = self.controller.restore_pipeline(self.num_workers, self.prefetch_factor or 1)
        probe = self._probe_due()
        probe_batches = 0
        if probe:  # nothing measured: the probe's batches first, and none planned before they are measured
            probe_batches = self.controller.start_probe(in_process=self._memory.source != "host")
            changed = bool(probe_batches) or changed
        if changed:
            self._pipeline.drop()  # each epoch starts with the workers and prefetch asked for
        self._pending_give_back, self._rebuild_pending = [], False
        self._ledger.feed.start(iter(self.sampler), skip=self._skip_on_resume)
        self._ledger.feed.hold_after = (probe_batches or 1) if probe else None
        self._skip_on_resume = 0
        return self.sampler.epoch

    def _probe_due(self) -> bool:
        """Under a memory limit (a budget, or a cgroup's) with workers and nothing measured yet:
        a probe first (see Controller.start_probe)."""
        return bool(self._memory_limited() and self.num_workers and self.controller.model.coefficients() is None)

    def _memory_limited(self) -> bool:
        """Whether memory is bounded: a ``memory_budget``, or a memory cgroup's limit."""
        return self.memory_budget is not None or self._memory.source != "host"

    def _start_iterator(self) -> Any:
        controller = self.controller
        self._oom_kills = read_oom_kills()  # a kill counted from here on is evidence against these workers
        workers = controller.num_workers if self.num_workers else 0
        self._worker_heaps.clear()  # the workers that told theirs are going
        watched = self._memory.source != "host"  # a memory cgroup's limit: what the job holds between batches counts
        self._pipeline.heap_copies = watched
        if workers and watched:
            release_free_heap()
            self._memory_watch.stop()  # no thread of ours while workers fork (Python 3.12 warns of it)
        room = self._memory_room(self._pipeline.arena_bytes())
        iterator = self._pipeline.start_iterator(workers, controller.prefetch_factor if workers else None,
                                                 self._arena_plan, self._expected_batch_bytes(),
                                                 UNBOUNDED if room is None else int(room))
        if watched:
            self._memory_watch.start()
        return iterator

    def _expected_batch_bytes(self) -> int:
        """What the next workers' batches should take: the largest measured lately (not the model's
        worst case), but no more than the model's bound under the budget now, which a step down
        lowered (arenas sized for the earlier batches would hold memory the budget gave up)."""
        recent = max(self._ledger.recent_batches, default=0)
        bound = self.controller.batch_bytes_bound()
        return int(min(recent, bound)) if bound > 0 else recent

    def _memory_room(self, held: int) -> Optional[float]:
        """Bytes the memfd arenas may reserve together, given ``held`` bytes of arenas we hold now."""
        memory = read_memory()
        budget = None if self.memory_budget is None else resolve_memory_budget(self.memory_budget, memory.limit)
        controller = self.controller
        return controller.memory_room(memory.available, budget, self._local_world_size, held,
                                      controller.num_workers if self.num_workers else 0, self._expected_batch_bytes())

    def _arena_plan(self) -> Any:
        pipeline = self._pipeline
        expected = self._expected_batch_bytes()
        if not expected:  # nothing measured: a ring of one page per worker, made here so that no batch
            # has to carry its fd here, grown in place by the worker's first batches
            current = pipeline.current_arenas()
            missing = [w for w in range(self.controller.num_workers) if w not in current]
            return (first_ring_bytes(), missing) if missing else None
        current = pipeline.current_arenas()
        held = pipeline.arena_bytes()
        if pipeline.arena_kind == "memfd":
            room = self._memory_room(held)
            if room is None:
                return None
        else:
            shm = self._shm.read()
            room = shm.free + held - (1 - self.safety) * shm.total
        return rules.arena_plan(expected, self.controller.prefetch_factor, room, self.controller.num_workers,
                                current, pipeline.arena_idle)

    # -- where map-style loaders and streams differ (streams: stream_loader.StreamLoader) ----------
    _workers_fixed = False  # whether fewer workers (down to none) is a rung: not for a stream

    def _next_envelope(self, iterator: Any) -> Any:
        """The next batch in transit from the DataLoader iterator (StopIteration at the epoch's end)."""
        self._before_batch_here()
        return next_watched(iterator)

    def _before_batch_here(self) -> None:
        """Before a batch made in the main process under a cgroup's limit: the pages the last batches freed
        go back (the group reads what glibc keeps as used), and its heap counts from here: what making
        the batch takes, not what the training step took since."""
        if self._pipeline.num_workers == 0 and self._memory.source != "host":
            release_free_heap()
            mark_heap_base(copies=False)

    def _take_batch(self, stats: Any) -> List[int]:
        """The batch being handed to the user: its indices, dropped from what is outstanding."""
        return self._ledger.feed.outstanding.popleft()

    def _requeue_outstanding(self) -> None:
        """The iterator is gone: batches dispatched and not delivered come again."""
        self._ledger.feed.requeue_outstanding()

    def _epoch_delivered(self) -> bool:
        """Whether the epoch's last batch was delivered (the iterator has nothing more to give)."""
        return self._ledger.feed.done

    def _unit_costs(self, indices: List[int], stats: Any) -> np.ndarray:
        return self.sampler.unit_costs[indices]

    def _after_batch(self, indices: List[int], stats: Any, batch: Any, wait_s: float, epoch: int) -> bool:
        """Record, decide if due, act, show (see :func:`epoch.after_batch`); True: rebuild."""
        return after_batch(self, self._parts, indices, stats, batch, wait_s, epoch)

    def _batch_cost(self, indices: List[int], costs: np.ndarray) -> float:
        batch_cost = getattr(self.sampler, "batch_cost", None)
        return float(batch_cost(indices)) if batch_cost is not None else float(costs.sum())

    def _observe(self, stats: Any) -> Observation:
        """Measure what the controller needs after this batch."""
        ledger = self._ledger
        shm = self._shm.read()
        if self._fds is None or rules.fds_due(ledger.step, stats.handles, self._fds.soft_limit):
            self._fds = read_fds()
        fds = self._fds
        arena_bytes = self._pipeline.arena_bytes()
        ours = ledger.held.bytes_alive() + ledger.in_flight_bytes(self.controller.model.expected_bytes,
                                                                  self.sampler.unit_costs) + arena_bytes
        if stats.worker_pid != os.getpid():
            self._worker_heaps[stats.worker_pid] = stats.heap
        # Loading in the main process, after the probe: the training step and the next batch take their turns,
        # so the least memory left lately (the step's peak, which workers overlap) is not what the batch meets;
        # what is left now, the step done, is.
        in_process = self._pipeline.num_workers == 0 and not self.controller.probing
        now = time.monotonic()
        if rules.memory_due(now - self._memory_read_at) or in_process:
            self._memory, self._memory_read_at = read_memory(), now
            self._memory_watch.add(now, self._memory.available)
        memory = self._memory
        available = memory.available if in_process else self._memory_watch.low(memory.available)
        budget = None if self.memory_budget is None else resolve_memory_budget(self.memory_budget, memory.limit)
        road = stats.transport
        shm_road = road == Road.ARENA or (road == Road.SHM and getattr(stats, "block_kind", "shm") == "shm")
        return Observation(
            shm_free=shm.free, ours_in_shm=ours if shm_road else 0, held_batches=ledger.held.alive(),
            fds_in_use=fds.in_use, fd_soft_limit=fds.soft_limit, fd_hard_limit=fds.hard_limit,
            fds_per_batch=stats.handles, local_world_size=self._local_world_size,
            arenas=road in ARENA_ROADS or arena_bytes > 0 or (road == Road.INLINE and self._pipeline.arena_owner
                                                              is not None),  # the probe's: workers will use them
            arena_capacity=ledger.smallest_tight_arena(),
            shm_total=shm.total, memory_available=available, memory_budget=budget,
            ours_in_memory=ours + ledger.held_inline.bytes_alive(), shm_road=shm_road,
            worker_heaps=sum(self._worker_heaps.values()))

    def _record_batch(self, epoch: int, indices: List[int], costs: np.ndarray, stats: Any, obs: Observation,
                      wait_s: float, rate: Optional[float]) -> None:
        step = self._ledger.step
        if self._ram is None or step % 10 == 0:  # for telemetry only
            self._ram = host_ram_available()
        worker_rss = None if stats.worker_pid == os.getpid() or step % 10 else rss_of([stats.worker_pid])[
            stats.worker_pid]
        self._telemetry.batch(
            step=step, epoch=epoch, samples=len(indices), cost=float(costs.sum()), bytes=stats.batch_bytes,
            storages=stats.batch_storages, max_cost=finite_or_none(self.sampler.max_cost), shm_free=obs.shm_free,
            shm_total=obs.shm_total, shm_ours=obs.ours_in_shm, fds_in_use=obs.fds_in_use,
            fd_limit=obs.fd_soft_limit, ram_available=self._ram, worker_rss=worker_rss,
            transport=str(stats.transport), worker=stats.worker_id, wait_s=wait_s, samples_per_s=rate,
            memory_limit=self._memory.limit, memory_used=self._memory.used, memory_ours=obs.ours_in_memory,
            **({"budget_version": stats.stream.version} if stats.stream is not None else {}))

    def _fd_pressure(self) -> Optional[str]:
        """Evidence for the failure classifier: do the fds batches carry put the limit in reach?"""
        fds = read_fds()
        handles = max(self._ledger.recent_handles, default=0)
        in_flight = self.controller.num_workers * self.controller.prefetch_factor
        return rules.fd_pressure(int(handles), in_flight, fds.in_use, fds.soft_limit)

    def _resource_summary(self) -> str:
        shm, fds = self._shm.read(), read_fds()
        return (f"shm {self._shm.path}: {shm.free / 2**20:.1f} MiB free of {shm.total / 2**20:.1f} MiB; "
                f"fds {fds.in_use} open, limit {fds.soft_limit} (hard {fds.hard_limit}); "
                f"sharing strategy {self._pipeline.sharing_strategy}; max_cost {self.sampler.max_cost:g}.")

    # -- construction helpers ------------------------------------------------------------
    def _make_sampler(self, n: int) -> BudgetBatchSampler:
        cost_array = _cost_array(self._costs_given, n, self.__dict__.get("_dataset"))
        return BudgetBatchSampler(cost_array, num_samples=n, **self._sampler_args)

    def _largest_batch(self) -> Optional[int]:
        """The most samples one batch can hold: the size cap, or one rank's share of the dataset where
        that is less (a cap above it asks for nothing more, and must not cut workers); None: no cap."""
        cap, samples = self.sampler.max_batch_size, len(self.sampler.costs)
        if not samples:
            return cap
        share = -(-samples // self.sampler.num_replicas)
        return share if cap is None else min(cap, share)

    def _whole_batch(self) -> Tuple[Optional[int], float]:
        """The largest batch asked for, and a bound on its cost (inf: no size cap bounds it)."""
        size, costs = self._largest_batch(), self.sampler.unit_costs
        return size, size * float(costs.max()) if size is not None and len(costs) else math.inf

    def _make_controller(self) -> Controller:
        costs = self.sampler.unit_costs
        positive = costs[costs > 0]
        min_cost = float(positive.min()) if len(positive) else 0.0
        floor = min_cost + (self.min_batch_size - 1) * (float(costs.mean()) if len(costs) else 0.0)
        return Controller(
            user_max_cost=self.user_max_cost, max_batch_size=self._largest_batch(),
            min_cost=min_cost, num_workers=self.num_workers, prefetch_factor=self.prefetch_factor or 1,
            safety=self.safety, max_sample_cost=float(costs.max()) if len(costs) else 0.0, floor_cost=floor)

    def _follow_dataset_length(self) -> None:
        """Between epochs, a dataset whose length changed since the sampler was made gets a sampler
        over its samples now (costs re-derived; the epoch, the seed and the budget kept; the workers,
        which hold a copy of the old dataset, stopped), or a ValueError that says why it cannot. A
        resumed epoch first ends over the samples it was saved with: the epoch after it follows."""
        n, planned = len(self._dataset), len(self.sampler.costs)
        if n == planned or self._resuming:
            return
        if self._costs_given is not None and not callable(self._costs_given):
            raise ValueError(
                f"the dataset now has {n} samples but costs= was given for {planned}: pass costs as a callable "
                f"(costs(index) -> number) to follow a dataset whose length changes, or build a new AdaptiveLoader")
        if self._sampler_args.get("group_ids") is not None:
            raise ValueError(f"the dataset now has {n} samples but group_ids= was given for {planned}: build a new "
                             f"AdaptiveLoader with one group id per sample")
        epoch = self.sampler.epoch
        sampler = self._make_sampler(n)
        sampler.set_epoch(epoch)
        sampler.max_cost = min(sampler.max_cost, self.sampler.max_cost)
        object.__setattr__(self, "sampler", sampler)
        self._ledger.feed.sampler = self._actuator.sampler = sampler
        self._actuator.whole_batch = self._whole_batch()
        self.controller = self._make_controller()
        self._pipeline.drop()


# -- conversions: costs for the sampler, a DataLoader's sampling for wrap() ------------------
def _cost_array(costs: Any, n: int, dataset: Any) -> Any:
    return as_cost_array(costs, expected_len=n, dataset=dataset)


def _wrapped_sampling(dataloader: DataLoader) -> Dict[str, Any]:
    """How ``dataloader`` batches, as AdaptiveLoader arguments; ValueError for what cannot be reproduced."""
    if isinstance(dataloader.dataset, IterableDataset):  # a stream: its batch size (None: it batches itself)
        if dataloader.batch_size is None:
            return {"batch_size": None}
        return {"max_batch_size": dataloader.batch_size, "drop_last": dataloader.drop_last}
    batch_sampler = dataloader.batch_sampler
    if batch_sampler is None:
        raise ValueError("wrap() needs a DataLoader that batches: this one has batch_size=None (one sample at "
                         "a time, no collation into batches). Use AdaptiveLoader(dataset, max_batch_size=1, "
                         "collate_fn=lambda b: b[0]) for that, or give the DataLoader a batch_size")
    extra: Dict[str, Any] = {}
    if type(batch_sampler) is BatchSampler:  # made by DataLoader from batch_size=, or passed as batch_sampler=
        sampler = batch_sampler.sampler
        extra["drop_last"] = batch_sampler.drop_last
    elif hasattr(batch_sampler, "group_ids") and hasattr(batch_sampler, "sampler"):
        sampler = batch_sampler.sampler  # torchvision's GroupedBatchSampler
        extra["group_ids"] = np.asarray(batch_sampler.group_ids)
    else:
        raise ValueError(
            f"wrap() cannot reproduce the batch sampler {type(batch_sampler).__name__}: AdaptiveLoader plans "
            f"its own batches. Build AdaptiveLoader(dataset, costs=..., max_cost=..., max_batch_size=..., "
            f"shuffle=...) yourself (group_ids= for batches that must not mix groups)")
    refuse_batch_sampler_as_sampler(sampler)
    if type(sampler) not in (SequentialSampler, RandomSampler):
        raise ValueError(
            f"wrap() keeps a SequentialSampler or RandomSampler; this DataLoader uses {type(sampler).__name__}, "
            f"which AdaptiveLoader cannot reproduce. Build AdaptiveLoader(dataset, ...) yourself (a Subset for "
            f"a subset; num_replicas/rank for ranks)")
    if isinstance(sampler, RandomSampler) and (sampler.replacement or sampler.num_samples != len(sampler.data_source)):
        raise ValueError("wrap() cannot reproduce RandomSampler(replacement=True) or num_samples=: AdaptiveLoader "
                         "delivers every sample exactly once per epoch. Use a Subset for fewer samples per epoch")
    batch_size = getattr(batch_sampler, "batch_size", None)
    if batch_size is None:
        raise ValueError(f"wrap(): the batch sampler {type(batch_sampler).__name__} has no batch_size; pass "
                         f"batch_size= to wrap()")
    shuffle = isinstance(sampler, RandomSampler)
    if shuffle:
        extra["seed"] = shuffle_seed(None, getattr(sampler, "generator", None) or dataloader.generator)
    return dict(max_batch_size=batch_size, shuffle=shuffle, **extra)
