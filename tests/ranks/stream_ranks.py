"""Run by torchrun (2 processes, gloo, CPU) from tests/test_stream_ranks.py; rank 0 writes a verdict.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ranks/stream_ranks.py OUT

Each rank writes its verdict to OUT.rank<N>.json.

A stream whose shards split unevenly between the ranks (rank 0 reads 3 shards, rank 1 two), as
``split_by_node`` leaves them with 5 shards and 2 ranks; in "stop-long" rank 0 has a shard of 4,000
samples more, which a cut must not read (with persistent workers, which the cut stops). Per epoch every rank must yield the same
number of batches, every sample that was delivered must carry its own content, and what was not
delivered must be reported. Last, plain DataLoader over the same stream with an all-reduce per step
(what DDP does), on a group with a short timeout: the rank with more batches waits in vain.
"""

import datetime
import faulthandler
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from adaptive_loader import AdaptiveLoader  # noqa: E402

SHARDS = [range(s * 40, (s + 1) * 40) for s in range(5)]  # 200 samples in 5 shards


LONG_SHARD = range(1000, 5000)  # "long": rank 0 has this one too, 4,000 samples the others do not match


class ShardedStream(IterableDataset):
    """Shards split by rank, then by worker (as WebDataset's split_by_node, split_by_worker);
    ``empty``: rank 1 gets no shard at all; ``long``: rank 0 gets ``LONG_SHARD`` as well. Given
    ``reads``, each worker appends every key it reads to ``reads``.rank<R>.worker<W>."""

    def __init__(self, empty: bool = False, long: bool = False, reads: str = "") -> None:
        self.empty, self.long, self.reads = empty, long, reads

    def __iter__(self):
        rank, world = dist.get_rank(), dist.get_world_size()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = (SHARDS if rank == 0 else []) if self.empty else SHARDS[rank::world]
        if self.long and rank == 0:
            shards = shards + [LONG_SHARD]
        log = open(f"{self.reads}.rank{rank}.worker{worker}", "a", buffering=1) if self.reads else None
        try:
            for shard in shards[worker::workers]:
                for i in shard:
                    if log is not None:
                        log.write(f"{i}\n")
                    yield {"key": f"{i:04d}", "x": torch.full((1 + i % 5,), float(i))}
        finally:
            if log is not None:
                log.close()


def objects(sample):
    return len(sample["x"])


def as_list(batch):
    return batch


def check(sample) -> int:
    i = int(sample["key"])
    assert torch.equal(sample["x"], torch.full((1 + i % 5,), float(i))), f"sample {i} has another's content"
    return i


def run(uneven: str, events: list, empty: bool = False, long: bool = False, reads: str = ""):
    loader = AdaptiveLoader(ShardedStream(empty, long, reads), costs=objects, max_cost=12, max_batch_size=4, num_workers=2,
                            collate_fn=as_list, uneven=uneven, sync_every=4, persistent_workers=long,
                            telemetry=lambda r: events.append(r) if r["kind"] == "event" else None)
    epochs = []
    for epoch in range(2):
        keys, repeats = [], 0
        for batch in loader:
            if loader.last_batch.repeat:
                repeats += 1
                continue
            keys.extend(check(s) for s in batch)
        epochs.append({"keys": keys, "repeats": repeats, "batches": loader._ledger.feed.delivered})
    loader.close()
    return epochs


def samples_read(reads: str, rank: int) -> int:
    """How many samples this rank's workers read, over every epoch (from their logs)."""
    folder, prefix = os.path.split(reads)
    total = 0
    for name in os.listdir(folder):
        if name.startswith(f"{prefix}.rank{rank}."):
            with open(os.path.join(folder, name)) as f:
                total += len(f.read().split())
    return total


def plain_dataloader_with_a_step_collective() -> dict:
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=10))
    steps, error = 0, None
    for _ in DataLoader(ShardedStream(), batch_size=4, num_workers=2, collate_fn=as_list):
        try:
            dist.all_reduce(torch.ones(1), group=group)  # the gradient all-reduce of a DDP step
        except RuntimeError as exc:
            error = str(exc).splitlines()[0][:200]
            break
        steps += 1
    return {"steps": steps, "error": error}


def main(out: str) -> None:
    faulthandler.dump_traceback_later(200, exit=True)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    verdict = {}
    for name, uneven, empty, long in (("stop", "stop", False, False), ("stop-long", "stop", False, True),
                                      ("pad", "pad", False, False), ("pad-empty", "pad", True, False)):
        events, reads = [], f"{out}.{name}.reads"
        epochs = run(uneven, events, empty, long, reads)
        uneven_events = [e["data"] for e in events if e["event"] == "ranks_uneven"]
        verdict[name] = {"epochs": epochs, "cut": [d for d in uneven_events if "cut_batch_samples" in d],
                         "repeated": [d for d in uneven_events if "repeated_batches" in d],
                         "read": samples_read(reads, rank)}
    dist.barrier()
    verdict["dataloader"] = plain_dataloader_with_a_step_collective()
    with open(f"{out}.rank{rank}.json", "w") as f:  # no collective after a timed-out one (torch 2.1 aborts)
        json.dump(verdict, f)
    deadline = time.monotonic() + 60  # the rank done first stays until the other has waited in vain
    while time.monotonic() < deadline and not all(os.path.exists(f"{out}.rank{r}.json") for r in (0, 1)):
        time.sleep(0.1)
    faulthandler.cancel_dump_traceback_later()
    os._exit(0)  # nor a process group's teardown


if __name__ == "__main__":
    main(sys.argv[1])
