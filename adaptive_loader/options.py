"""Construction-time checks of AdaptiveLoader's DataLoader-like arguments.

Pure functions: they raise what ``torch.utils.data.DataLoader`` raises for the
same input (the same exception type, often a clearer message) and refuse at
construction what DataLoader would only trip over later (``timeout=nan``, a
bogus ``generator``). Nothing here starts a process or touches shm.
"""

from __future__ import annotations

import math
import multiprocessing
import numbers
import warnings
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.multiprocessing

from . import _torch

__all__ = ["SEED_RANGE", "check_dataloader_options", "shuffle_seed", "warn_worker_number"]

SEED_RANGE = (0, 2**64)  # seed= is an int with 0 <= seed < 2**64, what torch.Generator.manual_seed takes unsigned


def check_dataloader_options(*, num_workers: Any = 0, prefetch_factor: Any = None, persistent_workers: Any = False,
                             pin_memory: Any = False, timeout: Any = 0, worker_init_fn: Any = None,
                             multiprocessing_context: Any = None, generator: Any = None, seed: Any = None,
                             pin_memory_device: Any = "", in_order: Any = True) -> Dict[str, Any]:
    """Validate DataLoader-like arguments; return them normalized.

    Normalized: ``prefetch_factor`` is 2 with workers and None without (as
    DataLoader), ``timeout`` a float, ``multiprocessing_context`` a context
    object or None (a start method's name becomes its context, as DataLoader
    does), ``seed`` an int or None. Raises ValueError or TypeError, the type
    DataLoader raises for the same mistake.
    """
    num_workers = _int(num_workers, "num_workers must be an int >= 0 (0: load in the main process)")
    if num_workers < 0:
        # DataLoader: "num_workers option should be non-negative; use num_workers=0 to disable multiprocessing."
        raise ValueError(f"num_workers must be an int >= 0 (0: load in the main process), got {num_workers}")
    return {
        "num_workers": num_workers,
        "prefetch_factor": _prefetch_factor(prefetch_factor, num_workers),
        "persistent_workers": _persistent_workers(persistent_workers, num_workers),
        "pin_memory": _bool("pin_memory", pin_memory),
        "timeout": _timeout(timeout),
        "worker_init_fn": _callable_or_none("worker_init_fn", worker_init_fn),
        "multiprocessing_context": _context(multiprocessing_context, num_workers),
        "generator": _generator(generator),
        "seed": _seed(seed),
        "pin_memory_device": _pin_memory_device(pin_memory_device),
        "in_order": _in_order(in_order),
    }


def shuffle_seed(seed: Optional[int], generator: Optional[torch.Generator]) -> int:
    """The base seed of the shuffle: ``seed`` if given; else one draw from ``generator``;
    else one draw from torch's global RNG now, so ``torch.manual_seed`` before
    construction decides the shuffle. A draw is what ``RandomSampler`` takes
    (a non-negative int64), and it advances that generator once."""
    if seed is not None:
        return _seed(seed)
    _generator(generator)
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())


def warn_worker_number(num_workers: int, stacklevel: int = 2) -> bool:
    """Emit torch's "excessive worker creation" warning, as DataLoader does, if
    ``num_workers`` exceeds the CPUs this process may use. ``stacklevel`` as for
    ``warnings.warn``, seen from the function calling this one: 1 is that call,
    the default 2 its caller (the user building the loader). True if it warned."""
    text = _torch.worker_number_warning(num_workers)
    if text is None:
        return False
    warnings.warn(text, UserWarning, stacklevel=stacklevel + 1)
    return True


# -- one check per argument -----------------------------------------------------------------

def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what}, got {type(value).__name__} {value!r}")
    return int(value)


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def _prefetch_factor(value: Any, num_workers: int) -> Optional[int]:
    if value is None:
        return 2 if num_workers > 0 else None
    value = _int(value, "prefetch_factor must be an int >= 1 (batches in flight per worker)")
    if num_workers == 0:
        # DataLoader: "prefetch_factor option could only be specified in multiprocessing..."
        raise ValueError(f"prefetch_factor={value} needs num_workers > 0: without workers nothing is prefetched; "
                         f"leave prefetch_factor=None")
    if value < 1:  # DataLoader takes 0, and then its workers never get an index
        raise ValueError(f"prefetch_factor must be an int >= 1 (batches in flight per worker), got {value}")
    return value


def _persistent_workers(value: Any, num_workers: int) -> bool:
    value = _bool("persistent_workers", value)
    if value and num_workers == 0:
        raise ValueError("persistent_workers=True needs num_workers > 0 (as DataLoader: \"persistent_workers "
                         "option needs num_workers > 0\")")
    return value


def _timeout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"timeout must be a number >= 0 (seconds; 0: no timeout), got {type(value).__name__} "
                        f"{value!r}")
    value = float(value)
    if math.isnan(value) or value < 0 or math.isinf(value):
        # DataLoader refuses < 0 only; NaN would never time out and inf overflows the queue's wait
        raise ValueError(f"timeout must be a number >= 0 (seconds; 0: no timeout), got {value!r}")
    return value


def _callable_or_none(name: str, value: Any) -> Any:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable or None, got {type(value).__name__} {value!r}")
    return value


def _context(value: Any, num_workers: int) -> Any:
    if value is None:
        return None
    if num_workers == 0:
        raise ValueError(f"multiprocessing_context can only be used with multi-process loading (num_workers > 0), "
                         f"but got num_workers={num_workers}")
    if isinstance(value, str):
        methods = torch.multiprocessing.get_all_start_methods()
        if value not in methods:
            raise ValueError(f"multiprocessing_context should be a start method in {methods!r} or a context "
                             f"object, got {value!r}")
        return torch.multiprocessing.get_context(value)
    if not isinstance(value, multiprocessing.context.BaseContext):
        raise TypeError(f"multiprocessing_context should be a start method's name or a context from "
                        f"multiprocessing.get_context(), got {type(value).__name__} {value!r}")
    return value


def _generator(value: Any) -> Optional[torch.Generator]:
    if value is None:
        return None
    if not isinstance(value, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(value).__name__} {value!r}")
    if value.device.type != "cpu":  # seeds and shuffles are drawn on the CPU, as DataLoader's are
        raise ValueError(f"generator must be a CPU torch.Generator, got one on {value.device}")
    return value


def _seed(value: Any) -> Optional[int]:
    if value is None:
        return None
    low, high = SEED_RANGE
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"seed must be an int with {low} <= seed < 2**64, or None (then from generator= or "
                        f"torch's RNG), got {type(value).__name__} {value!r}")
    value = int(value)
    if not low <= value < high:
        raise ValueError(f"seed must be an int with {low} <= seed < 2**64, got {value}")
    return value


def _pin_memory_device(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"pin_memory_device must be a device string such as 'cuda' or '', got "
                        f"{type(value).__name__} {value!r}")
    if value:
        try:
            torch.device(value)
        except RuntimeError as exc:
            raise ValueError(f"pin_memory_device {value!r} is not a device: {exc}") from None
    return value


def _in_order(value: Any) -> bool:
    value = _bool("in_order", value)
    if not value:
        raise ValueError("in_order=False is not supported: AdaptiveLoader matches each batch to its indices in "
                         "the order it dispatched them (to deliver every sample once, and to resume)")
    return value
