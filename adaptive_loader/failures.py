"""What went wrong when the DataLoader iterator raised, told by evidence.

An exception raised by the user's own code in a worker comes back wrapped
("Caught X in DataLoader worker process N") and is the user's: it is
re-raised and the epoch goes on. Everything else is a cause the loader
recovers from, and which one matters: a run out of fds switches torch's
sharing strategy (process-wide), a dead worker only rebuilds the iterator.
So the cause is read from evidence, in this order: a worker's exit status;
the EMFILE errno or torch's own fd messages; the fds the batches measurably
carry against the limit. A broken hand-over with none of these is ``LOST``:
rebuilt, with nothing switched.
"""

from __future__ import annotations

import errno
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

from . import _torch
from .arena import CorruptBatch
from .kinds import Cause

__all__ = ["Failure", "classify", "describe"]

_FD_ERRNOS = {errno.EMFILE, errno.ENFILE}
_NO_ROOM_ERRNOS = {errno.ENOSPC, errno.ENOMEM}
EXIT_WAIT_SECONDS = 1.0  # a worker whose pipe broke is given this long to show it exited


@dataclass(frozen=True)
class Failure:
    """``cause`` None: the user's own exception, to be re-raised."""

    cause: Optional[Cause]
    evidence: str


def classify(exc: BaseException, workers: List[Any], fd_pressure: Callable[[], Optional[str]],
             wait: float = EXIT_WAIT_SECONDS, starting: bool = False,
             oom_kills: Callable[[], Optional[str]] = lambda: None) -> Failure:
    """The failure ``exc`` (raised by the DataLoader iterator) reports.

    ``workers`` are the iterator's worker processes; ``fd_pressure`` returns a
    sentence when measured fds per batch put the fd limit in reach, else None;
    ``oom_kills`` a sentence when the memory cgroup's OOM kill count rose;
    ``starting``: the iterator (and its workers) was being made.
    """
    text, msg = str(exc), _torch.messages
    if isinstance(exc, CorruptBatch):
        return Failure(Cause.CORRUPT_BATCH, text.splitlines()[0] if text else "a batch's stamps did not match")
    if starting and isinstance(exc, OSError) and exc.errno in _NO_ROOM_ERRNOS:
        return Failure(Cause.NO_SHM_FOR_WORKERS, f"the workers could not start: {describe(exc)} (multiprocessing's "
                                                 f"queues need a few KiB of /dev/shm for their semaphores)")
    raised_in = _torch.worker_raised(text)
    if raised_in == "worker":
        return Failure(None, "raised by the dataset or collate_fn in a worker")
    if isinstance(exc, RuntimeError) and text.startswith(msg.TIMED_OUT):
        return Failure(Cause.TIMEOUT, text)
    if raised_in is None and msg.any_of(text, msg.WORKER_EXITED):
        return _died(_exits(workers, 0) or text, workers, oom_kills)
    if _fd_errno(exc) or msg.any_of(text, msg.FDS):
        return Failure(Cause.FDS, f"the fds ran out while a batch was handed over ({describe(exc)})")
    broken = isinstance(exc, (ConnectionError, EOFError)) or (
        raised_in == "pin" and ("Connection" in text or "EOFError" in text))
    if not broken:
        return Failure(None, "raised by the pin memory thread" if raised_in else "not a loader failure")
    exited = _exits(workers, wait)
    if exited:
        return _died(exited, workers, oom_kills)
    pressure = fd_pressure()
    if pressure:
        return Failure(Cause.FDS, pressure)
    return Failure(Cause.LOST, f"a batch's hand-over broke ({describe(exc)}) with every worker alive and the "
                               f"fds far from their limit")


def _died(evidence: str, workers: List[Any], oom_kills: Callable[[], Optional[str]]) -> Failure:
    """A dead worker; killed for memory when it died of SIGKILL and the OOM killer counted a kill."""
    killed = any(w.exitcode == -signal.SIGKILL for w in workers)
    oom = oom_kills() if killed else None
    if oom:
        return Failure(Cause.OOM_KILLED, f"{evidence}; {oom}")
    return Failure(Cause.WORKER_DIED, evidence)


def describe(exc: BaseException) -> str:
    """The exception's type and message: an EOFError's message alone is empty."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _fd_errno(exc: Optional[BaseException]) -> bool:
    seen = 0
    while exc is not None and seen < 8:  # the chain of causes
        if isinstance(exc, OSError) and exc.errno in _FD_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _exits(workers: List[Any], wait: float) -> str:
    """Which workers exited, with their status, waiting up to ``wait`` s for one to show."""
    deadline = time.monotonic() + wait
    while True:
        gone = [(i, w.exitcode) for i, w in enumerate(workers) if w.exitcode is not None]
        if gone or time.monotonic() >= deadline:
            return "; ".join(f"worker {i} exited with status {code}" + (
                f" (signal {-code})" if code < 0 else "") for i, code in gone)
        time.sleep(0.02)
