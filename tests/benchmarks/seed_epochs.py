"""Epochs of AdaptiveLoader on the stress ``seed`` scenario; prints their seconds as JSON.

Run by ``compare_loaders.py`` twice, with the same dataset: once in a private 64 MiB /dev/shm
(``stress.sandbox``) and once in a private 8 GiB one, so the two differ only in shm size.

    python tests/benchmarks/seed_epochs.py --dataset-for 64M --epochs 6
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from adaptive_loader import AdaptiveLoader  # noqa: E402
from stress.sandbox import parse_size  # noqa: E402
from stress.scenarios import get  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-for", default="64M", help="the shm size the scenario's samples are scaled to")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="the scenario's small dataset (tests)")
    args = parser.parse_args()
    setup = get("seed").build(parse_size(args.dataset_for), 2, args.quick)
    seconds, samples = [], 0
    transports = [Counter() for _ in range(args.epochs)]

    def count(record):
        if record["kind"] == "batch":
            transports[record["epoch"]][record["transport"]] += 1

    with AdaptiveLoader(setup.dataset, telemetry=count, **setup.adaptive) as loader:  # one loader, as in training
        for _ in range(args.epochs):
            start = time.perf_counter()
            samples = sum(len(setup.check(batch)) for batch in loader)
            seconds.append(time.perf_counter() - start)
        fallbacks = loader.fallbacks
    st = os.statvfs("/dev/shm")
    print(json.dumps({"seconds": seconds, "samples": samples, "fallbacks": fallbacks, "transports": transports,
                      "shm_total": st.f_blocks * st.f_frsize}))


if __name__ == "__main__":
    main()
