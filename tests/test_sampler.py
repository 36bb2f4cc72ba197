"""Invariants of BudgetBatchSampler, property-based where it pays."""

import math
import pickle
import subprocess
import sys
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from torch.utils.data import BatchSampler, SequentialSampler

from adaptive_loader import BudgetBatchSampler

EPS = 1e-9

cost_lists = st.lists(
    st.one_of(st.integers(0, 2000), st.floats(0, 2000, allow_nan=False, allow_infinity=False)),
    min_size=0, max_size=300)
budgets = st.tuples(st.one_of(st.none(), st.floats(1, 3000)), st.one_of(st.none(), st.integers(1, 12))).filter(
    lambda b: b != (None, None))


def check_batches(batches, costs, max_cost, max_batch_size, expect_all=True):
    """Every index once, no empty batch, caps respected except oversized singletons."""
    flat = [i for b in batches for i in b]
    counts = Counter(flat)
    assert all(c == 1 for c in counts.values()), "an index came twice"
    if expect_all:
        assert sorted(flat) == list(range(len(costs)))
    for b in batches:
        assert b, "empty batch"
        if max_batch_size is not None:
            assert len(b) <= max_batch_size
        total = sum(costs[i] for i in b)
        if max_cost is not None and total > max_cost * (1 + EPS):
            assert len(b) == 1 and costs[b[0]] > max_cost, (b, total)


@settings(max_examples=150, deadline=None)
@given(costs=cost_lists, budget=budgets, shuffle=st.booleans(), seed=st.integers(0, 10), window=st.integers(1, 64))
def test_exactly_once_within_budget(costs, budget, shuffle, seed, window):
    max_cost, max_batch_size = budget
    s = BudgetBatchSampler(costs, max_cost=max_cost, max_batch_size=max_batch_size, shuffle=shuffle,
                           seed=seed, window=window)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(s)
        assert len(s) == len(batches)
    check_batches(batches, costs, max_cost, max_batch_size)


@settings(max_examples=100, deadline=None)
@given(costs=cost_lists, first=budgets, changes=st.dictionaries(st.integers(0, 40), budgets, max_size=6),
       window=st.integers(1, 64))
def test_budget_changes_mid_epoch(costs, first, changes, window):
    s = BudgetBatchSampler(costs, max_cost=first[0], max_batch_size=first[1], window=window)
    batches = []
    budget = first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, batch in enumerate(s):
            check_batches([batch], costs, *budget, expect_all=False)  # the budget in force when asked
            batches.append(batch)
            if i in changes:
                budget = changes[i]
                s.set_budget(*budget)
    check_batches(batches, costs, None, None)


@settings(max_examples=100, deadline=None)
@given(costs=cost_lists, budget=budgets, k=st.integers(0, 50), shuffle=st.booleans(), window=st.integers(1, 64),
       restored_budget=budgets)
def test_state_round_trip(costs, budget, k, shuffle, window, restored_budget):
    kw = dict(shuffle=shuffle, seed=3, window=window)
    s = BudgetBatchSampler(costs, max_cost=budget[0], max_batch_size=budget[1], **kw)
    s.set_epoch(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        it = iter(s)
        head = [b for _, b in zip(range(k), it)]
        state = pickle.loads(pickle.dumps(s.state_dict()))
        fresh = BudgetBatchSampler(costs, max_cost=restored_budget[0], max_batch_size=restored_budget[1], **kw)
        fresh.load_state_dict(state)
        assert fresh.epoch == 2
        expected_len = len(fresh)
        tail = list(fresh)
    assert len(tail) == expected_len
    check_batches(tail, costs, restored_budget[0], restored_budget[1], expect_all=False)
    assert sorted(i for b in head + tail for i in b) == list(range(len(costs)))


def test_resume_at_same_budget_continues_identically():
    costs = np.random.default_rng(1).integers(10, 1201, 3000)
    a = BudgetBatchSampler(costs, max_cost=1500, max_batch_size=10, window=256)
    full = list(a)
    b = BudgetBatchSampler(costs, max_cost=1500, max_batch_size=10, window=256)
    it = iter(b)
    head = [next(it) for _ in range(100)]
    c = BudgetBatchSampler(costs, max_cost=1500, max_batch_size=10, window=256)
    c.load_state_dict(b.state_dict())
    assert head + list(c) == full


def test_deterministic_across_processes_and_epochs():
    code = ("import numpy as np; from adaptive_loader import BudgetBatchSampler as B;"
            "c=np.random.default_rng(5).integers(10,1201,2000);"
            "s=B(c,max_cost=1500,max_batch_size=10,seed=7); s.set_epoch(3); print(list(s))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    costs = np.random.default_rng(5).integers(10, 1201, 2000)
    s = BudgetBatchSampler(costs, max_cost=1500, max_batch_size=10, seed=7)
    s.set_epoch(3)
    assert out.strip() == str(list(s))
    epoch3 = list(s)
    s.set_epoch(4)
    assert list(s) != epoch3
    assert list(BudgetBatchSampler(costs, max_cost=1500, max_batch_size=10, seed=8)) != epoch3


def test_shuffle_false_keeps_dataset_order():
    costs = [1] * 25
    s = BudgetBatchSampler(costs, max_cost=4, shuffle=False)
    assert list(s) == [list(range(i, min(i + 4, 25))) for i in range(0, 25, 4)]
    mixed = BudgetBatchSampler([5, 1, 9, 3, 7, 2], max_cost=10, shuffle=False)
    batches = list(mixed)
    firsts = [b[0] for b in batches]
    assert firsts == sorted(firsts) and all(b == sorted(b) for b in batches)


def test_tight_packing_on_the_seed_distribution_stays_shuffled():
    costs = np.random.default_rng(0).integers(10, 1201, 100_000)
    s = BudgetBatchSampler(costs, max_cost=1500, max_batch_size=10)
    batches = list(s)
    lower = max(math.ceil(costs.sum() / 1500), math.ceil(len(costs) / 10))
    assert len(batches) <= 1.01 * lower
    # not sorted by cost across the epoch: first and second half have about the same mean cost
    mean_cost = [costs[b].sum() / len(b) for b in batches]
    half = len(mean_cost) // 2
    assert abs(np.mean(mean_cost[:half]) - np.mean(mean_cost[half:])) < 15
    # and not in dataset order
    assert abs(np.corrcoef(np.arange(len(batches)), [min(b) for b in batches])[0, 1]) < 0.2


def test_oversized_sample_alone_with_one_warning_per_epoch():
    costs = [100, 2000, 50, 3000, 10]
    s = BudgetBatchSampler(costs, max_cost=1500, max_batch_size=4)
    with pytest.warns(UserWarning, match=r"sample (1|3) has cost (2000|3000) > max_cost 1500") as rec:
        batches = list(s)
    assert len([w for w in rec if issubclass(w.category, UserWarning)]) == 1
    assert [1] in batches and [3] in batches
    check_batches(batches, costs, 1500, 4)


def test_costs_none_means_one_each():
    s = BudgetBatchSampler(None, num_samples=23, max_batch_size=5, shuffle=False)
    assert [len(b) for b in s] == [5, 5, 5, 5, 3]
    assert len(s) == 5
    assert len(BudgetBatchSampler(None, num_samples=23, max_cost=2.5)) == 12


@settings(max_examples=100, deadline=None)
@given(n=st.integers(0, 120), size=st.integers(1, 12), drop_last=st.booleans(), window=st.integers(1, 64),
       costs=st.sampled_from(["none", "ones", "varied"]))
def test_without_max_cost_the_batches_are_dataloaders(n, size, drop_last, window, costs):
    """A size cap alone: the very batches of BatchSampler(SequentialSampler), drop_last included,
    whatever the costs (they count for nothing without max_cost)."""
    values = {"none": None, "ones": [1] * n, "varied": [(7 * i) % 13 for i in range(n)]}[costs]
    s = BudgetBatchSampler(values, num_samples=n, max_batch_size=size, shuffle=False, drop_last=drop_last,
                           window=window)
    expected = list(BatchSampler(SequentialSampler(range(n)), size, drop_last))
    assert list(s) == expected
    assert len(s) == len(expected)


def test_drop_last_without_max_cost_drops_a_final_batch_that_is_not_full():
    s = BudgetBatchSampler(None, num_samples=27, max_batch_size=10, shuffle=False, drop_last=True)
    assert [len(b) for b in s] == [10, 10]
    assert len(s) == 2
    s = BudgetBatchSampler(None, num_samples=12, max_batch_size=4, shuffle=False, drop_last=True)
    assert list(s) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]  # all full: none moves, none dropped


def test_drop_last_without_max_cost_shuffled_drops_only_the_remainder():
    s = BudgetBatchSampler(None, num_samples=103, max_batch_size=10, shuffle=True, seed=4, drop_last=True)
    batches = list(s)
    assert [len(b) for b in batches] == [10] * 10 and len(s) == 10
    assert len({i for b in batches for i in b}) == 100


def test_drop_last_with_max_cost_drops_only_an_under_half_full_final_batch():
    s = BudgetBatchSampler(None, num_samples=23, max_cost=10, shuffle=False, drop_last=True)
    assert [len(b) for b in s] == [10, 10]
    assert len(s) == 2
    s = BudgetBatchSampler(None, num_samples=27, max_cost=10, shuffle=False, drop_last=True)
    assert [len(b) for b in s] == [10, 10, 7]
    # the least filled batch goes last, then is dropped only when under half of max_cost as well
    s = BudgetBatchSampler([1, 5, 5, 5, 5], max_cost=10, max_batch_size=10, shuffle=False, drop_last=True)
    assert list(s) == [[1, 3], [2, 4]] and len(s) == 2
    s = BudgetBatchSampler([6, 5, 5, 5, 5], max_cost=10, max_batch_size=10, shuffle=False, drop_last=True)
    assert list(s) == [[1, 2], [3, 4], [0]] and len(s) == 3


def test_cost_containers():
    pd = pytest.importorskip("pandas", reason="pandas is in the dev extra; costs as a Series need it")
    values = [3, 1, 4, 1, 5]
    for costs in (values, tuple(values), np.array(values), torch.tensor(values), pd.Series(values)):
        s = BudgetBatchSampler(costs, max_cost=5, shuffle=False)
        check_batches(list(s), values, 5, None)


@pytest.mark.parametrize("costs, kwargs, exc, match", [
    ([1, -1], dict(max_cost=5), ValueError, r"costs\[1\] = -1"),
    ([1, float("nan")], dict(max_cost=5), ValueError, r"costs\[1\] = nan"),
    ([float("inf")], dict(max_cost=5), ValueError, r"costs\[0\] = inf"),
    (["a", "b"], dict(max_cost=5), TypeError, "numeric"),
    ([1, None], dict(max_cost=5), TypeError, "numeric"),
    (5, dict(max_cost=5), TypeError, "sequence"),
    ([[1, 2]], dict(max_cost=5), ValueError, "one-dimensional"),
    ([1, 2], dict(max_cost=0), ValueError, "max_cost must be > 0"),
    ([1, 2], dict(max_cost=-3), ValueError, "max_cost must be > 0"),
    ([1, 2], dict(max_cost=float("nan")), ValueError, "max_cost must be > 0"),
    ([1, 2], dict(max_cost="10"), TypeError, "max_cost must be a number"),
    ([1, 2], dict(max_batch_size=0), ValueError, "max_batch_size must be >= 1"),
    ([1, 2], dict(max_batch_size=2.5), TypeError, "max_batch_size must be an int"),
    ([1, 2], dict(), ValueError, "give max_cost, max_batch_size or both"),
    (None, dict(max_cost=3), ValueError, "num_samples"),
    ([1, 2], dict(max_cost=3, num_samples=3), ValueError, "costs has 2 entries but the dataset has 3"),
])
def test_bad_input_is_refused_at_construction(costs, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        BudgetBatchSampler(costs, **kwargs)


def test_setting_a_bad_budget_later_is_refused():
    s = BudgetBatchSampler([1, 2, 3], max_cost=3)
    with pytest.raises(ValueError):
        s.max_cost = -1
    with pytest.raises(ValueError, match="needs a max_batch_size"):
        s.max_cost = None
    assert s.max_cost == 3
