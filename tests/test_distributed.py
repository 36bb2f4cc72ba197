"""Real torch.distributed runs: torchrun, 2 processes, gloo on CPU."""

import json
import os
import subprocess
import sys

import pytest

from stress.sandbox import sandbox_available, sandbox_command

SCRIPT = os.path.join(os.path.dirname(__file__), "ranks", "check_ranks.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(mode, out, shm_bytes=None):
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT, mode,
            str(out)]
    if shm_bytes is not None:
        argv = sandbox_command(argv, shm_bytes)
    try:
        result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=240,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
    except subprocess.TimeoutExpired as exc:  # say where it stood: the ranks dump their stacks at 200 s
        output = "".join(part.decode(errors="replace") if isinstance(part, bytes) else part or ""
                         for part in (exc.stdout, exc.stderr))  # bytes, whatever text= says
        pytest.fail(f"torchrun {mode} ran past 240 s; its output so far:\n{output[-6000:]}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


def test_sampler_ranks_get_equal_counts_and_every_index_once(tmp_path):
    verdict = torchrun("sampler", tmp_path / "v.json")
    for epoch_counts in zip(*verdict["counts"]):
        assert len(set(epoch_counts)) == 1
    assert verdict["exactly_once"] == [True, True]


@pytest.mark.skipif(not sandbox_available()[0], reason=f"no private /dev/shm: {sandbox_available()[1]}")
def test_adaptive_loader_ranks_agree_on_a_moving_budget(tmp_path):
    """Both ranks share one 48 MiB /dev/shm, so the budget moves; they must still agree."""
    verdict = torchrun("loader", tmp_path / "v.json", shm_bytes=48 * 2**20)
    for epoch_counts in zip(*verdict["counts"]):
        assert len(set(epoch_counts)) == 1, verdict
    assert verdict["exactly_once"] == [True, True], verdict
    assert min(verdict["budget_events"]) >= 1, verdict
    # each agreed budget that a limit set names it, on both ranks alike: the one node (0), and the limit
    # of the rank that proposed it (with memfd arenas, the batches are off /dev/shm: memory binds)
    assert verdict["binders"][0] and verdict["binders"][0] == verdict["binders"][1], verdict
    assert {tuple(b) for b in verdict["binders"][0]} <= {(0, "memory"), (0, "/dev/shm")}, verdict
    assert verdict["group_released"] == [True, True], verdict  # the loader's gloo group goes with it


@pytest.mark.skipif(not sandbox_available()[0], reason=f"no private /dev/shm: {sandbox_available()[1]}")
def test_ranks_whose_own_decisions_differ_still_meet_at_every_agreement(tmp_path):
    """A rank whose memory never asks for a decision (here: loading in its main process) must
    still take part in every agreement, or the other rank waits in it forever (seen across two
    nodes with different memory limits)."""
    verdict = torchrun("uneven", tmp_path / "v.json", shm_bytes=48 * 2**20)
    for epoch_counts in zip(*verdict["counts"]):
        assert len(set(epoch_counts)) == 1, verdict
    assert verdict["exactly_once"] == [True, True], verdict


def test_a_ranks_node_is_torchruns_group_rank_else_its_rank_over_the_ranks_per_node(monkeypatch):
    from adaptive_loader.distributed import node_rank

    monkeypatch.setenv("GROUP_RANK", "3")
    assert node_rank() == 3
    monkeypatch.delenv("GROUP_RANK")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert node_rank() == 2
