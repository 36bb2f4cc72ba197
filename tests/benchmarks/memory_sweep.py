"""Memory-limit sweep (issue 22): each loader in a real memory cgroup of decreasing size; prints a table.

For each limit and loader -- vanilla DataLoader, AdaptiveLoader, and ``vanilla-main`` (DataLoader with
``num_workers=0``: every batch made in the main process, the floor of what the workload needs) -- it runs
the ``memory-limit`` stress scenario N times through the stress harness (96 COCO-style images of 320x240
with 1..150 masks each, batches of 8, every sample compared with ``__getitem__``'s output made again in
the main process), each run in a fresh memory cgroup with a private 8 GiB ``/dev/shm``. Per limit and
loader it prints: runs completed, runs with every sample exactly once, runs that received a corrupted
sample, OOM kills, the median peak of the cgroup's memory (page cache and tmpfs pages included, as the
kernel charges them), the median images/s of the completed runs, the mean batch size. The median peak of
vanilla-main at the largest limit is the "main-process floor"; each limit and peak is also given as a
multiple of it. The runs go round by round (every limit and loader once per round) so that drift on a
busy machine hits all of them.

    .venv/bin/python tests/benchmarks/memory_sweep.py            # 7 limits x 3 loaders x 5 runs (~15-20 min, 2 cores)
    .venv/bin/python tests/benchmarks/memory_sweep.py --quick    # 2 limits x 3 loaders x 1 run, 48 images (~1 min)
    .venv/bin/python tests/benchmarks/memory_sweep.py --limits 768,512 --runs 3 --json sweep.json

Needs root (a memory cgroup, v1 or v2 with the memory controller) and a private /dev/shm (unshare).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from stress.cgroup import exit_on_sigterm, memory_cgroup_available  # noqa: E402
from stress.child import LOADERS  # noqa: E402
from stress.harness import run_case  # noqa: E402
from stress.sandbox import parse_size, sandbox_available  # noqa: E402
from stress.scenarios import SCENARIOS  # noqa: E402

MiB = 2**20
LIMITS = "1024,896,768,640,512,448,384"
QUICK_LIMITS = "768,448"
LOADER_NAMES = "vanilla,adaptive,vanilla-main"
FLOOR_LOADER = "vanilla-main"


def sweep(limits: Sequence[int], loaders: Sequence[str], runs: int, args) -> List[Dict[str, Any]]:
    """Every (limit, loader) ``runs`` times, round by round; each result gains ``memory_limit_mib``."""
    results = []
    total, done = len(limits) * len(loaders) * runs, 0
    for _ in range(runs):
        for limit in limits:
            for loader in loaders:
                started = time.monotonic()
                result = run_case(args.scenario, loader, shm_bytes=parse_size(args.shm_size),
                                  memory_bytes=limit * MiB, workers=args.workers, quick=args.quick,
                                  epochs=args.epochs, hang_after=args.hang_after)
                done += 1
                peak = "?" if result["peak_memory_bytes"] is None else f"{result['peak_memory_bytes'] / MiB:.0f}"
                print(f"[{done}/{total}] {limit} MiB {loader:12} {result['outcome']:5} "
                      f"{result['delivered']}/{result['expected']}, peak {peak} MiB, {result['oom_kills']} OOM kills, "
                      f"{time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
                results.append(dict(result, memory_limit_mib=limit))
    return results


def exactly_once(result: Dict[str, Any]) -> bool:
    return (result["outcome"] == "ok" and result["missing"] == 0 and result["duplicated"] == 0
            and result["delivered"] == result["expected"])


def corrupted(result: Dict[str, Any]) -> bool:
    """A sample's content check failed in the child: a crash whose error says so."""
    return result["outcome"] == "crash" and "corrupted" in (result["error"] or "")


def median(values: List[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def summarize(cell: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One (limit, loader)'s runs as the table's numbers."""
    completed = [r for r in cell if r["outcome"] == "ok"]
    batches = sum(r["batches"] for r in cell)
    samples = sum(r["mean_batch_size"] * r["batches"] for r in cell if r["batches"])
    return {
        "runs": len(cell), "completed": len(completed), "exactly_once": sum(map(exactly_once, cell)),
        "corrupted": sum(map(corrupted, cell)), "oom_kills": sum(r["oom_kills"] or 0 for r in cell),
        "peak": median([r["peak_memory_bytes"] for r in cell if r["peak_memory_bytes"] is not None]),
        "images_per_s": median([r["samples_per_s"] for r in completed if r["samples_per_s"] is not None]),
        "mean_batch": samples / batches if batches else None,
    }


def floor_bytes(results: List[Dict[str, Any]], largest: int) -> Optional[float]:
    """The median peak of vanilla-main's completed runs at the largest limit."""
    peaks = [r["peak_memory_bytes"] for r in results if r["loader"] == FLOOR_LOADER and r["outcome"] == "ok"
             and r["memory_limit_mib"] == largest and r["peak_memory_bytes"] is not None]
    return median(peaks)


def table(results: List[Dict[str, Any]], limits: Sequence[int], loaders: Sequence[str]) -> str:
    """The markdown table, the floor line above it and the errors below it."""
    floor = floor_bytes(results, max(limits))

    def times_floor(nbytes: Optional[float]) -> str:
        return "-" if nbytes is None or not floor else f"{nbytes / floor:.2f}x"

    if floor:
        lines = [f"main-process floor: {floor / MiB:.0f} MiB (median peak of {FLOOR_LOADER} in {max(limits)} MiB)\n"]
    else:
        lines = [f"main-process floor: unknown (no completed {FLOOR_LOADER} run at {max(limits)} MiB)\n"]
    lines += ["| limit | limit / floor | loader | completed | exactly once | corrupted | OOM kills | median peak "
              "| peak / floor | median images/s | mean batch |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    errors = []
    for limit in limits:
        for loader in loaders:
            cell = [r for r in results if r["memory_limit_mib"] == limit and r["loader"] == loader]
            if not cell:
                continue
            s = summarize(cell)
            peak = "-" if s["peak"] is None else f"{s['peak'] / MiB:.0f} MiB"
            speed = "-" if s["images_per_s"] is None else f"{s['images_per_s']:.1f}"
            batch = "-" if s["mean_batch"] is None else f"{s['mean_batch']:.2f}"
            lines.append(f"| {limit} MiB | {times_floor(limit * MiB)} | {loader} | {s['completed']}/{s['runs']} "
                         f"| {s['exactly_once']}/{s['runs']} | {s['corrupted']} | {s['oom_kills']} | {peak} "
                         f"| {times_floor(s['peak'])} | {speed} | {batch} |")
            seen: Dict[str, int] = {}
            for r in cell:
                if r["error"]:
                    seen[r["error"][:200]] = seen.get(r["error"][:200], 0) + 1
            errors += [f"- {limit} MiB {loader} ({n}x): {text}" for text, n in seen.items()]
    if errors:
        lines += ["", "errors:"] + errors
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limits", help=f"memory limits in MiB, comma-separated (default {LIMITS}; "
                                         f"--quick: {QUICK_LIMITS})")
    parser.add_argument("--loaders", default=LOADER_NAMES, help=f"comma-separated subset of {', '.join(LOADERS)} "
                                                                f"(default {LOADER_NAMES})")
    parser.add_argument("--runs", type=int, help="runs per limit and loader (default 5; --quick: 1)")
    parser.add_argument("--scenario", default="memory-limit", choices=list(SCENARIOS),
                        help="the stress scenario to run (default memory-limit)")
    parser.add_argument("--shm-size", default="8G", help="size of each run's private /dev/shm (default 8G)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per run (default 1)")
    parser.add_argument("--hang-after", type=float, default=20.0,
                        help="seconds without a batch that count as a hang (default 20)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke test: the scenario's quick size, limits {QUICK_LIMITS}, 1 run each")
    parser.add_argument("--json", metavar="FILE", help="write every run's result as JSON")
    args = parser.parse_args()
    limits = sorted({int(x) for x in (args.limits or (QUICK_LIMITS if args.quick else LIMITS)).split(",")},
                    reverse=True)
    loaders = [name.strip() for name in args.loaders.split(",")]
    unknown = sorted(set(loaders) - set(LOADERS))
    if unknown:
        parser.error(f"unknown loader(s) {', '.join(unknown)}; choose from {', '.join(LOADERS)}")
    runs = args.runs if args.runs is not None else (1 if args.quick else 5)
    if runs < 1 or not limits or min(limits) <= 0:
        parser.error("--runs must be at least 1 and every limit positive")
    for ok, why in (memory_cgroup_available(), sandbox_available()):
        if not ok:
            print(f"cannot run the sweep: {why}", file=sys.stderr)
            return 2
    exit_on_sigterm()  # killed with SIGTERM, the running case and its cgroup still go
    started = time.monotonic()
    results = sweep(limits, loaders, runs, args)
    print(f"{args.scenario} scenario{' (quick size)' if args.quick else ''}, {args.workers} workers, "
          f"{args.epochs} epoch(s) per run, private {args.shm_size} /dev/shm, {runs} run(s) per limit and loader\n")
    print(table(results, limits, loaders))
    print(f"\nrun time {time.monotonic() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
