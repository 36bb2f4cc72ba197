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
           "live_iterator", "iterator_pins", "new_shared_storage", "new_fd_storage", "share_fd", "messages",
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


# UntypedStorage._new_using_fd_cpu(nbytes) / ._share_fd_cpu_(): a storage on an unlinked shm file and
# its fd. Checked: 2.1, 2.4, 2.13, 2.14 (2.4 does not fallocate it).

def new_fd_storage(nbytes: int) -> torch.UntypedStorage:
    return torch.UntypedStorage._new_using_fd_cpu(nbytes)


def share_fd(storage: torch.UntypedStorage) -> Tuple[int, int]:
    return storage._share_fd_cpu_()


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
