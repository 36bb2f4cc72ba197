"""Cost of the per-batch decision (pure Python, no I/O).

    .venv/bin/python -m pytest tests/benchmarks/test_bench_controller.py --benchmark-enable
"""

import numpy as np

from adaptive_loader.controller import Controller, CostModel, Observation

OBS = Observation(shm_free=40 << 20, ours_in_shm=20 << 20, held_batches=1,
                  fds_in_use=100, fd_soft_limit=1024, fd_hard_limit=4096, fds_per_batch=1)


def test_observe_and_decide(benchmark):
    controller = Controller(user_max_cost=1500, max_batch_size=10, min_cost=10, num_workers=2, prefetch_factor=2)
    rng = np.random.default_rng(0)
    costs = rng.integers(10, 1201, (4096, 4)).astype(float)
    steps = iter(range(10**9))

    def step():
        c = costs[next(steps) % len(costs)]
        controller.model.observe(c, 3000 * c + 50_000)
        return controller.decide(OBS)

    decision = benchmark(step)
    assert decision.max_cost <= 1500


def test_cost_model_refit(benchmark):
    model = CostModel()
    c = np.random.default_rng(1).integers(10, 1201, 512).astype(float)
    model.observe(c, 3000 * c)

    def refit():
        model._fit = None
        return model.coefficients()

    assert benchmark(refit)[1] > 0
