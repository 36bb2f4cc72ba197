"""Run by torchrun (2 processes, gloo, CPU) from tests/test_distributed.py; rank 0 writes a verdict.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ranks/check_ranks.py MODE OUT.json
"""

import faulthandler
import gc
import json
import os
import sys
import warnings

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from adaptive_loader import AdaptiveLoader, BudgetBatchSampler  # noqa: E402
from stress.workloads import SegmentationDataset, detection_collate  # noqa: E402


def main(mode: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    costs = np.random.default_rng(0).integers(10, 1201, 5000 if mode == "sampler" else 240)
    events, group_released = [], None
    if mode == "sampler":  # plain sampler, a budget change at an agreed batch
        sampler = BudgetBatchSampler(costs, max_cost=1500, max_batch_size=10, window=512)
        sampler.schedule_budget(100, 800, 10)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            epochs = [[b for b in sampler]]
            sampler.set_epoch(1)
            epochs.append([b for b in sampler])
        epochs = [[list(b) for b in e] for e in epochs]
    else:  # AdaptiveLoader in a small /dev/shm: the budget moves, ranks must agree
        # "uneven": rank 1 loads in its main process, where no decision of its own is ever due
        workers = 0 if mode == "uneven" and rank == 1 else 2
        dataset = SegmentationDataset(costs, side=40)
        loader = AdaptiveLoader(dataset, costs=costs, max_batch_size=10, num_workers=workers,
                                collate_fn=detection_collate, shuffle=True, sync_every=4,
                                telemetry=lambda r: events.append(r) if r["kind"] == "event" else None)
        epochs = []
        for epoch in range(2):
            loader.set_epoch(epoch)
            epochs.append([list(batch[2]) for batch in loader])
        group = loader._group
        del loader
        gc.collect()
        group_released = group not in dist.distributed_c10d._world.pg_map  # its gloo threads are shut down
    gathered = [None] * world
    binders = [[e["data"]["bound_by_node"], e["data"]["bound_by_limit"]] for e in events
               if e["event"] == "budget" and "bound_by_node" in e["data"]]  # which node's limit set an agreed budget
    dist.all_gather_object(gathered, {"epochs": epochs, "events": [e["event"] for e in events],
                                      "group_released": group_released, "binders": binders})
    if rank == 0:
        verdict = {"counts": [[len(e) for e in g["epochs"]] for g in gathered], "exactly_once": [],
                   "budget_events": [g["events"].count("budget") for g in gathered],
                   "group_released": [g["group_released"] for g in gathered],
                   "binders": [g["binders"] for g in gathered]}
        for epoch in range(len(epochs)):
            seen = [i for g in gathered for b in g["epochs"][epoch] for i in b]
            verdict["exactly_once"].append(sorted(seen) == list(range(len(costs))))
        with open(out, "w") as f:
            json.dump(verdict, f)
    dist.barrier()  # both ranks done before either tears the group down (torch 2.1-2.4 gloo could hang there)
    if tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 2):
        os._exit(0)  # torch 2.1's gloo teardown still hung now and then (1 run in ~10), after the verdict: skip it
    dist.destroy_process_group()


if __name__ == "__main__":
    faulthandler.dump_traceback_later(200, exit=True)  # a hang shows where, before the test's 240 s timeout
    main(sys.argv[1], sys.argv[2])
