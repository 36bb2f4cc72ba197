"""fd exhaustion never crashes: real lowered ``ulimit -n`` in child processes, real DataLoader workers."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HEAD = """
import json, os, resource, sys, tempfile, warnings
warnings.filterwarnings("ignore")
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

class ManyTensors(Dataset):
    '''200 tensors per sample: default_collate in a worker would want one shm fd for each.'''
    def __len__(self):
        return 24
    def __getitem__(self, i):
        return {f"t{k}": torch.full((8,), float(i * 1000 + k)) for k in range(200)}

def check(batches):
    seen = sorted(int(b["t0"][j, 0]) // 1000 for b in batches for j in range(len(b["t0"])))
    exact = all(torch.equal(b[f"t{k}"][j], torch.full((8,), float(int(b["t0"][j, 0]) + k)))
                for b in batches for k in range(200) for j in range(len(b["t0"])))
    return seen == list(range(24)) and exact
"""


def run_limited(body, nofile, timeout=240):
    """Run ``body`` in a child whose RLIMIT_NOFILE soft limit is ``nofile`` (a real ``ulimit -n``)."""
    code = HEAD + textwrap.dedent(body)
    command = ["bash", "-c", f'ulimit -n {nofile} && exec "$0" -c "$1"', sys.executable, code]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=HERE,
                            env={**os.environ, "PYTHONPATH": HERE})
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(300)
def test_the_one_block_road_sends_200_tensors_a_sample_with_one_fd_a_batch_under_ulimit_256():
    out = run_limited("""
        from adaptive_loader.pipeline import measured_collate
        collate = measured_collate(default_collate, "/dev/shm", tempfile.gettempdir())
        batches, roads, handles = [], set(), set()
        for envelope in DataLoader(ManyTensors(), batch_size=4, num_workers=2, collate_fn=collate, timeout=60):
            roads.add(str(envelope.stats.transport))
            handles.add(envelope.stats.handles)
            batches.append(envelope.open())
        print(json.dumps({"ok": check(batches), "roads": sorted(roads), "handles": sorted(handles),
                          "limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}))
    """, 256)
    assert out == {"ok": True, "roads": ["shm"], "handles": [1], "limit": 256}


@pytest.mark.timeout(300)
def test_adaptive_loader_without_arena_delivers_everything_under_ulimit_256():
    out = run_limited("""
        from adaptive_loader import AdaptiveLoader
        with AdaptiveLoader(ManyTensors(), max_batch_size=4, num_workers=2, arena=False) as loader:
            batches = list(loader)
        print(json.dumps({"ok": check(batches), "limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}))
    """, 256)
    assert out == {"ok": True, "limit": 256}


@pytest.mark.timeout(300)
def test_a_worker_with_every_fd_taken_spills_with_its_spare_fd():
    """The worker's fds are all taken (by the user's own code) from its first sample on: no block can
    be made, and each spill file is written with the fd held in reserve since the worker started."""
    out = run_limited("""
        from adaptive_loader.pipeline import measured_collate
        held = []

        class Greedy(ManyTensors):
            def __getitem__(self, i):
                if not held:  # from the first sample on, this worker has no fd left
                    try:
                        while True:
                            held.append(os.open(os.devnull, os.O_RDONLY))
                    except OSError:
                        pass
                return super().__getitem__(i)

        collate = measured_collate(default_collate, "/dev/shm", tempfile.gettempdir(), arena_kind="shm")
        batches, roads = [], []
        for envelope in DataLoader(Greedy(), batch_size=4, num_workers=1, collate_fn=collate, timeout=60):
            roads.append(str(envelope.stats.transport))
            batches.append(envelope.open())
        print(json.dumps({"ok": check(batches), "roads": roads,
                          "left": os.listdir(collate.spill.path)}))
    """, 128)
    assert out["ok"] and out["left"] == []
    assert set(out["roads"]) == {"file"}
