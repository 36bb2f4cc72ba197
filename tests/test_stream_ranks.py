"""A stream over two real ranks (torchrun, gloo on CPU) whose shards split unevenly: no rank waits in a
collective the other left, and what is not delivered is reported (tests/ranks/stream_ranks.py)."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "ranks", "stream_ranks.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = {0: 120, 1: 80}  # rank 0 reads 3 shards of 40, rank 1 two


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks") / "verdict"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT, str(out)]
    before = set(os.listdir(REPO))
    try:
        result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=240,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the ranks ran past 240 s (a rank waiting in a collective?): {str(exc.stdout)[-3000:]}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert set(os.listdir(REPO)) - before == set(), "the ranks left files in the repository"
    return [json.loads(out.with_name(f"verdict.rank{rank}.json").read_text()) for rank in (0, 1)]


def test_uneven_stop_every_rank_stops_at_the_first_dry_one_and_reports_the_cut(ranks):
    for epoch in range(2):
        batches = [r["stop"]["epochs"][epoch]["batches"] for r in ranks]
        assert batches[0] == batches[1] > 0
        for rank, verdict in enumerate(ranks):
            keys = verdict["stop"]["epochs"][epoch]["keys"]
            assert len(keys) == len(set(keys)), "a sample came twice"
        assert len(ranks[1]["stop"]["epochs"][epoch]["keys"]) == SAMPLES[1]
        assert len(ranks[0]["stop"]["epochs"][epoch]["keys"]) < SAMPLES[0]
    assert [c["cut_batch_samples"] > 0 for c in ranks[0]["stop"]["cut"]] == [True, True], "rank 0 reports each cut"
    assert not ranks[1]["stop"]["cut"], "the rank that ran dry first cut nothing"


def test_a_cut_stream_is_not_read_to_its_end(ranks):
    """Rank 0 has 4,000 samples more than rank 1: at the cut its workers stop, they do not read them."""
    delivered = [len(e["keys"]) for e in ranks[0]["stop-long"]["epochs"]]
    assert delivered[0] < SAMPLES[0] and len(ranks[0]["stop-long"]["cut"]) == 2
    assert ranks[0]["stop-long"]["read"] < 2 * 1000, ranks[0]["stop-long"]["read"]  # the whole stream: 2 x 4,120
    assert ranks[1]["stop-long"]["read"] == 2 * SAMPLES[1]


def test_uneven_pad_the_short_rank_repeats_marked_batches_until_all_are_dry(ranks):
    for epoch in range(2):
        assert ranks[0]["pad"]["epochs"][epoch]["batches"] == ranks[1]["pad"]["epochs"][epoch]["batches"]
        for rank, verdict in enumerate(ranks):
            keys = verdict["pad"]["epochs"][epoch]["keys"]
            assert sorted(keys) == sorted(set(keys)) and len(keys) == SAMPLES[rank]
        assert ranks[0]["pad"]["epochs"][epoch]["repeats"] == 0
        assert ranks[1]["pad"]["epochs"][epoch]["repeats"] > 0
        assert ranks[1]["pad"]["repeated"][epoch]["repeated_batches"] == ranks[1]["pad"]["epochs"][epoch]["repeats"]


def test_pad_with_a_rank_that_has_no_batch_at_all_stops_every_rank_and_says_so(ranks):
    """Nothing to repeat: the rank with batches cuts them (reported), and nobody waits."""
    for epoch in range(2):
        assert [r["pad-empty"]["epochs"][epoch]["batches"] for r in ranks] == [0, 0]
    assert [c["cut_batch_samples"] > 0 for c in ranks[0]["pad-empty"]["cut"]] == [True, True]
    assert ranks[0]["pad-empty"]["read"] < 2 * 200
    assert not ranks[1]["pad-empty"]["cut"]


def test_plain_dataloader_on_the_same_shards_leaves_a_rank_waiting_in_its_step_collective(ranks):
    """What the loader saves users from: the rank with more batches waits in the gradient all-reduce
    (here a group with a 10 s timeout, so the wait ends)."""
    assert ranks[0]["dataloader"]["error"] and "Timed out" in ranks[0]["dataloader"]["error"]
    assert ranks[1]["dataloader"]["error"] is None
