"""Recovery, stalls and epochs after a fallback, with real processes and real SIGKILLs."""

import collections
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from adaptive_loader import AdaptiveLoader, LoaderFailed, LoaderStalled
from stress.workloads import kill_one_worker


class Indexed(torch.utils.data.Dataset):
    def __init__(self, n=40):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"x": torch.full((64,), float(i)), "i": i}


def delivered(batches):
    return sorted(int(i) for b in batches for i in b["i"])


def test_worker_killed_then_next_epoch_is_complete():
    loader = AdaptiveLoader(Indexed(), batch_size=4, num_workers=2, shuffle=True)
    first = []
    for step, batch in enumerate(loader):
        first.append(batch)
        if step == 2:
            kill_one_worker()
    assert delivered(first) == list(range(40))
    assert loader.fallbacks.get("recovery") == 1
    loader.set_epoch(1)
    assert delivered(list(loader)) == list(range(40))
    assert delivered(list(loader)) == list(range(40))  # same epoch again, without set_epoch


def test_persistent_workers_survive_an_epoch_left_early():
    loader = AdaptiveLoader(Indexed(), batch_size=4, num_workers=2, persistent_workers=True)
    for step, _ in enumerate(loader):
        if step == 1:
            break
    for _ in range(2):
        assert delivered(list(loader)) == list(range(40))


class Forever(Indexed):
    def __getitem__(self, i):
        if i == 5:
            time.sleep(3600)
        return super().__getitem__(i)


def test_a_stall_becomes_a_clear_error():
    loader = AdaptiveLoader(Forever(), batch_size=1, num_workers=1, stall_timeout=2)
    start = time.monotonic()
    with pytest.raises(LoaderStalled, match=r"no batch for \d+ s.*shm /dev/shm: .* MiB free.*fds \d+ open"):
        list(loader)
    assert time.monotonic() - start < 30


class Suicidal(Indexed):
    def __getitem__(self, i):
        if i == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__getitem__(i)


def test_repeated_worker_deaths_end_in_a_clear_error():
    loader = AdaptiveLoader(Suicidal(), batch_size=2, num_workers=1, max_restarts=2)
    with pytest.raises(LoaderFailed, match="2 recoveries in a row did not get a batch through"):
        list(loader)


def test_user_errors_from_the_dataset_propagate_unchanged():
    class Broken(Indexed):
        def __getitem__(self, i):
            raise KeyError(f"no sample {i}")

    with pytest.raises(KeyError, match="no sample"):
        list(AdaptiveLoader(Broken(), batch_size=2, num_workers=1))


class Box(collections.UserDict):
    """A batch type that is no dict: shm sharing must still reach its tensors."""


def test_batches_in_custom_containers_travel_intact():
    def collate(samples):
        return Box(x=torch.stack([s["x"] for s in samples]), i=[s["i"] for s in samples])

    records = []
    loader = AdaptiveLoader(Indexed(), batch_size=4, num_workers=2, collate_fn=collate, telemetry=records.append)
    batches = list(loader)
    assert all(isinstance(b, Box) for b in batches)
    assert sorted(i for b in batches for i in b["i"]) == list(range(40))
    assert all(float(b["x"][k, 0]) == b["i"][k] for b in batches for k in range(len(b["i"])))
    assert all(r["bytes"] == 4 * 64 * 4 for r in records if r["kind"] == "batch")


RESUME_SCRIPT = """
import sys, torch
sys.path.insert(0, {repo!r})
from adaptive_loader import AdaptiveLoader
from stress.workloads import SegmentationDataset, detection_collate
import numpy as np
costs = np.random.default_rng(0).integers(10, 1201, 90)
loader = AdaptiveLoader(SegmentationDataset(costs, side=4), costs=costs, max_cost=1500, num_workers=2,
                        collate_fn=detection_collate, shuffle=True, seed=4, num_replicas={replicas}, rank={rank})
phase, state = sys.argv[1], sys.argv[2]
if phase == "first":  # five batches, then a checkpoint with batches still in flight, then exit
    it = iter(loader)
    got = [i for _ in range(5) for i in next(it)[2]]
    torch.save(loader.state_dict(), state)
else:
    if phase == "resume":
        loader.load_state_dict(torch.load(state, weights_only=False))
    got = [i for batch in loader for i in batch[2]]
print(" ".join(map(str, got)))
"""


@pytest.mark.parametrize("replicas, rank", [(1, 0), (2, 1)])
def test_resume_in_a_new_process_delivers_exactly_the_rest(tmp_path, replicas, rank):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT.format(repo=repo, replicas=replicas, rank=rank))

    def run(phase):
        return subprocess.run([sys.executable, str(script), phase, str(tmp_path / "state.pt")],
                              capture_output=True, text=True, check=True).stdout.split()

    head, tail, whole = run("first"), run("resume"), run("whole")
    assert sorted(head + tail) == sorted(whole)  # this rank's share, each sample once


def test_a_broken_handover_is_classified_by_evidence_not_by_which_worker_lives():
    """An EOFError while opening a batch: a worker that exited is the cause if there is one (with
    its exit status); else fds measurably within reach of the limit; else it is 'lost', which
    rebuilds the iterator and switches nothing (the sharing strategy is process-wide)."""
    from torch.utils.data._utils import signal_handling

    from adaptive_loader.failures import classify
    from adaptive_loader.kinds import Cause

    iterator = iter(torch.utils.data.DataLoader(Indexed(), batch_size=4, num_workers=2))
    workers = list(iterator._workers)
    pids = tuple(w.pid for w in workers)
    signal_handling._remove_worker_pids(id(iterator))  # the kill below is the test's, not a failure
    try:
        next(iterator)
        calm, pressed = (lambda: None), (lambda: "batches carry ~300 fds each")
        assert classify(EOFError(), workers, calm, wait=0.1).cause == Cause.LOST
        assert classify(EOFError(), workers, pressed, wait=0.1).cause == Cause.FDS
        assert classify(OSError(24, "Too many open files"), workers, calm).cause == Cause.FDS
        os.kill(pids[0], signal.SIGKILL)
        failure = classify(ConnectionResetError(), workers, pressed)
        assert failure.cause == Cause.WORKER_DIED and "signal 9" in failure.evidence
        counted = lambda: "the memory cgroup's OOM killer count rose from 0 to 1"  # noqa: E731
        failure = classify(ConnectionResetError(), workers, calm, oom_kills=counted)
        assert failure.cause == Cause.OOM_KILLED and "signal 9" in failure.evidence and "rose from 0 to 1" in \
            failure.evidence  # a SIGKILL and a kill counted by the kernel: a memory failure
    finally:
        signal_handling._set_worker_pids(id(iterator), pids)  # as _shutdown_workers expects
        iterator._shutdown_workers()
    wrapped = RuntimeError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback ...")
    assert classify(wrapped, [], calm).cause is None  # the user's own error
