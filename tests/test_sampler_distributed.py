"""BudgetBatchSampler across ranks, simulated in one process (the torchrun tests run real ones)."""

import warnings
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from adaptive_loader import BudgetBatchSampler


def rank_batches(costs, replicas, schedule=(), **kwargs):
    out = []
    for rank in range(replicas):
        sampler = BudgetBatchSampler(costs, num_replicas=replicas, rank=rank, **kwargs)
        for at, max_cost, size in schedule:
            sampler.schedule_budget(at, max_cost, size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out.append((len(sampler) if not schedule else None, list(sampler)))
    return out


@settings(max_examples=80, deadline=None)
@given(costs=st.lists(st.integers(0, 1500), min_size=8, max_size=200), replicas=st.integers(1, 4),
       max_cost=st.integers(100, 3000), size=st.integers(1, 10), window=st.integers(4, 64),
       schedule=st.lists(st.tuples(st.integers(0, 60), st.integers(50, 3000), st.integers(1, 10)), max_size=3))
def test_equal_counts_and_every_index_once_over_ranks(costs, replicas, max_cost, size, window, schedule):
    per_rank = rank_batches(costs, replicas, schedule=sorted(schedule), max_cost=max_cost, max_batch_size=size,
                            window=window, seed=1)
    counts = {len(batches) for _, batches in per_rank}
    assert len(counts) == 1, "ranks got different numbers of batches"
    for expected_len, batches in per_rank:
        if expected_len is not None:
            assert expected_len == len(batches)
    seen = Counter(i for _, batches in per_rank for b in batches for i in b)
    assert all(c == 1 for c in seen.values())
    # indices are dropped only when the epoch's last window was all single-sample batches
    # and their count was not a multiple of the ranks: never more than replicas - 1
    assert len(set(range(len(costs))) - set(seen)) < replicas


def test_a_budget_change_at_an_agreed_batch_keeps_ranks_consistent():
    costs = np.random.default_rng(0).integers(10, 1201, 3000)
    per_rank = rank_batches(costs, 2, schedule=[(40, 700, 10), (90, 2000, 10)], max_cost=1500, max_batch_size=10,
                            window=256)
    a, b = (batches for _, batches in per_rank)
    assert len(a) == len(b)
    assert sorted(i for batch in a + b for i in batch) == list(range(3000))
    in_window = a[20:45] + b[20:45]  # global batches 40..89, planned at max_cost 700
    assert all(costs[batch].sum() <= 700 or len(batch) == 1 for batch in in_window)
    assert max(costs[batch].sum() for batch in a[:20] + b[:20]) > 700  # before it: at 1500


def test_fewer_samples_than_ranks_is_refused():
    with pytest.raises(ValueError, match="3 samples cannot give each of 4 ranks a batch"):
        BudgetBatchSampler([1, 2, 3], max_cost=5, num_replicas=4, rank=0)
    with pytest.raises(ValueError, match="rank must be < num_replicas"):
        BudgetBatchSampler([1, 2, 3], max_cost=5, num_replicas=2, rank=2)


def test_singletons_that_cannot_be_evened_out_are_dropped_with_a_warning():
    costs = [10] * 5  # each above max_cost: five single-sample batches over two ranks
    samplers = [BudgetBatchSampler(costs, max_cost=5, num_replicas=2, rank=r, shuffle=False) for r in range(2)]
    with pytest.warns(UserWarning, match=r"1 single-sample batches dropped .* so that 2 ranks get as many"):
        first = list(samplers[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        second = list(samplers[1])
    assert len(first) == len(second) == 2
    assert len({i for b in first + second for i in b}) == 4


def test_state_round_trip_on_one_rank():
    costs = np.random.default_rng(3).integers(10, 1201, 1000)
    full = rank_batches(costs, 2, max_cost=1500, max_batch_size=10, window=128)[1][1]
    sampler = BudgetBatchSampler(costs, max_cost=1500, max_batch_size=10, window=128, num_replicas=2, rank=1)
    it = iter(sampler)
    head = [next(it) for _ in range(30)]
    fresh = BudgetBatchSampler(costs, max_cost=1500, max_batch_size=10, window=128, num_replicas=2, rank=1)
    fresh.load_state_dict(sampler.state_dict())
    assert head + list(fresh) == full
    other = BudgetBatchSampler(costs, max_cost=1500, max_batch_size=10, window=128, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="state is for rank 1 of 2"):
        other.load_state_dict(sampler.state_dict())


def test_schedule_budget_validates():
    sampler = BudgetBatchSampler([1, 2, 3, 4], max_cost=5)
    with pytest.raises(ValueError, match="max_cost must be > 0"):
        sampler.schedule_budget(2, -1, None)
    with pytest.raises(ValueError, match="give max_cost, max_batch_size or both"):
        sampler.schedule_budget(2, None, None)


def test_drop_last_with_several_replicas_is_refused():
    with pytest.raises(ValueError, match="drop_last=True is not supported with several replicas"):
        BudgetBatchSampler([1, 2, 3, 4], max_cost=5, num_replicas=2, rank=0, drop_last=True)


def test_a_budget_agreed_past_the_epochs_end_starts_the_next_epoch_on_every_rank_alike():
    """Ranks agree after a batch, and a rank that planned ahead may have run out of batches by then
    while another has not: the budget agreed from the epoch's last global batch on must start the
    next epoch on both (seen across two nodes: one loaded in its main process, the other ahead)."""
    costs = np.random.default_rng(0).integers(1, 51, 96)
    epochs = []
    for ran_out_first in (True, False):
        sampler = BudgetBatchSampler(costs, max_cost=160, max_batch_size=8, shuffle=True, seed=0, num_replicas=4,
                                     rank=0)
        batches = iter(sampler)
        first = [next(batches) for _ in range(3)]
        end = 4 * len(sampler)  # global batches in this epoch
        if ran_out_first:
            first += list(batches)
            sampler.schedule_budget(end, 1.0, 8)
        else:
            sampler.schedule_budget(end, 1.0, 8)
            first += list(batches)
        sampler.set_epoch(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # every sample costs more than 1: a batch of its own
            epochs.append((first, list(sampler)))
    (first_a, next_a), (first_b, next_b) = epochs
    assert [list(b) for b in first_a] == [list(b) for b in first_b]
    assert [list(b) for b in next_a] == [list(b) for b in next_b] and all(len(b) == 1 for b in next_a)
