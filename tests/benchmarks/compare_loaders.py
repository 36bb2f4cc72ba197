"""Vanilla DataLoader against AdaptiveLoader on the same batches, plenty of shm; prints a table.

    .venv/bin/python tests/benchmarks/compare_loaders.py [--rounds 9]

Each case alternates the two loaders round by round (so drift on a busy machine hits both) and
reports the median epoch time; "ratio" is vanilla time / adaptive time (>1: adaptive is faster).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from adaptive_loader import AdaptiveLoader, BudgetBatchSampler  # noqa: E402
from stress.workloads import SegmentationDataset, VolumeDataset, detection_collate  # noqa: E402


class Floats(Dataset):
    """Trivial 4 MiB float32 samples: the transport is all there is to measure."""

    def __init__(self, n: int, numel: int = 1 << 20) -> None:
        self.n, self.numel = n, numel

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((self.numel,), float(i))


def list_collate(batch):
    return list(batch)


def cases():
    costs = np.random.default_rng(0).integers(10, 1201, 600)
    seg = SegmentationDataset(costs, side=35)
    vol = VolumeDataset(1000, shape=(1, 64, 64, 64))
    floats = Floats(400)

    def same(dataset, costs, max_cost, size, collate=None, **adaptive):
        sampler = lambda: BudgetBatchSampler(costs, num_samples=len(dataset), max_cost=max_cost,  # noqa: E731
                                             max_batch_size=size, shuffle=True)
        vanilla = lambda: DataLoader(dataset, batch_sampler=sampler(), num_workers=2,  # noqa: E731
                                     collate_fn=collate)
        ours = lambda: AdaptiveLoader(dataset, costs=costs, max_cost=max_cost, max_batch_size=size,  # noqa: E731
                                      num_workers=2, collate_fn=collate, shuffle=True, **adaptive)
        return vanilla, ours

    yield "seed workload, tuple collate", 600, *same(seg, costs, 3000, 10, detection_collate)
    yield "1 MiB volumes, default collate", 1000, *same(vol, None, None, 8)
    yield "4 MiB floats, default collate", 400, *same(floats, None, None, 8)
    yield "4 MiB floats, list collate", 400, *same(floats, None, None, 8, list_collate)


def epoch_seconds(make) -> float:
    loader = make()
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def memcpy_gbps() -> float:
    src, dst = torch.ones(64 << 20, dtype=torch.uint8), torch.empty(64 << 20, dtype=torch.uint8)
    dst.copy_(src)
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    return 10 * (64 << 20) / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, memcpy {memcpy_gbps():.1f} GB/s (warm buffers), "
          f"{args.rounds} rounds each, median epoch seconds\n")
    header = f"{'case':54} {'first':>8} {'second':>8} {'ratio':>7}"
    print(header + "\n" + "-" * len(header))
    for name, samples, first, second in cases():
        times = {0: [], 1: []}
        epoch_seconds(first), epoch_seconds(second)  # warm-up
        for _ in range(args.rounds):
            times[0].append(epoch_seconds(first))
            times[1].append(epoch_seconds(second))
        a, b = np.median(times[0]), np.median(times[1])
        print(f"{name:54} {a:8.3f} {b:8.3f} {a / b:7.3f}", flush=True)
    print("\nfirst = vanilla DataLoader, second = AdaptiveLoader; ratio = first / second")


if __name__ == "__main__":
    main()
