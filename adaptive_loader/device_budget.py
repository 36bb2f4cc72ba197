"""The device budget: the largest batch cost a training step can take without running out of memory.

Decide layer: pure, no torch and no I/O. The step guard (``guard.py``) feeds it each
step's cost with its peak device memory, or the cost of a step that ran out of
memory, and reads :meth:`DeviceBudget.max_cost`, a cap the loader combines with
its other budgets (the smallest wins).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

from .controller import CostModel

__all__ = ["DeviceBudget", "SAFETY", "OOM_BACKOFF", "OOM_BACKOFF_AGAIN", "GROW_EVERY", "GROW_NEAR", "GROW_FACTOR",
           "BELOW_FAILED", "HYSTERESIS", "MIN_STEPS"]

SAFETY = 0.9  # fraction of the device's memory a step's peak may reach
OOM_BACKOFF = 0.85  # after an out-of-memory at cost c the cap goes to c times this
OOM_BACKOFF_AGAIN = 0.5  # ... or this, when no step fitted since the cap last came down: it was far off
GROW_EVERY = 10  # fitting steps near the cap before it may rise once
GROW_NEAR = 0.85  # a step shows the cap fits when its cost is at least this fraction of the cap
GROW_FACTOR = 1.03  # one rise
BELOW_FAILED = 0.97  # with no measured room, the cap stays under this times the lowest cost that failed
HYSTERESIS = 0.05  # the fitted cap moves only when the fit moves it by more than this fraction
MIN_STEPS = 4  # measured steps before the fit is trusted (the first ones carry warm-up allocations)


class DeviceBudget:
    """Learns peak device memory against batch cost and turns it into a cost cap.

    Two bounds, the smaller wins:

    * the fit: with the device's usable memory known (``capacity`` bytes), peak memory
      is fitted online as ``a + b * cost`` (:class:`~adaptive_loader.controller.CostModel`,
      whose margin covers every step seen) and the cap is the cost whose bound reaches
      ``safety * capacity``;
    * the ceiling: a step that ran out of memory at cost ``c`` puts it below ``c``
      (:data:`OOM_BACKOFF`). It rises by :data:`GROW_FACTOR` after every :data:`GROW_EVERY`
      steps near it that fit, but not above :data:`BELOW_FAILED` times the lowest cost
      that failed unless the fit, from the steps at lower cost, shows room there.

    Args:
        capacity: bytes the steps may use on the device (``None``: unknown; then only
            out-of-memory errors set a cap).
        safety: fraction of ``capacity`` a step's peak may reach.
    """

    def __init__(self, capacity: Optional[float] = None, safety: float = SAFETY) -> None:
        self.capacity: Optional[float] = None
        self.safety = SAFETY
        self.model = CostModel(window=256, min_samples=16, refit_every=16)
        self.steps = 0  # steps that fitted
        self.ooms = 0
        self.lowest_failed = math.inf
        self._ceiling = math.inf
        self._fitted = math.inf  # the fit's cap as published (moves with hysteresis)
        self._streak = 0  # fitting steps near the ceiling since it last moved
        self._fitted_since_drop = True
        self.configure(capacity, safety)

    def configure(self, capacity: Optional[float], safety: float = SAFETY) -> None:
        """Change the usable bytes and the safety fraction, keeping what was learned."""
        if capacity is not None:
            capacity = _check_number("capacity", capacity)
            if capacity <= 0:
                raise ValueError(f"capacity must be > 0 bytes or None, got {capacity!r}")
        if isinstance(safety, bool) or not isinstance(safety, (int, float)) or not 0 < safety <= 1:
            raise ValueError(f"safety must be a number in (0, 1], got {safety!r}")
        self.capacity, self.safety = capacity, float(safety)
        self._fitted = self._fit_cap()

    @property
    def target_bytes(self) -> Optional[float]:
        """Peak bytes a step may reach (``None``: the capacity is unknown)."""
        return None if self.capacity is None else self.safety * self.capacity

    def observe(self, cost: float, peak_bytes: Optional[float] = None) -> None:
        """A step at ``cost`` completed; ``peak_bytes``: its peak device memory, if measured."""
        cost = _check_cost(cost)
        self.steps += 1
        self._fitted_since_drop = True
        if peak_bytes is not None:
            peak = _check_number("peak_bytes", peak_bytes)
            if peak < 0:
                raise ValueError(f"peak_bytes must be >= 0, got {peak_bytes!r}")
            self.model.observe([cost], [peak])
            self._refit()
        if math.isfinite(self._ceiling) and cost >= GROW_NEAR * self._ceiling:
            self._streak += 1
            if self._streak >= GROW_EVERY:
                self._grow()

    def failed(self, cost: float) -> None:
        """A step at ``cost`` ran out of device memory."""
        cost = _check_cost(cost)
        self.ooms += 1
        self.lowest_failed = min(self.lowest_failed, cost)
        # failing again under a ceiling no step has fitted since it came down: it was far off
        backoff = OOM_BACKOFF if self._fitted_since_drop or cost > self._ceiling else OOM_BACKOFF_AGAIN
        if cost * backoff < self._ceiling:
            self._ceiling = cost * backoff
            self._fitted_since_drop = False
        self._streak = 0

    def max_cost(self) -> Optional[float]:
        """The largest batch cost to plan (``None``: no device limit known)."""
        cap = min(self._ceiling, self._fitted)
        return None if math.isinf(cap) else cap

    def state(self) -> Dict[str, Any]:
        """What it knows, for telemetry and reports."""
        fit = self.model.coefficients()
        return {"max_cost": self.max_cost(), "capacity": self.capacity, "steps": self.steps, "ooms": self.ooms,
                "lowest_failed": None if math.isinf(self.lowest_failed) else self.lowest_failed,
                "fit": None if fit is None else {"intercept": fit[0], "slope": fit[1], "margin": fit[2]}}

    # -- internals ------------------------------------------------------------
    def _fit_cap(self) -> float:
        """The cost whose fitted bound reaches the target (inf: no fit, or memory does not grow with cost)."""
        target = self.target_bytes
        fit = self.model.coefficients() if self.model.seen >= MIN_STEPS else None
        if target is None or fit is None:
            return math.inf
        a, b, margin = fit
        if b <= 0:
            return math.inf if a + margin <= target else 1e-9
        return max(1e-9, (target - a - margin) / b)

    def _refit(self) -> None:
        new = self._fit_cap()
        old = self._fitted
        if math.isinf(old) or math.isinf(new) or abs(new - old) > HYSTERESIS * old:
            self._fitted = new

    def _room_at(self, cost: float) -> bool:
        """Whether the fit, with the capacity known, says a step at ``cost`` stays under the target."""
        return self.capacity is not None and self.model.seen >= MIN_STEPS and cost <= self._fit_cap()

    def _grow(self) -> None:
        self._streak = 0
        candidate = self._ceiling * GROW_FACTOR
        if self._room_at(candidate):
            self._ceiling = candidate
        elif self._ceiling < BELOW_FAILED * self.lowest_failed:
            self._ceiling = min(candidate, BELOW_FAILED * self.lowest_failed)


def _check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _check_cost(cost: Any) -> float:
    cost = _check_number("cost", cost)
    if cost < 0:
        raise ValueError(f"cost must be >= 0, got {cost!r}")
    return cost
