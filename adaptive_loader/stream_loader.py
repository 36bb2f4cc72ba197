"""AdaptiveLoader over a stream (an IterableDataset): ``AdaptiveLoader(stream, ...)`` makes one.

Everything but the planning is the map-style loader's: pipeline, roads,
ledger, controller, actuator, telemetry, recovery. What differs: batches are
made in the workers (:class:`~adaptive_loader.stream.StreamBatcher`), the
plan is the budget they read and the commits of what they delivered
(:class:`~adaptive_loader.stream_plan.StreamPlan`), a failure starts the
workers again from their commits instead of giving indices back, fewer
workers is no rung (a worker owns its shards), and ranks agree batch by batch
whether every one of them has a batch, so none waits in a collective the
others left.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
from torch.utils.data import default_collate, default_convert

from . import distributed
from .controller import Controller
from .epoch import LoaderFailed
from .kinds import Event, Road
from .loader import AdaptiveLoader
from .options import check_arena, check_dataloader_options, check_keywords, check_sampling, check_settings
from .pipeline import next_watched
from .sampler import COST_MODES, _check_quadratic, _replicas_and_rank
from .stream import BUFFER_BATCHES, FirstOf, StreamBatcher, StreamMeta, is_stateful
from .stream_plan import StreamPlan
from .telemetry import SinkSpec
from .transport import BatchStats, Envelope

__all__ = ["StreamLoader", "DEFAULT_BUFFER", "UNEVEN_ENDS"]

logger = logging.getLogger("adaptive_loader")

DEFAULT_BUFFER = 32  # samples each worker packs from when batching by cost
UNEVEN_ENDS = ("stop", "pad")


class StreamLoader(AdaptiveLoader):
    """An :class:`AdaptiveLoader` over an IterableDataset (see docs/streams.md).

    Takes AdaptiveLoader's arguments, with these differences: ``costs`` is a callable on a sample
    (``costs(sample) -> number``, e.g. the objects in its target) or None (batches by count, in
    stream order, as DataLoader makes them); ``group_ids`` a callable on a sample (batches never
    mix groups); ``window`` the samples each worker packs from (default 32); ``batch_size=None``:
    the dataset batches itself and its batches pass through; ``shuffle``, ``seed`` and
    ``sampler`` are refused (a stream shuffles itself); ``uneven``: what ranks whose streams run
    dry at different batches do: ``"stop"`` (default: every rank stops when the first runs dry;
    what the others had left is counted and reported) or ``"pad"`` (a rank that ran dry repeats
    its last batch, marked ``loader.last_batch.repeat``, until every rank has run dry).
    """

    _workers_fixed = True

    def __init__(self, dataset: Any, *, costs: Optional[Callable[[Any], float]] = None,
                 max_cost: Optional[float] = None, max_batch_size: Optional[int] = None, num_workers: int = 0,
                 collate_fn: Optional[Callable[[List[Any]], Any]] = None, shuffle: bool = False,
                 seed: Optional[int] = None, telemetry: SinkSpec = None, shm_path: str = "/dev/shm",
                 safety: float = 0.8, stall_timeout: float = 300.0, max_restarts: int = 3, drop_last: bool = False,
                 window: Optional[int] = None, spill_dir: Optional[str] = None, num_replicas: Optional[int] = None,
                 rank: Optional[int] = None, sync_every: int = 8, arena: Any = True,
                 memory_budget: Optional[float] = None, min_batch_size: int = 1, group_ids: Any = None,
                 cost: str = "sum", quadratic: float = 0.0, uneven: str = "stop", **dataloader_kwargs: Any) -> None:
        sampling, dataloader_kwargs = check_keywords(dataloader_kwargs)
        opts = check_dataloader_options(num_workers=num_workers, **dataloader_kwargs)
        max_batch_size = check_sampling(dataset, max_batch_size, shuffle, drop_last, sampling)
        passthrough = "batch_size" in sampling and sampling["batch_size"] is None and max_batch_size is None
        _check_stream_options(costs=costs, group_ids=group_ids, cost=cost, window=window, seed=seed, uneven=uneven,
                              passthrough=passthrough, max_cost=max_cost)
        if drop_last and max_batch_size is None and max_cost is not None:
            raise ValueError("drop_last=True drops each worker's last batch when it holds fewer than max_batch_size "
                             "samples: give max_batch_size= (batches made by cost alone have no size to fall short of)")
        quadratic = _check_quadratic(quadratic)
        check_settings(safety=safety, stall_timeout=stall_timeout, max_restarts=max_restarts, sync_every=sync_every,
                       min_batch_size=min_batch_size)
        arena_kind = check_arena(arena)
        self._check_memory_budget(memory_budget)
        if max_cost is None and max_batch_size is None and not passthrough:
            max_batch_size = 1  # DataLoader's default batch_size
        replicas, rank = _replicas_and_rank(num_replicas, rank)
        self.sampler = StreamPlan(max_cost=max_cost, max_batch_size=max_batch_size, num_replicas=replicas, rank=rank,
                                  drop_last=drop_last, stateful=is_stateful(dataset))
        self.uneven = uneven
        self.passthrough = passthrough
        self._batcher = StreamBatcher(dataset, self.sampler.budget, costs=costs,
                                      group_fn=group_ids, cost=cost, quadratic=quadratic,
                                      buffer_size=window or DEFAULT_BUFFER, passthrough=passthrough,
                                      drop_last=drop_last, user_max_cost=self.sampler.user_max_cost)
        self._cost_mode = cost
        collate = FirstOf(collate_fn or default_convert) if passthrough else collate_fn
        self._setup(dataset, self._batcher, opts, total_samples=_length(dataset), collate_fn=collate,
                    telemetry=telemetry, shm_path=shm_path, safety=safety, stall_timeout=stall_timeout,
                    max_restarts=max_restarts, spill_dir=spill_dir, sync_every=sync_every, arena_kind=arena_kind,
                    min_batch_size=min_batch_size)
        if collate_fn is None:
            collate_fn = default_convert if passthrough else default_collate
        self.collate_fn = collate_fn
        self._epoch_end: Optional[str] = None  # None while the epoch's stream runs; "dry": this rank's ended
        self._repeat_of: Any = None  # pad: the batch a rank that ran dry repeats
        self._repeats = 0  # pad: how often this epoch
        self._seen_min, self._seen_sum, self._seen_n = math.inf, 0.0, 0  # costs seen (see _learn_costs)
        self._seen_max, self._largest_batch = 0.0, 1  # the largest sample cost and batch seen

    # -- the DataLoader-like surface -------------------------------------------------------
    def __len__(self) -> int:
        """As DataLoader's for an IterableDataset: ``len(dataset)`` batched by ``max_batch_size``
        (a TypeError if the dataset has no length, or if batches are made by cost)."""
        n = len(self._dataset)
        if self.passthrough:
            return n
        if math.isfinite(self.sampler.user_max_cost):
            raise TypeError("a stream batched by cost (max_cost=) has no length known in advance: how many "
                            "batches its samples make depends on their costs")
        size = self.sampler.max_batch_size
        return n // size if self.drop_last else -(-n // size)

    def set_epoch(self, epoch: int) -> None:
        """The next epoch's number, passed on to the dataset's ``set_epoch`` if it has one (HF
        datasets reshuffle with it). Only this call reaches the dataset, as with DataLoader."""
        self.sampler.set_epoch(epoch)
        self._epoch_chosen = True
        if callable(getattr(self._dataset, "set_epoch", None)):
            self._dataset.set_epoch(epoch)

    def state_dict(self) -> Dict[str, Any]:
        """What each worker's stream delivered this epoch (positions, the dataset's state where it
        has one), and the budget: :meth:`load_state_dict` in a new process delivers exactly the rest."""
        return {"stream": self.sampler.state_dict(), "max_cost": self.sampler.max_cost}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if "stream" not in state:
            raise ValueError("this state was saved by an AdaptiveLoader over a map-style dataset, not a stream")
        saved = state["stream"]
        if saved["commits"] and int(saved["workers"]) != self.num_workers:
            raise ValueError(f"the state was saved with num_workers={saved['workers']}, this loader has "
                             f"{self.num_workers}: a stream is split among its workers, so resume with the same "
                             f"num_workers")
        self.sampler.load_state_dict(saved)
        budget = min(float(state["max_cost"]), self.user_max_cost)
        self._actuator.set_budget(budget)
        self.controller.max_cost = self.controller.memory_max_cost = budget
        self._resuming = True

    def guard(self, **options: Any) -> Any:
        raise TypeError("the step guard gives a failed step's samples back to the epoch, which a stream cannot "
                        "take back: use it with a map-style dataset")

    # -- the epoch ---------------------------------------------------------------------------
    def _start_epoch(self) -> int:
        plan = self.sampler
        if self._epochs_started and not self._epoch_chosen and not self._resuming:
            plan.set_epoch(plan.epoch + 1)
        self._epochs_started += 1
        if not self._resuming:
            plan.start_epoch(self.num_workers)
        self._ledger.feed.delivered = plan.delivered_batches  # the ranks agree on budgets by it
        self._epoch_chosen = self._resuming = False
        changed = self.controller.restore_pipeline(self.num_workers, self.prefetch_factor or 1)
        probe = self._probe_due()
        if probe:  # fewer batches in flight, and each worker buffers one batch, until one is measured
            changed = bool(self.controller.start_probe()) or changed
        self.sampler.probe(probe)
        if changed:
            self._pipeline.drop()
        self._epoch_end, self._repeat_of, self._repeats = None, None, 0
        return plan.epoch

    def _start_iterator(self) -> Any:
        resume = self.sampler.resume_plan()
        if resume or self._batcher.resume:  # workers must start with this plan (persistent ones hold the last)
            self._pipeline.drop()
        self._batcher.resume = resume
        return super()._start_iterator()

    def _next_envelope(self, iterator: Any) -> Any:
        """The next batch to hand out: a short last batch under ``drop_last`` is committed and skipped;
        across ranks, every rank hands out a batch or none does (``uneven``)."""
        envelope = None
        while self._epoch_end is None:
            try:
                self._before_batch_here()
                envelope = next_watched(iterator)
            except StopIteration:
                self._epoch_end = "dry"
                break
            if not envelope.stats.stream.drop:
                break
            self.sampler.commit(envelope.stats.stream)  # its samples are done with, as DataLoader drops them
            envelope = None
        if self._group is None or self.sampler.num_replicas == 1:
            if envelope is None:
                raise StopIteration
            return envelope
        return self._agree_on_batch(envelope, iterator)

    def _agree_on_batch(self, envelope: Optional[Envelope], iterator: Any) -> Envelope:
        """One all-reduce per batch: whether every rank has a batch, whether any has, and (pad)
        whether every rank has a batch or one to repeat; every rank takes the same turn."""
        has = 1.0 if envelope is not None else 0.0
        can = 1.0 if envelope is not None or self._repeat_of is not None else 0.0
        fewest, most, fewest_can = distributed.agree_on_minimum(self._group, has, -has, can)
        if fewest == 1.0:
            return envelope
        if self.uneven == "pad" and -most == 1.0 and fewest_can == 1.0:
            if envelope is not None:
                return envelope
            self._repeats += 1
            return self._repeat_of
        if self._repeats:
            self._report_uneven(f"it ran dry first and repeated its last batch {self._repeats} times (marked "
                                f"loader.last_batch.repeat) until every rank had", repeated_batches=self._repeats)
        if envelope is not None:  # another rank ran dry (or, padding, had no batch to repeat)
            self._cut_rest(envelope, iterator)
        raise StopIteration

    def _cut_rest(self, envelope: Envelope, iterator: Any) -> None:
        """Another rank is dry: this rank's epoch ends here. Its workers stop now, so the rest of its
        stream is not read (that could take as long as a shard more, with every other rank waiting for
        it at its next collective); what was not delivered is the batch in hand and all after it."""
        samples = len(envelope.stats.stream.positions)
        self._pipeline.drop(iterator)
        self._epoch_end = "cut"
        why = ("another rank's stream ran dry first (uneven='stop')" if self.uneven == "stop" else
               "another rank delivered no batch this epoch, so it had none to repeat (uneven='pad')")
        self._report_uneven(f"its stream was cut at a batch of {samples} samples, not delivered, and the rest of it "
                            f"was not read: {why}. Split the shards evenly among ranks"
                            + (", or pass uneven='pad'" if self.uneven == "stop" else ""),
                            cut_batch_samples=samples)

    def _report_uneven(self, what: str, **data: Any) -> None:
        self._actuator.event(Event.RANKS_UNEVEN, f"rank {self.sampler.rank}, epoch {self.sampler.epoch}: {what}",
                             self.sampler.epoch, level=logging.WARNING, **data)

    def _take_batch(self, stats: BatchStats) -> List[Any]:
        meta = stats.stream
        if not meta.repeat:
            self.sampler.commit(meta)
        return [(meta.worker, p) for p in meta.positions]

    def _after_batch(self, indices: List[Any], stats: Any, batch: Any, wait_s: float, epoch: int) -> bool:
        if not stats.stream.repeat:
            self._learn_costs(stats.stream.costs)
        rebuild = super()._after_batch(indices, stats, batch, wait_s, epoch)
        if self.sampler.probing and self.controller.model.coefficients() is not None:
            self.sampler.probe(False)  # measured: the buffer asked for, its cost bounded by the budget
        if self.controller.buffer_capped and not self.sampler.buffer_capped:
            self.sampler.cap_buffer(self._largest_batch)
        if self.uneven == "pad" and self.sampler.num_replicas > 1 and not stats.stream.repeat:
            self._repeat_of = _repeat(batch, stats)
        return rebuild

    def _learn_costs(self, costs: List[float]) -> None:
        """A stream's costs are known only as its samples come: the smallest positive one seen and
        the mean set the controller's floor (``min_batch_size`` samples), and the largest its
        whole batch, as the map-style loader's are set from every sample's cost up front."""
        self._largest_batch = max(self._largest_batch, len(costs))
        positive = [c for c in costs if c > 0]
        if not positive or self._batcher.costs is None:
            return
        self._seen_min, self._seen_max = min(self._seen_min, min(positive)), max(self._seen_max, max(positive))
        self._seen_sum, self._seen_n = self._seen_sum + sum(costs), self._seen_n + len(costs)
        controller = self.controller
        controller.min_cost, controller.max_sample_cost = self._seen_min, self._seen_max
        controller.floor_cost = self._seen_min + (self.min_batch_size - 1) * self._seen_sum / self._seen_n

    def _requeue_outstanding(self) -> None:
        pass  # the workers start again from their commits (see _start_iterator)

    def _epoch_delivered(self) -> bool:
        return False  # only the workers know where their streams end

    def _unit_costs(self, indices: List[Any], stats: Any) -> np.ndarray:
        return np.asarray(stats.stream.costs, np.float64)

    def _batch_cost(self, indices: List[Any], costs: np.ndarray) -> float:
        if not len(costs):
            return 0.0
        return float(len(costs) * costs.max()) if self._cost_mode == "padded" else float(costs.sum())

    # -- construction helpers -------------------------------------------------------------
    def _largest_batch(self) -> Optional[int]:
        return self.sampler.max_batch_size

    def _whole_batch(self) -> Tuple[Optional[int], float]:
        """Counting, a batch of ``max_batch_size`` costs that many; by cost, what it costs is unknown
        beforehand (inf: only a ``max_cost`` given tells when batches are smaller than asked)."""
        size = self.sampler.max_batch_size
        counting = self._batcher.costs is None and size is not None
        return size, float(size) if counting else math.inf

    def _make_controller(self) -> Controller:
        counting = self._batcher.costs is None
        return Controller(user_max_cost=self.user_max_cost, max_batch_size=self._largest_batch(),
                          min_cost=1.0 if counting else 0.0, num_workers=self.num_workers,
                          prefetch_factor=self.prefetch_factor or 1, safety=self.safety,
                          floor_cost=float(self.min_batch_size) if counting else 0.0, fixed_workers=True,
                          buffered_batches=0.0 if counting else self._read_ahead_batches())

    def _read_ahead_batches(self) -> float:
        """A worker's buffer, in batches beyond the one it makes: ``buffer_size`` samples in batches of
        ``max_batch_size`` (without one, ``BUFFER_BATCHES``: batches by cost hold an unknown count)."""
        size = self.sampler.max_batch_size
        return max(0.0, self._batcher.buffer_size / size - 1) if size else float(BUFFER_BATCHES)

    def _follow_dataset_length(self) -> None:
        pass  # a stream has no plan over its length


AdaptiveLoader._stream_class = StreamLoader


def _repeat(batch: Any, stats: BatchStats) -> Envelope:
    """The batch again, for a rank that ran dry (uneven='pad'): no bytes in flight, marked a repeat."""
    meta = stats.stream
    again = StreamMeta(worker=meta.worker, positions=list(meta.positions), costs=list(meta.costs),
                       version=meta.version, keys=list(meta.keys), low=meta.low, repeat=True)
    return Envelope(batch, BatchStats(sample_bytes=[], batch_bytes=0, batch_storages=0, handles=0,
                                      transport=Road.INLINE, off_shm_reason=None, worker_id=-1,
                                      worker_pid=stats.worker_pid, stream=again))


def _length(dataset: Any) -> Optional[int]:
    try:
        return len(dataset)
    except TypeError:
        return None


def _check_stream_options(*, costs: Any, group_ids: Any, cost: Any, window: Any, seed: Any, uneven: Any,
                          passthrough: bool, max_cost: Any) -> None:
    if costs is not None and not callable(costs):
        raise TypeError(f"for a stream, costs= is a callable on a sample (costs(sample) -> number, e.g. the objects "
                        f"in its target), got {type(costs).__name__}")
    if group_ids is not None and not callable(group_ids):
        raise TypeError(f"for a stream, group_ids= is a callable on a sample (group_ids(sample) -> a group, e.g. an "
                        f"aspect-ratio bin), got {type(group_ids).__name__}")
    if cost not in COST_MODES:
        raise ValueError(f"cost must be one of {COST_MODES}, got {cost!r}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)):
        raise TypeError(f"window must be an int (the samples each worker packs from), got {type(window).__name__}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if seed is not None:
        raise ValueError("seed= seeds the shuffle of a map-style dataset; a stream shuffles itself (the workers' "
                         "random seeds come from generator=, as in DataLoader)")
    if uneven not in UNEVEN_ENDS:
        raise ValueError(f"uneven must be one of {UNEVEN_ENDS}, got {uneven!r}")
    if passthrough and (costs is not None or max_cost is not None or group_ids is not None):
        raise ValueError("batch_size=None: the dataset batches itself and its batches pass through as they are, "
                         "so costs=, max_cost= and group_ids= have nothing to batch. Give max_batch_size= or "
                         "costs= and max_cost= to let the workers batch its samples")
