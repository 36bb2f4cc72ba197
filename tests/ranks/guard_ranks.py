"""A training step under a fixed memory allowance, and the runs tests/test_guard.py makes of it.

    python tests/ranks/guard_ranks.py workers OUT.json          # 2 workers (run it in a small /dev/shm)
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ranks/guard_ranks.py ranks OUT.json

The step really allocates: per sample, a tensor of ``cost * bytes_per_cost`` bytes, touched, on top
of a fixed base, and raises a real ``torch.OutOfMemoryError`` (``torch.cuda.OutOfMemoryError`` where
the former is missing) when the next allocation would pass the allowance. The costs it charges are
read from the batch itself, not from the loader.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
from typing import List, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from adaptive_loader import AdaptiveLoader  # noqa: E402

OOM = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


class CostDataset(Dataset):
    """Sample ``i``: its index, its cost, and ``cost * payload_per_cost`` bytes filled with ``i % 251``."""

    def __init__(self, costs: Sequence[int], payload_per_cost: int = 0) -> None:
        self.costs = np.asarray(costs)
        self.payload_per_cost = payload_per_cost

    def __len__(self) -> int:
        return len(self.costs)

    def __getitem__(self, i: int):
        cost = int(self.costs[i])
        return i, cost, torch.full((cost * self.payload_per_cost,), i % 251, dtype=torch.uint8)


def collate(batch: List[tuple]) -> tuple:
    return tuple(zip(*batch))


class Allowance:
    """``nbytes`` the step may hold at once; its peak is read back with :meth:`peak_bytes`."""

    def __init__(self, nbytes: int, bytes_per_cost: int, base: int = 0) -> None:
        self.nbytes, self.bytes_per_cost, self.base = nbytes, bytes_per_cost, base
        self.peak = 0

    @property
    def capacity_cost(self) -> float:
        """The largest batch cost whose step fits."""
        return (self.nbytes - self.base) / self.bytes_per_cost

    def step(self, batch) -> List[int]:
        """Run one step on ``batch`` (ids, costs, payloads); the ids of its samples."""
        ids, costs, payloads = batch
        for i, payload in zip(ids, payloads):  # the bytes came through intact
            assert payload.numel() == 0 or int(payload[-1]) == i % 251, f"sample {i} corrupted"
        held = self.base
        buffers = [torch.empty(self.base, dtype=torch.uint8)]
        buffers[0][::4096] = 1
        for cost in costs:
            need = int(cost) * self.bytes_per_cost
            if held + need > self.nbytes:
                raise OOM(f"allowance: tried to allocate {need} bytes with {held} of {self.nbytes} held")
            buffer = torch.empty(need, dtype=torch.uint8)
            buffer[::4096] = 1  # touch every page
            buffers.append(buffer)
            held += need
        self.peak = held
        return list(ids)

    def peak_bytes(self) -> int:
        return self.peak


def train(loader: AdaptiveLoader, allowance: Allowance, after_step=None) -> dict:
    """One epoch under the guard: the ids of completed steps, steps taken and OOMs."""
    completed: List[int] = []
    steps = ooms = 0
    for batch in loader:
        with loader.guard(peak_bytes=allowance.peak_bytes) as guard:
            ids = allowance.step(batch)
        steps += 1
        if guard.ok:
            completed += ids
        else:
            ooms += 1
        if after_step is not None:
            after_step()
    return {"completed": completed, "steps": steps, "ooms": ooms}


def main(mode: str, out: str) -> None:
    costs = np.random.default_rng(1).integers(10, 1201, 400)
    if mode == "workers":  # 2 workers; run in a small /dev/shm, so the shm budget moves too
        loader = AdaptiveLoader(CostDataset(costs, payload_per_cost=2048), costs=costs, max_cost=12000,
                                max_batch_size=32, num_workers=2, collate_fn=collate, shuffle=True)
        allowance = Allowance(3000 << 10, 1 << 10, base=100 << 10)
        result = train(loader, allowance)
        import shutil

        result["shm_total"] = shutil.disk_usage("/dev/shm").total
        with open(out, "w") as f:
            json.dump(result, f)
        return
    import torch.distributed as dist  # ranks: each its own allowance, so one rank's steps fail alone

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    loader = AdaptiveLoader(CostDataset(costs), costs=costs, max_cost=12000, max_batch_size=32, num_workers=0,
                            collate_fn=collate, shuffle=True, sync_every=4)
    allowance = Allowance((2000 if rank == 0 else 4000) << 10, 1 << 10, base=100 << 10)
    sync = torch.zeros(1)

    def gradient_sync():  # a collective per step, as DDP's: ranks taking different steps would hang here
        dist.all_reduce(sync, group=None)

    result = train(loader, allowance, gradient_sync)
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        seen = sorted(i for g in gathered for i in g["completed"])
        verdict = {"steps": [g["steps"] for g in gathered], "ooms": [g["ooms"] for g in gathered],
                   "exactly_once": seen == list(range(len(costs))), "missing": len(set(range(len(costs))) - set(seen)),
                   "duplicated": len(seen) - len(set(seen)), "syncs": float(sync[0])}
        with open(out, "w") as f:
            json.dump(verdict, f)
    del loader
    dist.barrier()  # both ranks done before either tears the group down (torch 2.1-2.4 gloo could hang there)
    dist.destroy_process_group()


if __name__ == "__main__":
    faulthandler.dump_traceback_later(200, exit=True)  # a hang shows where, before the test's 240 s timeout
    main(sys.argv[1], sys.argv[2])
