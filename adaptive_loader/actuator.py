"""The actuator: carries a decision out and says so.

It sets the sampler's budget (across ranks, the agreed one, from an agreed
global batch), tells the pipeline to raise the fd limit or switch the
sharing strategy, counts each fallback, and emits one event per change.
It decides nothing: every rule is the controller's.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, Optional, Tuple

from . import distributed
from .controller import format_cost
from .kinds import Event, Fallback
from .ledger import Ledger
from .pipeline import Pipeline
from .sampler import BudgetBatchSampler

__all__ = ["Actuator"]


class Actuator:
    def __init__(self, sampler: BudgetBatchSampler, pipeline: Pipeline, ledger: Ledger, telemetry: Any,
                 group: Any, sync_every: int, user_max_cost: float) -> None:
        self.sampler = sampler
        self.pipeline = pipeline
        self.ledger = ledger
        self.telemetry = telemetry
        self.group = group
        self.sync_every = sync_every
        self.user_max_cost = user_max_cost
        # the largest batch asked for (samples, None: no size cap) and its cost: a budget at least this cuts none
        self.whole_batch: Tuple[Optional[int], float] = (None, math.inf)
        self.fallbacks: Dict[str, int] = {}
        self._warned_epoch: Optional[int] = None  # the budget went below the user's in this epoch, said so
        self._last_agreed: Optional[float] = None  # the budget the ranks agreed on last

    def apply(self, decision: Any, epoch: int) -> bool:
        """Carry ``decision`` out; True when the iterator must be rebuilt for it."""
        rebuild = False
        if self.sampler.num_replicas > 1:
            self._agree_on_budget(decision, epoch)
        elif decision.max_cost != self.sampler.max_cost:
            self.set_budget(decision.max_cost)
            self.event(Event.BUDGET, decision.reason("max_cost"), epoch,
                       max_cost=finite_or_none(decision.max_cost), per_batch_bytes=decision.per_batch_bytes)
            self._warn_if_below_asked(decision.max_cost, decision, epoch)
        if decision.smaller_buffer:
            self.count(Fallback.SMALLER_BUFFER)
            self.event(Event.SMALLER_BUFFER, decision.reason("smaller buffer"), epoch, level=logging.WARNING)
        if decision.deeper:
            self.event(Event.DEPTH, decision.reason("first batch measured"), epoch)
        elif decision.num_workers == 0:
            self.count(Fallback.IN_PROCESS)
            self.event(Event.IN_PROCESS, decision.reason("main process"), epoch, level=logging.WARNING)
        elif decision.prefetch_factor is not None or decision.num_workers is not None:
            self.count(Fallback.FEWER_IN_FLIGHT)
            self.event(Event.FEWER_IN_FLIGHT, decision.reason("fewer batches"), epoch, level=logging.WARNING,
                       num_workers=decision.num_workers, prefetch_factor=decision.prefetch_factor)
        depth = (self.pipeline.num_workers if decision.num_workers is None else decision.num_workers,
                 decision.prefetch_factor or self.pipeline.prefetch_factor)
        if decision.deeper or depth != (self.pipeline.num_workers, self.pipeline.prefetch_factor):
            rebuild = True  # the workers running are not the depth decided
        if decision.fd_soft_limit is not None:
            self.pipeline.set_fd_soft_limit(decision.fd_soft_limit)
            self.count(Fallback.FD_LIMIT)
            self.event(Event.FD_LIMIT, decision.reason("fd soft limit"), epoch, level=logging.WARNING,
                       soft_limit=decision.fd_soft_limit)
        if decision.sharing_strategy is not None:
            self.switch_strategy(decision.sharing_strategy, decision.reason("file_system"), epoch)
            rebuild = True
        return rebuild

    def _warn_if_below_asked(self, max_cost: float, decision: Any, epoch: int) -> None:
        """Once per epoch: the batches got smaller than the user asked, how much and why."""
        size, whole_cost = self.whole_batch
        asked_cost = min(self.user_max_cost, whole_cost)
        if max_cost >= asked_cost or math.isinf(asked_cost) or self._warned_epoch == epoch:
            return
        self._warned_epoch = epoch
        asked = (f"your max_cost {format_cost(self.user_max_cost)}" if math.isfinite(self.user_max_cost)
                 else f"what {size} of the largest samples cost ({format_cost(whole_cost)})")
        share = f" ({max_cost / asked_cost:.0%} of it)"
        self.telemetry.event(
            Event.BUDGET.value, f"batches are smaller than asked this epoch: the cost budget is {format_cost(max_cost)}, "
            f"below {asked}{share}, because the {decision.limit or 'memory'} limit leaves "
            f"{decision.per_batch_bytes / 2**20:.1f} MiB per batch in flight even with "
            f"fewer batches in flight. Fewer workers, a smaller prefetch_factor or more memory keep them whole.",
            step=self.ledger.step, epoch=epoch, level=logging.WARNING, max_cost=finite_or_none(max_cost),
            limit=decision.limit, below_asked=True)

    def set_budget(self, max_cost: float) -> None:
        self.sampler.max_cost = max_cost
        self.sampler.warn_oversized = max_cost >= self.user_max_cost

    def switch_strategy(self, strategy: str, why: str, epoch: int) -> None:
        self.pipeline.set_sharing_strategy(strategy)
        self.count(Fallback.SHARING_STRATEGY)
        self.event(Event.SHARING_STRATEGY, f"sharing strategy -> {strategy} (process-wide until the loader "
                   f"closes): {why}", epoch, level=logging.WARNING, strategy=strategy)

    def count(self, kind: Fallback) -> None:
        self.fallbacks[kind.value] = self.fallbacks.get(kind.value, 0) + 1

    def event(self, kind: Event, message: str, epoch: int, level: int = logging.INFO, **data: Any) -> None:
        self.telemetry.event(kind.value, message, step=self.ledger.step, epoch=epoch, level=level, **data)

    def agreement_due(self) -> bool:
        """Whether the ranks agree on the budget after this batch: every ``sync_every`` batches of
        the epoch, the same batches on every rank, whatever each rank's own memory says (a rank
        missing one leaves the others waiting in it)."""
        return self.group is not None and self.ledger.feed.delivered % self.sync_every == 0

    def _agree_on_budget(self, decision: Any, epoch: int) -> None:
        """Ranks must plan the same batches: every ``sync_every`` batches they take the
        smallest proposed budget and apply it from a global batch none has planned yet."""
        if not self.agreement_due():
            return
        agreed, at = distributed.agree_on_minimum(self.group, decision.max_cost,
                                                  -float(self.sampler.global_position))
        at = int(-at)
        bound: Dict[str, Any] = {}
        # which node's limit set it, when it changed and a limit did: every rank saw the same agreements
        # and has the same cap, so all of them take part in this collective or none
        if agreed != self._last_agreed and agreed < self.user_max_cost:
            bound = distributed.who_bound(self.group, decision.max_cost <= agreed, decision.limit)
        self._last_agreed = agreed
        if agreed != self.sampler.max_cost:
            self.sampler.schedule_budget(at, agreed, self.sampler.max_batch_size)
            self.sampler.warn_oversized = agreed >= self.user_max_cost
            by = f"; node {bound['bound_by_node']}'s {bound['bound_by_limit']} limit set it" if bound else ""
            self.event(Event.BUDGET, f"ranks agreed on max_cost {format_cost(agreed)} from global batch {at} (this "
                       f"rank proposed {format_cost(decision.max_cost)}{by})", epoch, max_cost=finite_or_none(agreed),
                       at_batch=at, per_batch_bytes=decision.per_batch_bytes, **bound)


def finite_or_none(value: float) -> Optional[float]:
    return None if math.isinf(value) else value
