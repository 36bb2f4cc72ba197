"""AdaptiveLoader: a DataLoader whose batch budget follows the shm it has.

It wires the other modules together: the sampler plans batches under the
current budget, the workers measure and ship them (``transport``), the
probes read shm, fds and RAM (``measure``), the controller turns that into
the next budget and fallbacks, and ``telemetry`` records it all. It owns
recovery: a dead worker or a lost batch rebuilds the iterator over the
batches not yet delivered.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import tempfile
import time
import uuid
import weakref
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional

import torch
import torch.multiprocessing
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler

from . import _torch
from .arena import Arena
from .arena import registry as arena_registry
from .controller import Controller, Observation, arena_capacity
from .costs import as_cost_array
from .measure import ShmProbe, _leaves, host_ram_available, read_fds, rss_of
from .sampler import DEFAULT_WINDOW, BudgetBatchSampler, _pack_bits, _unpack_bits
from .telemetry import SinkSpec, Telemetry
from .transport import ARENA, FILE, SHM, MeasuredCollate, WorkerSetup

__all__ = ["AdaptiveLoader", "LoaderStalled", "LoaderFailed"]

logger = logging.getLogger("adaptive_loader")

_OWN_KEYWORDS = ("sampler", "batch_sampler")
_POLL_SECONDS = 1.0  # how often a waiting loader checks its workers


class LoaderStalled(RuntimeError):
    """No batch arrived for ``stall_timeout`` seconds although workers were alive."""


class LoaderFailed(RuntimeError):
    """Recovery was tried ``max_restarts`` times without a batch getting through."""


class AdaptiveLoader:
    """Iterate a map-style dataset in batches that fit the shared memory at hand.

    Like ``DataLoader(dataset, batch_sampler=BudgetBatchSampler(...))``, plus:
    workers measure each batch, a controller lowers or raises ``max_cost`` so
    the batches in flight fit in ``/dev/shm``, and before anything can fail it
    falls back (fewer batches in flight, a batch off shm, more fds or the
    ``file_system`` strategy). Every sample is delivered exactly once per epoch;
    a dead worker is replaced; a stall becomes :class:`LoaderStalled`.

    Args:
        dataset: a map-style dataset (``__getitem__`` and ``__len__``).
        costs: per-sample cost (e.g. objects per image); ``None``: 1 each.
        max_cost: your cap on a batch's summed cost; the adaptive budget never
            exceeds it. ``None``: only shm decides.
        max_batch_size: cap on samples per batch (``batch_size`` is accepted too).
        num_workers, collate_fn: as for DataLoader.
        shuffle, seed: shuffle with ``seed`` and the epoch (:meth:`set_epoch`).
        telemetry: where records go besides ``logging``: a JSONL path, a callable
            taking a record dict, ``"dashboard"``, ``"tensorboard:DIR"``, or a list.
        shm_path: where the POSIX shm filesystem is mounted.
        safety: fraction of the usable shm that batches in flight may fill.
        stall_timeout: seconds without a batch before :class:`LoaderStalled`
            (DataLoader's ``timeout``, if given, is used instead).
        max_restarts: recoveries in a row without progress before :class:`LoaderFailed`.
        drop_last, window: passed to :class:`BudgetBatchSampler`.
        spill_dir: a directory on real disk (not tmpfs) where a batch that cannot
            go through shm is written for the main process to read (default: the
            system temp directory).
        arena: each worker reserves one region of shm and reuses it for its
            batches (see docs/performance.md); ``False``: a new shm block per
            batch, as before. Either way a batch that does not fit goes off shm.
        num_replicas, rank: distributed training (default: from an initialized
            ``torch.distributed``). Every rank gets the same number of batches;
            the ranks agree on the budget every ``sync_every`` batches over a gloo
            group (see docs/distributed.md).
        **dataloader_kwargs: anything else DataLoader takes (``pin_memory``,
            ``prefetch_factor``, ``worker_init_fn``, ``persistent_workers``,
            ``multiprocessing_context``, ``generator``, ...).
    """

    def __init__(self, dataset: Dataset, *, costs: Any = None, max_cost: Optional[float] = None,
                 max_batch_size: Optional[int] = None, num_workers: int = 0,
                 collate_fn: Optional[Callable[[List[Any]], Any]] = None, shuffle: bool = False, seed: int = 0,
                 telemetry: SinkSpec = None, shm_path: str = "/dev/shm", safety: float = 0.8,
                 stall_timeout: float = 300.0, max_restarts: int = 3, drop_last: bool = False,
                 window: int = DEFAULT_WINDOW, spill_dir: Optional[str] = None, num_replicas: Optional[int] = None,
                 rank: Optional[int] = None, sync_every: int = 8, arena: bool = True,
                 **dataloader_kwargs: Any) -> None:
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise TypeError("AdaptiveLoader needs a map-style dataset with __len__ and __getitem__")
        max_batch_size = _take_batch_size_alias(max_batch_size, dataloader_kwargs)
        _refuse_own_keywords(dataloader_kwargs)
        if dataloader_kwargs.pop("in_order", True) is not True:
            raise ValueError("in_order=False is not supported: AdaptiveLoader matches batches to indices in order")
        _check_dataloader_keywords(dataloader_kwargs)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        _check_fraction("safety", safety)
        _check_positive("stall_timeout", stall_timeout)
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
            raise ValueError(f"max_restarts must be an int >= 0, got {max_restarts!r}")
        n = len(dataset)
        cost_array = as_cost_array(costs, expected_len=n)
        if max_cost is None and max_batch_size is None:
            max_batch_size = 1  # DataLoader's default batch_size
        self.dataset = dataset
        self.sampler = BudgetBatchSampler(cost_array, max_cost=max_cost, max_batch_size=max_batch_size,
                                          shuffle=shuffle, seed=seed, drop_last=drop_last, window=window,
                                          num_samples=n, num_replicas=num_replicas, rank=rank)
        if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
            raise ValueError(f"sync_every must be an int >= 1, got {sync_every!r}")
        if not isinstance(arena, bool):
            raise TypeError(f"arena must be True or False, got {arena!r}")
        # names this loader's arenas in the process-wide registry; they are unmapped when it goes
        self._arena_owner = uuid.uuid4().hex if arena else None
        if arena:
            weakref.finalize(self, arena_registry.forget, self._arena_owner)
        self.sync_every = sync_every
        self.user_max_cost = self.sampler.max_cost
        self._shm = ShmProbe(shm_path)
        self.spill_dir = _check_spill_dir(spill_dir if spill_dir is not None else tempfile.gettempdir())
        self.num_workers = num_workers
        self.prefetch_factor = dataloader_kwargs.pop("prefetch_factor", None)
        if num_workers > 0 and self.prefetch_factor is None:
            self.prefetch_factor = 2
        self._pipeline_asked = (num_workers, self.prefetch_factor)
        user_timeout = dataloader_kwargs.pop("timeout", 0)
        self.stall_timeout = float(user_timeout) if user_timeout else float(stall_timeout)
        self.max_restarts = max_restarts
        self.safety = safety
        self.collate_fn = collate_fn
        self._user_worker_init = dataloader_kwargs.pop("worker_init_fn", None)
        self._dataloader_kwargs = dataloader_kwargs
        self._telemetry = Telemetry(telemetry, total_samples=n, safety=safety)
        self._group = _budget_group(self.sampler.num_replicas)  # a collective: once every argument is valid
        if self._group is not None:
            weakref.finalize(self, _destroy_budget_group, self._group)
        positive = self.sampler.costs[self.sampler.costs > 0]
        self.controller = Controller(
            user_max_cost=self.user_max_cost, max_batch_size=self.sampler.max_batch_size,
            min_cost=float(positive.min()) if len(positive) else 0.0, num_workers=num_workers,
            prefetch_factor=self.prefetch_factor or 1, safety=safety,
            max_sample_cost=float(self.sampler.costs.max()) if n else 0.0)
        self.sharing_strategy = torch.multiprocessing.get_sharing_strategy()
        self._local_world_size = _local_world_size()
        self._fd_soft_limit: Optional[int] = None
        self._dataloader: Optional[DataLoader] = None
        self._collate: Optional[MeasuredCollate] = None
        self._allocated: Optional[torch.Tensor] = None  # per-worker shm bytes, written by the workers
        self._delivered: List[int] = []
        self._feed = _Feed(self.sampler)
        self._held = _HeldBatches()
        self._step = 0
        self._epochs_started = 0
        self._epoch_iterated = 0
        self._epoch_chosen = self._resuming = False  # set_epoch() called / a state loaded since the last epoch
        self._skip_on_resume = 0
        self._fallbacks: Dict[str, int] = {}
        self._fds = None  # last fd reading
        self._ram: Optional[int] = None
        self._last_delivery: Optional[float] = None
        self._largest_batch = 0  # bytes
        self._recent_batches: Deque[int] = deque(maxlen=64)  # bytes of the last batches delivered
        self._tight_arenas: Dict[int, int] = {}  # worker id -> its arena's capacity if too small, else 0
        self._last_target = 0.0  # the controller's last per-batch bytes
        self._rate: Optional[float] = None

    # -- construction from an existing DataLoader ------------------------------
    @classmethod
    def wrap(cls, dataloader: DataLoader, *, costs: Any = None, max_cost: Optional[float] = None,
             **overrides: Any) -> "AdaptiveLoader":
        """An AdaptiveLoader with ``dataloader``'s dataset, collate_fn, workers and keywords.

        Its ``batch_size`` becomes ``max_batch_size`` and a ``RandomSampler`` means ``shuffle=True``.
        """
        if not isinstance(dataloader, DataLoader):
            raise TypeError(f"wrap() takes a torch DataLoader, got {type(dataloader).__name__}")
        _refuse_batch_sampler_as_sampler(dataloader.sampler)
        if type(dataloader.sampler) not in (SequentialSampler, RandomSampler):
            raise ValueError(
                f"wrap() keeps a SequentialSampler or RandomSampler; this DataLoader uses "
                f"{type(dataloader.sampler).__name__}, which AdaptiveLoader cannot reproduce. Build "
                f"AdaptiveLoader(dataset, ...) yourself (a Subset for a subset; num_replicas/rank for ranks)")
        batch_size = dataloader.batch_size
        if batch_size is None:
            batch_size = getattr(dataloader.batch_sampler, "batch_size", None)
        if "batch_size" in overrides:
            batch_size = overrides.pop("batch_size")
        generator = dataloader.generator
        kwargs: Dict[str, Any] = dict(
            costs=costs, max_cost=max_cost, max_batch_size=batch_size, num_workers=dataloader.num_workers,
            seed=generator.initial_seed() if generator is not None else 0,
            collate_fn=dataloader.collate_fn, shuffle=isinstance(dataloader.sampler, RandomSampler),
            drop_last=dataloader.drop_last, pin_memory=dataloader.pin_memory, timeout=dataloader.timeout,
            worker_init_fn=dataloader.worker_init_fn, generator=dataloader.generator,
            persistent_workers=dataloader.persistent_workers,
            multiprocessing_context=dataloader.multiprocessing_context,
        )
        if dataloader.num_workers > 0:
            kwargs["prefetch_factor"] = dataloader.prefetch_factor
        if getattr(dataloader, "pin_memory_device", ""):
            kwargs["pin_memory_device"] = dataloader.pin_memory_device
        kwargs.update(overrides)
        return cls(dataloader.dataset, **kwargs)

    # -- the DataLoader-like surface -------------------------------------------
    def __len__(self) -> int:
        """Batches in a whole epoch at the current budget (the budget may still move),
        also while a resumed epoch is under way (like DataLoader)."""
        return self.sampler.epoch_length()

    def set_epoch(self, epoch: int) -> None:
        """Choose the next epoch's shuffle. Without it, each new iteration takes the next epoch."""
        self.sampler.set_epoch(epoch)
        self._epoch_chosen = True

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
        return dict(self._fallbacks)

    def state_dict(self) -> Dict[str, Any]:
        """The epoch's progress counting delivered batches only, plus the budget."""
        if self.sampler.num_replicas > 1:  # ranks keep one plan: replay it to the batch delivered
            return {"replay": {"epoch": self.sampler.epoch, "delivered": self._feed.delivered,
                               "budget": self.sampler.epoch_budget, "schedule": self.sampler.budget_schedule()},
                    "max_cost": self.sampler.max_cost}
        state = self.sampler.state_dict()
        consumed = _unpack_bits(state["consumed"], len(self.dataset))
        for batch in self._feed.outstanding:
            consumed[batch] = False  # dispatched but never delivered
        state["consumed"] = _pack_bits(consumed)
        state["chunk"] = None
        return {"sampler": state, "max_cost": self.sampler.max_cost}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume: the next iteration delivers exactly what the saved one had not."""
        self._resuming = True
        if "replay" in state:
            replay = state["replay"]
            self.sampler.set_epoch(replay["epoch"])
            self.sampler.schedule_budget(0, *replay["budget"])
            for entry in replay["schedule"]:
                self.sampler.schedule_budget(*entry)
            self._skip_on_resume = replay["delivered"]
            return
        self.sampler.load_state_dict(state["sampler"])
        budget = min(float(state["max_cost"]), self.user_max_cost)
        self._set_budget(budget)
        self.controller.max_cost = budget

    def __iter__(self) -> Iterator[Any]:
        return self._epoch()

    def close(self) -> None:
        """Stop persistent workers and close the telemetry sinks it opened (files, the dashboard)."""
        iterator = _torch.live_iterator(self._dataloader)
        if iterator is not None:
            self._stop(iterator, even_persistent=True)
        self._dataloader = None
        self._remove_spill_files()
        if self._arena_owner is not None:
            arena_registry.forget(self._arena_owner)
        self._telemetry.close()

    def __enter__(self) -> "AdaptiveLoader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- one epoch ---------------------------------------------------------------
    def _epoch(self) -> Iterator[Any]:
        untouched = self.sampler.epoch == self._epoch_iterated  # nobody set an epoch since the last one
        if self._epochs_started and untouched and not self._epoch_chosen and not self._resuming:
            self.sampler.set_epoch(self.sampler.epoch + 1)  # reshuffle like DataLoader(shuffle=True)
        self._epochs_started += 1
        self._epoch_chosen = self._resuming = False
        epoch = self._epoch_iterated = self.sampler.epoch
        self._last_delivery = self._rate = None
        self._restore_pipeline()
        self._feed.start(iter(self.sampler), skip=self._skip_on_resume)
        self._skip_on_resume = 0
        iterator = None
        restarts = 0
        last_progress = wait_start = time.monotonic()
        finished = False
        try:
            while True:
                try:
                    if iterator is None:
                        iterator = self._start_iterator()
                    envelope = _next_watched(iterator)
                    batch = envelope.open()
                except StopIteration:
                    finished = True
                    break
                except Exception as exc:  # classified: ours to recover from, or re-raised
                    kind = _classify(exc) if self.num_workers > 0 else None  # without workers: yours
                    if kind == "timeout" and iterator is None:
                        kind = "workers_not_starting"  # e.g. persistent workers that did not answer a reset
                    if kind == "worker_died" and _workers_alive(iterator):
                        kind = "fds"  # a live worker could not hand a batch's fds over: its fds ran out
                    if kind == "timeout":
                        if time.monotonic() - last_progress >= self.stall_timeout:
                            self._raise_stall(epoch, last_progress)
                        continue
                    if kind is None:
                        raise
                    restarts += 1
                    if restarts > self.max_restarts:
                        raise LoaderFailed(
                            f"{restarts - 1} recoveries in a row did not get a batch through; last error: "
                            f"{_describe(exc)}. "
                            f"{self._resource_summary()}") from exc
                    self._recover(iterator, kind, exc, epoch)
                    iterator, last_progress = None, time.monotonic()
                    continue
                restarts = 0
                indices = self._feed.outstanding.popleft()
                self._feed.delivered += 1
                if self._after_batch(indices, envelope.stats, batch, time.monotonic() - wait_start, epoch):
                    self._rebuild(iterator)
                    iterator = None
                yield batch
                last_progress = wait_start = time.monotonic()  # the training step is not a stall
        finally:
            if iterator is not None:
                # an epoch left early may leave persistent workers mid-way: never reuse them
                self._stop(iterator, even_persistent=not finished)
            if not finished:
                self._dataloader = None
                self._remove_spill_files()
            self._telemetry.event("epoch_end", f"epoch {epoch} {'done' if finished else 'left early'} after "
                                  f"{self._step} batches in all", step=self._step, epoch=epoch,
                                  completed=finished, fallbacks=self.fallbacks)

    def _after_batch(self, indices: List[int], stats, batch: Any, wait_s: float, epoch: int) -> bool:
        """Learn from the batch, record it, apply the controller's decision. True: rebuild needed."""
        self._step += 1
        costs = self.sampler.costs[indices]
        if stats.transport == SHM:
            self.controller.model.observe(costs, stats.sample_bytes)
            if stats.worker_id >= 0:
                self._delivered[stats.worker_id] += stats.batch_bytes
            if not self._pinning():  # pinned batches are copied out of shm
                self._held.track(batch, stats.batch_bytes)
        elif stats.transport == ARENA:  # its bytes are the arena's, counted whole
            self.controller.model.observe(costs, stats.sample_bytes)
            self._delivered[stats.worker_id] += stats.arena_new_bytes
            if not self._pinning():
                self._held.track(batch, 0)
        elif stats.transport == FILE:
            self.controller.model.observe(costs, stats.sample_bytes)
            self._count("off_shm")
            self._telemetry.event("off_shm", f"batch {self._step} ({len(indices)} samples) went through a "
                                  f"spill file: {stats.off_shm_reason}", step=self._step, epoch=epoch,
                                  level=logging.WARNING, bytes=stats.batch_bytes)
        self._largest_batch = max(self._largest_batch, stats.batch_bytes)
        self._recent_batches.append(stats.batch_bytes)
        if stats.worker_id >= 0:
            self._tight_arenas[stats.worker_id] = stats.arena_capacity
        rate = self._throughput(len(indices))
        decide = self.num_workers > 0 and self._decision_due(stats)
        if not (decide or self._telemetry.wants_batches):
            return False
        shm = self._shm.read()
        fds = self._read_fds_if_due(stats.handles)
        arena_bytes = self._arena_bytes()
        ours = self._held.bytes_alive() + self._in_flight_bytes() + arena_bytes
        decision = None
        if decide:
            decision = self.controller.decide(Observation(
                shm_free=shm.free, ours_in_shm=ours, held_batches=self._held.alive(),
                fds_in_use=fds.in_use, fd_soft_limit=fds.soft_limit, fd_hard_limit=fds.hard_limit,
                fds_per_batch=stats.handles, local_world_size=self._local_world_size,
                arenas=stats.transport == ARENA or arena_bytes > 0,
                arena_capacity=min((c for c in self._tight_arenas.values() if c), default=0)))
            self._last_target = decision.per_batch_bytes
        rebuild = decision is not None and self._apply(decision, epoch)
        if self._telemetry.wants_batches:  # RAM, worker RSS and the record are for telemetry alone
            self._telemetry.batch(
                step=self._step, epoch=epoch, samples=len(indices), cost=float(costs.sum()),
                bytes=stats.batch_bytes,
                storages=stats.batch_storages, max_cost=_finite_or_none(self.sampler.max_cost), shm_free=shm.free,
                shm_total=shm.total, shm_ours=ours, fds_in_use=fds.in_use, fd_limit=fds.soft_limit,
                ram_available=self._ram_available(), worker_rss=self._worker_rss(stats.worker_pid),
                transport=stats.transport, worker=stats.worker_id, wait_s=wait_s, samples_per_s=rate)
        return rebuild

    def _decision_due(self, stats) -> bool:
        """While shm is tight, decide after every batch; with ample room (the last target at
        least twice the largest batch seen, the fds far from their limit) every 8th batch is
        enough: the decision would not change, and the workers' own free-space check guards
        the batches in between."""
        ample = (self._last_target >= 2 * self._largest_batch and stats.transport in (SHM, ARENA)
                 and (self._fds is None or stats.handles * 64 < self._fds.soft_limit))
        return not ample or self._step % 8 == 0

    def _set_budget(self, max_cost: float) -> None:
        self.sampler.max_cost = max_cost
        self.sampler.warn_oversized = max_cost >= self.user_max_cost

    def _agree_on_budget(self, decision, epoch: int) -> None:
        """Ranks must plan the same batches: every ``sync_every`` batches they take the
        smallest proposed budget and apply it from a global batch none has planned yet."""
        if self._group is None or self._feed.delivered % self.sync_every:
            return
        import torch.distributed as dist

        proposal = torch.tensor([decision.max_cost, -float(self.sampler.global_position)], dtype=torch.float64)
        dist.all_reduce(proposal, op=dist.ReduceOp.MIN, group=self._group)
        agreed, at = float(proposal[0]), int(-proposal[1])
        if agreed != self.sampler.max_cost:
            self.sampler.schedule_budget(at, agreed, self.sampler.max_batch_size)
            self.sampler.warn_oversized = agreed >= self.user_max_cost
            self._event("budget", f"ranks agreed on max_cost {agreed:.4g} from global batch {at} (this rank "
                        f"proposed {decision.max_cost:.4g})", epoch, max_cost=_finite_or_none(agreed),
                        at_batch=at, per_batch_bytes=decision.per_batch_bytes)

    def _pinning(self) -> bool:
        """Whether batches really get pinned (torch turns pinning off without an accelerator)."""
        iterator = _torch.live_iterator(self._dataloader)
        if iterator is not None:
            return _torch.iterator_pins(iterator)
        return bool(self._dataloader_kwargs.get("pin_memory")) and torch.cuda.is_available()

    def _arena_bytes(self) -> int:
        return arena_registry.mapped_bytes(self._arena_owner) if self._arena_owner is not None else 0

    def _in_flight_bytes(self) -> int:
        """Shm taken by batches the workers made but the user has not got yet:
        counted by the workers themselves, else predicted from the cost model."""
        if self._allocated is not None:
            return max(0, sum(self._allocated.tolist()) - sum(self._delivered))
        if not self._feed.outstanding:
            return 0
        samples = sum(len(batch) for batch in self._feed.outstanding)
        cost = sum(float(self.sampler.costs[batch].sum()) for batch in self._feed.outstanding)
        return int(self.controller.model.expected_bytes(samples, cost))

    def _apply(self, decision, epoch: int) -> bool:
        rebuild = False
        if self.sampler.num_replicas > 1:
            self._agree_on_budget(decision, epoch)
        elif decision.max_cost != self.sampler.max_cost:
            self._set_budget(decision.max_cost)
            self._event("budget", "; ".join(r for r in decision.reasons if "max_cost" in r), epoch,
                        max_cost=_finite_or_none(decision.max_cost), per_batch_bytes=decision.per_batch_bytes)
        if decision.prefetch_factor is not None or decision.num_workers is not None:
            self.prefetch_factor = decision.prefetch_factor or self.prefetch_factor
            self.num_workers = decision.num_workers or self.num_workers
            self._count("fewer_in_flight")
            self._event("fewer_in_flight", _reason(decision, "fewer batches"), epoch, level=logging.WARNING,
                        num_workers=self.num_workers, prefetch_factor=self.prefetch_factor)
            rebuild = True
        if decision.fd_soft_limit is not None:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (decision.fd_soft_limit, hard))
            self._fd_soft_limit = decision.fd_soft_limit
            self._count("fd_limit")
            self._event("fd_limit", _reason(decision, "fd soft limit"), epoch, level=logging.WARNING,
                        soft_limit=decision.fd_soft_limit)
        if decision.sharing_strategy is not None:
            self._switch_strategy(decision.sharing_strategy, _reason(decision, "file_system"), epoch)
            rebuild = True
        return rebuild

    # -- iterators, rebuilds and recovery ----------------------------------------------
    def _start_iterator(self) -> Iterator[Any]:
        if self._dataloader is None:
            self._dataloader = self._make_dataloader()
        workers_running = self._dataloader.persistent_workers and _torch.live_iterator(self._dataloader) is not None
        if self._arena_owner is not None and not workers_running:
            self._resize_arenas()
            # workers started now continue these arenas
            self._collate.arenas = arena_registry.arenas_of(self._arena_owner)
            self._collate.batch_bytes_hint = int(self.controller.batch_bytes_bound())
        iterator = iter(self._dataloader)
        if self._collate is not None:
            self._collate.arenas = {}  # the workers have them now; here they would outlive the loader's use
        _torch.detach_sigchld_watch(iterator)  # _next_watched registers them while waiting
        return iterator

    def _resize_arenas(self) -> None:
        """Before new workers start: give each an arena of its full share for the batches measured.

        Workers size their own arena from their first batches, under whatever room is left
        then; with none running, the room is known and nothing else competes for it.
        """
        if not self._recent_batches or self.num_workers == 0:
            return
        current = arena_registry.arenas_of(self._arena_owner)
        shm = self._shm.read()
        room = shm.free + sum(a.nbytes for a in current.values()) - (1 - self.safety) * shm.total
        wanted = arena_capacity(max(self._recent_batches), self.prefetch_factor or 1, room, self.num_workers)
        # an arena a batch still lives on stays: replacing it would not give its room back
        stale = [w for w in range(self.num_workers) if w not in current
                 or (current[w].capacity < 0.95 * wanted and arena_registry.idle(self._arena_owner, w))]
        if not wanted or not stale:
            return
        del current
        arena_registry.forget_workers(self._arena_owner, stale)
        for worker in stale:
            try:
                arena = Arena.create(wanted)
            except RuntimeError as exc:  # then the worker makes its own
                logger.debug("arena of %d B for worker %d not reserved: %s", wanted, worker, exc)
                return
            arena_registry.receive(arena, arena.id, self._arena_owner, worker)

    def _remove_spill_files(self) -> None:
        if self._collate is not None:
            self._collate.remove_spill_files()

    def _make_dataloader(self) -> DataLoader:
        from torch.utils.data import default_collate

        kwargs = dict(self._dataloader_kwargs)
        if self.num_workers > 0:
            kwargs.update(prefetch_factor=self.prefetch_factor, timeout=min(_POLL_SECONDS, self.stall_timeout),
                          worker_init_fn=WorkerSetup(self._user_worker_init, self.sharing_strategy,
                                                     self._fd_soft_limit))
        else:
            kwargs.pop("persistent_workers", None)
            if self._user_worker_init is not None:
                kwargs["worker_init_fn"] = self._user_worker_init
        self._allocated = _shared_counters(self.num_workers)
        arena_sizes = _shared_counters(self.num_workers) if self._arena_owner is not None else None
        self._delivered = [0] * self.num_workers
        # the workers themselves never fill shm past the safety line: above it a batch goes to a file
        keep_free = int((1 - self.safety) * self._shm.read().total)
        self._collate = MeasuredCollate(self.collate_fn or default_collate, self._shm.path, self.spill_dir,
                                        shm_keep_free=keep_free, allocated=self._allocated,
                                        arena_owner=self._arena_owner, arena_sizes=arena_sizes,
                                        batches_in_flight=self.prefetch_factor or 1, workers=self.num_workers)
        return DataLoader(self.dataset, batch_sampler=self._feed, num_workers=self.num_workers,
                          collate_fn=self._collate, **kwargs)

    def _restore_pipeline(self) -> None:
        """Each epoch starts with the workers and prefetch the user asked for;
        the controller shrinks them again if shm is still short."""
        if (self.num_workers, self.prefetch_factor) != self._pipeline_asked:
            self.num_workers, self.prefetch_factor = self._pipeline_asked
            self.controller.num_workers, self.controller.prefetch_factor = self.num_workers, self.prefetch_factor or 1
            self._dataloader = None

    def _rebuild(self, iterator) -> None:
        """Drop the iterator (and its workers); outstanding batches go back to the epoch.
        The next iterator is built, with the current settings, when the epoch asks for it."""
        iterator = iterator or _torch.live_iterator(self._dataloader)
        if iterator is not None:
            self._stop(iterator, even_persistent=True)
        self._remove_spill_files()
        self._feed.requeue_outstanding()
        self._dataloader = None

    def _recover(self, iterator, kind: str, exc: BaseException, epoch: int) -> None:
        lost = sum(len(b) for b in self._feed.outstanding)
        self._count("recovery")
        self._event("recovery", f"{kind}: {_describe(exc)}; rebuilding the iterator, {lost} undelivered samples go "
                    f"back to the epoch. {self._resource_summary()}", epoch, level=logging.WARNING, cause=kind,
                    requeued_samples=lost)
        if kind == "fds" and self.sharing_strategy != "file_system":
            self._switch_strategy("file_system", "the fds ran out while a batch was handed over", epoch)
        self._rebuild(iterator)

    def _switch_strategy(self, strategy: str, why: str, epoch: int) -> None:
        torch.multiprocessing.set_sharing_strategy(strategy)
        self.sharing_strategy = strategy
        self.controller.strategy_switched = True
        self._count("sharing_strategy")
        self._event("sharing_strategy", f"sharing strategy -> {strategy}: {why}", epoch, level=logging.WARNING,
                    strategy=strategy)

    def _stop(self, iterator, even_persistent: bool = False) -> None:
        persistent = self._dataloader is not None and self._dataloader.persistent_workers
        if even_persistent or not persistent:
            _torch.shutdown_workers(iterator)
            if self._arena_owner is not None:
                arena_registry.writers_stopped(self._arena_owner)

    def _raise_stall(self, epoch: int, since: float) -> None:
        waited = time.monotonic() - since
        message = (f"no batch for {waited:.0f} s although the workers are alive (stall_timeout="
                   f"{self.stall_timeout:g} s). {self._resource_summary()} If your samples take longer "
                   f"to load, raise stall_timeout.")
        self._event("stall", message, epoch, level=logging.ERROR)
        raise LoaderStalled(message)

    # -- small helpers ----------------------------------------------------------
    def _resource_summary(self) -> str:
        shm, fds = self._shm.read(), read_fds()
        return (f"shm {self._shm.path}: {shm.free / 2**20:.1f} MiB free of {shm.total / 2**20:.1f} MiB; "
                f"fds {fds.in_use} open, limit {fds.soft_limit} (hard {fds.hard_limit}); "
                f"sharing strategy {self.sharing_strategy}; max_cost {self.sampler.max_cost:g}.")

    def _throughput(self, samples: int) -> Optional[float]:
        """Samples per second between this delivery and the previous one, smoothed."""
        now = time.monotonic()
        previous, self._last_delivery = self._last_delivery, now
        if previous is None:
            return None
        rate = samples / max(now - previous, 1e-9)
        self._rate = rate if self._rate is None else 0.8 * self._rate + 0.2 * rate
        return self._rate

    def _read_fds_if_due(self, fds_per_batch: int):
        """Listing /proc/self/fd costs ~0.2 ms: do it every 16 batches, or every
        batch once a batch's fds are a noticeable part of the fd limit."""
        pressing = self._fds is not None and fds_per_batch * 8 > self._fds.soft_limit
        if self._fds is None or pressing or self._step % 16 == 0:
            self._fds = read_fds()
        return self._fds

    def _ram_available(self) -> int:
        if self._ram is None or self._step % 10 == 0:  # for telemetry only
            self._ram = host_ram_available()
        return self._ram

    def _worker_rss(self, pid: int) -> Optional[int]:
        if pid == os.getpid() or self._step % 10:
            return None
        return rss_of([pid])[pid]

    def _event(self, event: str, message: str, epoch: int, level: int = logging.INFO, **data: Any) -> None:
        self._telemetry.event(event, message, step=self._step, epoch=epoch, level=level, **data)

    def _count(self, kind: str) -> None:
        self._fallbacks[kind] = self._fallbacks.get(kind, 0) + 1


class _Feed:
    """The batch sampler DataLoader sees: pulls from the sampler and remembers
    what it handed out, so a yielded batch can be matched to its indices and
    the undelivered ones can be given back."""

    def __init__(self, sampler: BudgetBatchSampler) -> None:
        self.sampler = sampler
        self.source: Iterator[List[int]] = iter(())
        self.outstanding: Deque[List[int]] = deque()
        self.replay: Deque[List[int]] = deque()
        self.delivered = 0  # batches delivered this epoch

    def start(self, source: Iterator[List[int]], skip: int = 0) -> None:
        self.source = source
        self.outstanding.clear()
        self.replay.clear()
        self.delivered = skip
        for _ in range(skip):  # resuming: these were delivered before the restart
            next(self.source, None)

    def requeue_outstanding(self) -> None:
        """Batches handed out but not delivered come again. With one replica they go back to
        the sampler, to be packed under the current budget; across ranks, where every rank must
        keep the same plan, the very same batches are sent again first."""
        if self.sampler.num_replicas > 1:
            self.replay.extendleft(reversed(self.outstanding))
        elif self.outstanding:
            self.sampler.requeue([i for batch in self.outstanding for i in batch])
            self.source = self.sampler.iter_remaining()
        self.outstanding.clear()

    def __iter__(self) -> Iterator[List[int]]:
        while self.replay:
            batch = self.replay.popleft()
            self.outstanding.append(batch)
            yield batch
        for batch in self.source:
            self.outstanding.append(batch)
            yield batch

    def __len__(self) -> int:
        return len(self.sampler)


class _HeldBatches:
    """Yielded shm batches the user still references (via a weakref on one tensor each)."""

    def __init__(self) -> None:
        self._bytes: Dict[int, int] = {}
        self._refs: Dict[int, weakref.ref] = {}
        self._next_id = 0

    def track(self, batch: Any, nbytes: int) -> None:
        anchor = next((leaf for leaf in _leaves(batch) if isinstance(leaf, torch.Tensor)), None)
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


def _classify(exc: BaseException) -> Optional[str]:
    """Which failure an exception from the DataLoader iterator reports, if one we recover from.

    An exception raised inside a worker (the dataset's or collate's own) comes
    back as "Caught X in DataLoader worker process N" and is not ours to handle.
    """
    text, msg = str(exc), _torch.messages
    raised_in = _torch.worker_raised(text)
    if raised_in == "pin":  # the pin thread opens batches too
        if msg.any_of(text, msg.FDS):
            return "fds"
        if "Connection" in text or "EOFError" in text:
            return "worker_died"  # it opened a batch whose worker had died
    if raised_in is not None:
        return None
    if isinstance(exc, RuntimeError) and text.startswith(msg.TIMED_OUT):
        return "timeout"
    if msg.any_of(text, msg.WORKER_EXITED):
        return "worker_died"
    if msg.any_of(text, msg.FDS):
        return "fds"
    if isinstance(exc, (ConnectionError, EOFError)):  # a batch's fd died with the worker sharing it
        return "worker_died"
    return None


def _workers_alive(iterator) -> bool:
    """Whether the iterator has workers and every one is still running."""
    workers = _torch.iterator_workers(iterator)
    return bool(workers) and all(w.is_alive() for w in workers)


def _describe(exc: BaseException) -> str:
    """The exception's type and message: an EOFError's message alone is empty."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _budget_group(replicas: int):
    """A gloo group for agreeing on budgets, or None with one replica (or no process group)."""
    if replicas == 1:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        logger.warning("%d replicas but no torch.distributed process group: the budget stays at max_cost, "
                       "the other fallbacks still work", replicas)
        return None
    return dist.new_group(backend="gloo")


def _destroy_budget_group(group) -> None:
    """Shut the budget group's gloo threads down when the loader goes, at the latest at exit.

    A group left alive is torn down by libtorch's static destructors after the
    interpreter is gone, which can abort the process at exit. Destroying a
    subgroup is local to this rank; if the whole package was destroyed first,
    the group is already gone."""
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group(group)
        except ValueError:  # not a known group any more
            pass


def _shared_counters(n: int) -> Optional[torch.Tensor]:
    """``n`` int64 slots in shm that workers can add to; None when there are no
    workers or shm cannot even hold that (then in-flight bytes are predicted)."""
    if n == 0:
        return None
    try:
        return torch.zeros(n, dtype=torch.int64).share_memory_()
    except RuntimeError:
        return None


def _next_watched(iterator) -> Any:
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


def _take_batch_size_alias(max_batch_size: Optional[int], kwargs: Dict[str, Any]) -> Optional[int]:
    if "batch_size" in kwargs:
        batch_size = kwargs.pop("batch_size")
        if max_batch_size is not None and batch_size is not None and batch_size != max_batch_size:
            raise ValueError(f"batch_size={batch_size} and max_batch_size={max_batch_size} disagree; give one")
        return max_batch_size if max_batch_size is not None else batch_size
    return max_batch_size


def _refuse_own_keywords(kwargs: Dict[str, Any]) -> None:
    sampler = kwargs.get("sampler")
    if sampler is not None:
        _refuse_batch_sampler_as_sampler(sampler)
    for key in _OWN_KEYWORDS:
        if kwargs.get(key) is not None:
            raise ValueError(f"AdaptiveLoader builds its own batch sampler from costs/max_cost/max_batch_size/"
                             f"shuffle; {key}= cannot be passed")
        kwargs.pop(key, None)


_OWN_OR_DERIVED = {"dataset", "batch_size", "shuffle", "sampler", "batch_sampler", "num_workers", "collate_fn",
                   "drop_last", "in_order"}  # AdaptiveLoader's own parameters, or refused


def _check_dataloader_keywords(kwargs: Dict[str, Any]) -> None:
    """Unknown or malformed DataLoader keywords fail now, not at the first iteration."""
    import inspect

    known = set(inspect.signature(DataLoader.__init__).parameters) - {"self"} - _OWN_OR_DERIVED
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"unknown keyword(s) {', '.join(unknown)}: AdaptiveLoader passes on these DataLoader "
                        f"keywords: {', '.join(sorted(known))}")
    timeout = kwargs.get("timeout", 0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
        raise ValueError(f"timeout must be a number >= 0, got {timeout!r}")
    prefetch = kwargs.get("prefetch_factor")
    if prefetch is not None and (isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1):
        raise ValueError(f"prefetch_factor must be an int >= 1, got {prefetch!r}")


def _refuse_batch_sampler_as_sampler(sampler: Any) -> None:
    if isinstance(sampler, (BatchSampler, BudgetBatchSampler)):
        raise ValueError(
            f"a batch sampler ({type(sampler).__name__}) was passed as sampler=: DataLoader then treats each "
            f"list of indices as one sample and yields batches of one. Pass it as batch_sampler=, or give "
            f"AdaptiveLoader costs= and max_cost= instead")


def _check_spill_dir(path: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"spill_dir must be a path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isdir(path) or not os.access(path, os.W_OK):
        raise ValueError(f"spill_dir {path!r} is not a writable directory; batches that cannot go through "
                         f"shm are written there")
    return path


def _check_fraction(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")


def _check_positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or math.isnan(value):
        raise ValueError(f"{name} must be a number > 0, got {value!r}")


def _local_world_size() -> int:
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _finite_or_none(value: float) -> Optional[float]:
    return None if math.isinf(value) else value


def _reason(decision, keyword: str) -> str:
    return next((r for r in decision.reasons if keyword in r), "; ".join(decision.reasons))
