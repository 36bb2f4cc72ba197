"""Packing by cost on a stream: batches an AdaptiveLoader makes from a stream, against a lower bound.

    .venv/bin/python tests/benchmarks/stream_packing.py [--samples 20000] [--buffers 16 32 64] [--workers 0 2]

The question's distribution: costs uniform integers in [10, 1200] (objects per image), max_cost 1500,
max_batch_size 10. A plain IterableDataset yields the samples (each carries its cost); the loader's
workers pack them in their bucketing buffers (``window=``). Lower bound, over the whole stream:
``max(ceil(sum / max_cost), ceil(N / max_batch_size))`` (sum); for padded batches (``len * max``) the
optimum of the whole stream packed at once (``pack_padded``), which no buffer can beat; with groups,
the sum of each group's bound. Each row checks that every sample came once and no batch broke a cap
or mixed groups. About 1 minute with the defaults.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from adaptive_loader import AdaptiveLoader
from adaptive_loader.packing import pack_padded

MAX_COST, MAX_BATCH_SIZE = 1500, 10


class CostStream(IterableDataset):
    """Sample ``i`` is ``(i, cost, group)``; workers take every ``num_workers``-th sample."""

    def __init__(self, costs: np.ndarray, groups: np.ndarray) -> None:
        self.costs, self.groups = costs, groups

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in range(worker, len(self.costs), workers):
            yield i, float(self.costs[i]), int(self.groups[i])


def cost_of(sample) -> float:
    return sample[1]


def group_of(sample) -> int:
    return sample[2]


def as_list(batch):
    return batch


def lower_bound(mode: str, costs: np.ndarray, groups, max_cost: float) -> int:
    def one(c):
        if mode == "sum":
            return max(math.ceil(c.sum() / max_cost), math.ceil(len(c) / MAX_BATCH_SIZE))
        return len(np.unique(pack_padded(c, max_cost, MAX_BATCH_SIZE, leave_partial=False)))
    if groups is None:
        return one(costs)
    return sum(one(costs[groups == g]) for g in np.unique(groups))


def run(costs, groups, mode, grouped, buffer, workers):
    loader = AdaptiveLoader(CostStream(costs, groups), costs=cost_of, max_cost=MAX_COST,
                            max_batch_size=MAX_BATCH_SIZE, cost=mode, group_ids=group_of if grouped else None,
                            window=buffer, num_workers=workers, collate_fn=as_list)
    seen, batches = [], 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for batch in loader:
            batches += 1
            c = np.array([s[1] for s in batch])
            total = len(c) * c.max() if mode == "padded" else c.sum()
            assert len(batch) <= MAX_BATCH_SIZE and (total <= MAX_COST or len(batch) == 1), "a cap broken"
            assert not grouped or len({s[2] for s in batch}) == 1, "a batch mixes groups"
            seen.extend(s[0] for s in batch)
    loader.close()
    assert sorted(seen) == list(range(len(costs))), "not every sample once"
    return batches


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=20_000)
    p.add_argument("--buffers", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    costs = np.random.default_rng(0).integers(10, 1201, args.samples).astype(np.float64)
    groups = np.random.default_rng(1).integers(0, 3, args.samples)
    print(f"{args.samples:,} samples, costs uniform in [10, 1200], max_cost {MAX_COST}, max_batch_size "
          f"{MAX_BATCH_SIZE}\n")
    print("| mode | buffer | workers | batches | lower bound | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, grouped in (("sum", False), ("sum", True), ("padded", False)):
        bound = lower_bound(mode, costs, groups if grouped else None, MAX_COST)
        name = mode + (", 3 groups" if grouped else "")
        for buffer in args.buffers:
            for workers in args.workers:
                batches = run(costs, groups, mode, grouped, buffer, workers)
                print(f"| {name} | {buffer} | {workers} | {batches:,} | {bound:,} | {batches / bound:.3f} |",
                      flush=True)
    print(f"\n{time.perf_counter() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
