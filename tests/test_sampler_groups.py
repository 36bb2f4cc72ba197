"""BudgetBatchSampler's group_ids and cost modes ("sum", "padded", quadratic), property-based."""

import math
import pickle
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from adaptive_loader import BudgetBatchSampler
from adaptive_loader.packing import pack_padded, padded_capacity

EPS = 1e-9
budgets = st.tuples(st.one_of(st.none(), st.floats(1, 3000)), st.one_of(st.none(), st.integers(1, 12))).filter(
    lambda b: b != (None, None))
modes = st.tuples(st.sampled_from(["sum", "padded"]), st.sampled_from([0.0, 0.0, 0.001, 0.5]))


@st.composite
def costs_and_groups(draw, min_size=0, max_size=200):
    n = draw(st.integers(min_size, max_size))
    value = st.one_of(st.integers(0, 2000), st.floats(0, 2000, allow_nan=False, allow_infinity=False))
    costs = draw(st.lists(value, min_size=n, max_size=n))
    n_groups = draw(st.integers(1, 5))
    groups = draw(st.lists(st.integers(-2, n_groups - 3), min_size=n, max_size=n))
    return costs, groups


def unit(costs, quadratic):
    c = np.asarray(costs, np.float64)
    return c + quadratic * c**2


def batch_total(batch, costs, mode, quadratic):
    u = unit(costs, quadratic)[batch]
    return len(u) * u.max() if mode == "padded" else u.sum()


def check_batches(batches, costs, groups, max_cost, max_batch_size, mode="sum", quadratic=0.0, expect_all=True):
    """Every index at most once (all of them if ``expect_all``), no empty batch, no batch that mixes
    groups, caps respected except by a single sample over ``max_cost`` on its own."""
    flat = [i for b in batches for i in b]
    assert all(c == 1 for c in Counter(flat).values()), "an index came twice"
    if expect_all:
        assert sorted(flat) == list(range(len(costs)))
    for b in batches:
        assert b, "empty batch"
        if groups is not None:
            assert len({groups[i] for i in b}) == 1, f"batch {b} mixes groups {[groups[i] for i in b]}"
        if max_batch_size is not None:
            assert len(b) <= max_batch_size
        total = batch_total(b, costs, mode, quadratic)
        if max_cost is not None and total > max_cost * (1 + EPS):
            assert len(b) == 1 and unit(costs, quadratic)[b[0]] > max_cost, (b, total)


def quiet(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


@settings(max_examples=100, deadline=None)
@given(data=costs_and_groups(), budget=budgets, mode=modes, use_groups=st.booleans(), shuffle=st.booleans(),
       seed=st.integers(0, 5), window=st.integers(1, 64))
def test_exactly_once_within_budget_never_mixing_groups(data, budget, mode, use_groups, shuffle, seed, window):
    costs, groups = data
    groups = groups if use_groups else None
    s = BudgetBatchSampler(costs, max_cost=budget[0], max_batch_size=budget[1], shuffle=shuffle, seed=seed,
                           window=window, group_ids=groups, cost=mode[0], quadratic=mode[1])
    batches = quiet(list, s)
    assert len(s) == len(batches)
    check_batches(batches, costs, groups, *budget, *mode)
    for b in batches:
        assert s.batch_cost(b) == pytest.approx(batch_total(b, costs, *mode))
    if not shuffle:
        assert all(b == sorted(b) for b in batches)


@settings(max_examples=50, deadline=None)
@given(data=costs_and_groups(), first=budgets, changes=st.dictionaries(st.integers(0, 40), budgets, max_size=5),
       mode=modes, window=st.integers(1, 64))
def test_budget_changes_mid_epoch_with_groups(data, first, changes, mode, window):
    costs, groups = data
    s = BudgetBatchSampler(costs, max_cost=first[0], max_batch_size=first[1], window=window, group_ids=groups,
                           cost=mode[0], quadratic=mode[1])
    batches, budget = [], first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, batch in enumerate(s):
            check_batches([batch], costs, groups, *budget, *mode, expect_all=False)  # the budget when asked
            batches.append(batch)
            if i in changes:
                budget = changes[i]
                s.set_budget(*budget)
    check_batches(batches, costs, groups, None, None)


@settings(max_examples=50, deadline=None)
@given(data=costs_and_groups(), budget=budgets, mode=modes, k=st.integers(0, 50), shuffle=st.booleans(),
       window=st.integers(1, 64), restored_budget=budgets)
def test_resume_mid_epoch_delivers_exactly_the_rest(data, budget, mode, k, shuffle, window, restored_budget):
    costs, groups = data
    kw = dict(shuffle=shuffle, seed=3, window=window, group_ids=groups, cost=mode[0], quadratic=mode[1])
    s = BudgetBatchSampler(costs, max_cost=budget[0], max_batch_size=budget[1], **kw)
    s.set_epoch(1)
    it = iter(s)
    head = quiet(lambda: [b for _, b in zip(range(k), it)])
    state = pickle.loads(pickle.dumps(s.state_dict()))
    same = BudgetBatchSampler(costs, max_cost=budget[0], max_batch_size=budget[1], **kw)
    same.load_state_dict(state)
    assert quiet(list, same) == quiet(list, it)  # same settings: the very same batches
    other = BudgetBatchSampler(costs, max_cost=restored_budget[0], max_batch_size=restored_budget[1], **kw)
    other.load_state_dict(state)
    expected_len = len(other)
    tail = quiet(list, other)
    assert len(tail) == expected_len
    check_batches(tail, costs, groups, *restored_budget, *mode, expect_all=False)
    assert sorted(i for b in head + tail for i in b) == list(range(len(costs)))


@settings(max_examples=40, deadline=None)
@given(data=costs_and_groups(min_size=8, max_size=200), replicas=st.integers(1, 4), mode=modes,
       max_cost=st.integers(100, 3000), size=st.integers(1, 10), window=st.integers(4, 64))
def test_ranks_cover_every_index_once_with_equal_counts(data, replicas, mode, max_cost, size, window):
    costs, groups = data
    per_rank = []
    for rank in range(replicas):
        s = BudgetBatchSampler(costs, max_cost=max_cost, max_batch_size=size, window=window, seed=1,
                               num_replicas=replicas, rank=rank, group_ids=groups, cost=mode[0], quadratic=mode[1])
        batches = quiet(list, s)
        assert len(s) == len(batches)
        check_batches(batches, costs, groups, max_cost, size, *mode, expect_all=False)
        per_rank.append(batches)
    assert len({len(b) for b in per_rank}) == 1, "ranks got different numbers of batches"
    seen = Counter(i for batches in per_rank for b in batches for i in b)
    assert all(c == 1 for c in seen.values())
    # as without groups: only single-sample batches that cannot be evened out over the ranks are dropped
    assert len(set(range(len(costs))) - set(seen)) < replicas


@settings(max_examples=40, deadline=None)
@given(data=costs_and_groups(min_size=1, max_size=200), mode=modes, k=st.integers(0, 30),
       back=st.integers(0, 5))
def test_requeued_batches_come_again_within_their_group(data, mode, k, back):
    costs, groups = data
    s = BudgetBatchSampler(costs, max_cost=1500, max_batch_size=6, window=16, group_ids=groups, cost=mode[0],
                           quadratic=mode[1])
    it = iter(s)
    head = quiet(lambda: [b for _, b in zip(range(k), it)])
    lost = head[len(head) - min(back, len(head)):]
    s.requeue([i for b in lost for i in b])
    rest = quiet(list, s.iter_remaining())
    check_batches(head[: len(head) - len(lost)] + rest, costs, groups, 1500, 6, *mode)


@settings(max_examples=200, deadline=None)
@given(costs=st.lists(st.integers(0, 100), min_size=1, max_size=7), max_cost=st.integers(1, 200),
       size=st.integers(1, 5))
def test_padded_kernel_needs_the_fewest_batches_possible(costs, max_cost, size):
    x = np.array([c for c in costs if c <= max_cost], np.float64)
    if not len(x):
        return
    batch_of = pack_padded(x, max_cost, size, leave_partial=False)
    assert (batch_of >= 0).all()
    for b in np.unique(batch_of):
        members = x[batch_of == b]
        assert len(members) <= size and len(members) * members.max() <= max_cost
    assert len(np.unique(batch_of)) == brute_force_padded(list(x), max_cost, size)


def brute_force_padded(x, max_cost, size):
    """The fewest padded batches, over every partition of ``x`` (fine for up to 7 items)."""
    best = [len(x)]

    def place(i, blocks):
        if len(blocks) >= best[0]:
            return
        if i == len(x):
            best[0] = len(blocks)
            return
        for block in blocks:
            if len(block) < size and (len(block) + 1) * max(block + [x[i]]) <= max_cost:
                block.append(x[i])
                place(i + 1, blocks)
                block.pop()
        blocks.append([x[i]])
        place(i + 1, blocks)
        blocks.pop()

    place(0, [])
    return best[0]


def test_padded_capacity_respects_the_cap_under_float_rounding():
    x, max_cost = 81.32721064978804, 406.6360532489402  # max_cost / x rounds up to 5.0, but 5 * x > max_cost
    assert max_cost / x == 5.0 and 5 * x > max_cost
    assert list(padded_capacity(np.array([x]), max_cost, 2**62)) == [4]
    x = np.array([0.1, 0.3, 1 / 3, 7.0, 0.0, 1e-320])
    cap = padded_capacity(x, 1.0, 2**62)
    assert (cap[:3] * x[:3] <= 1.0).all() and ((cap[:3] + 1) * x[:3] > 1.0).all()
    assert cap[3] == 1 and cap[4] == cap[5] == 2**62  # oversized: still 1; cost 0 (or nearly): no cost cap
    assert list(padded_capacity(np.array([300.0, 10.0]), 1500, 4)) == [4, 4]


SEED_COSTS = np.random.default_rng(0).integers(10, 1201, 100_000)
SEED_GROUPS = np.random.default_rng(1).integers(0, 3, len(SEED_COSTS))


def sum_bound(c):
    return max(math.ceil(c.sum() / 1500), math.ceil(len(c) / 10))


def padded_bound(c):
    """The optimum for the whole set at once (see pack_padded's proof): a lower bound for any window."""
    return len(np.unique(pack_padded(c.astype(np.float64), 1500, 10, leave_partial=False)))


@pytest.mark.parametrize("mode, use_groups", [("sum", True), ("padded", False), ("padded", True)])
def test_packing_on_the_seed_distribution_within_2_percent_of_the_bound(mode, use_groups):
    groups = SEED_GROUPS if use_groups else None
    s = BudgetBatchSampler(SEED_COSTS, max_cost=1500, max_batch_size=10, group_ids=groups, cost=mode)
    batches = list(s)
    bound_of = sum_bound if mode == "sum" else padded_bound
    if use_groups:
        bound = sum(bound_of(SEED_COSTS[SEED_GROUPS == g]) for g in range(3))
    else:
        bound = bound_of(SEED_COSTS)
    assert bound <= len(batches) <= 1.02 * bound
    flat = np.concatenate(batches)
    assert np.array_equal(np.sort(flat), np.arange(len(SEED_COSTS)))
    # still shuffled: batch order does not follow cost (padded buckets by cost only within a window)
    starts = np.cumsum([0] + [len(b) for b in batches[:-1]])
    mean_cost = np.add.reduceat(SEED_COSTS[flat], starts) / np.diff(np.append(starts, len(flat)))
    assert abs(np.corrcoef(np.arange(len(batches)), mean_cost)[0, 1]) < 0.2


def test_padded_budgets_size_times_largest_and_quadratic_adds_to_each_cost():
    s = BudgetBatchSampler([100, 400, 400, 100], max_cost=1000, cost="padded", shuffle=False)
    assert s.batch_cost([0, 1]) == 800 and s.batch_cost([0, 3]) == 200 and s.batch_cost([]) == 0
    assert sorted(map(sorted, s)) == [[0, 3], [1, 2]]  # padding: the small pair together, the large pair together
    q = BudgetBatchSampler([10, 20], max_cost=1000, cost="padded", quadratic=0.5)
    assert q.batch_cost([0, 1]) == 2 * (20 + 0.5 * 400)
    assert list(q.unit_costs) == [60, 220] and list(q.costs) == [10, 20]
    assert BudgetBatchSampler([10, 20], max_cost=1000, quadratic=0.5).batch_cost([0, 1]) == 280


def test_a_sample_oversized_by_its_padded_or_quadratic_cost_goes_alone_with_a_warning():
    s = BudgetBatchSampler([10, 60, 10], max_cost=1000, quadratic=0.3, max_batch_size=3)  # 60 counts 1140
    with pytest.warns(UserWarning, match=r"sample 1 has cost 1140 > max_cost 1000"):
        batches = list(s)
    assert [1] in batches and sorted(i for b in batches for i in b) == [0, 1, 2]


def test_drop_last_in_padded_mode_drops_an_under_half_full_final_batch():
    s = BudgetBatchSampler([100] * 21, max_cost=1000, cost="padded", shuffle=False, drop_last=True)
    assert [len(b) for b in s] == [10, 10]  # the last batch (1 sample, 100 of 1000) is dropped
    assert len(s) == 2


def test_group_ids_with_uniform_costs_give_full_batches_per_group():
    groups = [0, 1] * 10 + [2]
    s = BudgetBatchSampler(None, num_samples=21, max_batch_size=4, group_ids=groups, shuffle=False)
    batches = list(s)
    check_batches(batches, [1] * 21, groups, None, 4)
    assert sorted(len(b) for b in batches) == [1, 2, 2, 4, 4, 4, 4]


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(group_ids=[0, 1]), ValueError, "group_ids has 2 entries but the dataset has 3"),
    (dict(group_ids=[0.0, 1.0, 2.0]), TypeError, "group_ids must be integers, got dtype float64"),
    (dict(group_ids=[True, False, True]), TypeError, "group_ids must be integers, got dtype bool"),
    (dict(group_ids=["a", "b", "c"]), TypeError, "group_ids must be integers"),
    (dict(group_ids=[0, None, 1]), TypeError, "group_ids must be integers, got dtype object"),
    (dict(group_ids=[[0, 1, 2]]), ValueError, "group_ids must be one-dimensional"),
    (dict(group_ids=3), TypeError, "group_ids must be a sequence of numbers"),
    (dict(cost="max"), ValueError, r"cost must be one of \('sum', 'padded'\), got 'max'"),
    (dict(cost=None), TypeError, "cost must be one of .* got NoneType"),
    (dict(quadratic=-0.1), ValueError, "quadratic must be finite and >= 0, got -0.1"),
    (dict(quadratic=float("nan")), ValueError, "quadratic must be finite and >= 0"),
    (dict(quadratic=float("inf")), ValueError, "quadratic must be finite and >= 0"),
    (dict(quadratic="1"), TypeError, "quadratic must be a number, got str"),
    (dict(quadratic=1e308), ValueError, r"quadratic=1e\+308 makes costs\[1\] = 2 count as infinity"),
])
def test_bad_group_ids_cost_and_quadratic_are_refused_at_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        BudgetBatchSampler([1, 2, 3], max_cost=5, **kwargs)


def test_costs_as_a_callable_need_num_samples():
    s = BudgetBatchSampler(lambda i: [5, 1, 4][i], num_samples=3, max_cost=6, shuffle=False)
    assert list(s.costs) == [5, 1, 4] and sorted(map(sorted, s)) == [[0, 1], [2]]
    with pytest.raises(ValueError, match="a callable costs needs the number of samples"):
        BudgetBatchSampler(lambda i: 1, max_cost=6)


def test_group_ids_from_tensors_and_numpy():
    for groups in (torch.tensor([0, 1, 0, 1]), np.array([5, 7, 5, 7], np.int32), (0, 1, 0, 1)):
        s = BudgetBatchSampler([1, 1, 1, 1], max_cost=10, group_ids=groups)
        assert sorted(sorted(b) for b in s) == [[0, 2], [1, 3]]
        assert s.group_ids.dtype == np.int64 and not s.group_ids.flags.writeable
