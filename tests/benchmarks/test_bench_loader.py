"""AdaptiveLoader against vanilla DataLoader on the same batches, with plenty of shm (pytest-benchmark).

    .venv/bin/python -m pytest tests/benchmarks/test_bench_loader.py --benchmark-enable --benchmark-group-by=group

The cases are those of ``compare_loaders.py`` (see ``cases.py``), which alternates the loaders round by
round and prints the table that docs/performance.md quotes; here each variant is one loader iterated
epoch after epoch. Without ``--benchmark-enable`` (the normal test run) each epoch runs once and only
checks that every sample arrives.
"""

import pytest

from cases import close, seed_case, transport_case, volumes_case

TRANSPORT_SAMPLES = 256  # 1 GiB of 4 MiB samples per epoch
LONG_EPOCH_SAMPLES = 1024  # 4 GiB, from 64 distinct tensors: worker start weighs less


def count_batches(loader):
    return sum(1 for _ in loader)


def run(benchmark, case, variant):
    """Benchmark epochs of one loader; every epoch must deliver all its batches."""
    benchmark.group = case.name
    loader = case.variants[variant]()
    try:
        assert benchmark.pedantic(count_batches, args=(loader,), rounds=5, warmup_rounds=1) == len(loader)
    finally:
        close(loader)


@pytest.fixture(scope="module")
def transport_cases():
    return {(collate, persistent): transport_case(collate, TRANSPORT_SAMPLES, persistent)
            for collate, persistent in (("default", False), ("list", False), ("default", True))}


@pytest.mark.parametrize("variant", ["vanilla DataLoader", "AdaptiveLoader", "AdaptiveLoader, arena off"])
@pytest.mark.parametrize("collate", ["default", "list"])
def test_transport_bound_4mib_floats(benchmark, transport_cases, collate, variant):
    run(benchmark, transport_cases[(collate, False)], variant)


@pytest.mark.parametrize("variant", ["vanilla DataLoader", "AdaptiveLoader"])
def test_transport_bound_4mib_floats_persistent_workers(benchmark, transport_cases, variant):
    run(benchmark, transport_cases[("default", True)], variant)


@pytest.mark.parametrize("variant", ["vanilla DataLoader", "AdaptiveLoader"])
def test_transport_bound_4mib_floats_long_epoch(benchmark, variant):
    run(benchmark, transport_case("default", LONG_EPOCH_SAMPLES, distinct=64), variant)


@pytest.mark.parametrize("variant", ["vanilla DataLoader", "AdaptiveLoader",
                                     "AdaptiveLoader, telemetry records to a sink",
                                     "AdaptiveLoader, live dashboard drawn to memory"])
def test_seed_workload_tuple_collate(benchmark, variant):
    run(benchmark, seed_case(), variant)


@pytest.mark.parametrize("variant", ["vanilla DataLoader", "AdaptiveLoader"])
def test_volumes_default_collate(benchmark, variant):
    run(benchmark, volumes_case(), variant)
