"""loader.guard(): a step that really runs out of its memory allowance gives its batch back.

The step (tests/ranks/guard_ranks.py) allocates real tensors in proportion to the batch's cost and
raises a real torch.OutOfMemoryError past a fixed allowance; the loader is the real AdaptiveLoader.
"""

import json
import logging
import os
import resource
import subprocess
import sys

import numpy as np
import pytest
import torch

from adaptive_loader import AdaptiveLoader
from adaptive_loader.guard import SampleOutOfMemory, StepGuard
from stress.sandbox import sandbox_available, sandbox_command

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "ranks"))
from guard_ranks import OOM, Allowance, CostDataset, collate, train  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(__file__), "ranks", "guard_ranks.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COSTS = np.random.default_rng(0).integers(10, 1201, 300)
KIB = 1 << 10


def make_loader(costs=COSTS, **kwargs):
    kwargs.setdefault("max_cost", 12000)
    return AdaptiveLoader(CostDataset(costs), costs=costs, max_batch_size=32, collate_fn=collate, shuffle=True,
                          **kwargs)


def allowance():
    return Allowance(3000 * KIB, KIB, base=100 * KIB)  # fits a batch of cost <= 2900


def assert_once(ids, n=len(COSTS)):
    assert sorted(ids) == list(range(n)), f"missing {sorted(set(range(n)) - set(ids))[:10]}, " \
                                          f"{len(ids) - len(set(ids))} duplicated"


def test_oom_steps_give_their_samples_back_and_every_sample_completes_once():
    events = []
    loader = make_loader(telemetry=lambda r: events.append(r) if r["kind"] == "event" else None)
    run = train(loader, allowance())
    assert run["ooms"] >= 1
    assert_once(run["completed"])
    assert loader.max_cost < 2900  # the budget came down below what the allowance holds
    ooms = [e for e in events if e["event"] == "device_oom"]
    assert len(ooms) == run["ooms"] and ooms[0]["data"]["cost"] > 2900


@pytest.mark.parametrize("seed", [0, 14, 52])
def test_later_epochs_keep_the_learned_budget(seed):
    """Without device_memory the capacity is unknown, so the budget grows back slowly toward the lowest
    cost that failed: when the first epoch's failures were all far above the capacity (seeds 14 and 52,
    about one shuffle in ten), that growth meets it once more; then never again."""
    loader = make_loader(seed=seed)
    budget = allowance()
    first = train(loader, budget)
    later = [train(loader, budget) for _ in range(3)]
    assert first["ooms"] >= 2
    assert sum(run["ooms"] for run in later) <= 1 and later[-1]["ooms"] == 0
    for run in later:
        assert_once(run["completed"])


def test_with_the_memory_known_the_budget_aims_under_it():
    loader = make_loader()
    budget = allowance()
    loader.guard(device_memory=budget.nbytes, safety=0.9)  # options stay for the later guards
    run = train(loader, budget)
    assert_once(run["completed"])
    assert loader.guard().budget.max_cost() <= (0.9 * budget.nbytes - budget.base) / KIB * 1.001


def test_state_dict_after_an_oom_does_not_count_the_failed_batch(tmp_path):
    loader = make_loader()
    budget = allowance()
    completed, ooms = [], 0
    for batch in loader:
        with loader.guard(peak_bytes=budget.peak_bytes) as guard:
            ids = budget.step(batch)
        if guard.ok:
            completed += ids
        else:
            ooms += 1
            if ooms == 2:
                break
    torch.save(loader.state_dict(), tmp_path / "state.pt")
    del loader
    resumed = make_loader()
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    rest = train(resumed, budget)
    assert ooms == 2
    assert_once(completed + rest["completed"])


def test_a_batch_of_one_sample_that_does_not_fit_raises_naming_it():
    costs = np.array([100, 200, 5000, 300, 150])
    loader = make_loader(costs, max_cost=10000)
    budget = allowance()
    with pytest.raises(SampleOutOfMemory, match=r"sample 2 \(cost 5000\)") as raised:
        train(loader, budget)
    assert isinstance(raised.value.__cause__, OOM)


def test_an_error_that_is_not_out_of_memory_goes_through_and_the_batch_counts():
    loader = make_loader()
    iterator = iter(loader)
    batch = next(iterator)
    with pytest.raises(ValueError, match="the user's own"):
        with loader.guard():
            raise ValueError("the user's own")
    assert loader.last_batch is not None and loader.last_batch.indices == list(batch[0])
    assert loader.state_dict()["sampler"]["consumed"] != make_loader().state_dict()["sampler"]["consumed"]


def test_the_explicit_calls_for_loops_without_with():
    loader = make_loader()
    budget = allowance()
    guard = loader.guard(peak_bytes=budget.peak_bytes)
    completed, handled = [], 0
    for batch in loader:
        try:
            ids = budget.step(batch)
        except Exception as exc:
            if not guard.failed(exc):
                raise
            handled += 1
            assert not guard.failed(exc)  # the same batch is judged once
            continue
        guard.done()
        completed += ids
    assert handled >= 1
    assert_once(completed)
    assert not guard.failed(ValueError("not memory"))


def test_the_cpu_allocators_own_error_is_caught_too():
    """Under a real RLIMIT_AS, the CPU allocator itself fails ("DefaultCPUAllocator: can't
    allocate memory"); the guard takes that RuntimeError for an out-of-memory."""
    code = f"""
import resource, sys
sys.path.insert(0, {REPO!r}); sys.path.insert(0, {os.path.dirname(SCRIPT)!r})
import numpy as np, torch
from guard_ranks import CostDataset, collate
from adaptive_loader import AdaptiveLoader
costs = np.random.default_rng(0).integers(10, 1201, 120)
loader = AdaptiveLoader(CostDataset(costs), costs=costs, max_cost=40000, max_batch_size=64, collate_fn=collate)
vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), resource.RLIM_INFINITY))
done, errors = [], []
for batch in loader:
    with loader.guard() as guard:
        held = [torch.ones(int(c) << 16, dtype=torch.uint8) for c in batch[1]]  # 64 KiB per cost unit
        del held
    if guard.ok:
        done += batch[0]
print(sorted(done) == list(range(len(costs))), loader.guard().budget.ooms, loader.max_cost)
"""
    # Every allocation of 128 KiB or more is mmapped and unmapped when freed: glibc's default moves
    # allocations up to 32 MiB onto its heap once one was freed, and the fragmented heap then fills
    # the address space step by step, whatever the guard does.
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    once, ooms, budget = result.stdout.split()
    assert once == "True" and int(ooms) >= 1 and float(budget) < 4096  # 256 MiB / 64 KiB


@pytest.mark.parametrize("options, error", [
    ({"peak_bytes": 5}, TypeError), ({"device_memory": 0}, ValueError), ({"device_memory": "8G"}, TypeError),
    ({"device_memory": float("inf")}, ValueError), ({"safety": 0}, ValueError), ({"safety": 2}, ValueError),
])
def test_bad_options_are_refused_at_once(options, error):
    with pytest.raises(error):
        make_loader().guard(**options)


@pytest.mark.skipif(not sandbox_available()[0], reason=f"no private /dev/shm: {sandbox_available()[1]}")
def test_with_two_workers_in_a_64_mib_dev_shm(tmp_path):
    out = tmp_path / "run.json"
    command = sandbox_command([sys.executable, SCRIPT, "workers", str(out)], 64 << 20)
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = json.loads(out.read_text())
    assert run["shm_total"] == 64 << 20
    assert run["ooms"] >= 1
    assert_once(run["completed"], 400)


def test_two_ranks_take_the_same_steps_and_every_sample_completes_once(tmp_path):
    out = tmp_path / "verdict.json"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT, "ranks",
            str(out)]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    verdict = json.loads(out.read_text())
    assert verdict["steps"][0] == verdict["steps"][1], verdict
    assert verdict["ooms"][0] == verdict["ooms"][1] >= 1, verdict  # one rank's failure fails the step on both
    assert verdict["exactly_once"], verdict
