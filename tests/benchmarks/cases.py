"""The loader benchmark cases, shared by ``compare_loaders.py`` (a printed table) and
``test_bench_loader.py`` (pytest-benchmark).

Every variant of a case gets the very same batches: vanilla DataLoader takes a
``BudgetBatchSampler`` with the seed AdaptiveLoader uses, 2 workers each. Each variant is one
loader iterated epoch after epoch, as in training.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from adaptive_loader import AdaptiveLoader, BudgetBatchSampler  # noqa: E402
from stress.workloads import SegmentationDataset, VolumeDataset, detection_collate  # noqa: E402

__all__ = ["Case", "FloatBank", "list_collate", "transport_case", "seed_case", "volumes_case", "epoch_seconds",
           "close"]


class FloatBank(Dataset):
    """Trivial 4 MiB float32 samples made up front: ``__getitem__`` only returns one, so an epoch
    is the transport and the one copy a batch needs, nothing else. ``distinct`` tensors are made
    (all ``n`` by default) and sample ``i`` is tensor ``i % distinct``, so a long epoch needs
    little memory; only stacking collates should repeat them (a list collate would send a
    repeated tensor's shm again instead of copying it)."""

    def __init__(self, n: int, numel: int = 1 << 20, distinct: int = 0) -> None:
        self.n = n
        self.samples = [torch.full((numel,), float(i)) for i in range(distinct or n)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.samples[i % len(self.samples)]


def list_collate(batch: List[Any]) -> List[Any]:
    return list(batch)


@dataclass
class Case:
    name: str
    samples: int
    bytes_per_epoch: int
    goal: str
    variants: Dict[str, Callable[[], Any]]  # name -> makes the loader; the first is the baseline


def _same_batches(dataset, costs, max_cost, size, collate=None, arena_off=True,
                  **kwargs) -> Dict[str, Callable[[], Any]]:
    def vanilla():
        sampler = BudgetBatchSampler(costs, num_samples=len(dataset), max_cost=max_cost, max_batch_size=size,
                                     shuffle=True)
        return DataLoader(dataset, batch_sampler=sampler, num_workers=2, collate_fn=collate, **kwargs)

    def ours(**extra):
        return lambda: AdaptiveLoader(dataset, costs=costs, max_cost=max_cost, max_batch_size=size, num_workers=2,
                                      collate_fn=collate, shuffle=True, **kwargs, **extra)

    variants = {"vanilla DataLoader": vanilla, "AdaptiveLoader": ours()}
    if arena_off:
        variants["AdaptiveLoader, arena off"] = ours(arena=False)
    return variants


def transport_case(collate_name: str, samples: int = 400, persistent: bool = False, distinct: int = 0) -> Case:
    if distinct and collate_name == "list":
        raise ValueError("a list collate must not repeat tensors: vanilla would send their shm again, not copy")
    bank = FloatBank(samples, distinct=distinct)
    collate = list_collate if collate_name == "list" else None
    workers = "persistent workers" if persistent else "workers started each epoch"
    long_epoch = f", long epoch of {distinct} tensors repeated" if distinct else ""
    return Case(f"4 MiB float32 samples, {collate_name} collate, {workers}{long_epoch}", samples, samples * (4 << 20),
                "AdaptiveLoader >= 3x vanilla",
                _same_batches(bank, None, None, 8, collate, arena_off=not persistent, persistent_workers=persistent))


def seed_case(samples: int = 600) -> Case:
    costs = np.random.default_rng(0).integers(10, 1201, samples)
    dataset = SegmentationDataset(costs, side=35)  # ~1.2 KiB per mask: ~0.7 MiB per average image
    variants = _same_batches(dataset, costs, 3000, 10, detection_collate)
    for name, telemetry in (("telemetry records to a sink", lambda: (lambda record: None)),
                            ("live dashboard drawn to memory", _dashboard)):
        variants[f"AdaptiveLoader, {name}"] = lambda telemetry=telemetry: AdaptiveLoader(
            dataset, costs=costs, max_cost=3000, max_batch_size=10, num_workers=2, collate_fn=detection_collate,
            shuffle=True, telemetry=telemetry())
    nbytes = sum(int(c) * (35 * 35 + 36) + 3 * 35 * 35 * 4 + 8 for c in costs)  # masks, 4 small fields, image
    return Case("seed workload, tuple collate, plenty of shm", samples, nbytes, "AdaptiveLoader >= 0.98x vanilla",
                variants)


def _dashboard():
    import io

    from rich.console import Console

    from adaptive_loader.dashboard import Dashboard

    return Dashboard(console=Console(file=io.StringIO(), width=120, force_terminal=True))  # drawn for real


def volumes_case(samples: int = 1000) -> Case:
    dataset = VolumeDataset(samples, shape=(1, 64, 64, 64))
    return Case("1 MiB volumes, default collate", samples, samples << 20, "AdaptiveLoader >= 0.98x vanilla",
                _same_batches(dataset, None, None, 8))


def epoch_seconds(loader: Any) -> float:
    """One epoch, from asking for the first batch to the last (workers' start included, as a user sees it)."""
    import time

    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def close(loader: Any) -> None:
    """Stop persistent workers and give back shm now rather than at garbage collection."""
    if isinstance(loader, AdaptiveLoader):
        loader.close()
    else:
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()
