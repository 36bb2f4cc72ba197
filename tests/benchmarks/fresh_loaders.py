"""Fresh loaders against vanilla DataLoader (issue 24): what a NEW loader costs, not a warm one.

    .venv/bin/python tests/benchmarks/fresh_loaders.py [--rounds 5] [--quick] [--only fresh,epochs,first,three,fds]

The 4 MiB transport case of ``cases.py`` (400 float32 samples of 4 MiB, batches of 8, 2 workers,
plenty of shm); every loader here reads the same ``FloatBank`` (one, so the forks copy the same page
tables for every variant). Each figure is a median over ``--rounds`` rounds; in each round every
variant runs once, in an order reversed every other round, so drift on a busy machine hits them all
alike. "vs DataLoader" is always against vanilla DataLoader measured in the same rounds.

Sections (goals from the issue):
  * fresh:  a new loader's first epoch (``iter`` to the last batch, workers' start included), default
            collate and a list collate; goal >= 3x DataLoader. For reference, a later epoch of an
            AdaptiveLoader with persistent workers (what the first epoch could approach).
  * epochs: one loader without persistent workers, ``--epochs`` epochs; each epoch index against
            vanilla's same epoch; goal >= 3x every epoch. Also the time to each epoch's first batch.
  * first:  time to the first batch of a new loader, from ``iter()`` to the batch in hand (the
            workers' start included); goal <= 1.0x DataLoader's time.
  * three:  three fresh loaders made one after the other, one epoch each, as a user's loop does:
            "first+last held" keeps each loader's first batch (so, during its own epoch too) and its
            last (the ``for`` variable) alive while the next loader runs; "last carried" keeps only
            the ``for`` variable; "dropped" keeps nothing. Goal: held within 10% of dropped.
  * fds:    ``/proc/self/fd`` before and after N loaders made and dropped (no epoch), and after M
            loaders made, run one epoch over a small dataset and dropped (without ``close()``);
            goal: flat.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cases import FloatBank, _same_batches, close, epoch_seconds, list_collate  # noqa: E402

from adaptive_loader import AdaptiveLoader  # noqa: E402
from adaptive_loader.arena import Arena  # noqa: E402
from adaptive_loader.region import memfd_available  # noqa: E402

VANILLA, OURS = "vanilla DataLoader", "AdaptiveLoader"
SAMPLES, BATCH = 400, 8


def makers(bank: FloatBank, collate: Optional[Callable], persistent: bool) -> Dict[str, Callable[[], Any]]:
    """Vanilla and AdaptiveLoader over ``bank`` with the same batches (``cases._same_batches``)."""
    return _same_batches(bank, None, None, BATCH, collate, arena_off=False, persistent_workers=persistent)


def in_turn(names: List[str], round_: int) -> List[str]:
    return list(names) if round_ % 2 == 0 else list(names)[::-1]


def med(values: List[float]) -> float:
    return float(np.median(values))


def spread(values: List[float]) -> str:
    return f"{min(values) * 1e3:.0f}-{max(values) * 1e3:.0f}"


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISS"


def row(name: str, values: List[float], base: List[float], goal: Optional[Callable[[float], bool]] = None,
        time_ratio: bool = False, width: int = 52) -> None:
    """One variant: median ms, its spread, and the ratio to vanilla's median (speed: vanilla / this,
    >1 faster; ``time_ratio``: this / vanilla, <1 sooner)."""
    m, b = med(values), med(base)
    ratio = m / b if time_ratio else b / m
    label = "time vs DataLoader's" if time_ratio else "vs DataLoader"
    mark = "" if goal is None or name == VANILLA else f"  goal {verdict(goal(ratio))}"
    print(f"  {name:{width}} {m * 1e3:7.1f} ms  ({spread(values)})  {label} {ratio:5.2f}x{mark}", flush=True)


def finish(loader: Any, iterator: Any = None) -> None:
    """Stop the workers now, whether or not the epoch ran to its end."""
    if isinstance(loader, AdaptiveLoader):
        loader.close()
        return
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    close(loader)


# -- sections -------------------------------------------------------------------------------------
def fresh_section(bank: FloatBank, rounds: int) -> None:
    print("\n[fresh] a new loader's first epoch (workers' start included); goal: >= 3x DataLoader")
    for collate_name, collate in (("default collate", None), ("list collate", list_collate)):
        make = makers(bank, collate, persistent=True)
        times: Dict[str, List[float]] = {VANILLA: [], OURS: [], "later": [], "forks": [], "ring": []}
        for r in range(rounds):
            for name in in_turn([VANILLA, OURS], r):
                loader = make[name]()
                times[name].append(epoch_seconds(loader))
                if name == OURS and collate is None:
                    times["later"].append(epoch_seconds(loader))  # reference: its second epoch, workers kept
                    ring = loader._pipeline.arena_bytes() // 2  # one worker's arena, as the epoch left it
                finish(loader)
                del loader
            if collate is None:
                times["forks"].append(fork_seconds(2))
                times["ring"].append(new_ring_seconds(ring))
        print(f" {collate_name}, {SAMPLES} samples, {SAMPLES * 4} MiB per epoch")
        row(VANILLA, times[VANILLA], times[VANILLA])
        row(f"{OURS}, fresh, first epoch", times[OURS], times[VANILLA], lambda x: x >= 3)
        if times["later"]:
            row(f"{OURS}, its 2nd epoch (persistent, ref.)", times["later"], times[VANILLA])
            kernel_floor(times, ring)


def fork_seconds(n: int) -> float:
    """What forking ``n`` children of this process takes (they exit at once): each loader pays it for
    its workers, the page tables of the dataset above all."""
    start = time.perf_counter()
    pids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        pids.append(pid)
    took = time.perf_counter() - start
    for pid in pids:
        os.waitpid(pid, 0)
    return took


def new_ring_seconds(nbytes: int) -> float:
    """Reserving ``nbytes`` of new shared memory and mapping it writable: what a new worker's ring costs
    the kernel the first time round, whoever does it."""
    start = time.perf_counter()
    arena = Arena.create(nbytes)
    arena.map_pages(0, arena.capacity, new=True)
    took = time.perf_counter() - start
    arena.region.close()
    return took


def kernel_floor(times: Dict[str, List[float]], ring: int) -> None:
    """The kernel's share of a fresh loader, and what it leaves as the best a fresh first epoch can do:
    the second worker starts after both forks, and its half of the batches takes about the second
    epoch (both workers in parallel), plus its new ring."""
    forks, pages, later = med(times["forks"]), med(times["ring"]), med(times["later"])
    floor = forks + later + pages
    print(f"  what the kernel must do here: two forks of this process {forks * 1e3:.0f} ms, a new ring of "
          f"{ring / 2**20:.0f} MiB reserved and mapped {pages * 1e3:.0f} ms per worker")
    print(f"  {'estimated floor: forks + 2nd epoch + one new ring':52} {floor * 1e3:7.1f} ms"
          f"{'':{17}}vs DataLoader {med(times[VANILLA]) / floor:5.2f}x", flush=True)


def epochs_section(bank: FloatBank, rounds: int, epochs: int) -> None:
    print(f"\n[epochs] one loader without persistent workers, {epochs} epochs; goal: every epoch >= 3x "
          f"DataLoader's same epoch")
    make = makers(bank, None, persistent=False)
    make_persistent = makers(bank, None, persistent=True)
    names = [VANILLA, OURS, "persistent"]
    whole = {name: [[] for _ in range(epochs)] for name in names}
    first = {name: [[] for _ in range(epochs)] for name in names}
    for r in range(rounds):
        loaders = {VANILLA: make[VANILLA](), OURS: make[OURS](), "persistent": make_persistent[OURS]()}
        for e in range(epochs):  # epoch e of every loader, one after the other, in turn
            for name in in_turn(names, r + e):
                start = time.perf_counter()
                got = None
                for batch in loaders[name]:
                    if got is None:
                        got = time.perf_counter()
                whole[name][e].append(time.perf_counter() - start)
                first[name][e].append(got - start)
                del batch
        for loader in loaders.values():
            finish(loader)
        del loaders
    print(f"  {'':44} " + "  ".join(f"{'epoch ' + str(e + 1):>22}" for e in range(epochs)))
    for name, label in ((VANILLA, VANILLA), (OURS, OURS), ("persistent", f"{OURS}, persistent (ref.)")):
        cells = []
        for e in range(epochs):
            m, b = med(whole[name][e]), med(whole[VANILLA][e])
            cells.append(f"{m * 1e3:6.0f} ms {b / m:5.2f}x{' ' if name == VANILLA or b / m >= 3 else '!'}")
        print(f"  {label:44} " + "  ".join(f"{c:>22}" for c in cells), flush=True)
    print("  time to each epoch's first batch (ms, time vs DataLoader's):")
    for name, label in ((VANILLA, VANILLA), (OURS, OURS), ("persistent", f"{OURS}, persistent (ref.)")):
        cells = [f"{med(first[name][e]) * 1e3:6.1f} ms {med(first[name][e]) / med(first[VANILLA][e]):5.2f}x"
                 for e in range(epochs)]
        print(f"  {label:44} " + "  ".join(f"{c:>22}" for c in cells), flush=True)
    print("  ('!': under the 3x goal)")


def first_batch_section(bank: FloatBank, rounds: int) -> None:
    print("\n[first] time to a new loader's first batch, iter() to the batch in hand; goal: <= 1.0x DataLoader's")
    for collate_name, collate in (("default collate", None), ("list collate", list_collate)):
        make = makers(bank, collate, persistent=False)
        times: Dict[str, List[float]] = {VANILLA: [], OURS: []}
        for r in range(rounds):
            for name in in_turn([VANILLA, OURS], r):
                loader = make[name]()
                start = time.perf_counter()
                iterator = iter(loader)
                batch = next(iterator)
                times[name].append(time.perf_counter() - start)
                del batch
                finish(loader, iterator)
                del iterator, loader
        print(f" {collate_name}")
        row(VANILLA, times[VANILLA], times[VANILLA], time_ratio=True)
        row(OURS, times[OURS], times[VANILLA], lambda x: x <= 1.0, time_ratio=True)


def three_loaders(make: Callable[[], Any], mode: str) -> float:
    """Three fresh loaders one after the other, one epoch each; the seconds of the three epochs."""
    kept: Tuple[Any, ...] = ()
    total = 0.0
    for _ in range(3):
        loader = make()
        start = time.perf_counter()
        first = None
        for batch in loader:
            if first is None and mode == "first+last held":
                first = batch
        total += time.perf_counter() - start
        finish(loader)
        del loader  # dropped as a user's loop drops it (close() above only stops the workers now)
        kept = (first, batch) if mode == "first+last held" else (batch,) if mode == "last carried" else ()
        del first, batch
    del kept
    gc.collect()
    return total


def three_section(bank: FloatBank, rounds: int) -> None:
    modes = ["dropped", "last carried", "first+last held"]
    print("\n[three] three fresh loaders in a row, one epoch each (sum of the 3 epochs); goal: "
          "AdaptiveLoader held within 10% of dropped")
    make = makers(bank, None, persistent=False)
    times = {(name, mode): [] for name in (VANILLA, OURS) for mode in modes}
    for r in range(rounds):
        for mode in in_turn(modes, r):
            for name in in_turn([VANILLA, OURS], r):
                times[(name, mode)].append(three_loaders(make[name], mode))
    for mode in modes:
        print(f" {mode}")
        row(VANILLA, times[(VANILLA, mode)], times[(VANILLA, mode)])
        row(OURS, times[(OURS, mode)], times[(VANILLA, mode)])
    dropped = med(times[(OURS, "dropped")])
    for mode in modes[1:]:
        ratio = med(times[(OURS, mode)]) / dropped
        goal = f"  goal {verdict(ratio <= 1.10)}" if mode == "first+last held" else ""
        print(f"  {OURS}, {mode} / dropped: {ratio:5.2f}x the time{goal}")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fds_section(made: int, iterated: int) -> None:
    print(f"\n[fds] /proc/self/fd around loaders made and dropped (small dataset); goal: flat")
    small = FloatBank(32, numel=1024)

    def make() -> AdaptiveLoader:
        return AdaptiveLoader(small, max_batch_size=8, num_workers=2)

    loader = make()  # once before counting: what a process opens once (e.g. the spill module's spare fd)
    for batch in loader:
        pass
    loader.close()
    del loader, batch  # a batch held keeps its arena's fd open
    gc.collect()
    time.sleep(0.5)  # the warm-up's queue threads and workers' pipes close a moment later
    for label, count, epoch in ((f"{made} made and dropped, no epoch", made, False),
                                (f"{iterated} made, one epoch, dropped without close()", iterated, True)):
        gc.collect()
        before, start = open_fds(), time.perf_counter()
        for _ in range(count):
            loader = make()
            if epoch:
                for batch in loader:
                    pass
                del batch
            del loader
        gc.collect()
        after = open_fds()
        per = (after - before) / max(1, count)
        print(f"  {label:52} fds {before} -> {after} ({after - before:+d}, {per:+.3f} per loader; "
              f"{(time.perf_counter() - start) / max(1, count) * 1e3:.1f} ms per loader)  goal "
              f"{verdict(after <= before)}", flush=True)


def warm_up(bank: FloatBank) -> None:
    """One short epoch of each loader: the one-time imports and caches (numpy.random at the first
    shuffle, torch's multiprocessing) are not any variant's cost."""
    small = FloatBank(16, numel=1024)
    for collate in (None, list_collate):
        for make in makers(small, collate, persistent=False).values():
            loader = make()
            epoch_seconds(loader)
            finish(loader)
    del small


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=None, help="rounds per section (default 5, --quick 2)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs in [epochs] (default 4, --quick 3)")
    parser.add_argument("--fd-loaders", type=int, default=None, help="loaders made in [fds] (default 1000, "
                                                                     "--quick 100)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds, epochs and loaders")
    parser.add_argument("--only", default="fresh,epochs,first,three,fds", help="comma-separated sections")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)
    epochs = args.epochs or (3 if args.quick else 4)
    fd_loaders = args.fd_loaders or (100 if args.quick else 1000)
    which = set(args.only.split(","))
    shm = os.statvfs("/dev/shm")
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, kernel {os.uname().release}, memfd "
          f"{'yes' if memfd_available() else 'no'}, /dev/shm {shm.f_bavail * shm.f_frsize / 2**30:.1f} GiB free; "
          f"{SAMPLES} samples of 4 MiB, batches of {BATCH}, 2 workers; {rounds} rounds, medians "
          f"(spread min-max in ms)")
    bank = FloatBank(SAMPLES)
    warm_up(bank)
    if "fresh" in which:
        fresh_section(bank, rounds)
    if "epochs" in which:
        epochs_section(bank, rounds, epochs)
    if "first" in which:
        first_batch_section(bank, max(rounds, 3) if not args.quick else rounds)
    if "three" in which:
        three_section(bank, max(1, rounds // 2) if args.quick else max(2, rounds // 2 + 1))
    if "fds" in which:
        fds_section(fd_loaders, 5 if args.quick else 20)


if __name__ == "__main__":
    _started = time.perf_counter()
    main()
    print(f"\n(this script ran {time.perf_counter() - _started:.0f} s)")
