"""One epoch: iterate, tell failures apart, recover, catch stalls.

Per batch the loop reads in the order the docs describe: **record** the
batch in the ledger and the cost model, **decide** if a decision is due,
**act** on it, **show** it. An exception from the user's own code (a
dataset or collate raising) surfaces and the epoch goes on with the next
batch, as with DataLoader; a failure of the loader's own (a worker died,
fds ran out, a hand-over broke) rebuilds the iterator over what was not
delivered.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Protocol, Tuple

from . import _torch
from . import controller as rules
from .actuator import Actuator
from .controller import Controller, Observation
from .failures import Failure, classify, describe
from .kinds import ARENA_ROADS, Cause, Event, Fallback, Road
from .ledger import Ledger
from .pipeline import Pipeline

__all__ = ["EpochIterator", "EpochParts", "EpochHost", "LoaderStalled", "LoaderFailed", "after_batch", "Rate"]


class LoaderStalled(RuntimeError):
    """No batch arrived for ``stall_timeout`` seconds although workers were alive."""


class LoaderFailed(RuntimeError):
    """Recovery was tried ``max_restarts`` times without a batch getting through."""


class Rate:
    """Samples per second between one delivery and the previous, smoothed (for telemetry)."""

    def __init__(self) -> None:
        self._last: Optional[float] = None
        self.value: Optional[float] = None

    def update(self, samples: int) -> Optional[float]:
        now = time.monotonic()
        previous, self._last = self._last, now
        if previous is None:
            return None
        rate = samples / max(now - previous, 1e-9)
        self.value = rate if self.value is None else 0.8 * self.value + 0.2 * rate
        return self.value


@dataclass
class EpochParts:
    """The collaborators an epoch runs with: the loader's own, handed over as objects."""

    pipeline: Pipeline
    ledger: Ledger
    actuator: Actuator
    telemetry: Any
    rate: Rate = field(default_factory=Rate)


class EpochHost(Protocol):
    """What the epoch runner asks of its loader besides the parts: settings, and the steps that only
    the loader can take. AdaptiveLoader implements them; StreamLoader overrides the planning steps
    (``_start_epoch``, ``_start_iterator``, ``_next_envelope``, ``_take_batch``, ``_requeue_outstanding``,
    ``_unit_costs``, ``_batch_cost``, ``_after_batch``)."""

    controller: Controller
    stall_timeout: float
    max_restarts: int
    fallbacks: Dict[str, int]
    _workers_fixed: bool  # fewer workers (down to none) is no rung: a stream's
    _rebuild_pending: bool  # a give-back (the step guard's) waits for the next batch
    _fds: Any  # the last fd reading

    def __len__(self) -> int: ...
    def _start_epoch(self) -> int: ...
    def _start_iterator(self) -> Any: ...
    def _next_envelope(self, iterator: Any) -> Any: ...
    def _take_batch(self, stats: Any) -> List[Any]: ...
    def _after_batch(self, indices: List[Any], stats: Any, batch: Any, wait_s: float, epoch: int) -> bool: ...
    def _requeue_outstanding(self) -> None: ...
    def _epoch_delivered(self) -> bool: ...
    def _memory_limited(self) -> bool: ...
    def _take_give_backs(self, iterator: Any) -> Any: ...
    def _unit_costs(self, indices: List[Any], stats: Any) -> Any: ...
    def _batch_cost(self, indices: List[Any], costs: Any) -> float: ...
    def _observe(self, stats: Any) -> Observation: ...
    def _record_batch(self, epoch: int, indices: List[Any], costs: Any, stats: Any, obs: Observation,
                      wait_s: float, rate: Optional[float]) -> None: ...
    def _fd_pressure(self) -> Optional[str]: ...
    def _oom_evidence(self) -> Optional[str]: ...
    def _step_down_after_oom(self) -> Tuple[str, str]: ...
    def _resource_summary(self) -> str: ...


class EpochIterator:
    """The iterator ``iter(loader)`` returns: one epoch of batches."""

    def __init__(self, parts: "EpochParts", host: "EpochHost") -> None:
        self.parts, self.host = parts, host
        self.epoch: Optional[int] = None  # set when the epoch starts, at the first next()
        self._dl_iter: Any = None
        self._retired: Any = None  # the iterator whose workers were told to exit after the last batch
        self._restarts = 0
        self._done = False
        parts.rate = Rate()
        self._last_progress = self._wait_start = time.monotonic()

    def __iter__(self) -> "EpochIterator":
        return self

    @property
    def started(self) -> bool:
        """Whether the epoch began (at the first ``next()``)."""
        return self.epoch is not None

    @property
    def done(self) -> bool:
        """Whether the epoch ended: completed, closed, or left for a newer iterator."""
        return self._done

    def __len__(self) -> int:
        return len(self.host)

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        host, parts = self.host, self.parts
        if self.epoch is None:
            self.epoch = host._start_epoch()
            self._last_progress = self._wait_start = time.monotonic()
        while True:
            if host._rebuild_pending:
                self._dl_iter = host._take_give_backs(self._dl_iter)
            elif self._dl_iter is not None and self._dl_iter is self._retired:
                self.close(completed=True)
                raise StopIteration
            try:
                if self._dl_iter is None:
                    self._dl_iter = host._start_iterator()
                envelope = host._next_envelope(self._dl_iter)
                batch = envelope.open()
            except StopIteration:
                if parts.ledger.feed.hold_after is not None:  # the probe's batch came: plan the rest now
                    parts.ledger.feed.hold_after = None
                    parts.pipeline.drop(self._dl_iter)
                    self._dl_iter = None
                    continue
                self.close(completed=True)
                raise
            except Exception as exc:  # classified: ours to recover from, or the user's
                self._failed(exc)
                continue
            self._restarts = 0
            indices = host._take_batch(envelope.stats)
            if host._after_batch(indices, envelope.stats, batch, time.monotonic() - self._wait_start, self.epoch):
                parts.pipeline.drop(self._dl_iter)
                host._requeue_outstanding()
                self._dl_iter = None
            elif host._epoch_delivered() and parts.pipeline.retire(self._dl_iter):
                self._retired = self._dl_iter  # its workers exit while the user works on this last batch
            self._last_progress = self._wait_start = time.monotonic()  # the training step is not a stall
            return batch

    def close(self, completed: bool = False) -> None:
        """End the epoch: stop the workers (persistent ones too if it was left early)."""
        if self._done:
            return
        self._done = True
        if self.epoch is None:  # never started
            return
        host, parts = self.host, self.parts
        if self._dl_iter is not None and self._dl_iter is not self._retired:  # a retired one is reaped later
            parts.pipeline.stop(self._dl_iter, even_persistent=not completed)
        self._dl_iter = self._retired = None
        if not completed:
            parts.pipeline.drop()
        else:
            parts.pipeline.reap_exited()
        parts.actuator.event(Event.EPOCH_END, f"epoch {self.epoch} {'done' if completed else 'left early'} "
                             f"after {parts.ledger.step} batches in all", self.epoch, completed=completed,
                             fallbacks=host.fallbacks, arena_misses=parts.ledger.arena_misses,
                             refused_batches=parts.ledger.refused_batches)
        parts.ledger.arena_misses = parts.ledger.refused_batches = 0

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # at interpreter exit the loader's parts may be gone already
            pass

    # -- failures --------------------------------------------------------------------------
    def _failed(self, exc: Exception) -> None:
        """Recover from ``exc``, or re-raise it (the epoch goes on after the user's own error)."""
        host, parts = self.host, self.parts
        starting = self._dl_iter is None
        if parts.pipeline.num_workers == 0 and not (starting and host.controller.num_workers):
            failure = Failure(None, "raised in the main process")
        else:
            failure = classify(exc, _workers_of(self._dl_iter), host._fd_pressure, starting=starting,
                               oom_kills=host._oom_evidence)
        cause = failure.cause
        if cause == Cause.NO_SHM_FOR_WORKERS:
            self._load_in_process(failure)
            return
        if cause == Cause.TIMEOUT and self._dl_iter is None:
            cause = Cause.WORKERS_NOT_STARTING  # e.g. persistent workers that did not answer a reset
        if cause == Cause.TIMEOUT:
            if time.monotonic() - self._last_progress >= host.stall_timeout:
                self._stall()
            return
        if cause is None:
            if failure.evidence.startswith("not a loader failure"):
                self.close()  # ours, unexpected: the epoch cannot go on
            elif parts.ledger.feed.outstanding:  # the user's: that batch is consumed, as in DataLoader
                parts.ledger.feed.outstanding.popleft()
                parts.ledger.feed.delivered += 1
            raise exc
        self._restarts += cause != Cause.OOM_KILLED or host.controller.num_workers == 0  # a step down is progress
        if self._restarts > host.max_restarts:
            self.close()
            raise LoaderFailed(
                f"{self._restarts - 1} recoveries in a row did not get a batch through; last error: "
                f"{describe(exc)} ({failure.evidence}). {host._resource_summary()}") from exc
        self._recover(cause, failure, exc)
        self._dl_iter, self._last_progress = None, time.monotonic()

    def _recover(self, cause: Cause, failure: Failure, exc: Exception) -> None:
        host, parts = self.host, self.parts
        ledger, actuator = parts.ledger, parts.actuator
        lost = sum(len(b) for b in ledger.feed.outstanding)
        actuator.count(Fallback.RECOVERY)
        step_down, data = "", {}
        if cause == Cause.OOM_KILLED:  # before workers start again
            given_up, sentence = host._step_down_after_oom()
            step_down, data = f" Stepping down: {sentence}.", {"step_down": given_up}
        actuator.event(Event.RECOVERY, f"{cause}: {describe(exc)} ({failure.evidence}); rebuilding the iterator, "
                       f"{lost} undelivered samples go back to the epoch.{step_down} {host._resource_summary()}",
                       self.epoch, level=logging.WARNING, cause=cause.value, requeued_samples=lost, **data)
        strategy = rules.strategy_after_failure(cause, parts.pipeline.sharing_strategy)
        if strategy is not None:
            actuator.switch_strategy(strategy, failure.evidence, self.epoch)
            host.controller.strategy_switched = True
        # after an OOM kill the other workers go at once: what they hold must be free before new ones fork
        parts.pipeline.drop(self._dl_iter, kill=cause == Cause.OOM_KILLED)
        if cause in (Cause.CORRUPT_BATCH, Cause.OOM_KILLED):
            # whatever slipped, the next workers start on new arenas; after an OOM kill, sized anew and
            # smaller: until then their memory is given back (what a batch in hand holds, when it goes)
            parts.pipeline.forget_arenas()
        if cause == Cause.CORRUPT_BATCH:
            ledger.refused_batches += 1
        host._requeue_outstanding()

    def _load_in_process(self, failure: Failure) -> None:
        """The last rung: without even a few KiB of /dev/shm no worker can start; load here."""
        host, parts = self.host, self.parts
        if host._workers_fixed:
            self.close()
            raise LoaderFailed(f"{failure.evidence}: no worker can start, and a stream cannot be loaded in the main "
                               f"process instead (its workers own their shards). Free some of /dev/shm "
                               f"(a few KiB suffice). {host._resource_summary()}")
        parts.actuator.count(Fallback.IN_PROCESS)
        parts.actuator.event(Event.IN_PROCESS, f"{failure.evidence}: loading in the main process (num_workers=0) "
                             f"for the rest of this epoch; free some of /dev/shm to get the workers back",
                             self.epoch, level=logging.WARNING)
        host.controller.num_workers = 0
        parts.pipeline.drop()
        host._requeue_outstanding()

    def _stall(self) -> None:
        host, parts = self.host, self.parts
        waited = time.monotonic() - self._last_progress
        message = (f"no batch for {waited:.0f} s although the workers are alive (stall_timeout="
                   f"{host.stall_timeout:g} s). {host._resource_summary()} If your samples take longer "
                   f"to load, raise stall_timeout.")
        parts.actuator.event(Event.STALL, message, self.epoch, level=logging.ERROR)
        if self._dl_iter is not None:  # a stuck worker would keep the join waiting
            parts.pipeline.drop(self._dl_iter, kill=True)
            self._dl_iter = None
        self.close()
        raise LoaderStalled(message)


def after_batch(host: "EpochHost", parts: "EpochParts", indices: Any, stats: Any, batch: Any, wait_s: float,
                epoch: int) -> bool:
    """One batch delivered: record, decide if due, act, show. True: the iterator must be
    rebuilt for the decision taken."""
    ledger, controller = parts.ledger, host.controller
    costs = host._unit_costs(indices, stats)  # the units the budget counts in
    pinned = parts.pipeline.pinning()
    cost = host._batch_cost(indices, costs)
    ledger.deliver(indices, cost, stats, batch, pinned, epoch)  # record
    if stats.sample_bytes:  # a batch made in the main process is measured too (the probe's is)
        controller.model.observe(costs, stats.sample_bytes)
        controller.observe_heap(stats.heap, stats.batch_bytes)
        controller.observe_batch(cost)
    if stats.transport == Road.FILE:
        parts.actuator.count(Fallback.OFF_SHM)
        parts.actuator.event(Event.OFF_SHM, f"batch {ledger.step} ({len(indices)} samples) went through a "
                             f"spill file: {stats.off_shm_reason}", epoch, level=logging.WARNING,
                             bytes=stats.batch_bytes)
    rate = parts.rate.update(len(indices))
    fds = host._fds
    # batches made in the main process change nothing of /dev/shm's or the fds': only a memory limit moves their budget
    decide = parts.actuator.agreement_due() or controller.probing or controller.slow_starting or \
        (parts.pipeline.num_workers > 0 or host._memory_limited()) and (
        rules.decision_due(ledger.step, ledger.last_target, ledger.largest_batch,
                           stats.transport in (Road.SHM, Road.INLINE, *ARENA_ROADS), stats.handles,
                           fds.soft_limit if fds else None))
    telemetry = parts.telemetry
    if not (decide or telemetry.wants_batches):
        return False
    observation = host._observe(stats)  # measure
    rebuild = False
    if decide:
        decision = controller.decide(observation)  # decide
        ledger.last_target = decision.per_batch_bytes
        rebuild = parts.actuator.apply(decision, epoch)  # act
        if ledger.feed.hold_after is not None and not controller.probing:
            ledger.feed.hold_after = None  # the probe's batch is measured: the rest is planned with what it taught
            rebuild = True  # the running iterator was told there is no more
    if telemetry.wants_batches:  # show
        host._record_batch(epoch, indices, costs, stats, observation, wait_s, rate)
    return rebuild


def _workers_of(iterator: Any) -> list:
    return _torch.iterator_workers(iterator) if iterator is not None else []
