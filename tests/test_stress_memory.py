"""Real memory cgroups: the helper makes and always removes its group and counts OOM kills; the
memory-limit scenario in 768 MiB, adaptive (plenty of /dev/shm and 64 MiB of it) and vanilla,
delivers every sample exactly once, checked against __getitem__; an OOM kill is a crash."""

import os
import signal
import subprocess
import sys
import time

import pytest

from stress.cgroup import MemoryCgroup, list_groups, memory_cgroup_available, run_in_memory_cgroup
from stress.harness import run_case
from stress.sandbox import sandbox_available
from stress.scenarios import get
from stress.workloads import CocoStyleDataset, detection_collate

CGROUP, CGROUP_WHY = memory_cgroup_available()
SANDBOX, SANDBOX_WHY = sandbox_available()
NO_CGROUP = f"no memory cgroup can be made here: {CGROUP_WHY}"
NO_SANDBOX = f"no private /dev/shm can be made here: {SANDBOX_WHY}"
WHY_NO_RUN = "; ".join(why for ok, why in ((CGROUP, NO_CGROUP), (SANDBOX, NO_SANDBOX)) if not ok)
needs_cgroup = pytest.mark.skipif(not CGROUP, reason=NO_CGROUP)
needs_cgroup_and_sandbox = pytest.mark.skipif(bool(WHY_NO_RUN), reason=WHY_NO_RUN)
MiB = 2**20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# makes a group, then waits in it to be SIGTERMed, or SIGKILLs itself there
MAKE_GROUP_THEN = """
import os, signal, sys, time
from stress.cgroup import MemoryCgroup, exit_on_sigterm
exit_on_sigterm()
with MemoryCgroup(64 << 20, grace_s=0.5) as group:
    print(group.path, flush=True)
    if sys.argv[1] == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)
"""


def ours():
    """The groups this test process made that still exist."""
    return list_groups(os.getpid())


def python(code):
    return [sys.executable, "-c", code]


def alive(pid):
    """Whether ``pid`` runs (a zombie nobody has reaped yet does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def summary(result):
    keys = ("outcome", "delivered", "expected", "missing", "duplicated", "oom_kills", "peak_memory_bytes",
            "fallbacks", "error")
    return {key: result[key] for key in keys}


def assert_exactly_once(result, limit):
    assert result["outcome"] == "ok", summary(result)
    assert result["delivered"] == result["expected"] > 0, summary(result)
    assert result["missing"] == 0 and result["duplicated"] == 0, summary(result)
    assert result["oom_kills"] == 0, summary(result)
    assert result["memory_limit_bytes"] == limit, summary(result)
    assert 0 < result["peak_memory_bytes"] <= limit, summary(result)
    assert ours() == [], ours()


# -- the cgroup helper ----------------------------------------------------------------------------

@needs_cgroup
def test_the_group_is_made_with_its_limit_and_removed():
    with MemoryCgroup(64 * MiB) as group:
        assert os.path.isdir(group.path) and ours() == [group.path]
        assert os.path.basename(group.path).startswith(f"adaptive-stress-{os.getpid()}-")
        code = "print(open('/proc/self/cgroup').read())"
        out = subprocess.run(group.command(python(code)), capture_output=True, text=True, check=True).stdout
        assert os.path.basename(group.path) in out  # the command ran inside it
        limit_file = "memory.limit_in_bytes" if group.version == "v1" else "memory.max"
        with open(os.path.join(group.path, limit_file)) as f:
            assert int(f.read()) == 64 * MiB  # what the kernel holds to
    assert not os.path.exists(group.path) and ours() == []


@needs_cgroup
def test_an_allocation_past_the_limit_is_oom_killed_and_counted():
    run = run_in_memory_cgroup(python("x = b'\\x01' * (200 << 20)"), 64 * MiB, timeout=60,
                               stderr=subprocess.DEVNULL)
    assert run.returncode == -signal.SIGKILL and run.oom_kills >= 1, run
    assert run.peak_bytes is None or run.peak_bytes <= 64 * MiB, run
    assert ours() == []


@needs_cgroup
def test_an_allocation_under_the_limit_runs_with_no_oom_kill():
    run = run_in_memory_cgroup(python("x = b'\\x01' * (16 << 20)"), 64 * MiB, timeout=60)
    assert run.returncode == 0 and run.oom_kills == 0, run
    assert run.peak_bytes is None or 16 * MiB <= run.peak_bytes <= 64 * MiB, run  # the 16 MiB were touched
    assert ours() == []


@needs_cgroup
def test_a_failing_command_and_a_timed_out_one_leave_no_group():
    assert run_in_memory_cgroup(python("raise SystemExit(3)"), 64 * MiB, timeout=60).returncode == 3
    started = time.monotonic()
    # a grandchild in a session of its own holds the output pipe open: it is killed too
    timed_out = run_in_memory_cgroup(["sh", "-c", "setsid sleep 60 & echo started; sleep 60"], 64 * MiB, timeout=1,
                                     grace_s=0.5, stdout=subprocess.PIPE, text=True)
    assert timed_out.returncode == -signal.SIGKILL and timed_out.stdout == "started\n", timed_out
    assert time.monotonic() - started < 15 and ours() == []


@needs_cgroup
def test_processes_still_in_the_group_are_killed_on_an_exception():
    """A grandchild that outlives its parent, and an exception before anyone waits: the group goes anyway."""
    with pytest.raises(KeyError):
        with MemoryCgroup(64 * MiB, grace_s=0.5) as group:
            proc = subprocess.Popen(group.command(["sh", "-c", "sleep 60 & echo $!; wait"]), stdout=subprocess.PIPE,
                                    text=True)
            grandchild = int(proc.stdout.readline())
            os.kill(proc.pid, signal.SIGKILL)  # the sleep is orphaned, still in the group
            raise KeyError("boom")
    proc.wait(timeout=10)
    assert ours() == [] and not alive(grandchild)


@needs_cgroup
@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_a_killed_maker_leaves_no_group(how):
    """SIGTERM: its ``with`` removes the group; SIGKILL: the next group made removes the dead one's."""
    maker = subprocess.Popen([sys.executable, "-c", MAKE_GROUP_THEN, how], cwd=REPO, stdout=subprocess.PIPE,
                             text=True)
    path = maker.stdout.readline().strip()
    assert path and os.path.isdir(path)
    if how == "sigterm":
        maker.terminate()
    assert maker.wait(timeout=30) == (128 + signal.SIGTERM if how == "sigterm" else -signal.SIGKILL)
    if how == "sigkill":
        assert os.path.isdir(path)  # nobody could remove it yet
        with MemoryCgroup(64 * MiB):
            pass
    assert not os.path.exists(path)


def test_without_a_memory_controller_it_says_why(tmp_path, monkeypatch):
    import stress.cgroup as cgroup

    (tmp_path / "cgroup.controllers").write_text("cpu io memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("cpu pids\n")
    monkeypatch.setattr(cgroup, "V1_ROOT", str(tmp_path / "no-v1"))
    monkeypatch.setattr(cgroup, "V2_ROOT", str(tmp_path))
    with pytest.raises(RuntimeError, match="does not enable the memory controller"):
        MemoryCgroup(64 * MiB)
    monkeypatch.setattr(cgroup, "V2_ROOT", str(tmp_path / "no-v2"))
    with pytest.raises(RuntimeError, match="no memory cgroup hierarchy"):
        MemoryCgroup(64 * MiB)


@pytest.mark.skipif(not SANDBOX, reason=NO_SANDBOX)
def test_without_a_cgroup_stress_run_refuses_and_says_why(monkeypatch, capsys):
    import stress.__main__ as cli

    monkeypatch.setattr(cli, "memory_cgroup_available", lambda: (False, "no memory controller (a test)"))
    assert cli.main(["run", "memory-limit", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "no memory controller (a test)" in err and "--memory 0" in err, err


# -- the full-content check ---------------------------------------------------------------------

@pytest.mark.parametrize("key", ["masks", "boxes"])
def test_the_memory_limit_check_sees_a_corrupted_sample(key):
    setup = get("memory-limit").build(8 << 30, 2, True)
    setup.prepare()
    batch = detection_collate([setup.dataset[i] for i in (3, 5)])
    assert setup.check(batch) == [3, 5]
    _, targets, _ = batch
    values = targets[1][key].view(-1)  # sample 5's
    values[values.numel() // 2] += 1  # one value, which the index-only checks cannot see
    with pytest.raises(AssertionError, match=f"sample 5 corrupted: its {key}"):
        setup.check(batch)
    assert CocoStyleDataset.check(batch) == [3, 5]  # the plain check misses it: the recomputation is needed


# -- the memory-limit scenario in a real cgroup -----------------------------------------------------

@needs_cgroup_and_sandbox
@pytest.mark.parametrize("shm", [8 << 30, 64 * MiB], ids=["shm-8G", "shm-64M"])
def test_adaptive_in_768_mib_delivers_every_sample_once(shm):
    result = run_case("memory-limit", "adaptive", shm_bytes=shm, memory_bytes=768 * MiB, quick=True, epochs=2)
    assert_exactly_once(result, 768 * MiB)
    assert result["shm_left"] == {} and result["spill_left"] == [], summary(result)


@needs_cgroup_and_sandbox
@pytest.mark.parametrize("scenario", ["memory-limit", "memory-limit-tv"])
def test_adaptive_at_1_4x_the_main_process_floor_keeps_whole_batches_without_an_oom_kill(scenario):
    # 512 MiB, about 1.4x what DataLoader(num_workers=0) peaks at here (~350 MiB): vanilla's workers are
    # OOM-killed; one worker's arena and heap do not fit beside whole batches, the main process does. The
    # loader measures that before any worker starts and loads in the main process, with batches of 8.
    result = run_case(scenario, "adaptive", shm_bytes=8 << 30, memory_bytes=512 * MiB, quick=True, epochs=2)
    assert_exactly_once(result, 512 * MiB)
    assert result["mean_batch_size"] == 8 and result["fallbacks"].get("in_process") == 1, summary(result)


@needs_cgroup_and_sandbox
def test_a_stream_in_768_mib_gives_up_its_read_ahead_and_a_batch_in_flight_before_the_batch_size():
    # vanilla completes here with batches of 8. A stream's workers own its shards, so there is no main-process
    # rung: its workers read one batch ahead instead of 4 and keep one batch in flight each, and the batches stay
    # near the 8 asked for (3.6-4.6 images before, with the budget cut first)
    result = run_case("detection-stream", "adaptive", shm_bytes=8 << 30, memory_bytes=768 * MiB, quick=True,
                      epochs=2)
    assert_exactly_once(result, 768 * MiB)
    assert result["fallbacks"].get("smaller_buffer") == 1, summary(result)
    assert result["mean_batch_size"] >= 6.0, summary(result)


@needs_cgroup_and_sandbox
def test_vanilla_in_768_mib_delivers_every_sample_once():
    result = run_case("memory-limit", "vanilla", shm_bytes=8 << 30, memory_bytes=768 * MiB, quick=True)
    assert_exactly_once(result, 768 * MiB)


@needs_cgroup_and_sandbox
def test_an_oom_killed_run_is_a_crash_that_says_so():
    # 192 MiB is less than torch's own import needs (vanilla-main's floor is ~310 MiB)
    result = run_case("memory-limit", "vanilla-main", shm_bytes=8 << 30, memory_bytes=192 * MiB, quick=True)
    assert result["outcome"] == "crash" and result["oom_kills"] >= 1, summary(result)
    assert "OOM" in result["error"] and "192 MiB" in result["error"], summary(result)
    assert ours() == []


@needs_cgroup_and_sandbox
def test_a_watchdog_kill_leaves_no_group():
    # 2 s is less than the run's imports take: the watchdog kills it mid-start, whatever torch does
    result = run_case("memory-limit", "vanilla", shm_bytes=8 << 30, memory_bytes=768 * MiB, quick=True,
                      max_seconds=2)
    assert result["outcome"] == "hang" and result["oom_kills"] == 0, summary(result)
    assert result["memory_limit_bytes"] == 768 * MiB and ours() == []
