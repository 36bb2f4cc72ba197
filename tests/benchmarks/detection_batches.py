"""The detection scenario measured: mean images per batch and images/s, vanilla beside adaptive,
in a private 64 MiB /dev/shm and with plenty of it (a table, not a timed assertion).

    .venv/bin/python tests/benchmarks/detection_batches.py [--epochs 2] [--plenty 8G] [--quick]

Each run is a fresh process in its own mount namespace (the stress harness); vanilla DataLoader
gets batch_size=8, AdaptiveLoader max_batch_size=8, both shuffled, 2 workers, the tuple(zip(*batch))
collate. images/s is images delivered ÷ the seconds of the loop (all epochs); a hang is cut after
--hang-after seconds and shown as such. About 1.5 min per loaded run on 2 idle cores, plus the
vanilla hangs' waits.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from stress.harness import run_case  # noqa: E402
from stress.sandbox import parse_size, sandbox_available  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (default 2)")
    parser.add_argument("--plenty", default="8G", help="the size of 'plenty of shm' (default 8G)")
    parser.add_argument("--hang-after", type=float, default=15.0, help="seconds without a batch that make a hang")
    parser.add_argument("--quick", action="store_true", help="48 images instead of 400")
    args = parser.parse_args()
    ok, why = sandbox_available()
    if not ok:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    print(f"detection scenario, {args.epochs} epochs, 2 workers, batches of 8 asked for")
    print(f"{'/dev/shm':>9}  {'loader':9} {'outcome':8} {'images':>11} {'batches':>8} {'images/batch':>13} "
          f"{'images/s':>9} {'peak shm':>10}  run")
    for size in ("64M", args.plenty):
        for loader in ("vanilla", "adaptive"):
            begun = time.perf_counter()
            r = run_case("detection", loader, shm_bytes=parse_size(size), epochs=args.epochs, quick=args.quick,
                         hang_after=args.hang_after)
            per_batch = "-" if r["mean_batch_size"] is None else f"{r['mean_batch_size']:.2f}"
            peak = "-" if r["peak_shm_used_bytes"] is None else f"{r['peak_shm_used_bytes'] / 2**20:.1f} MiB"
            print(f"{size:>9}  {loader:9} {r['outcome']:8} {r['delivered']:>5}/{r['expected']:<5} {r['batches']:>8} "
                  f"{per_batch:>13} {r['samples_per_s'] or 0:>9.1f} {peak:>10}  {time.perf_counter() - begun:.0f} s",
                  flush=True)
    print(f"\n(this script ran {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
