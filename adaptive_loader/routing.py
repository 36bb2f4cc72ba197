"""The workers' rules: which road a batch takes, when an arena grows, when fds are short.

Decide layer: pure functions of plain numbers, no I/O. The main process builds
one :class:`WorkerRules` and hands it to ``MeasuredCollate(rules=...)``; the
workers only call it (transport does not import this module).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .controller import arena_batches_needed, arena_capacity

__all__ = ["WorkerRules", "UNBOUNDED", "GROW_WHEN_WANTED_OVER", "FD_HEADROOM_FACTOR", "FD_SHARE",
           "FDS_REREAD_EVERY"]

GROW_WHEN_WANTED_OVER = 1.2  # a new arena only when the wanted one is this much bigger: else not worth it
FD_HEADROOM_FACTOR = 8  # a batch's fds count this many times over: the main process and the feeder need theirs
FD_SHARE = 0.5  # a worker's fds in use, with the headroom, stay under this fraction of the soft limit
FDS_REREAD_EVERY = 16  # batches between readings of /proc/self/fd in a worker
UNBOUNDED = 1 << 62  # bytes: no bound from /dev/shm


@dataclass(frozen=True)
class WorkerRules:
    """The rules a worker follows for each batch.

    Args:
        keep_free: bytes of ``/dev/shm`` never to fill from the workers (room for others).
        batches_in_flight: batches a worker may have made and not yet seen delivered.
        workers: workers sharing the room for arenas.
        memory_room: bytes all of the loader's memfd arenas together may reserve (the main
            process's usable memory: a safety fraction of the smallest of what is available and
            ``memory_budget``); ``UNBOUNDED`` when nothing bounds it.
    """

    keep_free: int = 0
    batches_in_flight: int = 2
    workers: int = 1
    memory_room: int = UNBOUNDED

    def __post_init__(self) -> None:
        for name in ("keep_free", "batches_in_flight", "workers", "memory_room"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if self.keep_free < 0 or self.memory_room < 0:
            raise ValueError(f"keep_free and memory_room must be >= 0 bytes, got {self.keep_free} and "
                             f"{self.memory_room}")
        if self.batches_in_flight < 1 or self.workers < 1:
            raise ValueError(f"batches_in_flight and workers must be >= 1, got {self.batches_in_flight} "
                             f"and {self.workers}")

    def off_shm(self, needed: int, shm_free: int, kind: str = "shm") -> Optional[str]:
        """Why a batch of ``needed`` bytes must not go into a new block of ``kind`` now, or None if
        it may. A memfd is not bounded by ``/dev/shm``: only a ``"shm"`` block must fit there."""
        if kind == "shm" and needed > shm_free - self.keep_free:
            return f"batch needs {needed} B, shm has {shm_free} B free, {self.keep_free} B kept free"
        return None

    def arena_room(self, shm_free: int, kind: str = "shm", reserved: int = 0) -> int:
        """Bytes the workers' arenas of ``kind`` may still take: for ``"shm"`` what ``/dev/shm`` has
        above the safety line (its free space already lacks what arenas ``reserved``); a memfd is
        not in ``/dev/shm``: it is bounded by ``memory_room``, less what the arenas ``reserved``."""
        if kind == "shm":
            return shm_free - self.keep_free
        return max(0, self.memory_room - reserved)

    def arena_wanted(self, batch_bytes: int, room: int, reserved: int) -> int:
        """Bytes a worker's arena should have for batches of ``batch_bytes`` (0: none), given the
        ``room`` left and what all workers' arenas already ``reserved``."""
        return arena_capacity(batch_bytes, self.batches_in_flight, room + reserved, self.workers)

    def keep_arena(self, wanted: int, current: int) -> bool:
        """Whether an arena of ``current`` bytes is good enough when ``wanted`` would be better."""
        return current > 0 and wanted < GROW_WHEN_WANTED_OVER * current

    def arena_tight(self, current: int, batch_bytes: int) -> bool:
        """Whether an arena of ``current`` bytes is too small for the batches in flight and held:
        the main process then caps the budget until it is replaced."""
        return current < arena_batches_needed(self.batches_in_flight, self.workers) * batch_bytes

    def fds_to_spare(self, fds_in_use: int, fd_soft_limit: int, handles: int) -> bool:
        """Whether a worker with ``fds_in_use`` may send a batch that carries ``handles`` fds."""
        return fds_in_use + FD_HEADROOM_FACTOR * handles < fd_soft_limit * FD_SHARE

    def read_fds_now(self, batches_made: int) -> bool:
        """Whether to list this worker's fds again before its ``batches_made``-th batch."""
        return batches_made % FDS_REREAD_EVERY == 0
