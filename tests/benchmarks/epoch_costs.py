"""Where an epoch with workers started each epoch goes, and what ``Arena.map_pages`` saves.

    .venv/bin/python tests/benchmarks/epoch_costs.py [--epochs 12]

Prints, for the 4 MiB transport case (400 samples, 2 workers, default collate):
  * per loader, the fixed costs of an epoch: starting the workers (the DataLoader iterator's
    ``__init__``: the forks), the wait for the first batch, and the end (joining the workers);
  * AdaptiveLoader's epoch with and without ``map_pages``, alternated epoch by epoch, with the
    workers' CPU time, on that case and on the 1 MiB volumes case;
  * filling 160 MiB of a fresh arena in a forked child, with and without ``map_pages`` first.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from torch.utils.data import dataloader as torch_dataloader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cases import close, epoch_seconds, transport_case, volumes_case  # noqa: E402

from adaptive_loader.arena import Arena  # noqa: E402


def fixed_costs(epochs: int) -> None:
    iterator_class = torch_dataloader._MultiProcessingDataLoaderIter
    original_init = iterator_class.__init__
    spans = {}

    def timed_init(*args, **kwargs):  # the iterator's __init__ starts (forks) the workers
        start = time.perf_counter()
        try:
            return original_init(*args, **kwargs)
        finally:
            spans["__init__"] = time.perf_counter() - start

    iterator_class.__init__ = timed_init
    try:
        case = transport_case("default")
        print(f"{case.name}: median of {epochs} epochs, after one to warm up")
        for variant in ("vanilla DataLoader", "AdaptiveLoader"):
            loader = case.variants[variant]()
            epoch_seconds(loader)
            rows = []
            for _ in range(epochs):
                spans.clear()
                start = time.perf_counter()
                arrivals = [time.perf_counter() - start for _ in loader]
                end = time.perf_counter() - start
                started = spans.get("__init__", 0.0)
                rows.append((end, started, arrivals[0] - started, end - arrivals[-1],
                             (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1)))
            close(loader)
            epoch, start_workers, first, tail, gap = np.median(rows, axis=0)
            print(f"  {variant:20} epoch {epoch:.3f} s: start workers {start_workers * 1e3:5.1f} ms, then first "
                  f"batch {first * 1e3:5.1f} ms, last batch to the end (join) {tail * 1e3:5.1f} ms, "
                  f"a batch every {gap * 1e3:4.1f} ms in between")
    finally:
        iterator_class.__init__ = original_init


def map_pages_on_and_off(epochs: int) -> None:
    original = Arena.map_pages
    for case in (transport_case("default"), volumes_case()):
        loader = case.variants["AdaptiveLoader"]()
        epoch_seconds(loader)
        rows = {"with map_pages": [], "without": []}
        for _ in range(epochs):
            for mode in rows:  # forked workers inherit the class as it is when they start
                Arena.map_pages = original if mode == "with map_pages" else (lambda self: None)
                before = os.times()
                seconds = epoch_seconds(loader)
                after = os.times()
                rows[mode].append((seconds, after.children_user - before.children_user,
                                   after.children_system - before.children_system))
        Arena.map_pages = original
        close(loader)
        print(f"AdaptiveLoader, {case.name}: median of {epochs} alternated epochs")
        for mode, values in rows.items():
            seconds, user, system = np.median(values, axis=0)
            print(f"  {mode:15} epoch {seconds:.3f} s, workers' CPU {user:.3f} s user, {system:.3f} s system")


def fill_in_a_child(nbytes: int = 160 << 20) -> None:
    arena = Arena.create(nbytes)
    arena.ring[:] = 1  # the pages exist, as after the first epoch
    source = np.full(arena.capacity, 7, dtype=np.uint8)
    print(f"filling {nbytes >> 20} MiB of an arena in a freshly forked child (median of 5)")
    for map_first in (False, True):
        times = []
        for _ in range(5):  # a new child each time: its page tables start empty
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:
                start = time.perf_counter()
                if map_first:
                    arena.map_pages()
                np.copyto(arena.ring, source)
                os.write(write_end, str(time.perf_counter() - start).encode())
                os._exit(0)
            os.close(write_end)
            with os.fdopen(read_end) as pipe:
                times.append(float(pipe.read()))
            os.waitpid(pid, 0)
        label = "map_pages, then copy" if map_first else "copy, faulting"
        print(f"  {label:22} {np.median(times) * 1e3:6.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args()
    fixed_costs(args.epochs)
    map_pages_on_and_off(args.epochs)
    fill_in_a_child()


if __name__ == "__main__":
    _started = time.perf_counter()
    main()
    print(f"\n(this script ran {time.perf_counter() - _started:.0f} s)")
