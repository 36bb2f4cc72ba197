"""AdaptiveLoader against vanilla DataLoader on the same batches, with plenty of shm.

    .venv/bin/python -m pytest tests/benchmarks/test_bench_loader.py --benchmark-enable --benchmark-group-by=group

Both loaders get the same BudgetBatchSampler batches (seed 0, epoch 0), 2 workers, the
seed's workload scaled to ~1.2 KiB per mask, the seed's tuple collate and default collate.
"""

import numpy as np
import pytest
from torch.utils.data import DataLoader

from adaptive_loader import AdaptiveLoader, BudgetBatchSampler
from stress.workloads import SegmentationDataset, VolumeDataset, detection_collate

N = 600
COSTS = np.random.default_rng(0).integers(10, 1201, N)
SEG = SegmentationDataset(COSTS, side=35)  # ~1.2 KiB per mask: ~0.7 MiB per average image


def epoch(loader):
    return sum(1 for _ in loader)


def vanilla_seed():
    sampler = BudgetBatchSampler(COSTS, max_cost=3000, max_batch_size=10, shuffle=True)
    return DataLoader(SEG, batch_sampler=sampler, num_workers=2, collate_fn=detection_collate)


def adaptive_seed():
    return AdaptiveLoader(SEG, costs=COSTS, max_cost=3000, max_batch_size=10, num_workers=2,
                          collate_fn=detection_collate, shuffle=True)


VOLUMES = VolumeDataset(1000, shape=(1, 64, 64, 64))  # 1 MiB each, default collate


def vanilla_volumes():
    return DataLoader(VOLUMES, batch_sampler=BudgetBatchSampler(None, num_samples=len(VOLUMES), max_batch_size=8,
                                                                shuffle=True), num_workers=2)


def adaptive_volumes():
    return AdaptiveLoader(VOLUMES, max_batch_size=8, num_workers=2, shuffle=True)


@pytest.mark.parametrize("make", [vanilla_seed, adaptive_seed], ids=["vanilla", "adaptive"])
def test_seed_workload_tuple_collate(benchmark, make):
    benchmark.group = "seed workload, tuple collate, plenty of shm"
    assert benchmark.pedantic(lambda: epoch(make()), rounds=5, warmup_rounds=1) > 0


@pytest.mark.parametrize("make", [vanilla_volumes, adaptive_volumes], ids=["vanilla", "adaptive"])
def test_volumes_default_collate(benchmark, make):
    benchmark.group = "1 MiB volumes, default collate, plenty of shm"
    assert benchmark.pedantic(lambda: epoch(make()), rounds=9, warmup_rounds=1) > 0


def adaptive_seed_dashboard():
    import io

    from rich.console import Console

    from adaptive_loader.dashboard import Dashboard

    console = Console(file=io.StringIO(), width=120, force_terminal=True)  # drawn for real, to memory
    return AdaptiveLoader(SEG, costs=COSTS, max_cost=3000, max_batch_size=10, num_workers=2,
                          collate_fn=detection_collate, shuffle=True,
                          telemetry=Dashboard(total_samples=N, console=console))  # default 4 redraws/s


@pytest.mark.parametrize("make", [adaptive_seed, adaptive_seed_dashboard], ids=["no-telemetry", "dashboard"])
def test_dashboard_cost(benchmark, make):
    benchmark.group = "seed workload: live dashboard on/off"
    assert benchmark.pedantic(lambda: epoch(make()), rounds=7, warmup_rounds=1) > 0
