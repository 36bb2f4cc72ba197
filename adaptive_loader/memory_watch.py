"""Memory read between batches: a thread that samples what is left under a memory limit.

Reading memory only when a batch arrives misses the job's fullest moments: the training step
between two batches, and a worker's heap while the main process waits. The kernel's OOM killer
does not miss them. So under a memory cgroup's limit a thread reads what is left every
``WATCH_SECONDS`` and keeps the least of the last seconds (:class:`RecentLow`), which the budget then
counts on.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable, Deque, Optional, Tuple

__all__ = ["MemoryWatch", "RecentLow", "WATCH_SECONDS", "RECENT_LOW_SECONDS"]

WATCH_SECONDS = 0.05  # a reading costs ~0.2 ms: 0.4 % of a core
RECENT_LOW_SECONDS = 5.0  # how long a moment of little memory left holds the budget down


class RecentLow:
    """The least of the readings of the last ``seconds`` (memory left, under a limit). Workers' heaps
    and batches come and go: a budget raised in a dip between them meets the next peak, which the
    kernel's OOM killer answers. So the budget counts on what was left at the fullest moment lately:
    it still drops at once, and rises only when the room has lasted."""

    def __init__(self, seconds: float = RECENT_LOW_SECONDS) -> None:
        self.seconds = seconds
        self._readings: Deque[Tuple[float, int]] = deque()

    def add(self, now: float, value: Optional[int]) -> None:
        if value is None:
            return
        self._readings.append((now, value))
        while self._readings and self._readings[0][0] < now - self.seconds:
            self._readings.popleft()

    def low(self, current: Optional[int]) -> Optional[int]:
        """The least reading lately, never above ``current`` (None: nothing is known)."""
        if current is None:
            return None
        return min([current] + [value for _, value in self._readings])

    def clear(self) -> None:
        self._readings.clear()


class MemoryWatch:
    """The least memory left lately, fed by the loader's own readings and, once :meth:`start`
    is called, by a daemon thread of its own. ``read`` returns the bytes left (None: unknown)."""

    def __init__(self, read: Callable[[], Optional[int]], interval: float = WATCH_SECONDS) -> None:
        self._read = read
        self.interval = interval
        self._lows = RecentLow()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def watching(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def add(self, now: float, available: Optional[int]) -> None:
        with self._lock:
            self._lows.add(now, available)

    def low(self, current: Optional[int]) -> Optional[int]:
        """The least left lately, never above ``current``."""
        with self._lock:
            return self._lows.low(current)

    def forget(self) -> None:
        """Drop the readings so far: they were taken with processes that are gone (an OOM-killed worker)."""
        with self._lock:
            self._lows.clear()

    def start(self) -> None:
        """Read in a thread from now on, until :meth:`stop` (idempotent)."""
        if self.watching:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="adaptive-loader-memory-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=1.0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                available = self._read()
            except Exception:  # a reading that fails (e.g. a cgroup file gone at exit) is no reading
                continue
            self.add(time.monotonic(), available)
