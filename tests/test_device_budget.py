"""DeviceBudget with plain numbers: the fit, the ceiling after an out-of-memory, the slow growth back."""

import math

import pytest

from adaptive_loader import device_budget as rules
from adaptive_loader.device_budget import DeviceBudget

MIB = 2**20


def fits(budget, cost, a=100 * MIB, b=MIB, steps=1):
    for _ in range(steps):
        budget.observe(cost, a + b * cost)


def test_nothing_known_means_no_limit():
    budget = DeviceBudget()
    assert budget.max_cost() is None
    fits(budget, 500, steps=50)  # peaks without a capacity say nothing about the limit
    assert budget.max_cost() is None
    budget = DeviceBudget(capacity=8 * 2**30)
    assert budget.max_cost() is None


def test_with_a_capacity_it_aims_at_the_safety_fraction_of_it():
    capacity = 1100 * MIB  # peak = 100 MiB + 1 MiB per cost: 1000 cost fills it
    budget = DeviceBudget(capacity=capacity, safety=0.9)
    for cost in (200, 400, 300, 500, 250, 450) * 4:  # varied costs: a least-squares fit
        budget.observe(cost, 100 * MIB + MIB * cost)
    expected = (0.9 * capacity - 100 * MIB) / MIB  # 890
    assert budget.max_cost() == pytest.approx(expected, rel=0.02)
    assert budget.state()["fit"]["slope"] == pytest.approx(MIB, rel=1e-6)


def test_the_fit_is_not_trusted_before_min_steps():
    budget = DeviceBudget(capacity=1100 * MIB)
    fits(budget, 300, steps=rules.MIN_STEPS - 1)
    assert budget.max_cost() is None
    fits(budget, 300)
    assert budget.max_cost() is not None


def test_small_moves_of_the_fit_do_not_move_the_cap():
    budget = DeviceBudget(capacity=1100 * MIB)
    fits(budget, 300, steps=rules.MIN_STEPS)
    first = budget.max_cost()
    budget.observe(300, 100 * MIB + MIB * 300 + 5 * MIB)  # margin grows by 5 MiB: < 5 % of the cap in cost
    assert budget.max_cost() == first
    budget.observe(300, 100 * MIB + MIB * 300 + 200 * MIB)  # a large jump does move it
    assert budget.max_cost() < first * (1 - rules.HYSTERESIS)


def test_an_oom_puts_the_cap_below_its_cost_and_a_second_one_halves():
    budget = DeviceBudget()
    budget.failed(1000)
    assert budget.max_cost() == pytest.approx(1000 * rules.OOM_BACKOFF)
    budget.failed(800)  # failed again under the new ceiling before any step fitted
    assert budget.max_cost() == pytest.approx(800 * rules.OOM_BACKOFF_AGAIN)
    assert budget.ooms == 2 and budget.lowest_failed == 800


def test_a_batch_planned_before_the_cap_fell_does_not_halve_it():
    budget = DeviceBudget()
    budget.failed(1000)
    budget.failed(1150)  # prefetched at the old budget: above the ceiling, nothing new
    assert budget.max_cost() == pytest.approx(850)
    fits(budget, 840)
    budget.failed(840)  # after a step fitted, a failure lowers by the usual factor
    assert budget.max_cost() == pytest.approx(840 * rules.OOM_BACKOFF)


def test_it_grows_back_slowly_and_stays_below_the_cost_that_failed_without_room_shown():
    budget = DeviceBudget()
    budget.failed(1000)
    cap = budget.max_cost()
    fits(budget, cap, steps=rules.GROW_EVERY - 1)
    assert budget.max_cost() == cap  # not yet
    fits(budget, cap)
    assert budget.max_cost() == pytest.approx(cap * rules.GROW_FACTOR)
    fits(budget, 0.5 * cap, steps=5 * rules.GROW_EVERY)  # small steps show nothing about the cap
    assert budget.max_cost() == pytest.approx(cap * rules.GROW_FACTOR)
    for _ in range(100):
        fits(budget, budget.max_cost(), steps=rules.GROW_EVERY)
    assert budget.max_cost() == pytest.approx(rules.BELOW_FAILED * 1000)  # never again above it


def test_with_room_measured_it_grows_past_a_cost_that_failed():
    """An OOM at 600 (say, another process held memory then); the fit from later steps
    shows room up to ~890: the ceiling may climb past 600, slowly."""
    budget = DeviceBudget(capacity=1100 * MIB, safety=0.9)
    budget.failed(600)
    assert budget.max_cost() == pytest.approx(510)
    for _ in range(40):
        fits(budget, budget.max_cost(), steps=rules.GROW_EVERY)
    assert 600 < budget.max_cost() <= (0.9 * 1100 * MIB - 100 * MIB) / MIB + 1e-6


def test_configure_keeps_what_was_learned():
    budget = DeviceBudget()
    for cost in (200, 400, 300, 500) * 5:
        fits(budget, cost)
    budget.failed(1000)
    budget.configure(1100 * MIB, 0.9)
    assert budget.ooms == 1 and budget.model.seen == 20
    assert budget.max_cost() == pytest.approx(min(850, (0.9 * 1100 * MIB - 100 * MIB) / MIB), rel=0.02)


@pytest.mark.parametrize("kwargs, error", [
    ({"capacity": 0}, ValueError), ({"capacity": -5}, ValueError), ({"capacity": math.inf}, ValueError),
    ({"capacity": "8G"}, TypeError), ({"safety": 0}, ValueError), ({"safety": 1.5}, ValueError),
    ({"safety": True}, ValueError),
])
def test_bad_settings_are_refused(kwargs, error):
    with pytest.raises(error):
        DeviceBudget(**kwargs)


def test_bad_observations_are_refused():
    budget = DeviceBudget()
    with pytest.raises(ValueError, match="cost"):
        budget.observe(-1, 10)
    with pytest.raises(ValueError, match="cost"):
        budget.failed(math.nan)
    with pytest.raises(ValueError, match="peak_bytes"):
        budget.observe(1, -10)
    with pytest.raises(TypeError, match="peak_bytes"):
        budget.observe(1, "10")
