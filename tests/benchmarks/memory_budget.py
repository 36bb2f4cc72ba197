"""Two memory figures of issue 12; prints tables and the run time.

(a) ``memory_budget=256 MiB`` on a workload that would need ~1 GiB in flight (2 workers, prefetch 4,
    batches of 16 samples of 8 MiB = 128 MiB as asked): the peak of the loader's own accounting
    (telemetry ``memory_ours``, every batch) and of ``Shmem`` in /proc/meminfo (a thread, every ~10 ms,
    minus the value before the run), every sample once, the mean batch size, the depth's fall.
(b) with plenty of room (a private 8 GiB /dev/shm): the peak of AdaptiveLoader's arenas against vanilla
    DataLoader's peak /dev/shm use on the same batches (the seed and detection workloads); goal <= 2x.
    "memfd arenas" is what the loader's current arenas have mapped after each batch; "Shmem (memfd)"
    the peak of Shmem in /proc/meminfo less before (every 5 ms): any moment when arenas grow included.

    .venv/bin/python tests/benchmarks/memory_budget.py            # both (~2-3 min on 2 cores)
    .venv/bin/python tests/benchmarks/memory_budget.py --part a

``Shmem`` is the whole machine's (tmpfs and memfd pages of every process): other jobs running at the
same time add to it, so (a) prints the baseline and runs on an otherwise idle machine read cleanest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any, Callable, Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from adaptive_loader import AdaptiveLoader  # noqa: E402
from stress.sandbox import sandbox_available, sandbox_command  # noqa: E402
from stress.scenarios import get  # noqa: E402

MiB = 2**20
BUDGET = 256 * MiB
SAMPLE = 8 * MiB
ASKED = 16  # samples per batch: 128 MiB, eight in flight ~1 GiB
PREFETCH = 4


class BigSamples(Dataset):
    """``n`` float32 samples of ``SAMPLE`` bytes, each filled with its index."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.full((SAMPLE // 4,), float(i)), i


class Sampler(threading.Thread):
    """Calls ``read`` every ``every`` s and keeps the highest value."""

    def __init__(self, read: Callable[[], int], every: float) -> None:
        super().__init__(daemon=True)
        self.read, self.every, self.peak, self.stop = read, every, read(), threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.read())
            time.sleep(self.every)

    def __enter__(self) -> "Sampler":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.join()
        self.peak = max(self.peak, self.read())


def shmem() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no Shmem line in /proc/meminfo")


def shm_used() -> int:
    st = os.statvfs("/dev/shm")
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def part_a(n: int) -> Dict[str, Any]:
    records: List[Dict[str, Any]] = []
    base = shmem()
    seen: Counter = Counter()
    sizes: List[int] = []
    started = time.perf_counter()
    with Sampler(shmem, 0.01) as meter, \
            AdaptiveLoader(BigSamples(n), max_batch_size=ASKED, num_workers=2, prefetch_factor=PREFETCH,
                           memory_budget=BUDGET, telemetry=records.append) as loader:
        for data, ids in loader:
            assert bool((data[:, 0] == ids.to(torch.float32)).all()), "a sample arrived corrupted"
            seen.update(ids.tolist())
            sizes.append(len(ids))
            del data, ids
        fallbacks = loader.fallbacks
    seconds = time.perf_counter() - started
    batches = [r for r in records if r["kind"] == "batch"]
    events = [r for r in records if r["kind"] == "event"]
    return {
        "samples": n, "once": sorted(seen) == list(range(n)) and max(seen.values()) == 1,
        "batches": len(sizes), "mean_batch": sum(sizes) / len(sizes), "asked": ASKED,
        "peak_ours": max((r.get("memory_ours") or 0) for r in batches),
        "peak_shmem": meter.peak - base, "shmem_before": base, "seconds": seconds, "fallbacks": fallbacks,
        "depth": [f"{r['event']}: {r['message']}" for r in events if r["event"] in ("fewer_in_flight", "depth")],
        "budget_events": sum(1 for r in events if r["event"] == "budget"),
        "roads": dict(Counter(r["transport"] for r in batches)),
    }


def _workload(name: str):
    setup = get(name).build(64 * MiB, 2, name == "detection")  # detection: its 48-image quick set
    if setup.prepare is not None:
        setup.prepare()
    return setup


def part_b_inner(name: str) -> Dict[str, Any]:
    """In a private big /dev/shm: vanilla's peak use of it; AdaptiveLoader's arenas (memfd, and in /dev/shm)."""
    setup = _workload(name)
    out: Dict[str, Any] = {"workload": name}
    with Sampler(shm_used, 0.005) as meter:
        for batch in DataLoader(setup.dataset, **setup.vanilla):
            setup.check(batch)
            del batch
    out["vanilla_shm"] = meter.peak
    for arena in ("memfd", "shm"):
        peak_arena, peak_ours = 0, 0
        base = shmem()  # memfd pages count in Shmem (not in /dev/shm): the whole truth, old arenas included
        with Sampler(shm_used, 0.005) as meter, Sampler(shmem, 0.005) as all_shmem:
            records: List[Dict[str, Any]] = []
            with AdaptiveLoader(setup.dataset, arena=arena, telemetry=records.append, **setup.adaptive) as loader:
                for batch in loader:
                    setup.check(batch)
                    del batch
                    peak_arena = max(peak_arena, loader._pipeline.arena_bytes())  # what its arenas have mapped
            peak_ours = max((r.get("memory_ours") or 0) for r in records if r["kind"] == "batch")
        out[f"{arena}_arenas"] = peak_arena
        out[f"{arena}_ours"] = peak_ours
        out[f"{arena}_shm"] = meter.peak
        out[f"{arena}_shmem"] = all_shmem.peak - base
        out[f"{arena}_roads"] = dict(Counter(r["transport"] for r in records if r["kind"] == "batch"))
    return out


def part_b(names: List[str]) -> List[Dict[str, Any]]:
    ok, why = sandbox_available()
    if not ok:
        raise SystemExit(f"part b needs a private /dev/shm: {why}")
    results = []
    for name in names:
        command = sandbox_command([sys.executable, os.path.abspath(__file__), "--inner", name], 8 << 30)
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise SystemExit(f"{name}: {done.stderr[-2000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def mib(n: float) -> str:
    return f"{n / MiB:,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["a", "b", "both"], default="both")
    parser.add_argument("--samples", type=int, default=192, help="part a's samples of 8 MiB (default 192)")
    parser.add_argument("--workloads", default="seed,detection", help="part b's stress workloads")
    parser.add_argument("--inner", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        print(json.dumps(part_b_inner(args.inner)))
        return
    started = time.perf_counter()
    if args.part in ("a", "both"):
        a = part_a(args.samples)
        print(f"(a) memory_budget={mib(BUDGET)}: {a['samples']} samples of {mib(SAMPLE)}, asked {a['asked']} per "
              f"batch ({mib(SAMPLE * ASKED)}), 2 workers x prefetch {PREFETCH} (~1 GiB in flight as asked)\n")
        rows = [("every sample once", "yes" if a["once"] else "NO"),
                ("peak of its own accounting (memory_ours)", mib(a["peak_ours"])),
                ("peak Shmem (/proc/meminfo, every 10 ms) - before", mib(a["peak_shmem"])),
                ("Shmem before the run", mib(a["shmem_before"])),
                ("both under the budget", "yes" if max(a["peak_ours"], a["peak_shmem"]) < BUDGET else "NO"),
                ("batches; mean samples per batch", f"{a['batches']}; {a['mean_batch']:.2f} (asked {ASKED})"),
                ("roads", ", ".join(f"{k} {v}" for k, v in sorted(a["roads"].items()))),
                ("fallbacks", ", ".join(f"{k} {v}" for k, v in sorted(a["fallbacks"].items())) or "-"),
                ("budget events", str(a["budget_events"])),
                ("seconds", f"{a['seconds']:.1f}")]
        width = max(len(k) for k, _ in rows)
        print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
        for message in a["depth"]:
            print(message)
        print()
    if args.part in ("b", "both"):
        b = part_b([n.strip() for n in args.workloads.split(",")])
        print("(b) plenty of room (private 8 GiB /dev/shm): AdaptiveLoader's arenas vs vanilla DataLoader's "
              "peak /dev/shm, same batches\n")
        head = ["workload", "vanilla peak shm", "memfd arenas", "ratio", "Shmem (memfd)", "ratio", "ours (memfd)",
                "shm arenas", "/dev/shm (arena=shm)", "ratio"]
        rows = [head]
        for r in b:
            v = max(r["vanilla_shm"], 1)
            rows.append([r["workload"], mib(r["vanilla_shm"]), mib(r["memfd_arenas"]), f"{r['memfd_arenas'] / v:.2f}x",
                         mib(r["memfd_shmem"]), f"{r['memfd_shmem'] / v:.2f}x", mib(r["memfd_ours"]),
                         mib(r["shm_arenas"]), mib(r["shm_shm"]), f"{r['shm_shm'] / v:.2f}x"])
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        for k, row in enumerate(rows):
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
            if k == 0:
                print("  ".join("-" * w for w in widths))
        for r in b:
            print(f"{r['workload']} roads: memfd {r['memfd_roads']}, shm {r['shm_roads']}")
    print(f"\nrun time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
