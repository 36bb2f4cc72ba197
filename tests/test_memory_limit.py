"""The loader under a real memory cgroup limit: a worker the OOM killer takes is a memory failure,
told by evidence; the loader steps down before it starts workers again, the main process lives, and
every sample arrives once with its content.

Each test makes its own cgroup (``stress.cgroup``: v1 here, v2 where the machine has it) and removes
it; where none can be made (not root, no memory controller) it skips and says why.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from stress.cgroup import list_groups, memory_cgroup_available, run_in_memory_cgroup

AVAILABLE, WHY = memory_cgroup_available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"no memory cgroup can be made here: {WHY}")

MiB = 1 << 20

# The workers named decode with a burst far past the group's limit; the main process does not. The
# OOM killer takes a worker (workers raise their oom_score_adj), and the loader steps down.
HUNGRY_WORKERS = textwrap.dedent("""
    import json, sys
    import numpy as np
    import torch
    from torch.utils.data import Dataset, get_worker_info
    from adaptive_loader import AdaptiveLoader

    HUNGRY = eval(sys.argv[1])  # the ids of the workers whose decoding does not fit

    class Rows(Dataset):
        def __len__(self):
            return 48

        def __getitem__(self, i):
            info = get_worker_info()
            if info is not None and info.id in HUNGRY:
                burst = np.ones(1200 << 20, dtype=np.uint8)  # touched: charged to the group
                del burst
            return torch.full((1 << 18,), i, dtype=torch.int32), i

    records = []
    loader = AdaptiveLoader(Rows(), max_batch_size=4, num_workers=2, shuffle=True, telemetry=records.append,
                            multiprocessing_context="fork")
    seen, wrong = [], []
    for epoch in range(2):
        loader.set_epoch(epoch)
        for data, ids in loader:
            for row, i in zip(data, ids.tolist()):
                if not bool((row == i).all()):
                    wrong.append(i)
                seen.append(i)
    loader.close()
    recoveries = [r for r in records if r.get("event") == "recovery"]
    print(json.dumps({"seen": sorted(seen), "wrong": wrong, "fallbacks": loader.fallbacks,
                      "causes": [r["data"]["cause"] for r in recoveries],
                      "steps": [r["data"].get("step_down") for r in recoveries],
                      "messages": [r["message"] for r in recoveries]}))
""")


def run_with_hungry_workers(hungry, tmp_path):
    """Run the script above in a fresh 768 MiB group; its result, once the main process finished."""
    out = tmp_path / "out.json"
    with open(out, "w") as stdout:
        run = run_in_memory_cgroup([sys.executable, "-c", HUNGRY_WORKERS, repr(hungry)], 768 * MiB, timeout=200,
                                   stdout=stdout, stderr=subprocess.PIPE)
    assert run.returncode == 0, f"the main process did not finish (rc {run.returncode}, {run.oom_kills} OOM kills)"
    result = json.loads(out.read_text())
    assert result["seen"] == sorted(list(range(48)) * 2) and result["wrong"] == []  # once per epoch, intact
    assert run.oom_kills is not None and run.oom_kills >= len(result["causes"])
    return result


@pytest.mark.timeout(240)
def test_an_oom_killed_worker_makes_the_loader_step_down_and_every_sample_comes_once(tmp_path):
    result = run_with_hungry_workers((1,), tmp_path)
    assert result["causes"] == ["oom_killed", "oom_killed"], result["messages"]
    assert result["steps"] == ["fewer_in_flight", "fewer_in_flight"]
    assert "OOM killer count rose" in result["messages"][0] and "2x2 -> 2x1" in result["messages"][0]
    assert "2x1 -> 1x1" in result["messages"][1]  # and the second epoch starts where the first ended


@pytest.mark.timeout(240)
def test_when_no_worker_fits_the_loader_ends_in_the_main_process_having_given_up_what_comes_before_in_order(tmp_path):
    result = run_with_hungry_workers((0, 1), tmp_path)
    # under a cgroup's limit the first two batches are probed in the main process, which decodes without
    # the burst: the depth asked for starts, and each kill gives up the next rung in order: batches in
    # flight, a worker, then the workers altogether, before the batches asked for (4 samples) are cut
    assert result["steps"] == ["fewer_in_flight", "fewer_in_flight", "in_process"], result["messages"]
    assert "2x2 -> 2x1" in result["messages"][0] and "2x1 -> 1x1" in result["messages"][1]
    assert "rather than smaller batches" in result["messages"][2]
    assert result["fallbacks"]["in_process"] == 1


def test_no_cgroup_of_ours_is_left():
    assert list_groups(os.getpid()) == []  # this run's; another run's may be alive beside it
