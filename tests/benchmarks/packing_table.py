"""Packing figures of BudgetBatchSampler's modes on the seed's distribution: batches against a lower bound.

    .venv/bin/python tests/benchmarks/packing_table.py [--samples 100000] [--windows 1024 8192]

Costs uniform integers in [10, 1200], max_cost 1500, max_batch_size 10; three groups drawn uniformly
and independently of cost. Lower bounds:

- sum: ``max(ceil(sum / max_cost), ceil(N / max_batch_size))``;
- padded (a batch costs ``len * max``): the optimum of the whole epoch packed at once, largest first,
  each batch as long as its largest sample allows (``pack_padded``; optimal, see its docstring), which
  no windowed plan can beat;
- with groups: the sum over the groups of each group's bound.

One epoch per row and window; "plan CPU" is the process CPU time of planning and iterating it once
(CPU rather than wall time, since other jobs share the machine): indicative only.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings

import numpy as np

from adaptive_loader import BudgetBatchSampler
from adaptive_loader.packing import pack_padded

MAX_COST, MAX_BATCH_SIZE = 1500, 10


def sum_bound(costs: np.ndarray, max_cost: float) -> int:
    return max(math.ceil(costs.sum() / max_cost), math.ceil(len(costs) / MAX_BATCH_SIZE))


def padded_bound(costs: np.ndarray, max_cost: float) -> int:
    return len(np.unique(pack_padded(costs, max_cost, MAX_BATCH_SIZE, leave_partial=False)))


def bound(mode: str, unit: np.ndarray, groups, max_cost: float) -> int:
    of = sum_bound if mode == "sum" else padded_bound
    if groups is None:
        return of(unit, max_cost)
    return sum(of(unit[groups == g], max_cost) for g in np.unique(groups))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=100_000)
    p.add_argument("--windows", type=int, nargs="+", default=[1024, 8192])
    args = p.parse_args(argv)
    started = time.perf_counter()
    costs = np.random.default_rng(0).integers(10, 1201, args.samples).astype(np.float64)
    groups = np.random.default_rng(1).integers(0, 3, args.samples)
    rows = [  # name, mode, groups, quadratic, max_cost
        ("sum (before this change)", "sum", None, 0.0, MAX_COST),
        ("sum, 3 groups", "sum", groups, 0.0, MAX_COST),
        ("padded", "padded", None, 0.0, MAX_COST),
        ("padded, 3 groups", "padded", groups, 0.0, MAX_COST),
        ("padded + quadratic 1e-3, max_cost 3000", "padded", None, 1e-3, 3000),
        ("padded + quadratic 1e-3, max_cost 3000, 3 groups", "padded", groups, 1e-3, 3000),
    ]
    print(f"{args.samples:,} samples, costs uniform in [10, 1200], max_batch_size {MAX_BATCH_SIZE}\n")
    print("| mode | window | batches | lower bound | ratio | batches mixing groups | plan CPU |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, mode, group_ids, quadratic, max_cost in rows:
        unit = costs + quadratic * costs**2
        lower = bound(mode, unit, group_ids, max_cost)
        for window in args.windows:
            sampler = BudgetBatchSampler(costs, max_cost=max_cost, max_batch_size=MAX_BATCH_SIZE, window=window,
                                         group_ids=group_ids, cost=mode, quadratic=quadratic)
            t0 = time.process_time()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                batches = list(sampler)
            plan = time.process_time() - t0
            flat = np.concatenate(batches)
            assert len(flat) == args.samples and len(np.unique(flat)) == args.samples, "not every index once"
            mixed = sum(1 for b in batches if len(np.unique(groups[b])) > 1)
            print(f"| {name} | {window:,} | {len(batches):,} | {lower:,} | {len(batches) / lower:.4f}x | "
                  f"{mixed:,} of {len(batches):,} | {plan * 1000:.0f} ms |", flush=True)
    print(f"\nran {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
