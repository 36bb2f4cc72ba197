"""What telemetry costs AdaptiveLoader: none, records to a sink that drops them, the live dashboard.

    .venv/bin/python tests/benchmarks/compare_telemetry.py [--rounds 11]

The seed's workload with plenty of shm, the three variants alternated round by round; median epochs.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

import numpy as np
from rich.console import Console

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from adaptive_loader import AdaptiveLoader  # noqa: E402
from adaptive_loader.dashboard import Dashboard  # noqa: E402
from stress.workloads import SegmentationDataset, detection_collate  # noqa: E402

COSTS = np.random.default_rng(0).integers(10, 1201, 600)
SEG = SegmentationDataset(COSTS, side=35)
VARIANTS = {
    "none": lambda: None,
    "records to a sink that drops them": lambda: (lambda record: None),
    "live dashboard (drawn to memory, 2/s)": lambda: Dashboard(
        total_samples=len(COSTS), console=Console(file=io.StringIO(), force_terminal=True)),
}


def epoch_seconds(telemetry) -> float:
    loader = AdaptiveLoader(SEG, costs=COSTS, max_cost=3000, max_batch_size=10, num_workers=2,
                            collate_fn=detection_collate, shuffle=True, telemetry=telemetry)
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=11)
    rounds = parser.parse_args().rounds
    times = {name: [] for name in VARIANTS}
    for make in VARIANTS.values():
        epoch_seconds(make())  # warm-up
    for _ in range(rounds):
        for name, make in VARIANTS.items():
            times[name].append(epoch_seconds(make()))
    base = np.median(times["none"])
    print(f"{'telemetry':40} {'median epoch':>12} {'vs none':>8}")
    for name, values in times.items():
        print(f"{name:40} {np.median(values):11.3f}s {np.median(values) / base - 1:+8.1%}")


if __name__ == "__main__":
    main()
