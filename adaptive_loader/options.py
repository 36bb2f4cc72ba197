"""Construction-time checks of AdaptiveLoader's arguments: one module, one job.

DataLoader's arguments are checked as ``torch.utils.data.DataLoader`` checks them: the
same exception type, and where DataLoader refuses the same input, a message that starts
with DataLoader's own words (code and tests match on them) and goes on with ours, which
says what to pass. What DataLoader would only trip over later (``timeout=nan``, a bogus
``generator``) is refused here too, and so are bad values of AdaptiveLoader's own
settings (``safety``, ``spill_dir``, ``arena``, ...). Nothing here starts a process.
"""

from __future__ import annotations

import inspect
import math
import multiprocessing
import numbers
import os
import warnings
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.multiprocessing
from torch.utils.data import BatchSampler, DataLoader, IterableDataset

from . import _torch
from .region import MEMFD, SHM, memfd_available
from .sampler import BudgetBatchSampler

__all__ = ["SEED_RANGE", "check_arena", "check_dataloader_options", "check_keywords", "check_sampling",
           "check_settings", "check_spill_dir", "refuse_batch_sampler_as_sampler", "shuffle_seed",
           "warn_worker_number"]

SEED_RANGE = (0, 2**64)  # seed= is an int with 0 <= seed < 2**64, what torch.Generator.manual_seed takes unsigned

#: DataLoader's keywords for how indices are drawn: checked by :func:`check_sampling`, never passed on
SAMPLING = ("batch_size", "sampler", "batch_sampler")
#: DataLoader's keywords that AdaptiveLoader passes on (checked by :func:`check_dataloader_options`);
#: the others are parameters of its own (``shuffle``, ``num_workers``, ...) or :data:`SAMPLING`
PASSED_ON = frozenset(inspect.signature(DataLoader.__init__).parameters) - {
    "self", "dataset", "shuffle", "num_workers", "collate_fn", "drop_last", *SAMPLING}

_INSTEAD = ("pass costs=, max_cost=, max_batch_size= and shuffle= (group_ids= for batches that must not mix "
            "groups). AdaptiveLoader.wrap(dataloader) converts a DataLoader's SequentialSampler, RandomSampler or "
            "BatchSampler")
_MAP_STYLE = "AdaptiveLoader needs a map-style dataset with __len__ and __getitem__, or an IterableDataset"
_STREAM = ("a stream (IterableDataset) shuffles itself: shuffle its shards and samples in the dataset, "
           "seeded so that a worker started again reads the same (e.g. WebDataset's shardshuffle and "
           "shuffle with seed=; see docs/streams.md)")


def _dataloader_says(theirs: str, ours: str) -> str:
    """DataLoader's message for the same refusal, verbatim, then ours."""
    return f"{theirs} {ours}" if theirs.endswith(".") else f"{theirs}. {ours}"


def _takes_none(key: str) -> str:
    return f"AdaptiveLoader takes no {key}= at all: it plans its own batches; {_INSTEAD}"


# -- DataLoader's arguments --------------------------------------------------------------------

def check_keywords(kwargs: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Split the keywords AdaptiveLoader has no parameter of its own for: DataLoader's sampling
    keywords (``batch_size``, ``sampler``, ``batch_sampler``: for :func:`check_sampling`) and the
    options passed on (for :func:`check_dataloader_options`). A keyword DataLoader does not take
    is a TypeError now, not at the first batch."""
    unknown = sorted(set(kwargs) - PASSED_ON - set(SAMPLING))
    if unknown:
        raise TypeError(f"unknown keyword(s) {', '.join(unknown)}: AdaptiveLoader passes on these DataLoader "
                        f"keywords: {', '.join(sorted(PASSED_ON))}")
    sampling = {key: kwargs[key] for key in SAMPLING if key in kwargs}
    return sampling, {key: value for key, value in kwargs.items() if key not in sampling}


def check_sampling(dataset: Any, max_batch_size: Any, shuffle: Any, drop_last: Any,
                   sampling: Dict[str, Any]) -> Any:
    """Check the dataset and how it is sampled as DataLoader does (its checks, in its order, its
    words first), then refuse what AdaptiveLoader plans itself (``sampler=``, ``batch_sampler=``).
    Returns ``max_batch_size``, or ``batch_size=`` (DataLoader's spelling) where that is not given;
    ``batch_size=None`` is the same as leaving it out."""
    sampler, batch_sampler = sampling.get("sampler"), sampling.get("batch_sampler")
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        _check_iterable(dataset, shuffle, sampler, batch_sampler)
    if sampler is not None and shuffle:
        raise ValueError(_dataloader_says("sampler option is mutually exclusive with shuffle",
                                          _takes_none("sampler")))
    if batch_sampler is not None:
        if sampling.get("batch_size", 1) != 1 or shuffle or sampler is not None or drop_last:
            raise ValueError(_dataloader_says(
                "batch_sampler option is mutually exclusive with batch_size, shuffle, sampler, and drop_last",
                _takes_none("batch_sampler")))
    elif "batch_size" in sampling and sampling["batch_size"] is None and drop_last:
        raise ValueError(_dataloader_says(
            "batch_size=None option disables auto-batching and is mutually exclusive with drop_last",
            "AdaptiveLoader always batches, and batch_size=None is the same as leaving batch_size out: leave it "
            "out (or give max_batch_size=) to use drop_last=True"))
    if sampler is not None:
        refuse_batch_sampler_as_sampler(sampler)
    for key in ("sampler", "batch_sampler"):
        if sampling.get(key) is not None:
            raise ValueError(f"AdaptiveLoader builds its own batch sampler; {key}= cannot be passed: {_INSTEAD}")
    return _batch_size_alias(max_batch_size, sampling)


def refuse_batch_sampler_as_sampler(sampler: Any) -> None:
    """The trap DataLoader springs silently: a batch sampler passed as ``sampler=``."""
    if isinstance(sampler, (BatchSampler, BudgetBatchSampler)):
        raise ValueError(
            f"a batch sampler ({type(sampler).__name__}) was passed as sampler=: DataLoader then treats each "
            f"list of indices as one sample and yields batches of one. Pass it as batch_sampler=, or give "
            f"AdaptiveLoader costs= and max_cost= instead")


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
        raise ValueError(_dataloader_says(
            "num_workers option should be non-negative; use num_workers=0 to disable multiprocessing.",
            f"num_workers must be an int >= 0 (0: load in the main process), got {num_workers}"))
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


# -- AdaptiveLoader's own settings -------------------------------------------------------------

def check_settings(*, safety: Any, stall_timeout: Any, max_restarts: Any, sync_every: Any,
                   min_batch_size: Any) -> None:
    """AdaptiveLoader's numeric settings; a ValueError naming the first bad one."""
    _fraction("safety", safety)
    _positive("stall_timeout", stall_timeout)
    _int_at_least("max_restarts", max_restarts, 0)
    _int_at_least("sync_every", sync_every, 1)
    _int_at_least("min_batch_size", min_batch_size, 1)


def check_spill_dir(path: Any) -> str:
    """``spill_dir`` as a str: a writable directory."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"spill_dir must be a path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isdir(path) or not os.access(path, os.W_OK):
        raise ValueError(f"spill_dir {path!r} is not a writable directory; batches that cannot go through "
                         f"shared memory are written there")
    return path


def check_arena(arena: Any) -> Any:
    """``False``, or the kind of region the arenas live in (``True``: a memfd where there are memfds)."""
    if arena is True:
        return MEMFD if memfd_available() else SHM
    if arena is False:
        return False
    if arena == MEMFD and not memfd_available():
        raise ValueError("arena='memfd' needs os.memfd_create (Linux >= 3.17, Python >= 3.8); use arena='shm'")
    if arena in (MEMFD, SHM):
        return arena
    raise ValueError(f"arena must be True, False, 'memfd' or 'shm', got {arena!r}")


# -- one check per argument -----------------------------------------------------------------

def _check_iterable(dataset: Any, shuffle: Any, sampler: Any, batch_sampler: Any) -> None:
    """A stream takes no shuffle, sampler or batch sampler (DataLoader's ValueError, in its order);
    a dataset that is neither a stream nor has ``__len__`` is a TypeError."""
    if isinstance(dataset, IterableDataset):
        if shuffle not in (False, None):
            raise ValueError(_dataloader_says(f"DataLoader with IterableDataset: expected unspecified shuffle "
                                              f"option, but got shuffle={shuffle}", _STREAM))
        if sampler is not None:
            raise ValueError(_dataloader_says(f"DataLoader with IterableDataset: expected unspecified sampler "
                                              f"option, but got sampler={sampler}", _STREAM))
        if batch_sampler is not None:
            raise ValueError(_dataloader_says(f"DataLoader with IterableDataset: expected unspecified "
                                              f"batch_sampler option, but got batch_sampler={batch_sampler}",
                                              _STREAM))
        return
    raise TypeError(f"{_MAP_STYLE} (a subclass of torch.utils.data.IterableDataset), got "
                    f"{type(dataset).__name__}, which has no __len__")


def _batch_size_alias(max_batch_size: Any, sampling: Dict[str, Any]) -> Any:
    batch_size = sampling.get("batch_size")
    if max_batch_size is not None and batch_size is not None and batch_size != max_batch_size:
        raise ValueError(f"batch_size={batch_size} and max_batch_size={max_batch_size} disagree; give one")
    return max_batch_size if max_batch_size is not None else batch_size


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
        # DataLoader's words verbatim, its missing space after the full stop included
        raise ValueError(_dataloader_says(
            "prefetch_factor option could only be specified in multiprocessing.let num_workers > 0 to enable "
            "multiprocessing, otherwise set prefetch_factor to None.",
            f"prefetch_factor={value} needs num_workers > 0: without workers nothing is prefetched; leave "
            f"prefetch_factor=None"))
    if value < 1:  # DataLoader refuses < 0 only, and with 0 its workers never get an index
        ours = f"prefetch_factor must be an int >= 1 (batches in flight per worker), got {value}"
        raise ValueError(_dataloader_says("prefetch_factor option should be non-negative", ours) if value < 0
                         else ours)
    return value


def _persistent_workers(value: Any, num_workers: int) -> bool:
    value = _bool("persistent_workers", value)
    if value and num_workers == 0:
        raise ValueError(_dataloader_says("persistent_workers option needs num_workers > 0",
                                          "persistent_workers=True keeps the worker processes across epochs; "
                                          "num_workers=0 starts none"))
    return value


def _timeout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"timeout must be a number >= 0 (seconds; 0: no timeout), got {type(value).__name__} "
                        f"{value!r}")
    value = float(value)
    ours = f"timeout must be a number >= 0 (seconds; 0: no timeout), got {value!r}"
    if value < 0:
        raise ValueError(_dataloader_says("timeout option should be non-negative", ours))
    if math.isnan(value) or math.isinf(value):  # DataLoader takes them: NaN never times out, inf overflows a wait
        raise ValueError(ours)
    return value


def _callable_or_none(name: str, value: Any) -> Any:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable or None, got {type(value).__name__} {value!r}")
    return value


def _context(value: Any, num_workers: int) -> Any:
    if value is None:
        return None
    if num_workers == 0:  # DataLoader's words
        raise ValueError(f"multiprocessing_context can only be used with multi-process loading (num_workers > 0), "
                         f"but got num_workers={num_workers}")
    if isinstance(value, str):
        methods = torch.multiprocessing.get_all_start_methods()
        if value not in methods:
            raise ValueError(_dataloader_says(
                f"multiprocessing_context option should specify a valid start method in {methods!r}, but got "
                f"multiprocessing_context={value!r}", "A context from multiprocessing.get_context() will do too"))
        return torch.multiprocessing.get_context(value)
    if not isinstance(value, multiprocessing.context.BaseContext):
        raise TypeError(_dataloader_says(
            f"multiprocessing_context option should be a valid context object or a string specifying the start "
            f"method, but got multiprocessing_context={value}",
            f"Got a value of type {type(value).__name__}: pass a start method's name such as 'spawn', or "
            f"multiprocessing.get_context('spawn')"))
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


def _fraction(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or math.isnan(value):
        raise ValueError(f"{name} must be a number > 0, got {value!r}")


def _int_at_least(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
