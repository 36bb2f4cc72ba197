"""The memory probe: this machine's real cgroup and meminfo files (checked against ``cat`` and
``findmnt``), fixture trees for cgroup v1 and v2 (limited, unlimited, nested, a container's view,
none at all), meminfo parsing, and the checks of a user's ``memory_budget=``."""

import os
import shutil
import subprocess

import pytest

from adaptive_loader.memory import (V1_UNLIMITED, MemoryState, read_meminfo, read_memory, read_oom_kills,
                                   resolve_memory_budget)
from adaptive_loader.memory import _mounts
from adaptive_loader.region import SharedRegion, memfd_available

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "cgroup")
GiB, MiB = 1 << 30, 1 << 20


def fixture(case):
    return read_memory(os.path.join(FIXTURES, case))


# -- fixture trees -------------------------------------------------------------------------------

def test_v2_with_a_limit():
    state = fixture("v2-limit")
    assert state == MemoryState(limit=512 * MiB, used=200 * MiB, available=312 * MiB, shmem=64 * MiB,
                                source="cgroup v2 /kubepods.slice/kubepods-pod1.slice/cri-ctr1.scope",
                                cgroup="cgroup v2 /kubepods.slice/kubepods-pod1.slice/cri-ctr1.scope")


def test_v2_unlimited_is_the_host():
    state = fixture("v2-unlimited")  # "max" at every level: MemTotal 16 GiB, MemAvailable 12 GiB
    assert (state.limit, state.used, state.available) == (16 * GiB, 4 * GiB, 12 * GiB)
    assert state.source == "host" and state.cgroup == "cgroup v2 /user.slice/user-1000.slice/session-1.scope"


def test_v2_nested_takes_the_tighter_parent():
    state = fixture("v2-nested")  # pod 1 GiB (800 MiB used), its container 2 GiB (650 MiB used)
    assert state.limit == 1 * GiB and state.used == 800 * MiB and state.available == 224 * MiB
    assert state.source == "cgroup v2 /kubepods.slice/kubepods-pod1.slice"
    assert state.cgroup == "cgroup v2 /kubepods.slice/kubepods-pod1.slice/cri-ctr1.scope"


def test_v1_with_a_limit():
    state = fixture("v1-limit")  # 400 MiB used minus 150 MiB of inactive file cache (total_, hierarchical)
    assert (state.limit, state.used, state.available) == (512 * MiB, 250 * MiB, 262 * MiB)
    assert state.source == "cgroup v1 /docker/abc123"


def test_oom_kills_are_summed_over_the_levels_that_count_them():
    assert read_oom_kills(os.path.join(FIXTURES, "v2-nested")) == 3  # memory.events: the pod's 2, the container's 1
    assert read_oom_kills(os.path.join(FIXTURES, "v1-limit")) == 3  # memory.oom_control of its group only
    assert read_oom_kills(os.path.join(FIXTURES, "v2-limit")) is None  # no memory.events: not counted
    assert read_oom_kills(os.path.join(FIXTURES, "host")) is None  # no memory cgroup


def test_v1_unlimited_is_the_host():
    state = fixture("v1-unlimited")
    assert state.limit == 16 * GiB and state.source == "host" and state.cgroup == "cgroup v1 /user.slice"


def test_a_containers_view_where_the_mount_root_is_its_own_group():
    """No cgroup namespace: /proc/self/cgroup says /docker/abc123, and that group is what is mounted
    at /sys/fs/cgroup/memory (mountinfo's root field), so its files are at the mount point itself."""
    state = fixture("v1-container")
    assert (state.limit, state.used, state.available) == (256 * MiB, 80 * MiB, 176 * MiB)
    assert state.source == "cgroup v1 /docker/abc123"


def test_no_cgroup_at_all_is_the_host():
    state = fixture("host")  # MemTotal 8 GiB, MemAvailable 5 GiB, Shmem 1 MiB
    assert state == MemoryState(limit=8 * GiB, used=3 * GiB, available=5 * GiB, shmem=1 * MiB, source="host")


def test_a_cgroup_limit_above_the_ram_is_no_bound():
    state = fixture("tight-host")  # memory.max 64 GiB on an 8 GiB machine
    assert state.limit == 8 * GiB and state.source == "host" and state.cgroup == "cgroup v2 /big"


def test_mountinfo_escapes_and_optional_fields():
    line = r"35 31 0:32 /docker/a\040b /sys/fs/cgroup/mem\040ory rw,relatime shared:15 master:2 - cgroup cgroup rw,memory"
    assert _mounts(line) == [("/docker/a b", "/sys/fs/cgroup/mem ory", "cgroup", ["rw", "memory"])]


def test_meminfo_in_bytes():
    fields = read_meminfo(os.path.join(FIXTURES, "host"))
    assert fields["MemTotal"] == 8 * GiB and fields["Shmem"] == 1 * MiB
    assert fields["HugePages_Total"] == 0  # a count, not kB
    assert read_meminfo(os.path.join(FIXTURES, "host"), ("Shmem", "MemAvailable", "Nope")) == {
        "Shmem": 1 * MiB, "MemAvailable": 5 * GiB}
    with pytest.raises(OSError, match="meminfo"):
        read_meminfo(os.path.join(FIXTURES, "no-such-tree"))


# -- this machine's real files -------------------------------------------------------------------------

def cat(path):
    return subprocess.run(["cat", path], capture_output=True, text=True, check=True).stdout


def cat_meminfo():
    return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in cat("/proc/meminfo").splitlines()
            if line.split()[-1] == "kB"}


def expected_cgroup():
    """(version, group path, [(limit file contents, directory)...] from the group up), by cat and findmnt."""
    lines = [line.split(":", 2) for line in cat("/proc/self/cgroup").splitlines()]
    v1 = [path for _, controllers, path in lines if "memory" in controllers.split(",")]
    v2 = [path for hierarchy, controllers, path in lines if hierarchy == "0" and controllers == ""]
    if v1:
        version, path, fstype, limit_file = "v1", v1[0], "cgroup", "memory.limit_in_bytes"
    elif v2:
        version, path, fstype, limit_file = "v2", v2[0], "cgroup2", "memory.max"
    else:
        return None
    mounts = subprocess.run(["findmnt", "-rn", "-t", fstype, "-o", "TARGET,OPTIONS,FSROOT"], capture_output=True,
                            text=True, check=True).stdout.splitlines()
    mounts = [m.split() for m in mounts if version == "v2" or "memory" in m.split()[1].split(",")]
    if not mounts:
        return None
    target, _, fsroot = mounts[0]
    relative = path[len(fsroot.rstrip("/")):] if path.startswith(fsroot.rstrip("/") + "/") or fsroot == "/" else ""
    parts = [p for p in relative.split("/") if p]
    limits = []
    for n in range(len(parts), -1, -1):
        directory = os.path.join(target, *parts[:n])
        if os.path.exists(os.path.join(directory, limit_file)):
            limits.append((cat(os.path.join(directory, limit_file)).strip(), directory))
    return version, path, limits


@pytest.mark.skipif(not os.path.exists("/proc/self/cgroup") or shutil.which("findmnt") is None,
                    reason="needs /proc/self/cgroup and findmnt to check the probe against")
def test_this_machines_real_files_as_cat_reads_them():
    found = expected_cgroup()
    before = cat_meminfo()
    state = read_memory()
    after = cat_meminfo()
    total = before["MemTotal"]
    slack = 256 * MiB  # other processes allocate and free between the reads
    if found is None:
        assert state.cgroup == "" and state.source == "host"
        limits = []
    else:
        version, path, limit_files = found
        assert state.cgroup == f"cgroup {version} {path}"
        limits = [int(text) for text, _ in limit_files if text.isdigit() and int(text) < V1_UNLIMITED]
    expected_limit = min(limits + [total])
    assert state.limit == expected_limit
    if expected_limit == total:
        assert state.source == "host"
        low = total - max(before["MemAvailable"], after["MemAvailable"]) - slack
        high = total - min(before["MemAvailable"], after["MemAvailable"]) + slack
        assert low <= state.used <= high
    else:
        assert state.source.startswith(f"cgroup {found[0]} ")
        assert 0 <= state.used <= state.limit
    assert 0 <= state.available <= max(before["MemAvailable"], after["MemAvailable"]) + slack
    assert abs(state.shmem - before["Shmem"]) <= slack


@pytest.mark.skipif(not memfd_available(), reason="os.memfd_create is missing or refused here")
def test_memfd_pages_count_in_shmem():
    before = read_memory().shmem
    region = SharedRegion.create(512 * MiB)  # posix_fallocate: the pages exist now
    during = read_memory().shmem
    region.close()
    after = read_memory().shmem
    assert during - before >= 384 * MiB  # others' tests may free some shm meanwhile, not a third of this
    assert during - after >= 384 * MiB


# -- the user's memory_budget= ----------------------------------------------------------------------------

def test_budget_none_is_what_was_detected():
    assert resolve_memory_budget(None, 3 * GiB) == 3 * GiB


def test_budget_bytes_and_fractions():
    assert resolve_memory_budget(256 * MiB, 3 * GiB) == 256 * MiB
    assert resolve_memory_budget(0.5, 3 * GiB) == 1536 * MiB
    assert resolve_memory_budget(1.0, 3 * GiB) == 3 * GiB


@pytest.mark.parametrize("value, error, message", [
    (0, ValueError, r"memory_budget in bytes must be > 0, got 0"),
    (-5, ValueError, r"memory_budget in bytes must be > 0, got -5"),
    (0.0, ValueError, r"a fraction of the detected memory, in \(0, 1\]; got 0.0 \(give bytes as an int\)"),
    (1.5, ValueError, r"in \(0, 1\]; got 1.5"),
    (float("nan"), ValueError, r"got nan"),
    (float("inf"), ValueError, r"got inf"),
    (True, TypeError, r"memory_budget must be None, a number of bytes \(int > 0\) or a fraction .* not bool"),
    ("4G", TypeError, r"not str"),
    ([1], TypeError, r"not list"),
])
def test_budget_errors_are_precise(value, error, message):
    with pytest.raises(error, match=message):
        resolve_memory_budget(value, GiB)


def test_detected_must_be_bytes():
    with pytest.raises(ValueError, match="detected must be an int >= 0 bytes, got -1"):
        resolve_memory_budget(None, -1)
    with pytest.raises(ValueError, match="detected must be an int >= 0 bytes, got 0.5"):
        resolve_memory_budget(None, 0.5)
