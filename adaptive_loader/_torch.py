"""Every private torch name and every matched torch message, in one place.

Nothing else in the package imports a private torch module or reads a private
attribute of a torch object (``tests/test_layering.py`` checks it). Each entry
says which torch releases it was checked on and what happens where it is
missing. The CI's version matrix (``.ci/matrix``) runs the core suite on the
oldest and the newest torch we claim, so a change in any of these shows there.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, List, Optional, Tuple

import torch

# -- collate -------------------------------------------------------------------------------
# torch.utils.data._utils.collate: ``collate``, ``collate_tensor_fn`` and ``default_collate_fn_map``
# are the documented way to extend default_collate (the docs of torch.utils.data name them), but
# they live in a private module. Checked: 2.1, 2.4, 2.13, 2.14.
from torch.utils.data._utils.collate import collate, collate_tensor_fn, default_collate_fn_map  # noqa: E402

# -- pinning ---------------------------------------------------------------------------------
# torch.utils.data._utils.pin_memory.pin_memory(data, device=None): what the pin thread calls on a
# batch. Checked: 2.1, 2.4, 2.13, 2.14 (the ``device`` argument exists on all of them).
from torch.utils.data._utils.pin_memory import pin_memory  # noqa: E402
from torch.utils.data._utils import signal_handling as _signal_handling  # noqa: E402
from torch.utils.data._utils import worker as _worker  # noqa: E402

__all__ = ["collate", "collate_tensor_fn", "default_collate_fn_map", "pin_memory", "hidden_worker_info",
           "watch_workers", "unwatch_workers", "detach_sigchld_watch", "iterator_workers", "shutdown_workers",
           "tell_workers_to_exit",
           "live_iterator", "iterator_pins", "disarm_half_built_iterator", "new_shared_storage", "messages",
           "worker_raised"]


@contextlib.contextmanager
def hidden_worker_info() -> Iterator[None]:
    """Run code in a worker as if in the main process.

    ``default_collate`` stacks straight into fresh shm when
    ``torch.utils.data._utils.worker._worker_info`` is set (it asks
    ``get_worker_info()``); hiding it for the duration makes it allocate
    ordinary memory. Checked: 2.1, 2.4, 2.13, 2.14.
    """
    saved = _worker._worker_info
    _worker._worker_info = None
    try:
        yield
    finally:
        _worker._worker_info = saved


# -- the multi-process iterator ------------------------------------------------------------------
# _MultiProcessingDataLoaderIter: ``_workers`` (the worker processes), ``_shutdown_workers()``,
# ``_pin_memory``, ``_worker_pids_set``; DataLoader: ``_iterator`` (the persistent one).
# Checked: 2.1, 2.4, 2.13, 2.14. Each accessor falls back to "no workers" where a name is missing.

def iterator_workers(iterator: Any) -> List[Any]:
    """The iterator's worker processes (empty without workers)."""
    return list(getattr(iterator, "_workers", None) or [])


def shutdown_workers(iterator: Any) -> None:
    """Stop the iterator's workers now (DataLoader does it when the iterator is collected)."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def tell_workers_to_exit(iterator: Any) -> bool:
    """Ask the iterator's workers to exit, as ``_shutdown_workers`` does first (the done event, then a
    None on each active worker's index queue), without joining them: :func:`shutdown_workers` later
    finds them gone. False (nothing done) with a pinning thread, once shut down, or where a name is
    missing. Checked: 2.1, 2.13, 2.14 (tests/test_lifecycle.py on the matrix's legs)."""
    done = getattr(iterator, "_workers_done_event", None)
    status = getattr(iterator, "_workers_status", None)
    mark = getattr(iterator, "_mark_worker_as_unavailable", None)
    if done is None or status is None or mark is None or getattr(iterator, "_shutdown", True) \
            or getattr(iterator, "_pin_memory_thread", None) is not None:
        return False
    done.set()  # before the None: a worker asserts it is set when the None arrives
    for worker_id, active in enumerate(status):
        if active:
            mark(worker_id, shutdown=True)
    return True


def disarm_half_built_iterator(exc: BaseException) -> None:
    """An iterator whose ``__init__`` raised before it set ``_shutdown`` (its result queue could not
    get its semaphore: /dev/shm full) starts no worker, but its ``__del__`` prints an AttributeError
    traceback to stderr. Found in the traceback's frames and marked shut down, it goes quietly.
    Checked: 2.1, 2.4, 2.13, 2.14 (``_shutdown`` is set right after the result queue is made)."""
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "__init__":
            half_built = frame.f_locals.get("self")
            if type(half_built).__name__ == "_MultiProcessingDataLoaderIter" and not hasattr(half_built,
                                                                                             "_shutdown"):
                half_built._shutdown = True
        tb = tb.tb_next


def live_iterator(dataloader: Any) -> Any:
    """The iterator a DataLoader keeps for persistent workers, or None."""
    return getattr(dataloader, "_iterator", None)


def iterator_pins(iterator: Any) -> bool:
    """Whether the iterator really pins (torch turns pinning off without an accelerator)."""
    return bool(getattr(iterator, "_pin_memory", False))


# -- SIGCHLD ----------------------------------------------------------------------------------------
# torch.utils.data._utils.signal_handling._set_worker_pids / _remove_worker_pids: the registry that
# makes torch's SIGCHLD handler raise in the main thread when a worker dies. Checked: 2.1, 2.4, 2.13, 2.14.

def detach_sigchld_watch(iterator: Any) -> None:
    """Unregister the iterator's workers from torch's SIGCHLD watch: it raises in whatever
    main-thread code runs when a worker dies, e.g. in the middle of a training step."""
    if getattr(iterator, "_worker_pids_set", False):
        _signal_handling._remove_worker_pids(id(iterator))
        iterator._worker_pids_set = False


def watch_workers(iterator: Any, pids: Tuple[int, ...]) -> None:
    _signal_handling._set_worker_pids(id(iterator), pids)


def unwatch_workers(iterator: Any) -> None:
    _signal_handling._remove_worker_pids(id(iterator))


# -- storages -----------------------------------------------------------------------------------------
# UntypedStorage._new_shared(nbytes): a storage in fresh shm under the current sharing strategy
# (file_descriptor: shm_open + unlink; file_system: a named file torch_shm_manager cleans up).
# Checked: 2.1, 2.4, 2.13, 2.14. torch 2.13 reserves it with posix_fallocate; 2.4 does not.

def new_shared_storage(nbytes: int) -> torch.UntypedStorage:
    return torch.UntypedStorage._new_shared(nbytes)


# -- messages ---------------------------------------------------------------------------------------------
class messages:
    """Texts of torch's errors that the loader tells apart. Checked: 2.1, 2.4, 2.13, 2.14."""

    WORKER_RAISED = "Caught "  # "Caught ValueError in DataLoader worker process 0." (ExceptionWrapper)
    PIN_THREAD = "pin memory thread"  # "Caught X in pin memory thread for device 0."
    TIMED_OUT = "DataLoader timed out after"
    WORKER_EXITED = ("exited unexpectedly", "is killed by signal")
    FDS = ("Too many open files", "ancdata")  # EMFILE, and "received 0 items of ancdata"
    # what torch's shm allocator says when shm or fds run out (MapAllocator, storage sharing)
    RESOURCE = ("shared memory", "No space left", "Too many open files", "unable to write to file",
                "unable to mmap", "unable to open shared memory", "error 28", "error 24")

    @classmethod
    def any_of(cls, text: str, markers: Tuple[str, ...]) -> bool:
        return any(marker in text for marker in markers)


def worker_raised(text: str) -> Optional[str]:
    """``"worker"`` or ``"pin"`` if ``text`` is torch's wrapper of an exception raised in a
    worker (the user's code) or in the pin thread; else None."""
    if not text.startswith(messages.WORKER_RAISED):
        return None
    return "pin" if messages.PIN_THREAD in text else "worker"


# -- the worker-count warning ----------------------------------------------------------------------
# DataLoader.check_worker_number_rationality(self) reads only ``self.num_workers`` and warns "This
# DataLoader will create N worker processes in total. ... excessive worker creation ..." when N exceeds
# the CPUs this process may use. It is public but bound to a DataLoader; called here on a stand-in
# holding num_workers alone. Checked: 2.1, 2.4, 2.13 (2.1 counts os.sched_getaffinity itself, 2.13 via
# torch._utils.cpu_count; both read nothing else). Where it is missing, no warning.
WORKER_NUMBER_WARNING = r"This DataLoader will create \d+ worker processes in total"


def worker_number_warning(num_workers: int) -> Optional[str]:
    """The text of torch's over-subscription warning for ``num_workers``, or None if it would not warn."""
    import types
    import warnings

    from torch.utils.data import DataLoader

    check = getattr(DataLoader, "check_worker_number_rationality", None)
    if check is None:
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check(types.SimpleNamespace(num_workers=num_workers))
    return next((str(w.message) for w in caught if issubclass(w.category, UserWarning)), None)


@contextlib.contextmanager
def quiet_worker_number_warning() -> Iterator[None]:
    """Silence torch's over-subscription warning, e.g. from a DataLoader built inside the loader, which
    warns at its construction and at each iterator; the loader gives it once, at its own construction."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=WORKER_NUMBER_WARNING, category=UserWarning)
        yield


__all__ += ["WORKER_NUMBER_WARNING", "worker_number_warning", "quiet_worker_number_warning"]


# -- tensor kinds the transport rebuilds ----------------------------------------------------------------
# Tensor._indices() / ._values(): a sparse COO tensor's parts, coalesced or not (the public indices() /
# values() refuse an uncoalesced tensor). torch._utils._get_obj_state / _set_obj_state: the Python state
# of a tensor subclass (its __dict__ and slots) exactly as torch's own pickling saves and restores it
# (_rebuild_from_type_v2). Checked: 2.13 (the one installed here). Where the state helpers are missing:
# __dict__ alone.

def coo_parts(tensor: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A sparse COO tensor's indices and values, coalesced or not."""
    return tensor._indices(), tensor._values()


def tensor_state(tensor: torch.Tensor) -> Any:
    """What pickling saves of a tensor subclass besides its data."""
    import torch._utils as utils

    get = getattr(utils, "_get_obj_state", None)
    return get(tensor) if get is not None else dict(getattr(tensor, "__dict__", {}))


def restore_tensor_state(tensor: torch.Tensor, state: Any) -> torch.Tensor:
    """``tensor`` with the state :func:`tensor_state` took, as torch's unpickling restores it."""
    import torch._utils as utils

    if type(tensor).__setstate__ is not torch.Tensor.__setstate__:
        tensor.__setstate__(state)
        return tensor
    put = getattr(utils, "_set_obj_state", None)
    if put is not None:
        return put(tensor, state)
    for name, value in (state or {}).items():
        setattr(tensor, name, value)
    return tensor


__all__ += ["coo_parts", "tensor_state", "restore_tensor_state"]


# -- device memory (the step guard) ----------------------------------------------------------------
# torch.OutOfMemoryError, the device-generic class (pytorch#121702, torch 2.5 on; checked 2.13, where
# torch.cuda.OutOfMemoryError is the same class); torch.cuda.OutOfMemoryError alone before that (checked
# 2.1, 2.4). The CPU allocator raises a plain RuntimeError "DefaultCPUAllocator: can't allocate memory"
# (c10/core/impl/alloc_cpu.cpp; checked 2.1, 2.4, 2.13); MPS and XPU raised RuntimeErrors with the texts
# below before they used OutOfMemoryError. torch.accelerator's memory functions (max_memory_allocated,
# reset_peak_memory_stats, empty_cache, get_memory_info) are checked on 2.13 and missing on 2.1 and 2.4:
# there torch.cuda's are used, and without an accelerator nothing is measured.
OOM_TEXTS = ("DefaultCPUAllocator: can't allocate memory", "CUDA out of memory", "MPS backend out of memory",
             "XPU out of memory")


def oom_error_types() -> Tuple[type, ...]:
    """The exception classes torch raises when a device runs out of memory."""
    types = [getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)]
    return tuple(dict.fromkeys(t for t in types if isinstance(t, type)))


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocator's out-of-memory error (an accelerator's, or the CPU's)."""
    if isinstance(exc, oom_error_types()):
        return True
    return isinstance(exc, RuntimeError) and messages.any_of(str(exc), OOM_TEXTS)


def _accelerator_memory(name: str) -> Any:
    """``torch.accelerator.<name>`` where torch has it and an accelerator is there, else None."""
    accelerator = getattr(torch, "accelerator", None)
    function = getattr(accelerator, name, None)
    if function is None or not accelerator.is_available():
        return None
    return function


def device_in_use() -> bool:
    """Whether an accelerator whose memory can be measured is present."""
    return _accelerator_memory("max_memory_allocated") is not None or torch.cuda.is_available()


def empty_device_cache() -> None:
    """Give the caching allocator's unused blocks back to the device (nothing without one)."""
    function = _accelerator_memory("empty_cache")
    if function is not None:
        function()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_peak_bytes() -> Optional[int]:
    """Peak bytes allocated on the current accelerator since the last reset, or None."""
    function = _accelerator_memory("max_memory_allocated")
    if function is not None:
        return int(function())
    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def reset_device_peak() -> None:
    function = _accelerator_memory("reset_peak_memory_stats")
    if function is not None:
        function()
    elif torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def device_memory_bytes() -> Optional[int]:
    """Bytes this process may use on the current accelerator: its free memory plus what the
    caching allocator holds, within ``set_per_process_memory_fraction`` on CUDA; None without one."""
    function = _accelerator_memory("get_memory_info")
    if function is not None:
        free, total = function()
    elif torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
    else:
        return None
    usable = free
    if torch.cuda.is_available():
        usable += torch.cuda.memory_reserved()
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        if fraction is not None:
            usable = min(usable, int(fraction() * total))
    return int(min(usable, total))


__all__ += ["OOM_TEXTS", "oom_error_types", "is_out_of_memory", "device_in_use", "empty_device_cache",
            "device_peak_bytes", "reset_device_peak", "device_memory_bytes"]


# -- layouts ------------------------------------------------------------------------------------------
# torch.jagged (the layout of nested tensors built with layout=torch.jagged) is missing from torch 2.1;
# the others here exist on every torch we claim. Checked: 2.1.2 (no jagged), 2.13, 2.14.1 (jagged).

JAGGED = getattr(torch, "jagged", None)  # None on torch 2.1, where no nested tensor has this layout


def tensor_layouts() -> dict:
    """``str(layout) -> layout`` for the dense and sparse layouts, and jagged where this torch has it."""
    names = ("strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc", "jagged")
    found = (getattr(torch, name, None) for name in names)
    return {str(layout): layout for layout in found if isinstance(layout, torch.layout)}


# -- the worker processes --------------------------------------------------------------------------------
# Only torch >= 2.5 names a DataLoader worker process "pt_data_worker" (pytorch#128448); 2.1-2.4 leave the
# parent's name, and CPython drops a started Process's target. So the workers are found where torch keeps
# them: ``_workers`` of each live _MultiProcessingDataLoaderIter. Checked: 2.1.2, 2.13, 2.14.1.

def dataloader_worker_pids() -> List[int]:
    """Pids of this process's live DataLoader worker processes, of any iterator (for tests and the
    stress harness: it walks every object the garbage collector tracks)."""
    import gc

    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

    # type(), not isinstance(): that reads __class__, which some lazy objects warn on
    iterators = [obj for obj in gc.get_objects() if issubclass(type(obj), _MultiProcessingDataLoaderIter)]
    return [w.pid for it in iterators for w in iterator_workers(it) if w.pid is not None and w.is_alive()]


__all__ += ["JAGGED", "tensor_layouts", "dataloader_worker_pids"]
