"""Worker-side collate, measuring and transport of adaptive_loader.transport."""

import errno
import os
import pickle
import resource

import numpy as np
import pytest
import torch
import torch.multiprocessing

from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate, get_worker_info
from torch.utils.data._utils import worker as torch_worker

from adaptive_loader.pipeline import measured_collate
from adaptive_loader.measure import footprint
from adaptive_loader.region import memfd_available
from adaptive_loader.transport import (
    pack_batch, unpack_batch,
    FILE, INLINE, SHM, WORKER_OOM_SCORE_ADJ, BatchStats, Envelope, MeasuredCollate, WorkerSetup,
    _collate_without_shm, _is_resource_error, forking_workers)

needs_dev_shm = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm on this machine")


def make_stats(**over):
    values = dict(sample_bytes=[8, 8], batch_bytes=16, batch_storages=1, handles=0, transport=FILE,
                  off_shm_reason="test", worker_id=0, worker_pid=os.getpid())
    values.update(over)
    return BatchStats(**values)


def spilled(batch, tmp_path):
    """An envelope of ``batch`` written through the spill road by a collate in a (fake) worker."""
    collate = measured_collate(lambda xs: xs[0], "/dev/shm", str(tmp_path), shm_keep_free=1 << 62, arena_kind="shm")
    saved = torch_worker._worker_info
    torch_worker._worker_info = FakeWorkerInfo()
    try:
        env = collate([batch])
    finally:
        torch_worker._worker_info = saved
    assert env.stats.transport == FILE
    return env, collate


def spill_files(collate):
    return sorted(os.listdir(collate.spill.path))


def assert_same(a, b):
    """Equal structure, types, dtypes and values (NaN-free data)."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def rich_sample(i):
    g = torch.Generator().manual_seed(i)
    return {
        "bf16": torch.randn(3, 4, generator=g).to(torch.bfloat16),
        "mask": torch.rand(5, generator=g) > 0.5,
        "int8": torch.randint(-128, 127, (6,), dtype=torch.int8, generator=g),
        "complex": torch.randn(2, dtype=torch.complex64, generator=g),
        "nested": {"list": [torch.full((2,), float(i)), torch.arange(i + 1, i + 4)], "name": f"s{i}"},
        "array": np.arange(i, i + 5, dtype=np.float32).reshape(5, 1),
        "label": i,
    }


class RichDataset(Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        return rich_sample(i)


class FloatDataset(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"x": torch.arange(10, dtype=torch.float32) + i, "y": torch.tensor([i], dtype=torch.int64),
                "name": f"item{i}"}


# -- Envelope ---------------------------------------------------------------------------------------

def test_envelope_inline_is_the_batch():
    batch = [torch.ones(2)]
    env = Envelope(batch, make_stats(transport=INLINE, off_shm_reason=None))
    assert env.open() is batch


def test_envelope_shm_opens_handles_once():
    batch = {"x": torch.arange(4.0), "names": ["a", "b"]}
    handles = pack_batch(batch)[0]
    env = Envelope(handles, make_stats(transport=SHM, off_shm_reason=None))
    first = env.open()
    assert_same(first, batch)
    assert env.open() is first  # a second open does not unpickle again


@needs_dev_shm
def test_envelope_file_opens_and_removes_the_spill_file(tmp_path):
    batch = {"x": torch.arange(4), "names": ["a", "b"]}
    env, collate = spilled(batch, tmp_path)
    [name] = spill_files(collate)
    first = env.open()
    assert_same(first, batch)
    assert spill_files(collate) == []
    assert env.open() is first


@needs_dev_shm
def test_envelope_survives_pickling(tmp_path):
    env, _ = spilled([torch.arange(3)], tmp_path)
    again = pickle.loads(pickle.dumps(env))
    assert again.stats == env.stats
    assert_same(again.open(), [torch.arange(3)])


@needs_dev_shm
def test_envelope_pin_memory_round_trip_without_tensors(tmp_path):
    batch = {"names": ["a", "b"], "n": 3}
    env, collate = spilled(batch, tmp_path)
    pinned = env.pin_memory()
    assert isinstance(pinned, Envelope)
    assert pinned.stats is env.stats
    assert pinned.open() == batch
    assert pinned.open() is pinned.open()
    assert spill_files(collate) == []


def test_envelope_pin_memory_round_trip_with_tensors():
    batch = {"x": torch.arange(6, dtype=torch.float32), "y": [torch.ones(2, dtype=torch.bfloat16)]}
    env = Envelope(pack_batch(batch)[0], make_stats(transport=SHM))
    try:
        pinned = env.pin_memory()
    except RuntimeError as exc:  # CPU-only torch builds have nothing to pin for
        pytest.skip(f"pin_memory unavailable on this torch build: {exc}")
    assert pinned.stats is env.stats
    out = pinned.open()
    assert out["x"].is_pinned() and out["y"][0].is_pinned()
    assert_same({"x": out["x"].cpu(), "y": [out["y"][0].cpu()]}, batch)


# -- MeasuredCollate outside a worker ---------------------------------------------------------------

def test_measured_collate_outside_a_worker_is_inline(tmp_path):
    samples = [FloatDataset()[i] for i in range(3)]
    collate = measured_collate(default_collate, "/nonexistent/shm/path", str(tmp_path))  # no shm inline
    env = collate(samples)
    assert isinstance(env, Envelope)
    s = env.stats
    assert s.transport == INLINE
    assert s.off_shm_reason is None
    assert s.worker_id == -1
    assert s.worker_pid == os.getpid()
    assert s.sample_bytes == [10 * 4 + 8] * 3
    assert (s.batch_bytes, s.batch_storages) == (3 * 10 * 4 + 3 * 8, 2)
    assert_same(env.open(), default_collate(samples))
    assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(collate.spill.path)]
    assert spill_files(collate) == []  # the loader's private spill directory, empty
    del collate
    assert list(tmp_path.iterdir()) == []  # removed with the collate that made it


def test_measured_collate_per_sample_bytes_vary_with_samples(tmp_path):
    samples = [torch.zeros(n, dtype=torch.float64) for n in (1, 5, 0, 7)]
    env = measured_collate(lambda xs: xs, "/dev/shm", str(tmp_path))(samples)
    assert env.stats.sample_bytes == [8, 40, 0, 56]
    assert env.stats.batch_bytes == 8 * 13


def test_measured_collate_sample_bytes_of_rows_of_a_dataset_tensor(tmp_path):
    data = torch.zeros(10_000, 10)  # 400 kB; one row is 40 B
    samples = [TensorDataset(data)[i] for i in range(4)]
    env = measured_collate(default_collate, "/dev/shm", str(tmp_path))(samples)
    assert env.stats.batch_bytes == 4 * 40
    assert sum(env.stats.sample_bytes) == env.stats.batch_bytes


# -- MeasuredCollate in a (simulated) worker ---------------------------------------------------------

class FakeWorkerInfo:
    id = 3
    num_workers = 4


@pytest.fixture
def fake_worker(monkeypatch):
    monkeypatch.setattr(torch_worker, "_worker_info", FakeWorkerInfo())
    assert get_worker_info() is not None


@needs_dev_shm
def test_measured_collate_in_a_worker_puts_the_batch_in_shm(fake_worker, tmp_path):
    samples = [FloatDataset()[i] for i in range(4)]
    collate = measured_collate(lambda xs: [s["x"].clone() for s in xs], "/dev/shm", str(tmp_path))
    env = collate(samples)
    assert env.stats.transport == SHM
    assert env.stats.block_kind == ("memfd" if memfd_available() else "shm")
    assert env.stats.off_shm_reason is None
    assert env.stats.worker_id == 3
    assert env.stats.handles == 1
    assert (env.stats.batch_bytes, env.stats.batch_storages) == (4 * 40, 4)
    out = env.open()
    assert_same(out, [s["x"] for s in samples])
    assert len({t.untyped_storage().data_ptr() for t in out}) == 4  # four storages again, as sent
    assert spill_files(collate) == []  # nothing spilled


@needs_dev_shm
def test_measured_collate_spills_to_a_file_when_it_would_not_fit(fake_worker, tmp_path):
    samples = [FloatDataset()[i] for i in range(4)]
    calls = []

    def collate(xs):
        calls.append(get_worker_info())
        return default_collate(xs)

    measured = measured_collate(collate, "/dev/shm", str(tmp_path), shm_keep_free=1 << 62, arena_kind="shm")
    env = measured(samples)
    assert env.stats.transport == FILE
    assert "shm has" in env.stats.off_shm_reason
    assert calls == [None]  # collated once, with the worker hidden, so not into shm
    [name] = spill_files(measured)
    assert os.stat(os.path.join(measured.spill.path, name)).st_mode & 0o777 == 0o600
    out = env.open()
    assert spill_files(measured) == []
    assert not out["x"].is_shared()
    assert_same(out, default_collate(samples))


@needs_dev_shm
@pytest.mark.parametrize("exc", [RuntimeError("unable to open shared memory object </torch_1_2> in read-write mode"),
                                 OSError(errno.ENOSPC, "No space left on device")])
def test_measured_collate_falls_back_to_a_file_on_a_resource_error(fake_worker, tmp_path, exc):
    samples = [FloatDataset()[i] for i in range(2)]
    calls = []

    def collate(xs):
        calls.append(get_worker_info())
        if len(calls) == 1:
            raise exc
        return default_collate(xs)

    env = measured_collate(collate, "/dev/shm", str(tmp_path))(samples)
    assert env.stats.transport == FILE
    assert str(exc) in env.stats.off_shm_reason
    assert calls[0] is not None and calls[1] is None
    assert_same(env.open(), default_collate(samples))


@needs_dev_shm
def test_measured_collate_counts_shm_bytes_in_its_worker_slot(fake_worker, tmp_path):
    allocated = torch.zeros(FakeWorkerInfo.num_workers, dtype=torch.int64)
    samples = [FloatDataset()[i] for i in range(4)]
    env1 = measured_collate(default_collate, "/dev/shm", str(tmp_path), allocated=allocated)(samples)
    env2 = measured_collate(default_collate, "/dev/shm", str(tmp_path), allocated=allocated)(samples[:2])
    assert (env1.stats.transport, env2.stats.transport) == (SHM, SHM)
    expected = [0] * FakeWorkerInfo.num_workers
    expected[FakeWorkerInfo.id] = env1.stats.batch_bytes + env2.stats.batch_bytes
    assert allocated.tolist() == expected
    # a batch spilled to a file occupies none of it
    spilling = measured_collate(default_collate, "/dev/shm", str(tmp_path), shm_keep_free=1 << 62, arena_kind="shm",
                               allocated=allocated)
    assert spilling(samples).stats.transport == FILE
    assert allocated.tolist() == expected


@needs_dev_shm
def test_measured_collate_reraises_other_errors(fake_worker, tmp_path):
    def collate(xs):
        raise RuntimeError("stack expects each tensor to be equal size")

    with pytest.raises(RuntimeError, match="equal size"):
        measured_collate(collate, "/dev/shm", str(tmp_path))([torch.zeros(1), torch.zeros(2)])


@needs_dev_shm
def test_remove_spill_files_removes_only_its_own(fake_worker, tmp_path):
    mine = measured_collate(default_collate, "/dev/shm", str(tmp_path), shm_keep_free=1 << 62, arena_kind="shm")
    other = measured_collate(default_collate, "/dev/shm", str(tmp_path), shm_keep_free=1 << 62, arena_kind="shm")
    samples = [FloatDataset()[i] for i in range(2)]
    mine(samples), mine(samples)
    theirs = other(samples)
    (tmp_path / "unrelated.pkl").write_bytes(b"x")
    assert (len(spill_files(mine)), len(spill_files(other))) == (2, 1)
    assert mine.remove_spill_files() == 2
    assert spill_files(mine) == [] and len(spill_files(other)) == 1
    assert (tmp_path / "unrelated.pkl").exists()
    assert_same(theirs.open(), default_collate(samples))


# -- helpers ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("exc", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.ENOMEM, "Cannot allocate memory"),
    OSError(errno.EMFILE, "Too many open files"),
    OSError(errno.ENFILE, "Too many open files in system"),
    RuntimeError("unable to open shared memory object </torch_123_456_0> in read-write mode: "
                 "Too many open files (24)"),
    RuntimeError("unable to write to file </torch_1_2_3>: No space left on device (28)"),
    RuntimeError("unable to mmap 1024 bytes from file </torch_1>: Cannot allocate memory (12)"),
    RuntimeError("DataLoader worker is out of shared memory"),
    RuntimeError("falloc failed: error 28"),
])
def test_is_resource_error_true(exc):
    assert _is_resource_error(exc)


@pytest.mark.parametrize("exc", [
    OSError(errno.ENOENT, "No such file or directory"),
    OSError(errno.EACCES, "Permission denied"),
    RuntimeError("stack expects each tensor to be equal size, but got [3] at entry 0 and [4] at entry 1"),
    RuntimeError("expected scalar type Float but found Double"),
    ValueError("bad value"),
])
def test_is_resource_error_false(exc):
    assert not _is_resource_error(exc)


def test_collate_without_shm_hides_and_restores_worker_info(monkeypatch):
    info = FakeWorkerInfo()
    monkeypatch.setattr(torch_worker, "_worker_info", info)
    with _collate_without_shm():
        assert get_worker_info() is None
    assert get_worker_info() is info


def test_collate_without_shm_restores_worker_info_after_an_error(monkeypatch):
    info = FakeWorkerInfo()
    monkeypatch.setattr(torch_worker, "_worker_info", info)
    with pytest.raises(KeyError):
        with _collate_without_shm():
            raise KeyError("boom")
    assert get_worker_info() is info


def test_collate_without_shm_makes_default_collate_allocate_ordinary_memory(monkeypatch):
    monkeypatch.setattr(torch_worker, "_worker_info", FakeWorkerInfo())
    samples = [torch.ones(3), torch.zeros(3)]
    assert default_collate(samples).is_shared()  # what a worker does by default
    with _collate_without_shm():
        assert not default_collate(samples).is_shared()


@pytest.fixture
def restore_sharing_strategy():
    saved = torch.multiprocessing.get_sharing_strategy()
    yield
    torch.multiprocessing.set_sharing_strategy(saved)


@pytest.mark.parametrize("strategy", sorted(torch.multiprocessing.get_all_sharing_strategies()))
def test_worker_setup_sets_sharing_strategy_and_calls_user_fn(restore_sharing_strategy, strategy):
    calls = []
    WorkerSetup(calls.append, strategy, None)(5)
    assert torch.multiprocessing.get_sharing_strategy() == strategy
    assert calls == [5]


def test_worker_setup_without_user_fn(restore_sharing_strategy):
    WorkerSetup(None, "file_system", None)(0)
    assert torch.multiprocessing.get_sharing_strategy() == "file_system"


def test_worker_setup_sets_strategy_before_calling_user_fn(restore_sharing_strategy):
    seen = []
    WorkerSetup(lambda wid: seen.append(torch.multiprocessing.get_sharing_strategy()), "file_system", None)(1)
    assert seen == ["file_system"]


def test_worker_setup_raises_the_fd_soft_limit_within_the_hard_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 64:
        pytest.skip("fd soft limit too low to lower it safely")
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft - 1, hard))
    try:
        WorkerSetup(None, torch.multiprocessing.get_sharing_strategy(), soft)(0)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (soft, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_worker_setup_leaves_the_fd_limit_when_the_target_is_out_of_reach():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no finite hard limit")
    WorkerSetup(None, torch.multiprocessing.get_sharing_strategy(), hard + 1)(0)  # above hard: no error
    WorkerSetup(None, torch.multiprocessing.get_sharing_strategy(), max(1, soft - 1))(0)  # never lowers
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (soft, hard)


# -- through a real DataLoader ----------------------------------------------------------------------
# Each envelope is opened as it arrives, while its worker still lives: shm handles may be fds the
# worker passes on request.

@needs_dev_shm
@pytest.mark.timeout(120)
def test_dataloader_worker_sends_batches_through_shm(tmp_path):
    ds = FloatDataset()
    loader = DataLoader(ds, batch_size=4, num_workers=1, timeout=60,
                        collate_fn=measured_collate(default_collate, "/dev/shm", str(tmp_path)))
    seen = 0
    for k, env in enumerate(loader):
        seen += 1
        assert isinstance(env, Envelope)
        s = env.stats
        assert s.transport == SHM and s.handles == 1
        assert s.off_shm_reason is None
        assert s.worker_id == 0
        assert s.worker_pid != os.getpid()
        assert s.sample_bytes == [10 * 4 + 8] * 4
        assert (s.batch_bytes, s.batch_storages) == (4 * (10 * 4 + 8), 2)
        batch = env.open()
        assert_same(batch, default_collate([ds[i] for i in range(4 * k, 4 * k + 4)]))
    assert seen == 2
    assert spill_files(loader.collate_fn) == []


@needs_dev_shm
@pytest.mark.timeout(120)
def test_dataloader_worker_spills_batches_to_files_when_shm_is_kept_free(tmp_path):
    ds = RichDataset()
    collate = measured_collate(default_collate, "/dev/shm", str(tmp_path), shm_keep_free=1 << 62, arena_kind="shm")
    loader = DataLoader(ds, batch_size=3, num_workers=1, collate_fn=collate, timeout=60)
    seen = 0
    for k, env in enumerate(loader):
        seen += 1
        samples = [ds[i] for i in range(3 * k, 3 * k + 3)]
        s = env.stats
        assert s.transport == FILE
        assert "shm has" in s.off_shm_reason
        assert s.worker_id == 0
        assert s.worker_pid != os.getpid()
        assert s.sample_bytes == [footprint(x)[0] for x in samples]
        assert os.path.dirname(env.payload[0]) == collate.spill.path
        assert os.path.dirname(collate.spill.path) == str(tmp_path)
        batch = env.open()
        assert_same(batch, default_collate(samples))
        assert batch["bf16"].dtype == torch.bfloat16
        assert batch["mask"].dtype == torch.bool
        assert batch["int8"].dtype == torch.int8
        assert batch["complex"].dtype == torch.complex64
        assert isinstance(batch["array"], torch.Tensor) and batch["array"].dtype == torch.float32
        assert not any(t.is_shared() for t in (batch["bf16"], batch["mask"], batch["nested"]["list"][0]))
        assert (s.batch_bytes, s.batch_storages) == footprint(batch)
    assert seen == 2
    assert spill_files(collate) == []  # every spill file removed once opened


def _as_list(samples):
    return list(samples)


@needs_dev_shm
@pytest.mark.timeout(120)
def test_dataloader_spill_keeps_numpy_arrays_and_odd_dtypes_identical(tmp_path):
    ds = RichDataset()
    loader = DataLoader(ds, batch_size=2, num_workers=1, timeout=60,
                        collate_fn=measured_collate(_as_list, "/dev/shm", str(tmp_path), shm_keep_free=1 << 62,
                                                   arena_kind="shm"))
    seen = 0
    for k, env in enumerate(loader):
        seen += 1
        assert env.stats.transport == FILE
        assert_same(env.open(), [ds[2 * k], ds[2 * k + 1]])
    assert seen == 3


def _tuple_collate(samples):
    return tuple(zip(*samples))


class _Detections(torch.utils.data.Dataset):
    def __len__(self):
        return 12

    def __getitem__(self, i):
        return torch.full((3, 4), float(i)), {"masks": torch.full((i + 1, 2, 2), i, dtype=torch.uint8)}, i


@needs_dev_shm
def test_a_batch_of_many_tensors_travels_in_one_shm_block(tmp_path):
    """The seed's tuple collate leaves 2 tensors per sample: one fd per batch, not one per tensor."""
    collate = measured_collate(_tuple_collate, "/dev/shm", str(tmp_path))
    loader = torch.utils.data.DataLoader(_Detections(), batch_size=4, num_workers=1, collate_fn=collate)
    for envelope in loader:
        assert envelope.stats.transport == SHM and envelope.stats.handles == 1
        images, targets, ids = envelope.open()
        storages = {t.untyped_storage().data_ptr() for t in images + tuple(x["masks"] for x in targets)}
        assert len(storages) == 2 * len(ids)  # each tensor its own storage again, all in one block
        for image, target, i in zip(images, targets, ids):
            assert torch.equal(image, torch.full((3, 4), float(i)))
            assert torch.equal(target["masks"], torch.full((i + 1, 2, 2), i, dtype=torch.uint8))


def test_pack_batch_keeps_special_tensors_as_they_are():
    leaf = torch.ones(3, requires_grad=True)
    shared = torch.arange(4).share_memory_()
    view = torch.arange(10.0)[2:5]
    conj = torch.tensor([1 + 2j]).conj()
    batch = unpack_batch(pack_batch([leaf, shared, view, conj, view])[0])
    assert batch[0].requires_grad and torch.equal(batch[0], leaf)
    assert torch.equal(batch[1], shared)
    assert torch.equal(batch[2], view) and batch[2].shape == (3,)
    assert torch.equal(batch[3], torch.tensor([1 - 2j]))
    assert batch[2].data_ptr() == batch[4].data_ptr()  # the same tensor twice stays one region


# -- no torch shm of ours, and the rules --------------------------------------------------------------

@needs_dev_shm
def test_default_collate_in_a_worker_leaves_no_torch_file_in_dev_shm(fake_worker, tmp_path, restore_sharing_strategy):
    """Under file_system every torch shm allocation is a named /dev/shm file (a failed one stays): the block
    road stacks in ordinary memory and copies into one unnamed region instead."""
    torch.multiprocessing.set_sharing_strategy("file_system")
    before = {n for n in os.listdir("/dev/shm") if n.startswith("torch_")}
    collate = measured_collate(default_collate, "/dev/shm", str(tmp_path), arena_kind="shm")
    envelope = collate([FloatDataset()[i] for i in range(4)])
    assert envelope.stats.transport == SHM and envelope.stats.block_kind == "shm"
    assert {n for n in os.listdir("/dev/shm") if n.startswith("torch_")} <= before
    assert not any(n.startswith("adaptive_loader") for n in os.listdir("/dev/shm"))  # unlinked at once
    assert_same(envelope.open(), default_collate([FloatDataset()[i] for i in range(4)]))


def test_worker_rules_are_plain_numbers():
    from adaptive_loader.routing import WorkerRules

    rules = WorkerRules(keep_free=100, batches_in_flight=2, workers=2)
    assert rules.off_shm(901, 1000) is not None and rules.off_shm(900, 1000) is None
    assert rules.off_shm(10 ** 12, 0, kind="memfd") is None  # a memfd is not bounded by /dev/shm
    assert rules.keep_arena(119, 100) and not rules.keep_arena(120, 100)
    assert rules.arena_tight(299, 100) and not rules.arena_tight(300, 100)  # 2 in flight + this worker's held one
    alone = WorkerRules(batches_in_flight=2, workers=1)
    assert alone.arena_tight(399, 100) and not alone.arena_tight(400, 100)  # one worker holds both held batches
    assert rules.fds_to_spare(10, 1024, 60) and not rules.fds_to_spare(10, 1024, 63)
    bounded = WorkerRules(keep_free=100, memory_room=1000)  # memfd arenas: the memory room, less what they hold
    assert bounded.arena_room(0, "memfd", reserved=300) == 700 and bounded.arena_room(0, "memfd", 2000) == 0
    assert bounded.arena_room(5000, "shm", reserved=300) == 4900  # /dev/shm's free space already lacks them
    with pytest.raises(ValueError):
        WorkerRules(memory_room=-1)
    with pytest.raises(ValueError):
        WorkerRules(workers=0)
    with pytest.raises(TypeError):
        WorkerRules(keep_free=1.5)


def test_transport_takes_its_rules_from_the_caller(tmp_path):
    """The worker calls the rules it is given; it does not import the decide layer."""
    import ast

    import adaptive_loader.transport as transport

    class Never:
        keep_free = 0

        def off_shm(self, needed, free, kind="shm"):
            return "told so"

        def fds_to_spare(self, *args):
            return True

        def read_fds_now(self, n):
            return True

    imported = {n.module for n in ast.walk(ast.parse(open(transport.__file__).read()))
                if isinstance(n, ast.ImportFrom) and n.col_offset == 0}
    assert not {"controller", "routing"} & imported
    collate = transport.MeasuredCollate(_as_list, "/dev/shm", str(tmp_path), rules=Never())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch_worker, "_worker_info", FakeWorkerInfo())
        envelope = collate([torch.ones(2)])
    assert envelope.stats.transport == FILE and envelope.stats.off_shm_reason == "told so"
    assert_same(envelope.open(), [torch.ones(2)])


def _adj_of_a_fork() -> int:
    """The ``oom_score_adj`` a child forked now starts with (before any code of its own runs)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, open("/proc/self/oom_score_adj").read().strip().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as answer:
        return int(answer.read())


@pytest.mark.skipif(not os.path.exists("/proc/self/oom_score_adj"), reason="no /proc/self/oom_score_adj here")
def test_a_worker_is_first_for_the_oom_killer_from_its_fork_and_a_users_own_fork_is_not():
    with forking_workers():
        assert _adj_of_a_fork() == WORKER_OOM_SCORE_ADJ
    assert _adj_of_a_fork() == int(open("/proc/self/oom_score_adj").read())  # the parent's, unchanged
