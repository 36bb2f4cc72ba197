"""The budget controller of adaptive_loader.controller, with plain numbers."""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from adaptive_loader.controller import Controller, CostModel, Decision, Observation

MiB = 2**20
GiB = 2**30
REL = 1e-9


# -- helpers ----------------------------------------------------------------------------------------

def linear_model(a=0.0, b=float(MiB), lo=1.0, hi=100.0, n=64, min_samples=16):
    """A model that has seen ``n`` samples of exactly ``a + b * cost`` bytes."""
    model = CostModel(min_samples=min_samples)
    costs = np.linspace(lo, hi, n)
    model.observe(costs, a + b * costs)
    return model


def make_controller(model=None, *, user_max=1000.0, max_batch_size=None, min_cost=1.0, num_workers=1,
                    prefetch_factor=1, **kwargs):
    """One worker, one batch in flight by default: no pipeline to give up, so the budget moves."""
    return Controller(user_max_cost=user_max, max_batch_size=max_batch_size, min_cost=min_cost,
                      num_workers=num_workers, prefetch_factor=prefetch_factor, model=model, **kwargs)


def observe(controller, free, *, ours=0, held=0, fds=16, soft=1 << 20, hard=1 << 20, storages=1.0,
            local_world_size=1):
    obs = Observation(shm_free=int(free), ours_in_shm=int(ours), held_batches=held,
                      fds_in_use=fds, fd_soft_limit=soft, fd_hard_limit=hard, fds_per_batch=storages,
                      local_world_size=local_world_size)
    return controller.decide(obs)


def worst_batch_bytes(controller, max_cost):
    """Bytes of the heaviest batch the controller's own model allows under ``max_cost``."""
    a, b, m = controller.model.coefficients()
    count = max_cost / controller.min_cost if controller.min_cost > 0 else math.inf
    if controller.max_batch_size is not None:
        count = min(count, controller.max_batch_size)
    return count * (a + m) + b * max_cost


def slots(controller, held=0):
    return controller.num_workers * controller.prefetch_factor + max(1, held)


# -- CostModel --------------------------------------------------------------------------------------

def test_cost_model_before_any_sample():
    model = CostModel()
    assert model.seen == 0
    assert model.coefficients() is None


def test_cost_model_counts_samples_seen():
    model = CostModel(window=8)
    model.observe([1, 2, 3], [10, 20, 30])
    model.observe(np.array([4.0]), np.array([40]))
    assert model.seen == 4
    model.observe(range(5), range(5))
    assert model.seen == 9


def test_cost_model_seen_counts_a_call_longer_than_the_window():
    model = CostModel(window=8)
    model.observe(range(20), range(20))
    assert model.seen == 20


@pytest.mark.parametrize("a, b", [(0.0, 1000.0), (4096.0, 12.5), (1e6, 0.0), (123.0, 1.0)])
def test_cost_model_learns_intercept_and_slope(a, b):
    model = linear_model(a=a, b=b, lo=5, hi=500, n=40)
    intercept, slope, margin = model.coefficients()
    assert intercept == pytest.approx(a, rel=1e-6, abs=1e-3)
    assert slope == pytest.approx(b, rel=1e-6, abs=1e-6)
    assert 0 <= margin <= 1e-6 * (a + b * 500) + 1e-6
    for cost in (5, 50, 250, 500, 1000):
        assert model.sample_bytes(cost) == pytest.approx(a + b * cost, rel=1e-6, abs=1e-3)


def test_cost_model_expected_bytes_is_central():
    model = linear_model(a=100.0, b=10.0, lo=1, hi=50, n=32)
    assert model.expected_bytes(4, 60.0) == pytest.approx(4 * 100 + 10 * 60, rel=1e-6)
    assert model.expected_bytes(0, 0.0) == pytest.approx(0.0, abs=1e-6)


def test_cost_model_margin_covers_noise():
    rng = np.random.default_rng(0)
    costs = rng.uniform(1, 100, 200)
    nbytes = 1000 + 50 * costs + rng.uniform(0, 500, 200)
    model = CostModel()
    model.observe(costs, nbytes)
    a, b, m = model.coefficients()
    assert b == pytest.approx(50, rel=0.05)
    assert m > 0
    assert all(model.sample_bytes(c) >= y * (1 - REL) for c, y in zip(costs, nbytes))
    # and not wildly above: within twice the noise band of the sample it over-estimates most
    assert max(model.sample_bytes(c) - y for c, y in zip(costs, nbytes)) <= 2 * 500


def test_cost_model_is_conservative_before_min_samples():
    """Few samples: the estimate does not under-shoot the true bytes over the costs seen and above."""
    a, b = 1000.0, 10.0
    costs = np.array([10.0, 40.0, 70.0, 100.0])
    model = CostModel(min_samples=16)
    model.observe(costs, a + b * costs)
    assert model.seen < model.min_samples
    for cost in np.linspace(10, 1000, 100):
        assert model.sample_bytes(cost) >= (a + b * cost) * (1 - REL)
    # and it over-estimates compared with what it learns once it has enough samples
    learned = linear_model(a=a, b=b, lo=10, hi=100, n=32)
    assert model.sample_bytes(100) > learned.sample_bytes(100)


def test_cost_model_costs_that_barely_vary():
    model = CostModel(min_samples=4)
    costs = np.full(50, 10.0) + np.linspace(0, 0.5, 50)  # spread below 10%
    nbytes = np.linspace(1000, 3000, 50)
    model.observe(costs, nbytes)
    assert all(model.sample_bytes(c) >= y * (1 - REL) for c, y in zip(costs, nbytes))


def test_cost_model_all_costs_zero():
    model = CostModel(min_samples=2)
    model.observe([0, 0, 0], [10, 300, 20])
    assert model.sample_bytes(0) >= 300
    assert model.sample_bytes(5) >= 300


def test_cost_model_forgets_samples_older_than_its_window():
    model = CostModel(window=8, min_samples=4)
    costs = np.linspace(1, 8, 8)
    model.observe(costs, 1e6 * costs)
    assert model.sample_bytes(8) >= 8e6 * (1 - REL)
    model.observe(costs, 10 * costs)  # the window now holds only the light samples
    assert model.seen == 16
    assert model.sample_bytes(8) == pytest.approx(80, rel=1e-6)


def test_cost_model_observe_more_than_a_window_at_once():
    model = CostModel(window=4, min_samples=2)
    costs = np.arange(1, 11, dtype=float)
    nbytes = np.where(costs <= 6, 1e9, 7.0 * costs)  # only the last 4 are light
    model.observe(costs, nbytes)
    assert model.sample_bytes(10) == pytest.approx(70, rel=1e-6)


sample_lists = st.lists(
    st.tuples(st.one_of(st.just(0.0), st.floats(1e-3, 1e4)), st.floats(0, 1e9)), min_size=1, max_size=80)


@settings(max_examples=200, deadline=None)
@given(samples=sample_lists, min_samples=st.integers(1, 40), chunks=st.integers(1, 5))
def test_cost_model_sample_bytes_bounds_every_sample_in_its_window(samples, min_samples, chunks):
    model = CostModel(window=128, min_samples=min_samples)
    costs = np.array([c for c, _ in samples])
    nbytes = np.array([y for _, y in samples])
    for part_c, part_y in zip(np.array_split(costs, chunks), np.array_split(nbytes, chunks)):
        model.observe(part_c, part_y)
    a, b, m = model.coefficients()
    assert a >= 0 and b >= 0 and m >= 0
    scale = nbytes.max() + a + b * costs.max()
    for c, y in samples:
        assert model.sample_bytes(c) >= y - 1e-9 * scale - 1e-6


@settings(max_examples=100, deadline=None)
@given(samples=sample_lists, window=st.integers(1, 20))
def test_cost_model_bounds_the_most_recent_window(samples, window):
    model = CostModel(window=window, min_samples=4)
    for c, y in samples:
        model.observe([c], [y])
    recent = samples[-window:]
    scale = max(y for _, y in samples) + sum(model.coefficients()[:2]) * 1e4
    for c, y in recent:
        assert model.sample_bytes(c) >= y - 1e-9 * scale - 1e-6


# -- Controller: budget -----------------------------------------------------------------------------

def test_controller_starts_at_the_user_cap():
    c = make_controller(linear_model(), user_max=750.0)
    assert c.max_cost == 750.0


def test_decision_type_and_defaults():
    c = make_controller(linear_model())
    d = observe(c, 100 * GiB)
    assert isinstance(d, Decision)
    assert (d.prefetch_factor, d.num_workers, d.fd_soft_limit, d.sharing_strategy) == (None,) * 4
    assert d.reasons == []


def test_without_measurements_the_budget_is_the_user_cap():
    c = make_controller(CostModel(), user_max=500.0)
    d = observe(c, 1 * MiB)  # almost no shm, but nothing measured yet
    assert d.max_cost == 500.0
    assert (d.prefetch_factor, d.num_workers) == (None, None)


def test_plenty_of_shm_keeps_the_user_cap():
    c = make_controller(linear_model(), user_max=1000.0)
    d = observe(c, 1 << 50)
    assert d.max_cost == 1000.0
    assert d.reasons == []


def test_budget_is_what_fits_per_slot():
    # 1 MiB per unit of cost; 1 worker x 1 prefetch + 1 held slot = 2 slots
    c = make_controller(linear_model(), user_max=1000.0)
    d = observe(c, 1000 * MiB)
    assert d.per_batch_bytes == pytest.approx(0.8 * 1000 * MiB / 2)
    assert d.max_cost == pytest.approx(400, rel=1e-6)
    assert worst_batch_bytes(c, d.max_cost) * 2 <= 0.8 * 1000 * MiB * (1 + REL)


def test_budget_accounts_for_per_sample_bytes_and_min_cost():
    # 10 MiB per sample whatever its cost, plus 1 MiB per cost; samples cost at least 2
    c = make_controller(linear_model(a=10 * MiB, b=MiB, lo=2, hi=50), min_cost=2.0, user_max=1000.0)
    d = observe(c, 1000 * MiB)
    # per batch 400 MiB; n <= X / 2 samples: X * (10 / 2 + 1) MiB <= 400 MiB
    assert d.max_cost == pytest.approx(400 / 6, rel=1e-6)
    assert worst_batch_bytes(c, d.max_cost) <= d.per_batch_bytes * (1 + REL)


def test_max_batch_size_allows_a_larger_budget():
    model = linear_model(a=10 * MiB, b=MiB, lo=2, hi=50)
    free = 1000 * MiB
    plain = observe(make_controller(model, min_cost=2.0), free)
    capped = observe(make_controller(model, min_cost=2.0, max_batch_size=4), free)
    # at most 4 samples: 4 * 10 MiB + X * 1 MiB <= 400 MiB
    assert capped.max_cost == pytest.approx(360, rel=1e-6)
    assert capped.max_cost > plain.max_cost


def test_budget_never_below_min_cost():
    c = make_controller(linear_model(lo=5, hi=100), min_cost=5.0, num_workers=1, prefetch_factor=1)
    d = observe(c, 0)
    assert d.max_cost == 5.0
    assert d.per_batch_bytes == 0


def test_budget_never_above_the_user_cap_even_with_min_cost_above_the_fit():
    c = make_controller(linear_model(b=1.0), user_max=10.0)
    assert observe(c, 1 << 50).max_cost == 10.0


def test_shrinks_under_external_pressure_and_grows_back():
    c = make_controller(linear_model(), user_max=1000.0)
    assert observe(c, 100 * GiB).max_cost == 1000.0
    # someone else fills shm: 1000 MiB left
    decisions = [observe(c, 1000 * MiB) for _ in range(2)]
    assert c.max_cost <= 400 * (1 + 1e-6)
    assert worst_batch_bytes(c, c.max_cost) * slots(c) <= 1000 * MiB
    assert any(r.startswith("lower max_cost") for d in decisions for r in d.reasons)
    # and frees it again
    decisions = [observe(c, 100 * GiB) for _ in range(2)]
    assert c.max_cost == 1000.0
    assert any(r.startswith("raise max_cost") for d in decisions for r in d.reasons)


def test_slow_squeeze_never_overfills():
    """Free shm shrinking by 4% per batch: each step is inside the hysteresis, the sum is not."""
    c = make_controller(linear_model(), user_max=1000.0)
    free = 2000.0 * MiB
    budgets = []
    for _ in range(60):
        d = observe(c, free)
        budgets.append(d.max_cost)
        assert worst_batch_bytes(c, d.max_cost) * slots(c) <= free * (1 + REL)
        free *= 0.96
    assert budgets[-1] < budgets[0] / 5
    assert budgets == sorted(budgets, reverse=True)


def test_hysteresis_ignores_small_changes():
    c = make_controller(linear_model(), user_max=1000.0)
    base = observe(c, 1000 * MiB).max_cost
    assert base == pytest.approx(400, rel=1e-6)
    for free in (1050, 960, 1080, 1000, 1150):  # -4% .. +15%
        d = observe(c, free * MiB)
        assert d.max_cost == base
        assert d.reasons == []
    d = observe(c, 1300 * MiB)  # +30%: a clear rise
    assert d.max_cost == pytest.approx(520, rel=1e-6)
    assert len(d.reasons) == 1 and "raise max_cost" in d.reasons[0]
    d = observe(c, 700 * MiB)  # -46%
    assert d.max_cost == pytest.approx(280, rel=1e-6)
    assert len(d.reasons) == 1 and "lower max_cost" in d.reasons[0]


def test_returns_to_the_user_cap_exactly():
    c = make_controller(linear_model(), user_max=450.0)
    assert observe(c, 500 * MiB).max_cost == pytest.approx(200, rel=1e-6)
    assert observe(c, 1000 * MiB).max_cost == pytest.approx(400, rel=1e-6)
    d = observe(c, 1150 * MiB)  # what fits is above the cap: back to the cap, though within the hysteresis
    assert d.max_cost == 450.0
    assert any("raise max_cost" in r for r in d.reasons)


def test_reasons_are_human_readable():
    c = make_controller(linear_model(), user_max=1000.0)
    d = observe(c, 1000 * MiB)
    [reason] = d.reasons
    assert isinstance(reason, str)
    assert "max_cost" in reason and "1000" in reason and "400" in reason and "MiB" in reason
    assert "inf" not in " ".join(observe(make_controller(linear_model(), user_max=math.inf), 10 * MiB).reasons)


# -- Controller: shm share --------------------------------------------------------------------------

def test_per_batch_bytes_times_slots_is_the_safe_share():
    for held in (0, 1, 3):
        for safety in (0.5, 0.8):
            c = make_controller(linear_model(), safety=safety, num_workers=3, prefetch_factor=2)
            d = observe(c, 4 * GiB, ours=512 * MiB, held=held)
            assert d.per_batch_bytes * slots(c, held) == pytest.approx(safety * (4 * GiB + 512 * MiB))


def test_held_batches_take_slots():
    free = 4 * GiB
    none_held = observe(make_controller(linear_model()), free, held=0).per_batch_bytes
    three_held = observe(make_controller(linear_model()), free, held=3).per_batch_bytes
    assert none_held == pytest.approx(0.8 * free / 2)
    assert three_held == pytest.approx(0.8 * free / 4)


def test_our_own_batches_in_shm_count_as_usable():
    free, ours = 1 * GiB, 3 * GiB
    d = observe(make_controller(linear_model()), free, ours=ours)
    assert d.per_batch_bytes == pytest.approx(0.8 * (free + ours) / 2)


def test_local_world_size_halves_the_free_share():
    free = 2000 * MiB
    alone = make_controller(linear_model())
    shared = make_controller(linear_model())
    d1 = observe(alone, free, local_world_size=1)
    d2 = observe(shared, free, local_world_size=2)
    assert d2.per_batch_bytes == pytest.approx(d1.per_batch_bytes / 2)
    assert d2.max_cost == pytest.approx(d1.max_cost / 2, rel=1e-6)
    assert worst_batch_bytes(shared, d2.max_cost) * slots(shared) <= free / 2


def test_local_world_size_divides_only_the_free_space():
    free, ours = 2 * GiB, 1 * GiB
    d = observe(make_controller(linear_model()), free, ours=ours, local_world_size=4)
    assert d.per_batch_bytes == pytest.approx(0.8 * (free / 4 + ours) / 2)


# -- Controller: fewer in flight before smaller batches ------------------------------------------------

def deep_controller(**kwargs):
    """4 workers x 2 prefetch; batches of up to 100 cost units at 1 MiB each: 100 MiB at the cap."""
    return make_controller(linear_model(), user_max=100.0, num_workers=4, prefetch_factor=2, **kwargs)


def test_no_fewer_in_flight_when_the_asked_batches_fit():
    c = deep_controller()
    d = observe(c, 1000 * MiB / 0.8)  # 9 slots x 100 MiB = 900 MiB fit
    assert (d.prefetch_factor, d.num_workers) == (None, None)
    assert (c.num_workers, c.prefetch_factor, d.max_cost) == (4, 2, 100.0)


def test_fewer_in_flight_lowers_prefetch_first_and_keeps_the_batches():
    c = deep_controller()
    d = observe(c, 650 * MiB / 0.8)  # 4x2 needs 900 MiB, 4x1 needs 500 MiB
    assert (d.prefetch_factor, d.num_workers) == (1, None)
    assert (c.num_workers, c.prefetch_factor) == (4, 1)
    assert d.max_cost == 100.0  # the user's batches are kept
    assert any(r.startswith("fewer batches in flight") and "4x2 -> 4x1" in r for r in d.reasons)


def test_fewer_in_flight_lowers_workers_when_prefetch_1_is_not_enough():
    c = deep_controller()
    d = observe(c, 350 * MiB / 0.8)  # 4x1 needs 500, 3x1 400, 2x1 300 MiB
    assert (d.prefetch_factor, d.num_workers) == (1, 2)
    assert (c.num_workers, c.prefetch_factor, d.max_cost) == (2, 1, 100.0)


def test_fewer_in_flight_counts_held_batches():
    c = deep_controller()
    d = observe(c, 1000 * MiB / 0.8, held=4)  # 4x2 + 4 held needs 1200 MiB, 4x1 + 4 held 800 MiB
    assert (c.num_workers, c.prefetch_factor, d.max_cost) == (4, 1, 100.0)


def test_the_budget_drops_only_once_one_by_one_is_not_enough():
    c = deep_controller()
    d = observe(c, 150 * MiB / 0.8)  # 1x1 + 1 held needs 200 MiB
    assert (c.num_workers, c.prefetch_factor) == (1, 1)
    assert d.max_cost == pytest.approx(75, rel=1e-6)  # 150 MiB over 2 slots
    assert any("lower max_cost 100 -> 75" in r for r in d.reasons)


def test_the_budget_never_drops_below_the_floor():
    assert observe(deep_controller(), 0).max_cost == 1.0  # min_cost
    assert observe(deep_controller(floor_cost=50.0), 0).max_cost == 50.0  # min_batch_size's floor


def test_depth_never_grows_within_an_epoch_and_is_restored_for_the_next():
    c = deep_controller()
    observe(c, 350 * MiB / 0.8)
    observe(c, 100 * GiB)
    assert (c.num_workers, c.prefetch_factor) == (2, 1)
    assert c.restore_pipeline(4, 2) and (c.num_workers, c.prefetch_factor) == (4, 2)


def test_after_an_oom_kill_the_loader_gives_up_in_the_promised_order_and_keeps_it():
    c = deep_controller(floor_cost=10.0)  # 4 workers x 2, the user's max_cost 100
    steps = [c.step_down_after_oom() for _ in range(4)]
    assert [what for what, _, _ in steps] == ["fewer_in_flight"] * 4
    assert "4x2 -> 4x1" in steps[0][1] and "2x1 -> 1x1" in steps[3][1]
    caps = []
    while True:
        what, _, cap = c.step_down_after_oom()
        if what != "budget":
            break
        caps.append(cap)
        c.external_cap = cap  # as the loader applies it (AdaptiveLoader._cap_budget)
        c.max_cost = c.capped(c.memory_max_cost)
    assert caps == [50.0, 25.0, 12.5, 10.0]  # halved, never below the floor
    assert what == "in_process" and c.num_workers == 0
    assert c.restore_pipeline(4, 2) is False and (c.num_workers, c.prefetch_factor) == (0, 1)  # kept next epoch


def test_a_step_down_to_fewer_workers_holds_for_the_next_epochs():
    c = deep_controller()
    c.step_down_after_oom()
    assert c.restore_pipeline(4, 2) is False and (c.num_workers, c.prefetch_factor) == (4, 1)


# -- Controller: the real memory limits ---------------------------------------------------------------

def observe_memory(controller, *, available, budget=None, ours=0, shm_free=0, shm_road=False, ranks=1, arenas=False):
    obs = Observation(shm_free=int(shm_free), ours_in_shm=0, held_batches=0, fds_in_use=16, fd_soft_limit=1 << 20,
                      fd_hard_limit=1 << 20, fds_per_batch=1, local_world_size=ranks, arenas=arenas,
                      memory_available=available, memory_budget=budget, ours_in_memory=ours, shm_road=shm_road)
    return controller.decide(obs)


def test_a_small_dev_shm_does_not_bind_batches_that_do_not_go_through_it():
    c = deep_controller()
    d = observe_memory(c, available=10 * GiB, shm_free=0)
    assert (d.max_cost, c.num_workers, c.prefetch_factor) == (100.0, 4, 2)
    assert c.limit == "memory"


def test_dev_shm_binds_batches_that_go_through_it():
    c = deep_controller()
    observe_memory(c, available=10 * GiB, shm_free=350 * MiB / 0.8, shm_road=True)
    assert (c.num_workers, c.prefetch_factor) == (2, 1) and c.limit == "/dev/shm"


def test_the_smallest_of_memory_and_the_users_budget_wins_shared_among_ranks():
    c = deep_controller()
    observe_memory(c, available=10 * GiB, budget=int(700 * MiB / 0.8), ranks=2)  # 350 MiB for this rank
    assert (c.num_workers, c.prefetch_factor) == (2, 1) and c.limit == "memory_budget"
    c = deep_controller()
    observe_memory(c, available=int(300 * MiB / 0.8), ours=int(50 * MiB / 0.8))  # 350 MiB with ours
    assert (c.num_workers, c.prefetch_factor) == (2, 1) and c.limit == "memory"


def test_the_memory_room_is_the_memory_part_of_the_usable_bytes():
    c = deep_controller()
    assert c.memory_room(None, None, 1, 0) is None  # nothing known: no bound
    assert c.memory_room(10 * GiB, 256 * MiB, 1, 0) == pytest.approx(0.8 * 256 * MiB)
    assert c.memory_room(100 * MiB, 256 * MiB, 2, 10 * MiB) == pytest.approx(0.8 * 60 * MiB)


def test_the_probe_holds_one_batch_in_flight_and_gives_the_asked_depth_back_when_it_fits():
    c = make_controller(None, user_max=100.0, num_workers=4, prefetch_factor=2)
    assert c.start_probe() == 1 and (c.num_workers, c.prefetch_factor) == (1, 1)
    assert not c.start_probe()  # already one batch in flight
    d = observe_memory(c, available=10 * GiB)  # nothing measured yet: the probe goes on
    assert (c.num_workers, c.prefetch_factor) == (1, 1) and not d.deeper
    c.model.observe(np.full(64, 50.0), np.full(64, float(MiB)))  # 1 MiB per cost unit
    d = observe_memory(c, available=10 * GiB)
    assert d.deeper and (d.num_workers, d.prefetch_factor) == (None, None)
    assert (c.num_workers, c.prefetch_factor) == (4, 2) and not c.probing


def test_under_a_cgroups_limit_the_probe_makes_two_batches_in_the_main_process():
    c = make_controller(None, user_max=100.0, num_workers=4, prefetch_factor=2)
    assert c.start_probe(in_process=True) == 2 and c.num_workers == 0
    assert not c.start_probe(in_process=True)  # already in the main process
    d = observe_memory(c, available=10 * GiB)  # nothing measured yet: the probe goes on
    assert c.num_workers == 0 and not d.deeper
    c.model.observe(np.full(64, 50.0), np.full(64, float(MiB)))  # 1 MiB per cost unit
    d = observe_memory(c, available=10 * GiB)  # the first measured batch: the second is made here too,
    assert c.num_workers == 0 and c.probing and not d.deeper  # after the training step on the first
    d = observe_memory(c, available=10 * GiB)
    assert d.deeper and (d.num_workers, d.prefetch_factor) == (None, None)
    assert (c.num_workers, c.prefetch_factor) == (4, 2) and not c.probing
    assert any(r.startswith("first batch measured") and "4x2" in r for r in d.reasons)


def test_a_streams_probe_keeps_its_workers_with_one_batch_in_flight_each():
    c = make_controller(None, user_max=100.0, num_workers=2, prefetch_factor=2, fixed_workers=True)
    assert c.start_probe() and (c.num_workers, c.prefetch_factor) == (2, 1)
    c.model.observe(np.full(64, 50.0), np.full(64, float(MiB)))
    assert observe_memory(c, available=10 * GiB).deeper and (c.num_workers, c.prefetch_factor) == (2, 2)


def test_after_the_probe_the_depth_is_what_fits_counted_from_the_depth_asked():
    c = deep_controller()
    c.start_probe()
    d = observe_memory(c, available=10 * GiB, budget=int(650 * MiB / 0.8))  # 4x1 fits, 4x2 does not
    assert not d.deeper and (d.num_workers, d.prefetch_factor) == (None, 1)  # as against the asked 4x2
    assert (c.num_workers, c.prefetch_factor) == (4, 1)
    assert any("fewer batches in flight: 4x2 -> 4x1" in r for r in d.reasons)


def heap_controller(heap_extra=20 * MiB, **kwargs):
    """deep_controller whose workers were measured: each holds its batch's samples and 20 MiB more."""
    c = deep_controller(**kwargs)
    c.observe_heap(100 * MiB + heap_extra, 100 * MiB)
    return c


def test_under_a_memory_limit_each_worker_counts_its_heap():
    # 9 slots (4x2 and the held batch) of 100 MiB fit 1000 MiB; with each worker's heap (its batch's
    # samples and 20 MiB) 4x2 needs 1380 MiB, 4x1 980 MiB
    plain, measured = deep_controller(), heap_controller()
    assert (observe_memory(plain, available=int(1000 * MiB / 0.8)).num_workers, plain.prefetch_factor) == (None, 2)
    d = observe_memory(measured, available=int(1000 * MiB / 0.8))
    assert (measured.num_workers, measured.prefetch_factor) == (4, 1) and d.max_cost == 100.0
    assert d.per_batch_bytes == pytest.approx((1000 * MiB - 4 * 20 * MiB) / (4 + 1 + 4))


def test_heaps_are_not_on_dev_shms_account():
    c = heap_controller()
    d = observe(c, 1000 * MiB / 0.8)  # /dev/shm binds: 9 slots of 100 MiB fit, heaps live elsewhere
    assert (d.prefetch_factor, d.num_workers, d.max_cost) == (None, None, 100.0)


def test_the_main_process_comes_before_one_worker_with_smaller_batches():
    # one worker with its arena: (3.3 + 1) x 100 + 20 = 450 MiB for the batches asked; the main process holds
    # the batch it makes and the one the user keeps: 2 x 100 + 20
    c = heap_controller()
    d = observe_memory(c, available=int(500 * MiB / 0.8), arenas=True)
    assert (c.num_workers, c.prefetch_factor, d.max_cost) == (1, 1, 100.0)  # one worker keeps them whole
    c = heap_controller()
    d = observe_memory(c, available=int(400 * MiB / 0.8), arenas=True)
    assert d.num_workers == 0 and c.num_workers == 0 and d.max_cost == 100.0 and c.depth_cap[0] == 0
    assert any(r.startswith("loading in the main process") for r in d.reasons)
    assert c.restore_pipeline(4, 2) is False and c.num_workers == 0  # and so in the next epochs


def test_in_the_main_process_the_budget_is_what_fits_there():
    c = heap_controller()
    d = observe_memory(c, available=int(150 * MiB / 0.8), arenas=True)
    assert d.num_workers == 0 and d.per_batch_bytes == pytest.approx((150 - 20) * MiB / 2)
    assert d.max_cost == pytest.approx(65.0)


def test_in_the_main_process_later_decisions_follow_the_room_there_both_ways():
    c = heap_controller()
    observe_memory(c, available=int(150 * MiB / 0.8), arenas=True)  # to the main process, 65 MiB batches
    d = observe_memory(c, available=int(100 * MiB / 0.8))  # the training step took 50 MiB more
    assert d.num_workers is None and c.num_workers == 0 and d.per_batch_bytes == pytest.approx((100 - 20) * MiB / 2)
    assert d.max_cost == pytest.approx(40.0) and any("lower max_cost 65 -> 40" in r for r in d.reasons)
    d = observe_memory(c, available=int(250 * MiB / 0.8))  # and gave it back: whole batches again
    assert d.max_cost == 100.0 and c.num_workers == 0

def test_after_an_oom_kill_at_one_worker_the_main_process_comes_before_the_budget_where_heaps_count():
    c = heap_controller()
    observe_memory(c, available=int(1000 * MiB / 0.8))  # a decision bound by memory: heaps count
    c.num_workers, c.prefetch_factor = 1, 1
    what, sentence, cap = c.step_down_after_oom()
    assert (what, cap, c.num_workers) == ("in_process", None, 0) and "rather than smaller batches" in sentence


def test_a_stream_never_moves_to_the_main_process():
    c = heap_controller(fixed_workers=True)
    d = observe_memory(c, available=int(150 * MiB / 0.8), arenas=True)
    assert d.num_workers is None and c.num_workers == 4


def stream_controller(read_ahead=3.0):
    """A stream's 4x2 workers, each reading ``read_ahead`` batches of samples ahead of the one it makes;
    measured: each held that buffer, its batch and 20 MiB more."""
    c = deep_controller(fixed_workers=True, buffered_batches=read_ahead)
    c.observe_heap(int((1 + read_ahead) * 100 * MiB + 20 * MiB), 100 * MiB)
    return c


def test_a_streams_read_ahead_is_given_up_first_then_a_batch_in_flight_and_the_batches_keep_their_size():
    # with 3 batches read ahead, 4x2 needs (9 slots + 4 x 4 heaps) x 100 MiB + 4 x 20 MiB: far over 1000 MiB;
    # reading one batch's samples only, 4x2 needs 1380 MiB and 4x1 980 MiB
    c = stream_controller()
    d = observe_memory(c, available=int(1000 * MiB / 0.8))
    assert d.smaller_buffer and c.buffer_capped and "read ahead" in d.reason("smaller buffer")
    assert (c.num_workers, c.prefetch_factor, d.prefetch_factor, d.max_cost) == (4, 1, 1, 100.0)
    assert d.per_batch_bytes == pytest.approx((1000 * MiB - 4 * 20 * MiB) / (4 + 1 + 4))
    assert not observe_memory(c, available=int(1000 * MiB / 0.8)).smaller_buffer  # said once


def test_a_streams_read_ahead_stays_where_the_batches_fit_beside_it():
    c = stream_controller()
    d = observe_memory(c, available=int(3000 * MiB / 0.8))  # (9 + 16) x 100 + 80 MiB fit
    assert not d.smaller_buffer and not c.buffer_capped and (c.prefetch_factor, d.max_cost) == (2, 100.0)


def test_a_streams_read_ahead_is_not_on_dev_shms_account():
    c = stream_controller()
    d = observe(c, 1000 * MiB / 0.8)  # /dev/shm binds: 9 slots of 100 MiB fit; the buffer is in the workers' heaps
    assert (d.prefetch_factor, d.max_cost, d.smaller_buffer) == (None, 100.0, False)


def test_a_streams_first_batches_under_a_memory_limit_rise_from_the_batches_measured():
    # 3000 MiB fit every batch at the cap (100); after one batch of cost 40 the budget stays at 1.25 x 40, and
    # rises with the batches measured until the 8th, from which the memory readings alone set it
    from adaptive_loader.controller import SLOW_START_BATCHES, SLOW_START_RISE
    c = stream_controller()
    c.observe_batch(40.0)
    d = observe_memory(c, available=int(3000 * MiB / 0.8))
    assert d.max_cost == SLOW_START_RISE * 40 and c.slow_starting and "slow start" in d.reason("max_cost")
    c.observe_batch(50.0)  # the budget of 50 was filled: it may rise again (by more than the hysteresis)
    assert observe_memory(c, available=int(3000 * MiB / 0.8)).max_cost == SLOW_START_RISE * 50
    for _ in range(SLOW_START_BATCHES - 2):
        c.observe_batch(50.0)
    assert observe_memory(c, available=int(3000 * MiB / 0.8)).max_cost == 100.0 and not c.slow_starting


def test_a_slow_start_never_raises_the_budget_the_memory_readings_lower():
    c = stream_controller()
    c.observe_batch(90.0)
    d = observe_memory(c, available=int(1000 * MiB / 0.8))  # the read-ahead goes, then 4x1 fits batches of 100
    assert d.max_cost == 100.0 and d.smaller_buffer
    c = stream_controller()
    c.observe_batch(90.0)
    d = observe_memory(c, available=int(400 * MiB / 0.8))
    assert d.max_cost < 90.0


@pytest.mark.parametrize("where", ["map-style", "/dev/shm", "memory_budget"])
def test_no_slow_start_for_map_style_loaders_nor_outside_a_memory_cgroups_limit(where):
    c = heap_controller() if where == "map-style" else stream_controller()
    c.observe_batch(40.0)
    if where == "/dev/shm":
        d = observe(c, 3000 * MiB / 0.8)
    else:
        d = observe_memory(c, available=10 * GiB, budget=int(3000 * MiB / 0.8) if where == "memory_budget" else None)
    assert d.max_cost == 100.0 and not c.slow_starting


def test_the_arenas_room_leaves_the_workers_heaps_and_the_plan_out():
    c = heap_controller()
    assert c.memory_room(int(1000 * MiB / 0.8), None, 1, 0, workers=2, batch_bytes=50 * MiB) == \
        pytest.approx(1000 * MiB - 2 * (20 + 50) * MiB)
    observe_memory(c, available=int(1000 * MiB / 0.8))  # plans 4x1 at 102 MiB per batch
    planned = 4 * (1 + 1) * 1.1 * c.per_batch_bytes
    assert c.memory_room(10 * GiB, None, 1, 0, workers=4, batch_bytes=50 * MiB) == pytest.approx(planned)


# -- Controller: file descriptors -------------------------------------------------------------------

def test_fds_well_below_the_limit_leave_it_alone():
    c = make_controller(linear_model())
    d = observe(c, 100 * GiB, fds=100, soft=1024, hard=4096, storages=10)
    assert (d.fd_soft_limit, d.sharing_strategy) == (None, None)


def test_fd_threshold_is_80_percent_of_the_soft_limit_counting_batches_in_flight():
    # 1 worker x 1 prefetch + 1 = 2 batches of 1 storage each are on their way
    at = observe(make_controller(linear_model()), 100 * GiB, fds=798, soft=1000, hard=4096, storages=1)
    above = observe(make_controller(linear_model()), 100 * GiB, fds=799, soft=1000, hard=4096, storages=1)
    assert at.fd_soft_limit is None
    assert above.fd_soft_limit is not None


def test_fd_soft_limit_is_raised_toward_the_hard_limit():
    c = make_controller(linear_model())
    d = observe(c, 100 * GiB, fds=900, soft=1024, hard=1 << 20, storages=1)
    assert 1024 < d.fd_soft_limit <= 1 << 20
    assert d.fd_soft_limit * 0.8 >= 900 + 2  # the projected fds fit under the new headroom
    assert d.sharing_strategy is None
    assert any("fd soft limit" in r and "1024" in r for r in d.reasons)


def test_fd_soft_limit_counts_fds_per_batch():
    c = make_controller(linear_model())
    d = observe(c, 100 * GiB, fds=100, soft=1024, hard=1 << 20, storages=400)  # ~800 fds incoming
    assert d.fd_soft_limit is not None
    assert d.fd_soft_limit * 0.8 >= 100 + 400 * 2


def test_fd_soft_limit_is_capped_at_the_hard_limit():
    c = make_controller(linear_model())
    d = observe(c, 100 * GiB, fds=1000, soft=1024, hard=1100, storages=1)
    assert d.fd_soft_limit == 1100
    assert d.sharing_strategy is None


def test_fd_switches_to_file_system_when_soft_equals_hard():
    c = make_controller(linear_model())
    d = observe(c, 100 * GiB, fds=1000, soft=1024, hard=1024, storages=1)
    assert d.fd_soft_limit is None
    assert d.sharing_strategy == "file_system"
    assert any("file_system" in r for r in d.reasons)
    # once switched, it does not ask again
    again = observe(c, 100 * GiB, fds=1020, soft=1024, hard=1024, storages=1)
    assert (again.fd_soft_limit, again.sharing_strategy) == (None, None)
    assert again.reasons == []


# -- Controller: invariants -------------------------------------------------------------------------

observations = st.lists(
    st.tuples(st.integers(0, 64 * GiB),  # shm free
              st.integers(0, 4 * GiB),  # ours in shm
              st.integers(0, 5),  # held batches
              st.integers(1, 4)),  # local world size
    min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(a=st.one_of(st.just(0.0), st.floats(1, 50 * MiB)), b=st.one_of(st.just(0.0), st.floats(1, 4 * MiB)), noise=st.floats(0, 1), min_cost=st.floats(0.1, 10),
       user_factor=st.floats(1, 1000), max_batch_size=st.one_of(st.none(), st.integers(1, 64)),
       num_workers=st.integers(1, 8), prefetch_factor=st.integers(1, 4), seed=st.integers(0, 2**16),
       obs_list=observations)
def test_controller_invariants(a, b, noise, min_cost, user_factor, max_batch_size, num_workers, prefetch_factor,
                               seed, obs_list):
    rng = np.random.default_rng(seed)
    costs = rng.uniform(min_cost, 50 * min_cost, 32)
    nbytes = (a + b * costs) * (1 + noise * rng.uniform(0, 1, 32))
    model = CostModel()
    model.observe(costs, nbytes)
    user_max = min_cost * user_factor
    c = make_controller(model, user_max=user_max, max_batch_size=max_batch_size, min_cost=min_cost,
                        num_workers=num_workers, prefetch_factor=prefetch_factor)
    h = c.hysteresis
    for free, ours, held, lws in obs_list:
        before = (c.max_cost, c.num_workers, c.prefetch_factor)
        d = observe(c, free, ours=ours, held=held, local_world_size=lws)
        raw = free / lws + ours
        # never above the user's cap, never below one sample
        assert min_cost <= d.max_cost <= user_max
        assert d.max_cost == c.max_cost
        # the pipeline only shrinks, and the decision says how
        assert c.num_workers <= before[1] and c.prefetch_factor <= before[2]
        assert d.num_workers in (None, c.num_workers) and d.prefetch_factor in (None, c.prefetch_factor)
        assert (d.num_workers is None) == (c.num_workers == before[1])
        assert (d.prefetch_factor is None) == (c.prefetch_factor == before[2])
        # the per-batch share times the slots is the safe share of the usable shm
        assert d.per_batch_bytes * slots(c, held) == pytest.approx(c.safety * raw, rel=1e-9, abs=1e-6)
        smallest = model.sample_bytes(min_cost)
        if d.per_batch_bytes >= smallest:
            # the heaviest batch the budget allows fits its share, up to the hysteresis on a small drop
            worst = worst_batch_bytes(c, d.max_cost)
            assert worst <= d.per_batch_bytes / (1 - h / 2) * (1 + 1e-9) + 1e-6
            assert worst * slots(c, held) <= raw * (1 + 1e-9) + 1e-6
        else:
            # even one sample per slot does not fit: as few in flight as it goes
            assert (c.num_workers, c.prefetch_factor) == (1, 1)
            assert d.max_cost == min_cost or d.max_cost <= min_cost / (1 - h / 2) * (1 + 1e-9)
        # every change comes with a reason
        changed = (d.max_cost != before[0], d.num_workers is not None or d.prefetch_factor is not None,
                   d.fd_soft_limit is not None or d.sharing_strategy is not None)
        assert bool(d.reasons) == any(changed)
        assert all(isinstance(r, str) and r for r in d.reasons)


def test_a_decision_while_loading_in_the_main_process_with_arenas_left():
    """Ranks decide at every agreement, also while loading in the main process after a step down,
    when the workers' arenas may still be mapped: the batches held count, no arena does."""
    c = make_controller(num_workers=0)
    for _ in range(3):
        c.model.observe(np.array([10.0]), np.array([1000.0]))
    obs = Observation(shm_free=1 << 30, ours_in_shm=0, held_batches=2, fds_in_use=16, fd_soft_limit=1 << 20,
                      fd_hard_limit=1 << 20, fds_per_batch=1, arenas=True, memory_available=1 << 30,
                      ours_in_memory=1 << 20, shm_road=False)
    decision = c.decide(obs)
    assert math.isfinite(decision.per_batch_bytes) and c.num_workers == 0


def test_recent_low_holds_a_dip_in_memory_left_for_its_window_then_lets_go():
    from adaptive_loader.memory_watch import RecentLow

    lows = RecentLow(seconds=5.0)
    assert lows.low(None) is None and lows.low(900) == 900  # nothing read yet: what is left now
    lows.add(0.0, 1000)
    lows.add(1.0, 300)  # a worker's heap at its fullest
    lows.add(2.0, 800)
    assert lows.low(800) == 300  # a budget raised now would meet that peak again
    lows.add(6.5, 820)  # the dip is older than the window: the room has lasted
    assert lows.low(820) == 800
    lows.add(12.0, 850)
    assert lows.low(850) == 850 and lows.low(100) == 100  # never above what is left now
