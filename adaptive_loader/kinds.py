"""The kinds the package speaks of, each defined once: roads, events, fallbacks, failure causes.

They are ``str`` enums: a record or a message holds the plain string
(``Road.ARENA == "arena"``, ``json.dumps`` writes ``"arena"``), and the
dashboard, the report and the docs read the lists from here.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["Road", "Event", "Fallback", "Cause"]


class _Kind(str, Enum):
    """A str enum that formats as its value on every Python (3.11 changed ``format`` of mixins)."""

    __str__ = str.__str__
    __format__ = str.__format__


class Road(_Kind):
    """The way a batch took from a worker to the main process."""

    MEMFD = "memfd"  # the worker's reusable ring in a memfd: no /dev/shm at all
    ARENA = "arena"  # the worker's reusable ring in /dev/shm
    SHM = "shm"  # one new /dev/shm block for the whole batch
    FILE = "file"  # written to a spill file on disk, its name through the pipe
    INLINE = "inline"  # num_workers=0: the batch never leaves the process


ARENA_ROADS = (Road.MEMFD, Road.ARENA)


class Fallback(_Kind):
    """Something the loader gave up to keep going; counted in ``AdaptiveLoader.fallbacks``."""

    OFF_SHM = "off_shm"  # a batch went through a spill file
    FEWER_IN_FLIGHT = "fewer_in_flight"  # fewer workers or a lower prefetch_factor
    FD_LIMIT = "fd_limit"  # the fd soft limit was raised
    SHARING_STRATEGY = "sharing_strategy"  # torch's sharing strategy switched to file_system
    RECOVERY = "recovery"  # the iterator was rebuilt after a failure
    IN_PROCESS = "in_process"  # workers could not start (no /dev/shm at all): loading in the main process
    SMALLER_BUFFER = "smaller_buffer"  # a stream's workers pack from one batch's samples, not a buffer read ahead


class Event(_Kind):
    """A telemetry event: a fallback, or one of these."""

    OFF_SHM = Fallback.OFF_SHM.value
    FEWER_IN_FLIGHT = Fallback.FEWER_IN_FLIGHT.value
    FD_LIMIT = Fallback.FD_LIMIT.value
    SHARING_STRATEGY = Fallback.SHARING_STRATEGY.value
    RECOVERY = Fallback.RECOVERY.value
    IN_PROCESS = Fallback.IN_PROCESS.value
    SMALLER_BUFFER = Fallback.SMALLER_BUFFER.value
    BUDGET = "budget"  # the cost budget moved
    DEPTH = "depth"  # the first batch was measured under memory_budget: the depth asked for comes back
    STALL = "stall"  # no batch for stall_timeout seconds
    EPOCH_END = "epoch_end"  # an epoch finished or was left
    RUN_END = "run_end"  # the loader was closed: no more records follow
    DEVICE_OOM = "device_oom"  # a training step ran out of device memory; its samples went back to the epoch
    RANKS_UNEVEN = "ranks_uneven"  # a stream's ranks ran dry at different batches: cut or padded (see uneven=)


class Cause(_Kind):
    """Why a batch did not arrive, as the loader classifies a failure it recovers from."""

    FDS = "fds"  # fds ran out while a batch was handed over
    WORKER_DIED = "worker_died"
    OOM_KILLED = "oom_killed"  # a worker died of SIGKILL and the memory cgroup counted an OOM kill
    TIMEOUT = "timeout"  # no batch within the poll interval (not yet a stall)
    WORKERS_NOT_STARTING = "workers_not_starting"
    NO_SHM_FOR_WORKERS = "no_shm_for_workers"  # not even multiprocessing's semaphores fit in /dev/shm
    LOST = "lost"  # a batch's hand-over broke with every worker alive and no sign of fd exhaustion
    CORRUPT_BATCH = "corrupt_batch"  # a batch's stamps did not match: refused, its samples dispatched again
