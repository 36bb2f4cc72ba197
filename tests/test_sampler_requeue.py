"""BudgetBatchSampler.schedule_requeue: a batch given back from an agreed global batch (issue 16).

Ranks are simulated in one process: one sampler per rank, stepped in lockstep like training steps,
each rank's iterator running a few batches ahead of its steps as DataLoader's prefetch does. When a
step fails, every rank schedules the union of that step's batches at the furthest global batch any
rank has planned, as the step guard does (docs/device.md).
"""

import io
import re
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from adaptive_loader import BudgetBatchSampler

DROPPED = re.compile(r"single-sample batches dropped .*: indices \[([0-9, ]*)\]")


def run_ranks(costs, replicas, failures, lookahead=None, force_at=None, snapshot_at=None, **kwargs):
    """Step every rank's sampler in lockstep. ``failures`` maps a step to a delay: that step fails
    on every rank and the union of its batches is requeued at the furthest position + delay (or at
    ``force_at[step]``). Returns per rank what its iterator yielded, the steps that failed, the
    requeue batches used, the samplers, the indices dropped to even ranks out, and the schedule
    logged right after the step ``snapshot_at`` failed."""
    lookahead = lookahead or [0] * replicas
    samplers = [BudgetBatchSampler(costs, num_replicas=replicas, rank=r, **kwargs) for r in range(replicas)]
    iterators = [iter(s) for s in samplers]
    pulled = [[] for _ in range(replicas)]
    failed, used_at, snapshot, dropped = [], {}, None, []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = 0
        while True:
            for r in range(replicas):
                while len(pulled[r]) < step + 1 + lookahead[r]:
                    batch = next(iterators[r], None)
                    if batch is None:
                        break
                    pulled[r].append(batch)
            have = [len(p) > step for p in pulled]
            assert len(set(have)) == 1, f"ranks disagree on whether step {step} exists"
            if not have[0]:
                break
            if step in failures:
                union = sorted(i for p in pulled for i in p[step])
                at = max(s.global_position for s in samplers) + failures[step]
                if force_at is not None:
                    at = force_at[step]
                used_at[step] = at
                for r, sampler in enumerate(samplers):
                    sampler.schedule_requeue(at, union)
                    if len(pulled[r]) <= step + lookahead[r]:  # its iterator had ended: go on from the plan
                        iterators[r] = sampler.iter_remaining()
                failed.append(step)
                if step == snapshot_at:
                    snapshot = [s.budget_schedule() for s in samplers]
            step += 1
    for warning in caught:  # the evened-out drops, which every rank names
        found = DROPPED.search(str(warning.message))
        if found:
            dropped += [int(i) for i in found.group(1).split(",")]
    return pulled, failed, used_at, samplers, sorted(set(dropped)), snapshot


def delivered(pulled, failed):
    return [batch for rank in pulled for step, batch in enumerate(rank) if step not in failed]


def assert_every_index_once(pulled, failed, n, dropped=()):
    """Each index once, but those dropped with a warning so that the ranks get as many batches (a rank
    that had planned the epoch's end before a give-back may name some that then came after all)."""
    flat = sorted(i for batch in delivered(pulled, failed) for i in batch)
    assert len(flat) == len(set(flat)), "an index came twice"
    missing = set(range(n)) - set(flat)
    assert missing <= set(dropped), f"missing {sorted(missing - set(dropped))[:10]}"
    return missing


@settings(max_examples=60, deadline=None)
@given(costs=st.lists(st.integers(0, 1500), min_size=6, max_size=160), replicas=st.sampled_from([1, 3]),
       max_cost=st.integers(200, 3000), size=st.integers(1, 10), window=st.integers(2, 48),
       failures=st.dictionaries(st.integers(0, 30), st.integers(0, 7), max_size=4),
       lookahead=st.lists(st.integers(0, 4), min_size=3, max_size=3), shuffle=st.booleans())
def test_requeued_batches_come_once_and_the_plan_does_not_depend_on_timing(costs, replicas, max_cost, size, window,
                                                                          failures, lookahead, shuffle):
    kwargs = dict(max_cost=max_cost, max_batch_size=size, window=window, shuffle=shuffle, seed=2)
    ahead = lookahead[:replicas]
    # Given back later than the furthest planned batch (even past the epoch's end): still every index once.
    pulled, failed, _, samplers, dropped, _ = run_ranks(costs, replicas, failures, ahead, **kwargs)
    assert len(assert_every_index_once(pulled, failed, len(costs), dropped)) < replicas
    assert len({len(p) for p in pulled}) == 1
    schedules = [s.budget_schedule() for s in samplers]
    assert all(schedule == schedules[0] for schedule in schedules)
    assert all(entry[1] % replicas == 0 for entry in schedules[0])
    # Given back at the furthest planned batch, as the step guard does: the same give-backs at the same
    # batches, scheduled with no batch prefetched, give the very same batches.
    at_furthest = dict.fromkeys(failures, 0)
    pulled, failed, used_at, _, dropped, _ = run_ranks(costs, replicas, at_furthest, ahead, **kwargs)
    assert len(assert_every_index_once(pulled, failed, len(costs), dropped)) < replicas
    again, *_ = run_ranks(costs, replicas, at_furthest, [0] * replicas, force_at=used_at, **kwargs)
    assert again == pulled


@pytest.mark.parametrize("replicas", [1, 3])
def test_the_requeued_indices_come_after_the_agreed_batch_and_nothing_before_it_changes(replicas):
    costs = np.random.default_rng(1).integers(10, 1201, 600)
    kwargs = dict(max_cost=1500, max_batch_size=10, window=128, seed=3)
    plain, *_ = run_ranks(costs, replicas, {}, **kwargs)
    pulled, failed, used_at, samplers, dropped, _ = run_ranks(costs, replicas, {4: 5}, [2] * replicas, **kwargs)
    assert failed == [4] and dropped == []
    assert_every_index_once(pulled, failed, len(costs))
    at = used_at[4]
    rounded = -(-at // replicas) * replicas
    assert samplers[0].budget_schedule()[0][:2] == ("requeue", rounded)
    local = rounded // replicas  # this many batches of each rank come before the give-back
    union = {i for p in pulled for i in p[4]}
    for rank in range(replicas):
        assert pulled[rank][:local] == plain[rank][:local]
        assert pulled[rank][local:] != plain[rank][local:]
        assert not union & {i for batch in pulled[rank][5:local] for i in batch}
    assert union <= {i for p in pulled for batch in p[local:] for i in batch}


@pytest.mark.parametrize("replicas", [1, 3])
def test_the_logged_schedule_replays_the_plan_after_a_restart(replicas):
    costs = np.random.default_rng(2).integers(10, 1201, 500)
    kwargs = dict(max_cost=1500, max_batch_size=10, window=64, seed=5)
    pulled, failed, _, samplers, _, snapshot = run_ranks(costs, replicas, {3: 2, 9: 0, 20: 4}, [3] * replicas,
                                                         snapshot_at=9, **kwargs)
    assert failed == [3, 9, 20]
    assert_every_index_once(pulled, failed, len(costs))
    # Saved at step 9, the give-back of step 9 still pending: the run that had only those two.
    until_9, *_ = run_ranks(costs, replicas, {3: 2, 9: 0}, [3] * replicas, **kwargs)
    assert [entry[0] for entry in snapshot[0]] == ["requeue", "requeue"]
    assert snapshot[0][-1][1] > samplers[0].budget_schedule()[0][1]
    for rank in range(replicas):
        for schedule, expected in ((samplers[rank].budget_schedule(), pulled[rank]), (snapshot[rank], until_9[rank])):
            buffer = io.BytesIO()
            torch.save(schedule, buffer)  # a checkpoint holds plain tuples, strings and numbers
            buffer.seek(0)
            restored = torch.load(buffer, weights_only=True)
            fresh = BudgetBatchSampler(costs, num_replicas=replicas, rank=rank, **kwargs)
            fresh.replay_schedule(restored)
            assert list(fresh) == expected


def test_a_give_back_at_the_epochs_end_comes_in_the_same_epoch():
    costs = [3] * 20
    sampler = BudgetBatchSampler(costs, max_cost=12, shuffle=False)
    batches = list(sampler)
    assert len(batches) == 5
    sampler.schedule_requeue(sampler.global_position, batches[-1])  # the iterator has ended
    assert list(sampler.iter_remaining()) == [batches[-1]]
    sampler.schedule_requeue(sampler.global_position + 10, batches[0])  # past the end: applied there
    assert list(sampler.iter_remaining()) == [batches[0]]
    assert [entry[1] for entry in sampler.budget_schedule()] == [5, 16]


def test_a_give_back_left_pending_is_not_applied_to_another_epoch():
    costs = list(range(1, 41))
    sampler = BudgetBatchSampler(costs, max_cost=60, seed=1)
    iterator = iter(sampler)
    first = next(iterator)
    sampler.schedule_requeue(sampler.global_position + 3, first)
    sampler.set_epoch(1)
    epoch1 = list(sampler)  # the epoch left behind never reached the give-back
    assert sorted(i for batch in epoch1 for i in batch) == list(range(40))
    assert sampler.budget_schedule() == []


def test_budget_changes_and_give_backs_share_one_schedule_and_old_entries_still_load():
    costs = np.random.default_rng(4).integers(10, 1201, 300)
    kwargs = dict(max_cost=1500, max_batch_size=10, window=64)
    sampler = BudgetBatchSampler(costs, **kwargs)
    iterator = iter(sampler)
    head = [next(iterator) for _ in range(6)]
    sampler.schedule_budget(8, 700, 10)
    sampler.schedule_requeue(8, head[2])
    sampler.schedule_budget(20, 1200, None)
    rest = list(iterator)
    schedule = sampler.budget_schedule()
    assert schedule == [("budget", 8, 700, 10), ("requeue", 8, tuple(head[2])), ("budget", 20, 1200, None)]
    assert all(costs[batch].sum() <= 700 or len(batch) == 1 for batch in rest[2:14])  # global batches 8..19
    assert max(costs[batch].sum() for batch in rest[14:]) > 700
    old = BudgetBatchSampler(costs, **kwargs)
    old.replay_schedule([(8, 700, 10), ("requeue", 8, list(head[2])), (20, 1200, None)])  # 3-tuples: budgets
    assert list(old) == head + rest
    assert [sampler.max_cost_at(at) for at in (0, 7, 8, 19, 20, 99)] == [1500, 1500, 700, 700, 1200, 1200]


@pytest.mark.parametrize("at_batch, indices, error, match", [
    (5, [1.0, 2.0], TypeError, "indices must be ints"),
    (5, [True], TypeError, "indices must be ints"),
    (5, "12", TypeError, "indices must be a sequence of ints"),
    (5, 3, TypeError, "indices must be a sequence of ints"),
    (5, [], ValueError, "non-empty one-dimensional"),
    (5, [[1, 2]], ValueError, "non-empty one-dimensional"),
    (5, [3, 10], ValueError, r"indices\[1\] = 10 is not an index of 10 samples"),
    (5, [-1], ValueError, r"indices\[0\] = -1"),
    (1, [1], ValueError, "at_batch must be >= 2"),  # two batches are planned already
    (2.0, [1], TypeError, "at_batch must be an int"),
])
def test_bad_give_backs_are_refused(at_batch, indices, error, match):
    sampler = BudgetBatchSampler(None, num_samples=10, max_batch_size=2, shuffle=False)
    iterator = iter(sampler)
    next(iterator), next(iterator)
    with pytest.raises(error, match=match):
        sampler.schedule_requeue(at_batch, indices)
    assert sampler.budget_schedule() == []


def test_a_give_back_needs_a_batch_after_the_first():
    with pytest.raises(ValueError, match="at_batch must be >= 1, got 0"):
        BudgetBatchSampler(None, num_samples=10, max_batch_size=2).schedule_requeue(0, [1])


@pytest.mark.parametrize("entry", [("requeue", 5), ("sometime", 5, 1, 2), (5, 1), ()])
def test_replay_refuses_what_is_not_a_schedule_entry(entry):
    with pytest.raises(ValueError, match="not a budget_schedule"):
        BudgetBatchSampler(None, num_samples=10, max_batch_size=2).replay_schedule([entry])
