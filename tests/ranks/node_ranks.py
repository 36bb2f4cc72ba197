"""Run by torchrun on each simulated node (stress/nodes.py) from tests/test_two_nodes.py; every rank writes
``$NODE_OUT_DIR/rank<RANK>.json``: what it got, each sample's content checked, the budget, the events.

    python -m torch.distributed.run --nnodes 2 --node_rank I ... tests/ranks/node_ranks.py [--max-mib 8 ...]
"""

import argparse
import faulthandler
import json
import os
import resource
import signal
import sys
import time

import numpy as np
import psutil
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, IterableDataset, get_worker_info

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from adaptive_loader import AdaptiveLoader, distributed  # noqa: E402
from adaptive_loader.memory import read_memory  # noqa: E402

INT64_PER_MIB = 2**20 // 8


class UnevenDataset(Dataset):
    """Sample ``i``: ``mib[i]`` MiB (1 to ``max_mib``, drawn once from ``seed``) of int64s that
    only index ``i`` has: ``i << 40`` plus the position."""

    def __init__(self, n: int, max_mib: int, seed: int = 0) -> None:
        self.mib = np.random.default_rng(seed).integers(1, max_mib + 1, n)

    def __len__(self) -> int:
        return len(self.mib)

    def __getitem__(self, i: int):
        return i, torch.arange(int(self.mib[i]) * INT64_PER_MIB, dtype=torch.int64).add_(i << 40)


class ShardedStream(IterableDataset):
    """The same samples as a stream: ``shards`` shards, split by rank and then by worker, as WebDataset's
    ``split_by_node`` and ``split_by_worker`` split them."""

    def __init__(self, dataset: UnevenDataset, shards: int = 8) -> None:
        self.dataset, self.shards = dataset, shards

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        per = len(self.dataset) // self.shards
        for shard in range(self.shards)[dist.get_rank()::dist.get_world_size()][worker::workers]:
            for i in range(shard * per, (shard + 1) * per):
                yield self.dataset[i]


def collate(samples):
    return tuple(zip(*samples))  # (indices, tensors): the tensors differ in size


class Report(dict):
    """What this rank writes to ``$NODE_OUT_DIR/rank<RANK>.json``, saved after every batch and on entering
    every agreement: a rank killed or stuck later still says how far it got."""

    def __init__(self, out: str, rank: int, world: int) -> None:
        super().__init__(rank=rank, node=int(os.environ["GROUP_RANK"]), local_rank=int(os.environ["LOCAL_RANK"]),
                         world=world, epochs=[], events=[], agreements=[], bad_content=[], checked=0, done=False,
                         timeline=[])
        self.path, self.position = os.path.join(out, f"rank{rank}.json"), {"epoch": 0, "after_batch": 0}

    def save(self) -> None:
        with open(self.path + ".tmp", "w") as f:
            json.dump(self, f, default=str)
        os.replace(self.path + ".tmp", self.path)


def spy_on_agreements(report: Report) -> None:
    """Record every budget agreement as this rank enters it (one it is stuck in keeps ``agreed`` None):
    where this rank stood, what it proposed, what the ranks agreed and from which global batch."""
    agree = distributed.agree_on_minimum

    def agree_and_record(group, max_cost, *rest):
        entry = {**report.position, "proposed": max_cost, "agreed": None, "at": None}
        report["agreements"].append(entry)
        report.save()
        started = time.perf_counter()
        agreed = agree(group, max_cost, *rest)
        entry.update(agreed=agreed[0], at=-agreed[1] if rest else None, seconds=time.perf_counter() - started)
        return agreed

    distributed.agree_on_minimum = agree_and_record  # the actuator calls it through the module


def kill_my_workers() -> int:
    """SIGKILL this rank's DataLoader workers (its child processes), as a crash or the OOM killer would."""
    children = psutil.Process().children()
    for child in children:
        os.kill(child.pid, signal.SIGKILL)
    return len(children)


def run_epoch(loader, dataset, epoch: int, report: Report, kill_after: int = 0, stop_after: int = 0,
              resumed: bool = False) -> None:
    """One epoch: every sample's content against ``dataset[i]`` made anew, the budget after each batch;
    with ``kill_after``, this rank's workers are SIGKILLed after that many batches; with ``stop_after``,
    the epoch is left after that many (a job stopping to resume later); ``resumed``: the loader goes on
    with the epoch its loaded state was saved in."""
    if not resumed:
        loader.set_epoch(epoch)
    started = time.perf_counter()
    got = {"indices": [], "batches": 0, "max_cost_after_batch": []}
    report["epochs"].append(got)
    report.position.update(epoch=epoch, after_batch=0)
    got["repeats"] = 0
    for indices, tensors in loader:
        got["batches"] += 1
        report.position.update(after_batch=got["batches"])
        if loader.last_batch.repeat:  # a stream's rank that ran dry repeats a batch (uneven="pad")
            got["repeats"] += 1
            report.save()
            continue
        for i, tensor in zip(indices, tensors):
            if not torch.equal(tensor, dataset[i][1]):
                report["bad_content"].append(i)
        report["checked"] += len(indices)
        got["indices"].extend(int(i) for i in indices)
        got["max_cost_after_batch"].append(loader.max_cost)
        report["timeline"].append([time.time(), read_memory().used, loader.max_cost])  # for the picture
        if got["batches"] == kill_after:
            report["killed_workers"] = kill_my_workers()
        report.save()
        if got["batches"] == stop_after:
            break
    # the agreed changes by global batch: the same on every rank, or their plans parted
    schedule = getattr(loader.sampler, "budget_schedule", list)  # a stream's agreed budget applies at once
    got["schedule"] = [list(entry) for entry in schedule()]
    got["fallbacks"] = loader.fallbacks
    got["seconds"] = time.perf_counter() - started


def time_agreements(group, calls: int) -> float:
    """The median seconds of one budget agreement (the all-reduce the loader makes) with every rank ready."""
    dist.barrier()
    times = []
    for call in range(calls):
        started = time.perf_counter()
        distributed.agree_on_minimum(group, 100.0, -float(call))
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def run(opts) -> None:
    dist.init_process_group("gloo")
    report = Report(opts.out, dist.get_rank(), dist.get_world_size())
    spy_on_agreements(report)
    dataset = UnevenDataset(opts.samples, opts.max_mib)
    if opts.stream:  # each rank its shards; the short ranks repeat marked batches so that none waits
        source = dict(dataset=ShardedStream(dataset), costs=lambda sample: float(dataset.mib[sample[0]]),
                      uneven="pad")
    else:
        source = dict(dataset=dataset, costs=dataset.mib, shuffle=True, seed=0)
    loader = AdaptiveLoader(**source, max_cost=opts.max_cost, max_batch_size=8, num_workers=1,
                            collate_fn=collate, sync_every=opts.sync_every,
                            telemetry=lambda r: report["events"].append(r) if r["kind"] == "event" else None)
    try:
        kill_rank, _, kill_after = (opts.kill_workers or "-1:0").partition(":")
        state_path = os.path.join(opts.state_dir or opts.resume_from or ".", f"rank{report['rank']}.pt")
        if opts.resume_from:
            loader.load_state_dict(torch.load(state_path, weights_only=False))
        for epoch in range(opts.epochs):
            run_epoch(loader, dataset, epoch, report,
                      int(kill_after) if epoch == 0 and report["rank"] == int(kill_rank) else 0,
                      opts.stop_after if epoch == 0 else 0, resumed=bool(opts.resume_from) and epoch == 0)
            if opts.stop_after and epoch == 0:  # the job stops here: every rank saves its loader's state
                torch.save(loader.state_dict(), state_path)
                break
        if opts.time_agreements:
            report["agreement_s"] = time_agreements(loader._group, opts.time_agreements)
        report["done"] = True
    except BaseException as exc:  # say how it ended before torchrun reports the exit status
        report["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        report["maxrss_mib"] = {who: resource.getrusage(which).ru_maxrss / 1024 for who, which in
                                (("self", resource.RUSAGE_SELF), ("workers", resource.RUSAGE_CHILDREN))}
        report.save()
    dist.barrier()
    loader.close()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--max-mib", type=int, default=8)
    parser.add_argument("--max-cost", type=float, default=16)
    parser.add_argument("--sync-every", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", default=os.environ.get("NODE_OUT_DIR", "."))
    parser.add_argument("--kill-workers", metavar="RANK:BATCH", help="SIGKILL that rank's workers after that "
                        "many batches of the first epoch")
    parser.add_argument("--stream", action="store_true", help="the samples as a stream of 8 shards split by "
                        "rank and worker (IterableDataset), uneven='pad'")
    parser.add_argument("--stop-after", type=int, default=0, metavar="N", help="save the loader's state to "
                        "--state-dir after N batches of the first epoch, and stop")
    parser.add_argument("--state-dir", help="where --stop-after saves each rank's state (rank<RANK>.pt)")
    parser.add_argument("--resume-from", metavar="DIR", help="load each rank's state from DIR, finish its epoch, "
                        "then the epochs after it")
    parser.add_argument("--time-agreements", type=int, default=0, metavar="N",
                        help="after the epochs, time N budget agreements back to back (median in agreement_s)")
    parser.add_argument("--hang-after", type=float, default=170, help="dump the stacks and exit after this long")
    opts = parser.parse_args()
    faulthandler.dump_traceback_later(opts.hang_after, exit=True)  # a hang shows where, before the harness's timeout
    run(opts)


if __name__ == "__main__":
    main()
