"""A transport-bound stream: 4 MiB tensors, batches of 8, 2 workers, default collate. Plain DataLoader
beside AdaptiveLoader, alternating in one process, so both see the same machine.

    .venv/bin/python tests/benchmarks/stream_transport.py [--samples 400] [--runs 5]

Each run builds a fresh loader and reads one epoch; MB/s is the bytes of the batches delivered over
the seconds from the loader's creation to its last batch. Every batch's content is checked (each
sample is filled with its own number). About a minute with the defaults.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from adaptive_loader import AdaptiveLoader

SAMPLE_FLOATS = 1 << 20  # 4 MiB of float32


class BigTensors(IterableDataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in range(worker, self.n, workers):
            yield torch.full((SAMPLE_FLOATS,), float(i))


def one_epoch(make) -> float:
    start = time.perf_counter()
    loader = make()
    seen, nbytes = [], 0
    for batch in loader:
        firsts = batch[:, 0]
        assert torch.equal(batch, firsts[:, None].expand_as(batch)), "a sample holds another's values"
        seen.extend(int(v) for v in firsts)
        nbytes += batch.numel() * 4
        del batch
    seconds = time.perf_counter() - start
    getattr(loader, "close", lambda: None)()
    assert sorted(seen) == list(range(len(seen))), "not every sample once"
    return nbytes / seconds / 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=400)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args(argv)
    loaders = {
        "DataLoader": lambda: DataLoader(BigTensors(args.samples), batch_size=8, num_workers=2),
        "AdaptiveLoader": lambda: AdaptiveLoader(BigTensors(args.samples), batch_size=8, num_workers=2),
    }
    rates = {name: [] for name in loaders}
    for _ in range(args.runs):
        for name, make in loaders.items():
            rates[name].append(one_epoch(make))
    base = statistics.median(rates["DataLoader"])
    print(f"{args.samples} samples of 4 MiB, batches of 8, 2 workers, {args.runs} runs each (alternating)\n")
    print("| loader | MB/s (median) | runs | vs DataLoader |")
    print("|---|---:|---|---:|")
    for name, values in rates.items():
        print(f"| {name} | {statistics.median(values):,.0f} | {', '.join(f'{v:,.0f}' for v in values)} | "
              f"{statistics.median(values) / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
