"""Probes of adaptive_loader.measure: footprint, shm, fds, RSS."""

import os
import pathlib
import resource
import shutil
import subprocess
import sys
from collections import namedtuple

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from adaptive_loader.measure import FdState, ShmProbe, ShmState, footprint, host_ram_available, read_fds, rss_of


# -- footprint ---------------------------------------------------------------------------------------

def test_footprint_of_one_tensor_is_its_storage():
    t = torch.zeros(10, 3, dtype=torch.float64)
    assert footprint(t) == (240, 1)


def test_footprint_of_one_array():
    a = np.zeros((4, 5), dtype=np.int16)
    assert footprint(a) == (40, 1)


def test_footprint_walks_dicts_lists_tuples_sets():
    Pair = namedtuple("Pair", "left right")
    a = torch.zeros(4, dtype=torch.float32)  # 16 B
    b = torch.zeros(2, dtype=torch.int64)  # 16 B
    c = np.zeros(3, dtype=np.float64)  # 24 B
    d = torch.zeros(5, dtype=torch.uint8)  # 5 B
    e = torch.zeros(1, dtype=torch.complex128)  # 16 B
    f = torch.zeros(7, dtype=torch.bool)  # 7 B
    obj = {"a": a, "nested": [{"b": b}, (c, Pair(d, "text"))], "set": frozenset([e]), "s": {f}}
    assert footprint(obj) == (16 + 16 + 24 + 5 + 16 + 7, 6)


def test_footprint_walks_other_mappings_and_sequences():
    import collections
    import types

    a, b, c, d = (torch.zeros(n, dtype=torch.uint8) for n in (1, 2, 4, 8))
    obj = collections.OrderedDict(
        a=a, rest=collections.deque([types.MappingProxyType({"b": b}), collections.UserList([c])]),
        more=collections.UserDict({"d": d}))
    assert footprint(obj) == (15, 4)


def test_footprint_counts_a_tensor_storage_once_through_views():
    t = torch.arange(100, dtype=torch.float32)  # 400 B
    views = [t, t[:10], t.view(10, 10), t[5:50:3], t.view(10, 10).T, {"again": t}]
    assert footprint(views) == (400, 1)


def test_footprint_of_a_view_counts_its_whole_storage():
    t = torch.arange(100, dtype=torch.float32)
    assert footprint(t[:10]) == (400, 1)


def test_footprint_same_array_object_counted_once():
    a = np.arange(100, dtype=np.float64)
    assert footprint([a, a, (a,)]) == (800, 1)


def test_footprint_tensor_sharing_an_array_buffer_counted_once():
    a = np.arange(100, dtype=np.float64)
    assert footprint([a, torch.from_numpy(a)]) == (800, 1)


def test_footprint_counts_numpy_views_by_their_own_bytes():
    """Arrays are pickled by value: each view travels as its own bytes."""
    a = np.arange(100, dtype=np.float64)
    assert footprint([a, a[:10], a[::2]]) == (800 + 80 + 400, 3)


def test_footprint_own_bytes_counts_the_view_not_the_storage():
    data = torch.zeros(1000, 10)
    assert footprint(data[3]) == (40_000, 1)
    assert footprint(data[3], own_bytes=True) == (40, 1)
    assert footprint([data[3], data[4]], own_bytes=True) == (80, 1)


def test_footprint_skips_huge_sequences_and_survives_cycles():
    cycle = [torch.ones(2)]
    cycle.append(cycle)
    assert footprint({"r": range(10**9), "m": memoryview(b"x" * 10), "c": cycle}) == (8, 1)


def test_footprint_distinct_tensors_of_equal_content_counted_separately():
    a = torch.ones(8)
    b = torch.ones(8)
    assert footprint([a, b]) == (64, 2)


@pytest.mark.parametrize("obj", ["a string" * 100, b"bytes" * 100, 12345, 3.5, None, object(),
                                 {"k": "v", "n": [1, 2, "x"]}, [], {}, ()])
def test_footprint_of_non_tensors_is_zero(obj):
    assert footprint(obj) == (0, 0)


def test_footprint_ignores_strings_next_to_tensors():
    t = torch.zeros(3, dtype=torch.float32)
    assert footprint({"name": "x" * 10_000, "t": t, "tags": ["a", "b"]}) == (12, 1)


_dtypes = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.int8, torch.int64, torch.bool,
                           torch.complex64, np.float32, np.int16, np.uint8])


def _make(dtype, n):
    if isinstance(dtype, torch.dtype):
        return torch.zeros(n, dtype=dtype)
    return np.zeros(n, dtype=dtype)


def _nest(draw, leaves):
    """Scatter ``leaves`` (possibly repeated) through a random nest of containers."""
    items = list(leaves)
    while len(items) > 1 and draw(st.booleans()):
        k = draw(st.integers(1, len(items)))
        chunk, items = items[:k], items[k:]
        kind = draw(st.sampled_from(["list", "tuple", "dict"]))
        if kind == "list":
            items.append(chunk)
        elif kind == "tuple":
            items.append(tuple(chunk))
        else:
            items.append({f"k{i}": v for i, v in enumerate(chunk)})
    return {"root": items, "label": "ignored"}


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_footprint_property_distinct_leaves_summed_once(data):
    specs = data.draw(st.lists(st.tuples(_dtypes, st.integers(1, 50)), min_size=0, max_size=8))
    leaves = [_make(d, n) for d, n in specs]
    repeats = data.draw(st.lists(st.integers(0, max(0, len(leaves) - 1)), max_size=6)) if leaves else []
    order = leaves + [leaves[i] for i in repeats]
    order = data.draw(st.permutations(order))
    obj = _nest(data.draw, order)
    expected_bytes = sum(x.untyped_storage().nbytes() if isinstance(x, torch.Tensor) else x.nbytes for x in leaves)
    assert footprint(obj) == (expected_bytes, len(leaves))


# -- shm ------------------------------------------------------------------------------------------

needs_dev_shm = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm on this machine")


def test_shm_probe_missing_path_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ShmProbe(str(tmp_path / "not-there"))


def test_shm_probe_file_instead_of_directory_raises_value_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError):
        ShmProbe(str(f))


@pytest.mark.parametrize("bad", [None, 5, 3.0, ["/dev/shm"], b"/dev/shm"])
def test_shm_probe_non_path_raises_type_error(bad):
    with pytest.raises(TypeError):
        ShmProbe(bad)


def test_shm_probe_accepts_pathlike(tmp_path):
    probe = ShmProbe(pathlib.Path(tmp_path))
    assert probe.path == str(tmp_path)
    state = probe.read()
    assert 0 <= state.free <= state.total


@needs_dev_shm
def test_shm_probe_reads_dev_shm():
    probe = ShmProbe()
    assert probe.path == "/dev/shm"
    state = probe.read()
    assert isinstance(state, ShmState)
    assert state.total > 0
    assert 0 <= state.free <= state.total
    assert state.total == shutil.disk_usage("/dev/shm").total


# -- fds, RAM, RSS ----------------------------------------------------------------------------------

def test_read_fds_is_ordered_and_matches_rlimit():
    fds = read_fds()
    assert isinstance(fds, FdState)
    assert 0 < fds.in_use <= fds.soft_limit <= fds.hard_limit
    assert (fds.soft_limit, fds.hard_limit) == resource.getrlimit(resource.RLIMIT_NOFILE)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_read_fds_counts_newly_opened_fds(tmp_path):
    deltas = []
    for attempt in range(3):  # another thread of the test process may open or close an fd meanwhile
        before = read_fds().in_use
        files = [open(tmp_path / f"f{attempt}_{i}", "w") for i in range(5)]
        try:
            opened = read_fds().in_use
        finally:
            for f in files:
                f.close()
        deltas.append((opened - before, read_fds().in_use - opened))
        if deltas[-1] == (5, -5):
            break
    assert deltas[-1] == (5, -5), deltas


def test_host_ram_available_is_positive():
    assert host_ram_available() > 0


def test_rss_of_self_is_positive():
    pid = os.getpid()
    out = rss_of([pid])
    assert set(out) == {pid}
    assert isinstance(out[pid], int) and out[pid] > 0


def test_rss_of_a_dead_pid_is_none():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid is gone
    out = rss_of([proc.pid, os.getpid()])
    assert out[proc.pid] is None
    assert out[os.getpid()] > 0


def test_rss_of_empty_list():
    assert rss_of([]) == {}


def test_footprint_of_sparse_tensors_counts_indices_and_values():
    coo = torch.sparse_coo_tensor(torch.tensor([[0, 1, 2], [1, 0, 2]]), torch.ones(3), (3, 3))  # uncoalesced
    assert footprint(coo) == (2 * 3 * 8 + 3 * 4, 2)
    csr = torch.eye(3).to_sparse_csr()
    assert footprint(csr, own_bytes=True) == (4 * 8 + 3 * 8 + 3 * 4, 3)


def test_footprint_of_nested_tensors_counts_their_values():
    strided = torch.nested.nested_tensor([torch.zeros(2, 3), torch.ones(4, 3)])
    assert footprint(strided, own_bytes=True)[0] == 6 * 3 * 4
    if not hasattr(torch, "jagged"):
        pytest.skip(f"torch {torch.__version__} has no jagged layout (it came in 2.2); the strided case passed")
    jagged = torch.nested.nested_tensor([torch.zeros(2, 3), torch.ones(4, 3)], layout=torch.jagged)
    assert footprint(jagged) == (6 * 3 * 4 + 3 * 8, 2)


def test_footprint_own_bytes_of_an_expanded_tensor_is_its_storage():
    assert footprint(torch.zeros(4).expand(1000, 4), own_bytes=True) == (16, 1)
    t = torch.arange(100.0)
    assert footprint([t[:10], t[5:20], t[50:60]], own_bytes=True) == ((20 + 10) * 4, 1)  # overlaps once
