"""What a process takes in memory (measure.HeapMeter), and the thread that reads memory between batches."""

import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from adaptive_loader.measure import HeapMeter, anon_bytes, private_bytes
from adaptive_loader.memory_watch import MemoryWatch

MiB = 2**20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(anon_bytes() is None or private_bytes() is None,
                                reason="no /proc/self/statm or smaps_rollup: heaps are not measured here")


def test_the_heap_grows_with_what_the_process_allocates_and_shrinks_when_it_is_freed():
    # in a fresh process: in this one, earlier tests' freed memory may be reused without growing anything
    script = textwrap.dedent("""
        import numpy as np
        from adaptive_loader.measure import HeapMeter
        meter = HeapMeter()
        meter.mark(copies=False)
        block = np.ones(64 << 20, dtype=np.uint8)  # touched: resident
        grown = meter.growth()
        del block
        print(grown, meter.growth())
    """)
    grown, after = map(int, subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                                           text=True, cwd=REPO).stdout.split())
    assert 60 * MiB <= grown <= 80 * MiB
    assert after < 16 * MiB


def test_a_forked_child_counts_the_parents_pages_it_copies_on_write():
    inherited = np.ones(64 * MiB, dtype=np.uint8)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its anonymous pages do not grow when it writes inherited ones
        try:
            meter = HeapMeter()
            meter.mark()
            inherited[::4096] = 2  # one byte per page: every page copied
            os.write(write_end, str(meter.growth()).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    grown = int(os.read(read_end, 64))
    os.close(read_end)
    os.waitpid(pid, 0)
    assert grown >= 60 * MiB


def test_the_watch_keeps_the_least_memory_left_it_read_between_batches():
    readings = iter([500, 400, 100, 450] + [480] * 1000)
    watch = MemoryWatch(lambda: next(readings) * MiB, interval=0.005)
    watch.start()
    deadline = time.monotonic() + 5
    while watch.low(10**6 * MiB) != 100 * MiB and time.monotonic() < deadline:
        time.sleep(0.01)
    assert watch.low(10**6 * MiB) == 100 * MiB  # the dip it read, though no batch came then
    assert watch.low(50 * MiB) == 50 * MiB  # never above what the loader reads now
    watch.stop()
    assert not watch.watching
    assert not [t for t in threading.enumerate() if t.name == "adaptive-loader-memory-watch"]


def test_a_reading_that_fails_is_skipped():
    calls = []

    def read():
        calls.append(1)
        if len(calls) == 1:
            raise OSError("cgroup file gone")
        return 300 * MiB

    watch = MemoryWatch(read, interval=0.005)
    watch.start()
    deadline = time.monotonic() + 5
    while watch.low(10**6 * MiB) != 300 * MiB and time.monotonic() < deadline:
        time.sleep(0.01)
    watch.stop()
    assert watch.low(10**6 * MiB) == 300 * MiB


def test_after_an_oom_kill_the_watch_forgets_the_lows_the_killed_worker_made():
    watch = MemoryWatch(lambda: None)
    watch.add(0.0, 40 * MiB)  # the moment before the kill: a worker at its fullest
    watch.add(0.5, 300 * MiB)
    assert watch.low(300 * MiB) == 40 * MiB
    watch.forget()
    assert watch.low(300 * MiB) == 300 * MiB
    watch.add(1.0, 250 * MiB)
    assert watch.low(300 * MiB) == 250 * MiB  # readings from now on count again
