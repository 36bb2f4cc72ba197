"""A worker SIGKILLed mid-epoch on a stream: how long until batches come again, and every sample once.

    .venv/bin/python tests/benchmarks/stream_recovery.py [--runs 3]

Two streams of 600 small samples (at most 97 int64 values; the plain one 2 ms to read), 2 workers,
batches of 8 by cost: a plain deterministic generator, which the new worker replays and fast-forwards
past what was delivered, and an HF ``datasets`` IterableDataset, restored from its ``state_dict()``. One worker is SIGKILLed after
batch 20; "going again" is the time from the kill to the first batch handed out after the recovery
(the batches already in the queue first, then the failure seen, workers started again, the stream
replayed or restored, packed). Every run checks each sample's content and that each came exactly once.
About a minute.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/, for stream_data

import torch  # noqa: E402

from adaptive_loader import AdaptiveLoader  # noqa: E402
from stream_data import CountingStream, check_counting_sample, check_hf_sample, hf_stream, list_collate  # noqa: E402


class SlowStream(CountingStream):
    def sample(self, key):
        time.sleep(0.002)
        return super().sample(key)


def x_cost(sample) -> int:
    return int(sample["x"].numel())


def one_run(make, check, n: int, kill_at: int = 20):
    loader = make()
    keys, gap = [], None
    it = iter(loader)
    killed_at = None
    for step, batch in enumerate(it):
        if killed_at is not None and gap is None and loader.fallbacks.get("recovery"):
            gap = time.perf_counter() - killed_at  # the first batch of the workers started again
        keys.extend(check(s) for s in batch)
        if step == kill_at:
            os.kill(it._dl_iter._workers[0].pid, signal.SIGKILL)
            killed_at = time.perf_counter()
    loader.close()
    assert sorted(keys) == list(range(n)), f"{len(keys)} delivered, {len(set(keys))} distinct of {n}"
    return gap


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    streams = {
        "deterministic generator (replayed)": (lambda: AdaptiveLoader(
            SlowStream(600), costs=x_cost, max_cost=300, max_batch_size=8, num_workers=2, collate_fn=list_collate),
            check_counting_sample, 600),
        "HF IterableDataset (state_dict)": (lambda: AdaptiveLoader(
            hf_stream(600, num_shards=4), costs=x_cost, max_cost=200, max_batch_size=8, num_workers=2,
            collate_fn=list_collate), check_hf_sample, 600),
    }
    print("| stream | going again after the kill (median) | runs | every sample once |")
    print("|---|---:|---|---|")
    for name, (make, check, n) in streams.items():
        gaps = [one_run(make, check, n) for _ in range(args.runs)]
        print(f"| {name} | {statistics.median(gaps):.2f} s | {', '.join(f'{g:.2f}' for g in gaps)} | yes |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
