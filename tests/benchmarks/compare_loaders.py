"""The benchmark suite as one table: AdaptiveLoader against vanilla DataLoader on the same batches.

    .venv/bin/python tests/benchmarks/compare_loaders.py [--rounds 9] [--only transport,seed,volumes,small,costs]

Sections:
  * loaders, plenty of shm: every variant of a case alternates round by round (so drift on a busy
    machine hits all of them) and the median epoch is reported, with "vs first" = first variant's
    time / this variant's time (>1: faster than vanilla DataLoader);
  * small shm: the seed scenario's dataset, AdaptiveLoader only (vanilla hangs there), in a private
    64 MiB /dev/shm and in a private 8 GiB one, alternated (order swapped each round), each in its own process;
  * per-batch costs of the sampler and the controller.
The memcpy bandwidth printed first is the physical limit of moving bytes on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cases import close, epoch_seconds, seed_case, transport_case, volumes_case  # noqa: E402

from adaptive_loader import BudgetBatchSampler  # noqa: E402
from adaptive_loader.controller import Controller, Observation  # noqa: E402
from stress.sandbox import sandbox_available, sandbox_command  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def memcpy_gbps(cold: bool) -> float:
    """Copy bandwidth, in GB/s of bytes copied: the same 64 MiB over and over (warm: partly from
    cache), or 32 MiB chunks of a 1 GiB buffer each touched once per pass (cold: from memory)."""
    chunk, total = (64 << 20, 64 << 20) if not cold else (32 << 20, 1 << 30)
    src, dst = torch.ones(total, dtype=torch.uint8), torch.empty(total, dtype=torch.uint8)
    dst.copy_(src)  # fault every page in first
    start = time.perf_counter()
    copied = 0
    for _ in range(10 if not cold else 2):
        for offset in range(0, total, chunk):
            dst[offset:offset + chunk].copy_(src[offset:offset + chunk])
            copied += chunk
    return copied / (time.perf_counter() - start) / 1e9


def loader_section(rounds: int, which) -> None:
    # list collate with persistent workers is left out: vanilla's feeder moves each bank tensor into shm
    # in place the first time, so later epochs pass fds of tensors already there (a cache, not transport)
    makers = {"transport": [lambda: transport_case("default"), lambda: transport_case("list"),
                            lambda: transport_case("default", persistent=True),
                            lambda: transport_case("default", samples=2000, distinct=100)],
              "seed": [seed_case], "volumes": [volumes_case]}
    for key, builders in makers.items():
        if key not in which:
            continue
        for build in builders:
            case = build()
            loaders = {name: make() for name, make in case.variants.items()}
            times = {name: [] for name in case.variants}
            for loader in loaders.values():
                epoch_seconds(loader)  # warm-up: the first epoch also learns, and makes the arenas
            for _ in range(rounds):
                for name, loader in loaders.items():
                    times[name].append(epoch_seconds(loader))
            for loader in loaders.values():
                close(loader)
            print(f"\n{case.name}: {case.samples} samples, {case.bytes_per_epoch / 2**20:.0f} MiB per epoch; "
                  f"goal: {case.goal}")
            base = float(np.median(next(iter(times.values()))))
            for name, values in times.items():
                median = float(np.median(values))
                print(f"  {name:48} {median:7.3f} s  {case.samples / median:8.0f} samples/s  "
                      f"{case.bytes_per_epoch / median / 1e9:5.2f} GB/s  vs first {base / median:5.2f}x  "
                      f"(spread {min(values):.3f}-{max(values):.3f} s)", flush=True)
            del case, loaders


def small_shm_section(rounds: int) -> None:
    ok, why = sandbox_available()
    if not ok:
        print(f"\nseed in 64 MiB of shm: skipped, {why}")
        return
    argv = [sys.executable, os.path.join(HERE, "seed_epochs.py"), "--dataset-for", "64M", "--epochs", "6"]
    # Both in a private /dev/shm (the same mount namespace setup, so only the size differs), and the
    # order swapped each round: the first of two runs in a row was the slower one here.
    sizes = {"64 MiB /dev/shm": 64 << 20, "8 GiB /dev/shm (plenty)": 8 << 30}
    runs = {name: [] for name in sizes}
    for round_ in range(rounds):
        for name in (list(sizes) if round_ % 2 == 0 else list(sizes)[::-1]):
            out = subprocess.run(sandbox_command(argv, sizes[name]), capture_output=True, text=True, check=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
    print("\nseed scenario's dataset (1,200 images scaled for 64 MiB), AdaptiveLoader only, one loader for 6 "
          "epochs; goal: 64 MiB >= 0.95x plenty")
    def medians(results):  # first epoch, later epochs, the whole run of 6
        return (float(np.median([r["seconds"][0] for r in results])),
                float(np.median([s for r in results for s in r["seconds"][1:]])),
                float(np.median([sum(r["seconds"]) for r in results])))

    plenty = medians(runs["8 GiB /dev/shm (plenty)"])
    for name, results in runs.items():
        first, later, whole = medians(results)
        samples = results[0]["samples"]
        fallbacks = results[-1]["fallbacks"]
        print(f"  {name:24} first epoch {first:6.3f} s ({samples / first:5.0f}/s, {plenty[0] / first:4.2f}x)  "
              f"later epochs {later:6.3f} s ({samples / later:5.0f}/s, {plenty[1] / later:4.2f}x)  "
              f"whole run {whole:6.3f} s ({plenty[2] / whole:4.2f}x)  "
              f"shm {results[0]['shm_total'] / 2**20:,.0f} MiB, fallbacks {fallbacks or '-'}", flush=True)


def costs_section() -> None:
    costs = np.random.default_rng(0).integers(10, 1201, 100_000)
    sampler = BudgetBatchSampler(costs, max_cost=1500, max_batch_size=10, shuffle=True)
    timings = []
    for epoch in range(5):
        sampler.set_epoch(epoch)
        start = time.perf_counter()
        batches = sum(1 for _ in sampler)
        timings.append((time.perf_counter() - start) / batches)
    controller = Controller(user_max_cost=1500, max_batch_size=10, min_cost=10, num_workers=2, prefetch_factor=2)
    obs = Observation(shm_free=40 << 20, ours_in_shm=20 << 20, held_batches=1, fds_in_use=100, fd_soft_limit=1024,
                      fd_hard_limit=4096, fds_per_batch=1)
    rows = np.random.default_rng(1).integers(10, 1201, (2000, 4)).astype(float)
    start = time.perf_counter()
    for c in rows:
        controller.model.observe(c, 3000 * c + 50_000)
        controller.decide(obs)
    decide = (time.perf_counter() - start) / len(rows)
    print("\nper-batch costs in the main process")
    print(f"  sampler, planning (100,000 samples, the question's costs)   {np.median(timings) * 1e6:6.2f} us per batch")
    print(f"  controller, observe + decide (4 samples a batch)             {decide * 1e6:6.2f} us per batch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--only", default="transport,seed,volumes,small,costs", help="comma-separated sections")
    args = parser.parse_args()
    which = set(args.only.split(","))
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, memcpy {memcpy_gbps(cold=False):.1f} GB/s warm, "
          f"{memcpy_gbps(cold=True):.1f} GB/s cold (1 GiB buffers); {args.rounds} rounds, median epochs")
    loader_section(args.rounds, which)
    if "small" in which:
        small_shm_section(max(3, args.rounds // 3))
    if "costs" in which:
        costs_section()


if __name__ == "__main__":
    _started = time.perf_counter()
    main()
    print(f"\n(this script ran {time.perf_counter() - _started:.0f} s)")
