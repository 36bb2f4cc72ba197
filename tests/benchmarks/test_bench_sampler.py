"""Sampler packing quality and speed (pytest-benchmark; run with --benchmark-enable).

    .venv/bin/python -m pytest tests/benchmarks/test_bench_sampler.py --benchmark-enable
"""

import math

import numpy as np
import pytest
from torch.utils.data import BatchSampler, RandomSampler

from adaptive_loader import BudgetBatchSampler
from packing_table import bound

SEED_N = 100_000
EPOCH_N = 1_000_000


def seed_costs(n):
    return np.random.default_rng(0).integers(10, 1201, n)


def lower_bound(costs, max_cost, max_batch_size):
    return max(math.ceil(costs.sum() / max_cost), math.ceil(len(costs) / max_batch_size))


@pytest.mark.parametrize("window", [1024, 8192])
def test_packing_ratio_seed_distribution(benchmark, window):
    costs = seed_costs(SEED_N)
    sampler = BudgetBatchSampler(costs, max_cost=1500, max_batch_size=10, window=window)
    n_batches = benchmark.pedantic(lambda: sum(1 for _ in sampler), rounds=3, iterations=1)
    ratio = n_batches / lower_bound(costs, 1500, 10)
    benchmark.extra_info.update(batches=n_batches, ratio_to_lower_bound=round(ratio, 4))
    assert ratio <= 1.01


@pytest.mark.parametrize("mode, groups", [("sum", 3), ("padded", 1), ("padded", 3)])
def test_packing_ratio_groups_and_padded(benchmark, mode, groups):
    """The lower bounds are those of packing_table.py (which prints the full table)."""
    costs = seed_costs(SEED_N).astype(np.float64)
    group_ids = np.random.default_rng(1).integers(0, groups, SEED_N) if groups > 1 else None
    sampler = BudgetBatchSampler(costs, max_cost=1500, max_batch_size=10, group_ids=group_ids, cost=mode)
    n_batches = benchmark.pedantic(lambda: sum(1 for _ in sampler), rounds=3, iterations=1)
    ratio = n_batches / bound(mode, costs, group_ids, 1500)
    benchmark.extra_info.update(batches=n_batches, ratio_to_lower_bound=round(ratio, 4))
    assert 1 <= ratio <= 1.02


def test_epoch_1m_torch_batch_sampler(benchmark):
    sampler = BatchSampler(RandomSampler(range(EPOCH_N)), 10, drop_last=False)
    benchmark.pedantic(lambda: sum(1 for _ in sampler), rounds=5, iterations=1)


def test_epoch_1m_budget_sampler_seed_costs(benchmark):
    sampler = BudgetBatchSampler(seed_costs(EPOCH_N), max_cost=1500, max_batch_size=10)
    n = benchmark.pedantic(lambda: sum(1 for _ in sampler), rounds=5, iterations=1)
    benchmark.extra_info["batches"] = n


def test_epoch_1m_budget_sampler_uniform_costs(benchmark):
    sampler = BudgetBatchSampler(None, num_samples=EPOCH_N, max_batch_size=10)
    n = benchmark.pedantic(lambda: sum(1 for _ in sampler), rounds=5, iterations=1)
    benchmark.extra_info["batches"] = n


def test_replan_after_budget_change(benchmark):
    """Cost of one batch right after the budget moved (a chunk is planned again)."""
    sampler = BudgetBatchSampler(seed_costs(SEED_N), max_cost=1500, max_batch_size=10)
    it = iter(sampler)
    caps = iter([1500, 1400] * 10_000)

    def step():
        sampler.max_cost = next(caps)
        next(it)

    benchmark(step)
