"""The CPU allowance benchmark: how the device budget learns a step's memory limit.

    .venv/bin/python tests/benchmarks/device_allowance.py [--steps 3000] [--learn 200]

Seed-like costs (10..1200 objects per image), a step that really allocates
``cost * 1 KiB`` plus a 100 KiB base under a fixed allowance and raises a real
``torch.OutOfMemoryError`` past it (tests/ranks/guard_ranks.py), the user's
``max_cost`` far above what fits. For each way of measuring (the step's peaks
only; the peaks and the allowance as ``device_memory``) it prints: steps, OOMs,
OOMs after the first ``--learn`` steps and their share (goal <= 2 %), mean cost
per completed batch after learning over the allowance's true capacity in cost
(goal >= 0.85), whether every sample completed exactly once per epoch, and the
run time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ranks"))
from guard_ranks import Allowance, CostDataset, collate  # noqa: E402

from adaptive_loader import AdaptiveLoader  # noqa: E402

KIB = 1 << 10


def run(steps: int, learn: int, known: bool, samples: int) -> dict:
    costs = np.random.default_rng(0).integers(10, 1201, samples)
    allowance = Allowance(3000 * KIB, KIB, base=100 * KIB)
    loader = AdaptiveLoader(CostDataset(costs), costs=costs, max_cost=20000, max_batch_size=64,
                            collate_fn=collate, shuffle=True)
    options = {"peak_bytes": allowance.peak_bytes}
    if known:
        options["device_memory"] = allowance.nbytes
    taken = ooms = late_ooms = 0
    late_costs, once = [], True
    start = time.perf_counter()
    while taken < steps:
        completed = []
        for batch in loader:
            with loader.guard(**options) as guard:
                ids = allowance.step(batch)
            taken += 1
            if guard.ok:
                completed += ids
                if taken > learn:
                    late_costs.append(float(sum(batch[1])))
            else:
                ooms += 1
                late_ooms += taken > learn
            if taken >= steps:
                break
        else:
            once &= sorted(completed) == list(range(samples))
    seconds = time.perf_counter() - start
    return {"steps": taken, "ooms": ooms, "late_ooms": late_ooms, "late_share": late_ooms / max(1, taken - learn),
            "fill": float(np.mean(late_costs)) / allowance.capacity_cost, "once": once, "seconds": seconds,
            "budget": loader.max_cost, "device_cap": loader.guard().budget.max_cost(),
            "capacity": allowance.capacity_cost}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--learn", type=int, default=200)
    parser.add_argument("--samples", type=int, default=2000)
    args = parser.parse_args()
    print(f"{args.steps} steps, learning = the first {args.learn}; {args.samples} samples per epoch; allowance "
          f"capacity 2900 cost; user max_cost 20000")
    print(f"{'measured':24} {'steps':>6} {'OOMs':>5} {'late':>5} {'late %':>7} {'fill':>6} {'once':>5} "
          f"{'budget':>8} {'device cap':>10} {'time s':>7}")
    for known in (False, True):
        r = run(args.steps, args.learn, known, args.samples)
        cap = "none" if r["device_cap"] is None else f"{r['device_cap']:.0f}"
        print(f"{'peaks + device_memory' if known else 'peaks only':24} {r['steps']:6d} {r['ooms']:5d} "
              f"{r['late_ooms']:5d} {100 * r['late_share']:6.2f}% {r['fill']:6.3f} {str(r['once']):>5} "
              f"{r['budget']:8.0f} {cap:>10} {r['seconds']:7.1f}")


if __name__ == "__main__":
    main()
