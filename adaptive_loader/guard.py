"""The step guard: a training step that runs out of device memory gives its batch back.

::

    for batch in loader:
        with loader.guard():
            loss = model(batch); loss.backward(); opt.step(); opt.zero_grad()

On an out-of-memory error inside the block, the guard frees what it can,
swallows the error, lowers the device budget below the batch's cost and gives
the batch's samples back to the epoch, which delivers them again in smaller
batches. Loops that cannot use ``with`` call :meth:`StepGuard.done` after a
step and :meth:`StepGuard.failed` with the exception of one that raised. See
docs/device.md.
"""

from __future__ import annotations

import gc
import logging
import math
import traceback
import weakref
from typing import Any, Callable, List, Optional

from . import _torch
from .device_budget import SAFETY, DeviceBudget
from .kinds import Event

__all__ = ["StepGuard", "SampleOutOfMemory"]

_UNSET: Any = object()


class SampleOutOfMemory(RuntimeError):
    """A batch of one sample ran out of device memory: no smaller batch can hold it."""


class _DeviceState:
    """What the guard keeps for one loader across steps: the budget and the options."""

    def __init__(self) -> None:
        self.peak_bytes: Optional[Callable[[], float]] = None
        self.budget: Optional[DeviceBudget] = None
        self.device_memory: Optional[float] = None
        self.safety = SAFETY
        self.handled_step: Optional[tuple] = None  # (epoch, step) of the last batch judged
        self.published: Optional[float] = None  # the cap last given to the loader


_STATES: "weakref.WeakKeyDictionary[Any, _DeviceState]" = weakref.WeakKeyDictionary()


class StepGuard:
    """Guard one training step of ``loader`` against running out of device memory.

    ``loader.guard(**options)`` returns one; the device budget it learns is kept per
    loader, so a new guard per step (or one reused) continues it. Options given replace
    those in force, the rest stay.

    Args:
        peak_bytes: a callable returning the finished step's peak memory in bytes (it is
            called once per completed step, so it may reset its own counter then).
            Default: the accelerator's ``max_memory_allocated``, reset before each step;
            without an accelerator nothing is measured and only errors lower the budget.
        device_memory: bytes the steps may use (default: the accelerator's free memory plus
            what torch's allocator holds; ``None`` without one). With it, the budget aims at
            ``safety`` of it from the fitted peaks.
        safety: fraction of ``device_memory`` a step's peak may reach.

    After the block, :attr:`ok` says whether the step completed (with several ranks: on
    every rank; when one rank's step fails, every rank gives its batch back).
    """

    def __init__(self, loader: Any, *, peak_bytes: Any = _UNSET, device_memory: Any = _UNSET,
                 safety: Any = _UNSET) -> None:
        if peak_bytes is not _UNSET and peak_bytes is not None and not callable(peak_bytes):
            raise TypeError(f"peak_bytes must be a callable returning bytes, got {type(peak_bytes).__name__}")
        if device_memory is not _UNSET and device_memory is not None:
            if isinstance(device_memory, bool) or not isinstance(device_memory, (int, float)):
                raise TypeError(f"device_memory must be a number of bytes, got {type(device_memory).__name__}")
            if not device_memory > 0 or math.isinf(device_memory):
                raise ValueError(f"device_memory must be a finite number of bytes > 0, got {device_memory!r}")
        if safety is not _UNSET and (isinstance(safety, bool) or not isinstance(safety, (int, float))
                                     or not 0 < safety <= 1):
            raise ValueError(f"safety must be a number in (0, 1], got {safety!r}")
        self.loader = loader
        state = _STATES.get(loader)
        if state is None:
            state = _STATES[loader] = _DeviceState()
        if peak_bytes is not _UNSET:
            state.peak_bytes = peak_bytes
        if device_memory is not _UNSET or safety is not _UNSET or state.budget is None:
            if device_memory is not _UNSET:
                state.device_memory = device_memory
            elif state.budget is None and state.peak_bytes is None:
                state.device_memory = _torch.device_memory_bytes()
            if safety is not _UNSET:
                state.safety = float(safety)
            if state.budget is None:
                state.budget = DeviceBudget(state.device_memory, state.safety)
            else:
                state.budget.configure(state.device_memory, state.safety)
        self._state = state
        self.ok: Optional[bool] = None

    @property
    def budget(self) -> DeviceBudget:
        """The loader's device budget."""
        return self._state.budget

    # -- the with block ---------------------------------------------------------------
    def __enter__(self) -> "StepGuard":
        self.begin()
        return self

    def __exit__(self, exc_type: Any, exc: Optional[BaseException], tb: Any) -> bool:
        if exc is None:
            self.done()
            return False
        return self.failed(exc)

    # -- the explicit calls ----------------------------------------------------------
    def begin(self) -> None:
        """Before a step (optional): start measuring its peak memory afresh."""
        self.ok = None
        if self._state.peak_bytes is None:
            _torch.reset_device_peak()

    def done(self) -> None:
        """The step of the batch most recently yielded completed: learn from its peak memory."""
        batch = self._take_batch()
        if batch is None:
            return
        state = self._state
        if state.peak_bytes is not None:
            peak = state.peak_bytes()
        else:
            peak = _torch.device_peak_bytes()
            _torch.reset_device_peak()
        state.budget.observe(batch.cost, peak)
        self.ok = True
        if self._ranks():
            self._agree(batch, failed=False)
        else:
            self._publish(state.budget.max_cost())

    def failed(self, exc: BaseException) -> bool:
        """The step of the batch most recently yielded raised ``exc``. True: it ran out of device
        memory and the batch went back to the epoch (go on with the next batch); False: not
        ours, re-raise it. Raises :class:`SampleOutOfMemory` when the batch was one sample."""
        if not _torch.is_out_of_memory(exc):
            return False
        batch = self._take_batch()
        if batch is None:
            return False  # nothing yielded, or this batch was judged already: nothing to give back
        _free(exc)
        self.ok = False
        state = self._state
        state.budget.failed(batch.cost)
        if self._ranks():
            self._agree(batch, failed=True, exc=exc)
            return True
        self._publish(state.budget.max_cost())
        self.loader._give_back(list(batch.indices))
        self._event(batch, exc)
        if len(batch.indices) == 1:
            raise _one_sample_error(batch.indices[0], batch.cost, exc) from exc
        return True

    # -- internals ---------------------------------------------------------------------
    def _take_batch(self) -> Any:
        """The batch to judge, once: None before any batch or when judged already."""
        batch = self.loader.last_batch
        if batch is None:
            return None
        key = (getattr(batch, "epoch", None), batch.step)
        if key == self._state.handled_step:
            return None
        self._state.handled_step = key
        return batch

    def _publish(self, cap: Optional[float]) -> None:
        if cap != self._state.published:
            self._state.published = cap
            self.loader._cap_budget("device", cap)

    def _event(self, batch: Any, exc: BaseException, union: Optional[List[int]] = None) -> None:
        budget = self._state.budget
        cap = budget.max_cost()
        given = union if union is not None else batch.indices
        message = (f"a step ran out of device memory on a batch of {len(batch.indices)} samples, cost "
                   f"{batch.cost:g} ({type(exc).__name__}); {len(given)} samples go back to the epoch, the device "
                   f"budget is now {'none' if cap is None else format(cap, '.4g')}")
        self.loader._telemetry.event(Event.DEVICE_OOM.value, message, step=batch.step, epoch=getattr(batch, "epoch", 0),
                                     level=logging.WARNING, cost=batch.cost, samples=len(batch.indices),
                                     requeued_samples=len(given), device_max_cost=cap, ooms=budget.ooms)

    def _ranks(self) -> bool:
        return self.loader.sampler.num_replicas > 1 and getattr(self.loader, "_group", None) is not None

    def _agree(self, batch: Any, failed: bool, exc: Optional[BaseException] = None) -> None:
        """Every rank, after every step: did a step fail anywhere, and the smallest device cap.
        If one failed, the step failed on every rank: each gives back every rank's batch of this
        step, from a global batch none has planned yet, so the plans stay the same."""
        import torch
        import torch.distributed as dist

        loader = self.loader
        group = loader._group
        cap = self._state.budget.max_cost()
        one_sample = failed and len(batch.indices) == 1
        flags = torch.tensor([float(failed), float(one_sample), -(math.inf if cap is None else cap),
                              float(loader.sampler.global_position)], dtype=torch.float64)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
        any_failed, any_one, agreed, at_batch = bool(flags[0]), bool(flags[1]), -float(flags[2]), int(flags[3])
        agreed_cap = None if math.isinf(agreed) else agreed
        if not any_failed:
            self._publish(agreed_cap)
            return
        gathered: List[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, list(batch.indices), group=group)
        union = sorted(i for indices in gathered for i in indices)
        self.ok = False
        self._state.published = agreed_cap  # from the failed batch on: the give-back is planned under it
        loader._cap_budget("device", agreed_cap, at_batch=at_batch)
        loader._give_back(union, at_batch=at_batch)
        self._event(batch, exc if exc is not None else RuntimeError("another rank ran out of device memory"),
                    union)
        if any_one:
            if one_sample:
                raise _one_sample_error(batch.indices[0], batch.cost, exc) from exc
            raise SampleOutOfMemory("another rank's step ran out of device memory on a batch of one sample; "
                                    "every rank stops (its message names the sample)")


def _free(exc: BaseException) -> None:
    """Drop what the failed step still holds: its frames' locals (kept alive by the traceback),
    then unreachable cycles, then the allocator's cached blocks."""
    traceback.clear_frames(exc.__traceback__)
    gc.collect()
    _torch.empty_device_cache()


def _one_sample_error(index: int, cost: float, exc: Optional[BaseException]) -> SampleOutOfMemory:
    return SampleOutOfMemory(
        f"sample {index} (cost {cost:g}) ran out of device memory in a batch of its own, so no smaller batch can "
        f"hold it ({type(exc).__name__ if exc is not None else 'out of memory'}: {exc}). It went back to the "
        f"epoch (state_dict() does not count it): give the step more memory, or take the sample out of the "
        f"dataset.")
