"""The arena: the ring itself, the main process's views and their release, and the arena
through real DataLoader workers (fork and spawn, either sharing strategy); memfd and /dev/shm
regions, reserved for real, in real small /dev/shm namespaces."""

import errno
import gc
import json
import mmap
import os
import pickle
import resource
import shutil
import stat
import subprocess
import sys
import textwrap
from multiprocessing.reduction import ForkingPickler

import pytest
import torch
import torch.multiprocessing
from torch.utils.data import DataLoader, Dataset, default_collate

from adaptive_loader.pipeline import measured_collate
from adaptive_loader import AdaptiveLoader
from adaptive_loader.arena import (ALIGN, STAMP, Arena, ArenaFull, ArenaUnavailable, RingWriter, default_kind,
                                   first_ring_bytes, open_view, registry)
from adaptive_loader.controller import ARENA_MARGIN, ARENA_MIN_BYTES, Controller, Observation, arena_capacity
from adaptive_loader.kinds import ARENA_ROADS, Road
from adaptive_loader import region
from adaptive_loader.region import MEMFD, SHM, memfd_available
from adaptive_loader.transport import MeasuredCollate

from stress.sandbox import sandbox_available, sandbox_command
from test_transport import RichDataset, assert_same, rich_sample

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm on this machine")


def fill(writer, nbytes, value):
    piece = writer.alloc(nbytes)
    piece.fill_(value)
    return piece


# -- the ring, worker side -------------------------------------------------------------------------

KINDS = [pytest.param(MEMFD, marks=pytest.mark.skipif(not memfd_available(), reason="no memfd_create here")), SHM]


@pytest.mark.parametrize("kind", KINDS)
def test_create_reserves_an_unlinked_private_region(kind):
    arena = Arena.create(1 << 20, kind=kind)
    info = os.fstat(arena.region.fileno())
    assert arena.kind == kind
    assert stat.S_IMODE(info.st_mode) == 0o600  # nobody else may open it...
    assert info.st_nlink == 0  # ...and it has no name left to open it by
    assert info.st_size == arena.nbytes
    assert arena.capacity == arena.nbytes - mmap.PAGESIZE == 1 << 20  # a header page, then the ring
    assert info.st_blocks * 512 >= arena.nbytes  # posix_fallocate: the pages exist now


def test_the_default_kind_is_memfd_where_there_is_one():
    assert default_kind() == (MEMFD if memfd_available() else SHM)
    assert Arena.create(4096).kind == default_kind()


def test_bad_arguments_are_refused_at_create():
    with pytest.raises(ValueError, match="kind must be 'memfd' or 'shm', got 'tmpfs'"):
        Arena.create(4096, kind="tmpfs")
    with pytest.raises(ValueError, match="capacity must be > 0 bytes, got 0"):
        Arena.create(0)
    with pytest.raises(TypeError, match="capacity must be an int, not float"):
        Arena.create(4096.0)


def test_a_shortage_is_an_oserror_with_its_errno(tmp_path):
    with pytest.raises(ArenaUnavailable) as caught:
        Arena.create(4096, kind=SHM, shm_path=str(tmp_path / "missing"))
    assert isinstance(caught.value, OSError) and isinstance(caught.value, RuntimeError)
    assert caught.value.errno == errno.ENOENT and "could not reserve a shm arena" in str(caught.value)


def in_a_forked_child(work):
    """``work()``'s list of ints, run in a forked child: a new process, whose page tables hold
    none of the shared memory's pages (fork copies no shm PTEs)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write_end, " ".join(map(str, work())).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    values = [int(v) for v in os.read(read_end, 256).split()]
    os.close(read_end)
    os.waitpid(pid, 0)
    return values


def minor_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def faults_writing_the_ring_in_a_child(arena, map_first):
    """Minor page faults a forked child takes to fill the ring (after ``map_pages``, or not)."""
    def work():
        if map_first:
            arena.map_pages()
        before = minor_faults()
        arena.ring[:arena.capacity] = 7  # the ring once (its mirror faults in where batches wrap)
        return [minor_faults() - before]
    return in_a_forked_child(work)[0]


def test_map_pages_spares_a_new_process_the_write_faults():
    arena = Arena.create(16 << 20)
    arena.ring[:arena.capacity] = 1  # the pages exist, as after earlier batches
    pages = arena.capacity // mmap.PAGESIZE
    assert faults_writing_the_ring_in_a_child(arena, map_first=False) > pages // 2  # fork copies no shm PTEs
    assert faults_writing_the_ring_in_a_child(arena, map_first=True) < pages // 20


def resident_bytes_at(address):
    """The resident bytes of this process's mapping that starts at ``address`` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split()[0]
            if "-" in first and not first.endswith(":"):
                inside = int(first.split("-")[0], 16) == address
            elif inside and first == "Rss:":
                return int(line.split()[1]) * 1024
    raise LookupError(f"no mapping at {address:#x}")


def test_a_writer_maps_the_pages_its_batches_reach_and_no_more():
    """The first batch does not wait for the whole ring: a new writer maps a batch's pages at
    once when the batch begins (no fault per page), and only those."""
    arena = Arena.create(64 << 20)

    def work():
        writer = RingWriter(arena)
        writer.begin(16 << 20)
        before = minor_faults()
        writer.alloc(16 << 20).numpy()[:] = 3
        return [minor_faults() - before, resident_bytes_at(arena.ring.ctypes.data)]

    faults, resident = in_a_forked_child(work)
    assert faults < (16 << 20) // mmap.PAGESIZE // 20, f"{faults} faults writing 16 MiB"
    assert resident < 20 << 20, f"{resident} B of a 64 MiB ring mapped for a 16 MiB batch"


def test_a_grown_ring_maps_the_pages_written_before_for_reading_and_only_the_new_ones_for_writing(monkeypatch):
    """After the ring grows, its new mapping holds the same pages below the old end: they are mapped with
    the cheaper read populate, not zeroed again, and only the pages past them count as new."""
    arena = Arena.create(first_ring_bytes(3 << 20))
    writer = RingWriter(arena)
    writer.begin(3 << 20)
    fill(writer, 3 << 20, 1)
    end = writer.commit()[0]
    arena.header[0] = end  # released
    assert arena.grow(16 << 20)
    calls = []
    monkeypatch.setattr(Arena, "map_pages", lambda self, lo=0, hi=None, new=False: calls.append((lo, hi, new)))
    writer.begin(8 << 20)
    at = arena.offset_of(end)
    old_end = first_ring_bytes(3 << 20)
    assert calls[0] == (0, old_end, False)  # written by the first batch: read populate
    assert calls[1][0] == old_end and calls[1][2] is True and calls[1][1] >= at + (8 << 20)
    assert len(calls) == 2


@pytest.mark.parametrize("populate_works", [True, False], ids=["madvise", "older kernel"])
def test_map_pages_maps_the_range_asked_for(monkeypatch, populate_works):
    """One madvise call, or (before Linux 5.14) a byte read per page: either way the range is mapped."""
    monkeypatch.setattr(region, "_populate_works", populate_works)
    arena = Arena.create(32 << 20)

    def work():
        arena.map_pages(0, 8 << 20, new=True)
        return [resident_bytes_at(arena.ring.ctypes.data)]

    resident, = in_a_forked_child(work)
    assert 8 << 20 <= resident < 12 << 20


def test_batches_take_consecutive_ranges_and_report_them():
    writer = RingWriter(Arena.create(4096))
    writer.begin(100)
    fill(writer, 100, 1)
    fill(writer, 10, 2)
    first = 3 * ALIGN + 2 * STAMP  # the pieces, aligned, between the batch's two stamps
    assert writer.commit()[:4] == (first, 0, first, 4096)  # end position, bytes [lo, hi) of a 4 KiB ring
    writer.begin(64)
    fill(writer, 64, 3)
    assert writer.commit()[:4] == (first + ALIGN + 2 * STAMP, first, first + ALIGN + 2 * STAMP, 4096)


def test_rollback_leaves_nothing_taken():
    writer = RingWriter(Arena.create(4096))
    writer.begin(1000)
    fill(writer, 1000, 1)
    writer.rollback()
    assert writer.room() == writer.arena.capacity
    writer.begin(10)
    fill(writer, 10, 1)
    assert writer.commit()[1] == 0  # the rolled-back bytes were handed out again


def test_a_batch_that_runs_past_the_end_stays_one_range_through_the_mirror():
    arena = Arena.create(4096)
    writer = RingWriter(arena)
    writer.begin(3000)
    fill(writer, 3000, 1)
    end = writer.commit()[0]
    assert end == 3008 + 2 * STAMP
    arena.header[0] = end  # released
    writer.begin(2000)  # 960 bytes left before the end: the batch runs on into the mirror
    fill(writer, 2000, 2)
    place = writer.commit()
    assert place[:4] == (end + 2048 + 2 * STAMP, end, end + 2048 + 2 * STAMP, 4096)  # no byte skipped at the end
    view = open_view(None if arena.id in registry._mapped else arena, arena.id, "test-owner", 0, *place)
    assert view.numel() == 2048 + 2 * STAMP and bool((view[STAMP:STAMP + 2000] == 2).all())
    past_end = end + STAMP + 2000 - 4096
    assert bool((arena.ring[:past_end] == 2).all())  # the part past the end lies at the ring's start


def test_an_arena_grows_in_place_and_the_batches_on_it_stay_where_they_are():
    arena = Arena.create(4 * 4096)
    writer = RingWriter(arena)
    old = batch_on(writer, "t-grow", 10000, 1)  # opened at 16 KiB: the view reads the ring it was written in
    size_before = os.fstat(arena.region.fileno()).st_size
    try:
        assert arena.grow(8 * 4096) is True
        assert arena.capacity == 8 * 4096 and arena.nbytes == 9 * 4096
        assert os.fstat(arena.region.fileno()).st_size == size_before + 4 * 4096  # the same fd, reserved further
        assert bool((old[:10000] == 1).all())
        new = batch_on(writer, "t-grow", 20000, 2)  # did not fit before: 16 KiB - 10,176 B were free
        assert bool((new[:20000] == 2).all()) and bool((old[:10000] == 1).all())
        after = 10048 + 3 * STAMP  # right after the first batch and its stamps, past the second's opening one
        assert bool((arena.ring[after:after + 20000] == 2).all())
        del old, new
        gc.collect()
        assert writer.room() == arena.capacity
    finally:
        registry.forget("t-grow")


def test_the_main_process_counts_what_an_arena_grew_by_once_a_batch_written_in_it_arrives():
    arena = Arena.create(4 * 4096)
    writer = RingWriter(arena)
    writer.begin(1000)
    fill(writer, 1000, 1)
    first = writer.commit()
    assert arena.grow(8 * 4096)
    writer.begin(1000)
    fill(writer, 1000, 2)
    second = writer.commit()
    try:
        shipped = pickle.loads(ForkingPickler.dumps(arena))  # as the main process gets it: the header says 32 KiB
        view = open_view(shipped, arena.id, "t-count", 0, *first)
        assert registry.mapped_bytes("t-count") == 5 * 4096  # the first batch tells of the 16 KiB ring only
        view2 = open_view(None, arena.id, "t-count", 0, *second)
        assert registry.mapped_bytes("t-count") == 9 * 4096
        assert bool((view[STAMP:STAMP + 1000] == 1).all()) and bool((view2[STAMP:STAMP + 1000] == 2).all())
    finally:
        registry.forget("t-count")


def test_an_arena_does_not_grow_while_its_batches_run_past_its_end():
    arena = Arena.create(4096)
    writer = RingWriter(arena)
    writer.begin(3000)
    fill(writer, 3000, 1)
    arena.header[0] = writer.commit()[0]  # released
    writer.begin(2000)
    fill(writer, 2000, 2)
    end = writer.commit()[0]  # bytes 3,136 to 5,312: past the end
    assert end == 3008 + 2048 + 4 * STAMP
    assert arena.grow(8192) is False and arena.capacity == 4096  # nothing changed
    arena.header[0] = end  # released: the ring is empty
    assert arena.grow(8192) is True and arena.capacity == 8192
    writer.begin(7000)
    fill(writer, 7000, 3)
    head = end - 4096  # it goes on where the head was
    assert writer.commit()[1:4] == (head, head + 7040 + 2 * STAMP, 8192)
    with pytest.raises(ValueError, match="grows"):
        arena.grow(4096)


def test_full_while_earlier_batches_are_held_never_waits():
    writer = RingWriter(Arena.create(4096))
    writer.begin(3000)
    fill(writer, 3000, 1)
    writer.commit()  # never released
    with pytest.raises(ArenaFull, match="free"):
        writer.begin(2000)
    writer.begin(500)  # what does fit still goes in
    with pytest.raises(ArenaFull):
        writer.alloc(2000)


def test_a_batch_larger_than_the_ring_is_refused():
    writer = RingWriter(Arena.create(4096))
    with pytest.raises(ArenaFull):
        writer.begin(8192)


# -- views and release, main side -----------------------------------------------------------------

def batch_on(writer, owner, nbytes, value):
    writer.begin(nbytes)
    fill(writer, nbytes, value)
    return open_view(writer.arena, writer.arena.id, owner, 0, *writer.commit())[STAMP:-STAMP]  # the batch's own bytes


def test_views_see_what_the_writer_wrote_and_release_when_dropped():
    writer = RingWriter(Arena.create(1 << 16))
    try:
        view = batch_on(writer, "t-release", 1000, 7)
        assert view.shape == (1024,) and bool((view[:1000] == 7).all())  # the range is whole ALIGN blocks
        assert writer.room() < writer.arena.capacity
        del view
        gc.collect()
        assert writer.room() == writer.arena.capacity  # dropped: the ring is free again
        assert writer.arena.header[2] == 1  # the main side says it has mapped the arena
    finally:
        registry.forget("t-release")


def test_release_is_in_ring_order_whatever_order_batches_are_dropped():
    writer = RingWriter(Arena.create(1 << 16))
    try:
        first = batch_on(writer, "t-order", 1024, 1)
        second = batch_on(writer, "t-order", 1024, 2)
        taken = writer.room()
        second_view = second[10:20].view(torch.int16)  # a derived view keeps the batch alive too
        del second
        gc.collect()
        assert writer.room() == taken  # the first still holds the ring's tail
        del first
        gc.collect()
        assert writer.room() == writer.arena.capacity - 1024 - 2 * STAMP  # the second is alive through its view
        del second_view
        gc.collect()
        assert writer.room() == writer.arena.capacity
    finally:
        registry.forget("t-order")


def test_an_unknown_arena_is_a_clear_error():
    with pytest.raises(RuntimeError, match="never reached this process"):
        open_view(None, "no-such-arena", "t-unknown", 0, 64, 0, 64, 4096, (0, 1, 1, 0))


def test_unsent_batches_of_a_dead_writer_are_freed_and_a_live_writer_keeps_its_arena():
    writer = RingWriter(Arena.create(1 << 16))
    try:
        kept = batch_on(writer, "t-dead", 1024, 1)
        writer.begin(2048)
        fill(writer, 2048, 2)
        writer.commit()  # never sent
        registry.writers_stopped("t-dead")  # the writer (this process) is alive: the arena is dropped
        assert registry.arenas_of("t-dead") == {}
        assert bool((kept == 1).all())  # an open batch keeps its memory whatever happens

        writer2 = RingWriter(Arena.create(1 << 16))
        batch = batch_on(writer2, "t-dead2", 1024, 3)
        writer2.begin(2048)
        fill(writer2, 2048, 4)
        writer2.commit()
        writer2.arena.header[3] = 2**22 + 7  # a pid that does not exist: the writer is gone
        registry.writers_stopped("t-dead2")
        del batch
        gc.collect()
        assert writer2.room() == writer2.arena.capacity  # the unsent batch was freed with it
        assert list(registry.arenas_of("t-dead2")) == [0]  # and the arena is kept for the next worker
    finally:
        registry.forget("t-dead")
        registry.forget("t-dead2")


# -- sizing ----------------------------------------------------------------------------------------

def test_capacity_holds_the_batches_in_flight_and_the_workers_share_of_the_two_held():
    assert arena_capacity(8 << 20, 2, room=10 << 30, workers=2) == 26 << 20  # (2 + 1) x 8 MiB x 1.1, whole MiB
    assert arena_capacity(8 << 20, 2, room=10 << 30, workers=1) == 35 << 20  # (2 + 2) x 8 MiB x 1.1: one arena
    assert arena_capacity(1 << 10, 2, room=10 << 30, workers=2) == ARENA_MIN_BYTES


def test_capacity_stays_within_a_share_of_the_room():
    assert arena_capacity(8 << 20, 2, room=48 << 20, workers=2) == 24 << 20  # wanted 26 MiB, share 24
    assert arena_capacity(8 << 20, 2, room=24 << 20, workers=2) == 0  # 12 MiB cannot hold two batches
    assert arena_capacity(8 << 20, 2, room=-5, workers=2) == 0


def test_the_controller_bounds_a_batch_from_its_cost_model():
    controller = Controller(user_max_cost=100, max_batch_size=4, min_cost=1, num_workers=2, prefetch_factor=2)
    assert controller.batch_bytes_bound() == 0  # nothing measured yet
    controller.model.observe([10, 20, 30, 40] * 8, [1000, 2000, 3000, 4000] * 8)  # 100 B per cost unit
    assert controller.batch_bytes_bound() == pytest.approx(100 * 100, rel=1e-6)
    controller.max_sample_cost = 10  # four samples of cost 10 at most
    assert controller.batch_bytes_bound() == pytest.approx(100 * 40, rel=1e-6)
    unbounded = Controller(user_max_cost=float("inf"), max_batch_size=None, min_cost=1, num_workers=2,
                           prefetch_factor=2)
    unbounded.model.observe([10, 20], [1000, 2000])
    assert unbounded.batch_bytes_bound() == 0


def test_with_arenas_each_worker_needs_room_for_its_batches_in_flight_and_its_held_one():
    controller = Controller(user_max_cost=float("inf"), max_batch_size=None, min_cost=1, num_workers=2,
                            prefetch_factor=2)
    common = dict(shm_free=64 << 20, ours_in_shm=0, held_batches=1, fds_in_use=10, fd_soft_limit=1024,
                  fd_hard_limit=4096, fds_per_batch=0)
    blocks = controller.decide(Observation(**common))
    rings = controller.decide(Observation(**common, arenas=True))
    assert blocks.per_batch_bytes == pytest.approx(0.8 * (64 << 20) / (2 * 2 + 1))
    assert rings.per_batch_bytes == pytest.approx(0.8 * (64 << 20) / (2 * (2 + 1) * ARENA_MARGIN))
    tight = controller.decide(Observation(**common, arenas=True, arena_capacity=8 << 20))
    assert tight.per_batch_bytes == pytest.approx((8 << 20) / ((2 + 1) * ARENA_MARGIN))  # they must fit the arena it has


# -- through real workers ---------------------------------------------------------------------------

class Floats(Dataset):
    def __init__(self, n=48, numel=1 << 16):
        self.n, self.numel = n, numel

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((self.numel,), float(i))


def list_collate(batch):
    return list(batch)


def transposed_collate(batch):
    return {"t": torch.stack(batch).t(), "first": batch[0][:3].clone(), "empty": torch.empty(0, 5)}


def values_of(batch):
    return sorted(int(v) for v in batch[:, 0].tolist())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("collate", [None, list_collate, transposed_collate], ids=["default", "list", "odd"])
def test_every_batch_goes_through_the_arena_intact(collate):
    reference = collate or default_collate
    loader = AdaptiveLoader(Floats(), max_batch_size=4, num_workers=2, collate_fn=collate)
    transports, new_arenas = [], 0
    original = loader._after_batch

    def spy(indices, stats, batch, wait_s, epoch):
        nonlocal new_arenas
        transports.append(stats.transport)
        new_arenas += stats.arena_new_bytes > 0
        assert_same(batch, reference([Floats()[i] for i in indices]))
        return original(indices, stats, batch, wait_s, epoch)

    loader._after_batch = spy
    with loader:
        assert sum(1 for _ in loader) == 12
    assert len(transports) == 12 and set(transports) <= set(ARENA_ROADS)
    # one arena per worker, reused by all their batches: it grows at its first batch to that batch's size
    # and at the second to the whole ring (see arena.first_ring_bytes)
    assert new_arenas == 4


@pytest.mark.timeout(120)
def test_rich_samples_round_trip_through_the_arena(tmp_path):
    collate = measured_collate(default_collate, "/dev/shm", str(tmp_path), arena_owner="t-rich", workers=1)
    try:
        loader = DataLoader(RichDataset(), batch_size=3, num_workers=1, collate_fn=collate, timeout=60)
        for k, envelope in enumerate(loader):
            assert envelope.stats.transport in ARENA_ROADS and envelope.stats.handles <= 1
            assert_same(envelope.open(), default_collate([rich_sample(i) for i in range(3 * k, 3 * k + 3)]))
    finally:
        registry.forget("t-rich")


@pytest.mark.timeout(120)
def test_a_ring_the_user_holds_is_replaced_by_a_new_arena():
    """A user who keeps every batch: the rings cannot be reused, so each worker takes a new arena
    (as DataLoader gives each batch memory of its own) rather than a slower road. The arenas
    replaced count for the loader while batches on them are held, and go with those batches."""
    loader = AdaptiveLoader(Floats(n=64, numel=1 << 20), max_batch_size=4, num_workers=2)  # 16 MiB batches
    kept, roads = [], []
    original = loader._after_batch

    def spy(indices, stats, batch, wait_s, epoch):
        roads.append(stats.transport)
        return original(indices, stats, batch, wait_s, epoch)

    loader._after_batch = spy
    with loader:
        for batch in loader:
            kept.append(batch)
        assert sorted(v for b in kept for v in values_of(b)) == list(range(64))
        assert roads and all(road in ARENA_ROADS for road in roads), roads
        held = loader._pipeline.arena_bytes()
        assert held >= 64 * (4 << 20), f"{held} B of arenas counted while 256 MiB of batches are held"
        del kept[:], batch
        gc.collect()
        assert loader._pipeline.arena_bytes() < held / 2


@pytest.mark.timeout(180)
def test_fresh_loaders_while_the_previous_ones_batches_are_held_keep_the_arena_roads():
    """Three fresh loaders in a row, each while the previous one's first and last batches are still
    referenced (a ``for`` variable keeps the last): every batch takes an arena, and a loader counts
    no arena of a loader that is gone."""
    held = []
    for _ in range(3):
        loader = AdaptiveLoader(Floats(n=64, numel=1 << 20), max_batch_size=4, num_workers=2)
        roads, original = [], loader._after_batch

        def spy(indices, stats, batch, wait_s, epoch, original=original, roads=roads):
            roads.append(stats.transport)
            return original(indices, stats, batch, wait_s, epoch)

        loader._after_batch = spy
        assert loader._pipeline.arena_bytes() == 0  # the last loader's arenas, held or not, are not ours
        seen = []
        for index, batch in enumerate(loader):
            seen += values_of(batch)
            if index == 0:
                held.append(batch)  # kept through this epoch and the next loaders'
        held.append(batch)
        assert sorted(seen) == list(range(64))
        assert roads and all(road in ARENA_ROADS for road in roads), roads
        del loader, batch
        gc.collect()
    assert all(len(b) == 4 for b in held)


@pytest.mark.timeout(120)
def test_the_next_epochs_workers_continue_the_same_arenas():
    loader = AdaptiveLoader(Floats(), max_batch_size=4, num_workers=2, shuffle=True)
    new_arena_bytes = []
    original = loader._after_batch

    def spy(indices, stats, batch, wait_s, epoch):
        new_arena_bytes.append(stats.arena_new_bytes)
        return original(indices, stats, batch, wait_s, epoch)

    loader._after_batch = spy
    with loader:
        for _ in range(3):
            seen = [v for batch in loader for v in values_of(batch)]
            assert sorted(seen) == list(range(48))
    assert sum(b > 0 for b in new_arena_bytes[:12]) == 4  # per worker: grown to its first batch, then to the ring
    assert sum(b > 0 for b in new_arena_bytes[12:]) == 0


class Growing(Dataset):
    """Samples of 1 MiB, then of 4 MiB, filled with their index: each worker's first batch is small,
    its later ones do not fit the arena sized for it."""

    def __init__(self, n=32):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((1 << 18 if i < self.n // 4 else 1 << 20,), float(i))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_arenas_grow_in_place_when_the_batches_outgrow_them_and_the_next_workers_continue_them(context):
    loader = AdaptiveLoader(Growing(), max_batch_size=4, num_workers=2, collate_fn=list_collate,
                            multiprocessing_context=context)
    arenas, new_bytes, roads = {}, {(e, w): [] for e in (0, 1) for w in (0, 1)}, []
    original = loader._after_batch

    def spy(indices, stats, batch, wait_s, epoch):
        assert [int(t[0]) for t in batch] == list(indices) and all(bool((t == t[0]).all()) for t in batch)
        roads.append(stats.transport)
        if stats.arena_new_bytes:
            new_bytes[epoch, stats.worker_id].append(stats.arena_new_bytes)
        for worker, arena in loader._pipeline.current_arenas().items():
            arenas.setdefault(worker, []).append((arena.id, arena.capacity))
        return original(indices, stats, batch, wait_s, epoch)

    loader._after_batch = spy
    with loader:
        for _ in range(2):
            assert sum(len(batch) for batch in loader) == 32
        mapped = loader._pipeline.arena_bytes()  # what the main process counts: the rings it mapped, once
    assert mapped == sum(seen[-1][1] + mmap.PAGESIZE for seen in arenas.values())
    assert len(roads) == 16 and set(roads) <= set(ARENA_ROADS)
    for worker, seen in arenas.items():
        assert len({arena_id for arena_id, _ in seen}) == 1  # one arena all along, both epochs: never replaced
        capacities = [capacity for _, capacity in seen]
        assert capacities == sorted(capacities)
        first, *grown = new_bytes[0, worker]  # the batches that brought the main process news of the arena
        # made here with a ring of one page, grown to the first batch (4 MiB), then for the batches in flight
        assert first == first_ring_bytes(4 << 20) - first_ring_bytes() and grown
        assert first_ring_bytes() + sum(new_bytes[0, worker]) == capacities[-1]  # the loader counted what it grew by
        assert capacities[-1] >= ARENA_MIN_BYTES
        assert new_bytes[1, worker] == []  # the second epoch's workers write into the grown ring as it is


def test_a_bigger_batch_waits_to_grow_the_arena_until_its_batches_stop_wrapping(monkeypatch, tmp_path):
    """While the batches open in the main process run past the ring's end the arena cannot grow:
    the batch takes the ring if it fits, the budget is not capped, and the arena grows at a later batch."""
    from torch.utils.data._utils import worker as torch_worker

    class Worker:
        id, num_workers = 0, 1

    monkeypatch.setattr(torch_worker, "_worker_info", Worker())
    collate = measured_collate(default_collate, "/dev/shm", str(tmp_path), arena_owner="t-wrap", workers=1)
    mib = 1 << 20

    def batch_of(nbytes, value):
        envelope = collate([torch.full((nbytes // 4,), float(value))])
        assert envelope.stats.transport in ARENA_ROADS
        return envelope.open(), envelope.stats

    try:
        open_batches = []
        for k in range(6):  # 3 MiB each in a 16 MiB ring, the last two kept: bytes 12 to 18 MiB, past its end
            open_batches = open_batches[-1:] + [batch_of(3 * mib, k)[0]]
            gc.collect()
        arena = collate._writer.arena
        assert arena.capacity == ARENA_MIN_BYTES
        big, stats = batch_of(5 * mib, 6)  # wants (2 + 2) x 5 MiB x 1.1 = 22 MiB
        assert arena.capacity == ARENA_MIN_BYTES and stats.arena_capacity == 0  # not grown, not capped
        open_batches.append(big)
        del open_batches[:2]  # what is open now lies at 2 to 7 MiB: no longer past the end
        gc.collect()
        later, stats = batch_of(5 * mib, 7)
        assert arena.capacity == 22 * mib and stats.arena_new_bytes == 6 * mib  # grown by 6 MiB, in place
        assert collate._writer.arena is arena
        assert bool((open_batches[0] == 6).all()) and bool((later == 7).all())
        del open_batches, later, big
        gc.collect()
        assert collate._writer.room() == arena.capacity
    finally:
        registry.forget("t-wrap")


def shm_used():
    st = os.statvfs("/dev/shm")
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def arenas_mapped():
    """Bytes this process maps of our regions, memfd (``/memfd:adaptive_loader``) or /dev/shm file."""
    total = 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "adaptive_loader" in line:
                lo, hi = line.split()[0].split("-")
                total += int(hi, 16) - int(lo, 16)
    return total


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", KINDS)
def test_close_gives_the_arenas_back_once_the_last_batch_is_dropped(kind):
    gc.collect()
    before, shm_before = arenas_mapped(), shm_used()
    loader = AdaptiveLoader(Floats(n=16, numel=1 << 20), max_batch_size=4, num_workers=2, arena=kind)
    last = None
    for last in loader:
        pass
    loader.close()
    assert arenas_mapped() - before >= 2 * ARENA_MIN_BYTES  # the last batch keeps its arena mapped
    if kind == SHM:
        assert shm_used() - shm_before >= 2 * ARENA_MIN_BYTES
    assert values_of(last) == sorted(values_of(last)) and len(values_of(last)) == 4
    del last
    gc.collect()
    assert arenas_mapped() - before < ARENA_MIN_BYTES
    if kind == SHM:
        assert shm_used() - shm_before < ARENA_MIN_BYTES


@pytest.mark.timeout(180)
@pytest.mark.parametrize("context, strategy", [("spawn", "file_descriptor"), ("fork", "file_system")])
def test_spawned_workers_and_the_file_system_strategy(context, strategy):
    previous = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy(strategy)
    try:
        transports = []
        loader = AdaptiveLoader(Floats(n=16), max_batch_size=4, num_workers=2, multiprocessing_context=context,
                                telemetry=lambda r: transports.append(r.get("transport")))
        with loader:
            assert sorted(v for batch in loader for v in values_of(batch)) == list(range(16))
        roads = [t for t in transports if t]
        assert len(roads) == 4 and set(roads) <= set(ARENA_ROADS)
    finally:
        torch.multiprocessing.set_sharing_strategy(previous)


def test_arena_must_be_a_bool_or_a_kind():
    with pytest.raises(ValueError, match="arena must be True, False, 'memfd' or 'shm', got 'yes'"):
        AdaptiveLoader(Floats(), num_workers=2, arena="yes")


@pytest.mark.timeout(120)
def test_arena_off_sends_a_new_block_per_batch():
    transports = []
    with AdaptiveLoader(Floats(n=16), max_batch_size=4, num_workers=2, arena=False,
                        telemetry=lambda r: transports.append(r.get("transport"))) as loader:
        assert sorted(v for batch in loader for v in values_of(batch)) == list(range(16))
    assert [t for t in transports if t] == [Road.SHM] * 4


def test_a_pinned_copy_releases_the_ring_at_once(monkeypatch, tmp_path):
    """The pin-memory thread opens the batch, copies it and drops the views: the ring is free again
    before the user sees the batch. (No accelerator here: the copy stands in for pinning.)"""
    from torch.utils.data._utils import worker as torch_worker

    from adaptive_loader import transport

    class Worker:
        id, num_workers = 0, 1

    monkeypatch.setattr(torch_worker, "_worker_info", Worker())
    monkeypatch.setattr(transport, "_pin_memory", lambda batch, device: {k: v.clone() for k, v in batch.items()})
    collate = measured_collate(default_collate, "/dev/shm", str(tmp_path), arena_owner="t-pin", workers=1)
    try:
        samples = [{"x": torch.full((1000,), float(i))} for i in range(4)]
        envelope = collate(samples)
        assert envelope.stats.transport in ARENA_ROADS
        writer = collate._writer
        assert writer.room() < writer.arena.capacity
        pinned = envelope.pin_memory().open()
        gc.collect()
        assert writer.room() == writer.arena.capacity
        assert_same(pinned, default_collate(samples))
    finally:
        registry.forget("t-pin")


def test_a_collate_that_runs_out_of_shm_in_the_arena_path_goes_off_shm(monkeypatch, tmp_path):
    """A custom collate that allocates shm itself (as default_collate does inside a worker) and finds
    it full: the ring is rolled back and the batch is collated again without shm into a spill file."""
    from torch.utils.data import get_worker_info
    from torch.utils.data._utils import worker as torch_worker

    class Worker:
        id, num_workers = 0, 1

    def shm_hungry_collate(samples):
        if get_worker_info() is not None:
            raise RuntimeError("unable to allocate shared memory(shm) for file </torch_1>: "
                               "No space left on device (28)")
        return list(samples)

    monkeypatch.setattr(torch_worker, "_worker_info", Worker())
    collate = measured_collate(shm_hungry_collate, "/dev/shm", str(tmp_path), arena_owner="t-enospc", workers=1)
    try:
        envelope = collate([torch.ones(10), torch.zeros(10)])
        assert envelope.stats.transport == "file" and "collate ran out of shm" in envelope.stats.arena_miss
        assert collate._writer.room() == collate._writer.arena.capacity  # nothing left taken in the ring
        assert_same(envelope.open(), [torch.ones(10), torch.zeros(10)])
    finally:
        registry.forget("t-enospc")


# -- real memory, not /dev/shm: memfd arenas in a small /dev/shm, shm arenas refused at once ----------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SANDBOX, WHY_NOT = sandbox_available()
needs_sandbox = pytest.mark.skipif(not SANDBOX, reason=f"no private /dev/shm can be made here: {WHY_NOT}")
needs_memfd = pytest.mark.skipif(not memfd_available(), reason="os.memfd_create is missing or refused here")

MEMFD_IN_SMALL_SHM = textwrap.dedent("""
    import json, os
    import numpy as np
    from torch.utils.data import DataLoader, Dataset
    from adaptive_loader.arena import Arena

    def used():
        st = os.statvfs("/dev/shm")
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    class Half(Dataset):  # the worker checks the main process's half, then fills its own
        def __init__(self, arena):
            self.arena = arena

        def __len__(self):
            return 1

        def __getitem__(self, i):
            ring = self.arena.ring[:self.arena.capacity]  # the ring once (it is mapped twice)
            half = ring.size // 2
            seen = int(ring[:half:4096].astype(np.int64).sum())
            ring[half:] = 2
            return {"seen": seen, "used_in_worker": used()}

    if __name__ == "__main__":  # spawned workers import this file again
        out = {"total": os.statvfs("/dev/shm").f_blocks * os.statvfs("/dev/shm").f_frsize}
        arena = Arena.create(256 << 20, kind="memfd")
        out["kind"] = arena.kind
        out["blocks"] = os.fstat(arena.region.fileno()).st_blocks * 512
        ring = arena.ring[:arena.capacity]
        half = ring.size // 2
        ring[:half] = 1
        for context in ("fork", "spawn"):
            ring[half:] = 0
            [batch] = DataLoader(Half(arena), batch_size=None, num_workers=1, multiprocessing_context=context,
                                 timeout=60)
            out[context] = {"seen": int(batch["seen"]), "used_in_worker": int(batch["used_in_worker"]),
                            "worker_half": int(ring[half::4096].astype(np.int64).sum())}
        out["pages"] = len(range(0, half, 4096))
        out["worker_pages"] = len(range(half, ring.size, 4096))
        out["used_in_main"] = used()
        out["left"] = os.listdir("/dev/shm")
        print(json.dumps(out))
""")

SHM_TOO_BIG = textwrap.dedent("""
    import errno, json, os
    from adaptive_loader.arena import Arena, ArenaUnavailable

    out = {"before": os.listdir("/dev/shm")}
    try:
        Arena.create(96 << 20, kind="shm")
        out["created"] = True
    except ArenaUnavailable as exc:
        out.update(created=False, errno=exc.errno, oserror=isinstance(exc, OSError), message=str(exc))
    small = Arena.create(8 << 20, kind="shm")  # what does fit is reserved for real
    out["small_blocks"] = os.fstat(small.region.fileno()).st_blocks * 512
    out["small_nbytes"] = small.nbytes
    out["listed_while_open"] = os.listdir("/dev/shm")
    del small
    out["left"] = os.listdir("/dev/shm")
    print(json.dumps(out))
""")


def run_in_small_shm(script, tmp_path, shm_bytes=64 << 20, timeout=150):
    """Run ``script`` (a file, so that spawned workers can import it) in a private ``shm_bytes`` /dev/shm."""
    path = tmp_path / "child.py"
    path.write_text(script)
    command = sandbox_command([sys.executable, str(path)], shm_bytes)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    assert done.returncode == 0, f"exit {done.returncode} (SIGBUS is -7 / 135): {done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_memfd
@needs_sandbox
@pytest.mark.timeout(240)
def test_a_memfd_arena_four_times_bigger_than_a_64_mib_dev_shm_works_and_leaves_it_empty(tmp_path):
    out = run_in_small_shm(MEMFD_IN_SMALL_SHM, tmp_path)
    assert out["total"] == 64 << 20 and out["kind"] == MEMFD
    assert out["blocks"] >= 256 << 20  # reserved for real, in RAM
    for context in ("fork", "spawn"):
        assert out[context]["seen"] == out["pages"]  # the worker reads what the main process wrote...
        assert out[context]["worker_half"] == 2 * out["worker_pages"]  # ...and the main process the worker's
        assert out[context]["used_in_worker"] <= 1 << 20  # a few KiB of queue semaphores at most
    ours_left = [name for name in out["left"] if not name.startswith("sem.")]  # sem.*: multiprocessing's
    assert out["used_in_main"] <= 1 << 20 and ours_left == []


@needs_sandbox
@pytest.mark.timeout(180)
def test_a_shm_arena_bigger_than_a_small_dev_shm_fails_at_create_not_with_sigbus(tmp_path):
    out = run_in_small_shm(SHM_TOO_BIG, tmp_path)
    assert out["created"] is False and out["oserror"] is True
    assert out["errno"] == errno.ENOSPC and "could not reserve a shm arena" in out["message"]
    assert out["small_blocks"] >= out["small_nbytes"]  # posix_fallocate, whatever the torch version
    assert out["before"] == out["listed_while_open"] == out["left"] == []  # never a name in /dev/shm


SHM_ARENA_GROWS_PAST_THE_MOUNT = textwrap.dedent("""
    import gc, json, os
    import torch
    from adaptive_loader.arena import Arena, ArenaUnavailable, RingWriter, open_view, registry

    def used():
        st = os.statvfs("/dev/shm")
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    arena = Arena.create(8 << 20, kind="shm")
    writer = RingWriter(arena)
    writer.begin(1 << 20)
    writer.alloc(1 << 20).fill_(5)
    view = open_view(arena, arena.id, "t-past", 0, *writer.commit())
    out = {"before": used(), "grown": arena.grow(12 << 20), "after_growing": used()}
    try:
        arena.grow(32 << 20)
    except ArenaUnavailable as exc:
        out.update(errno=exc.errno, message=str(exc))
    out.update(after_refusal=used(), capacity=arena.capacity, size=os.fstat(arena.region.fileno()).st_size,
               intact=bool((view[64:64 + (1 << 20)] == 5).all()))
    writer.begin(10 << 20)  # the ring it has still works
    writer.alloc(10 << 20).fill_(6)
    out["next"] = bool((open_view(None, arena.id, "t-past", 0, *writer.commit())[64:64 + (10 << 20)] == 6).all())
    print(json.dumps(out))
""")


@needs_sandbox
@pytest.mark.timeout(180)
def test_a_shm_arena_that_cannot_grow_in_a_small_dev_shm_says_so_and_keeps_its_ring(tmp_path):
    out = run_in_small_shm(SHM_ARENA_GROWS_PAST_THE_MOUNT, tmp_path, shm_bytes=24 << 20)
    assert out["grown"] is True and out["after_growing"] - out["before"] == 4 << 20
    assert out["errno"] == errno.ENOSPC and "could not grow a shm arena" in out["message"]
    assert out["after_refusal"] == out["after_growing"]  # what the refused call reserved is given back
    assert out["capacity"] == 12 << 20 and out["size"] == (12 << 20) + mmap.PAGESIZE
    assert out["intact"] and out["next"]


NOBODY_OPENS = "import sys\ntry:\n    open(sys.argv[1], 'r+b')\nexcept PermissionError:\n    sys.exit(13)\n"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to act as the user nobody")
def test_another_user_cannot_open_a_region_file_while_it_has_a_name(tmp_path):
    """The file exists under its name only between open and unlink; in that window it is 0600."""
    from adaptive_loader.region import _new_shm_file

    path = os.path.join("/dev/shm", f"adaptive_loader_test_{os.getpid()}")
    old_umask = os.umask(0)  # the mode is ours, not the umask's
    try:
        fd = _new_shm_file(path)
    finally:
        os.umask(old_umask)
    try:
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600
        os.chmod(path, 0o600)
        as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c",
                     NOBODY_OPENS, path]
        assert subprocess.run(as_nobody, timeout=60).returncode == 13  # refused
        os.chmod(path, 0o666)  # the control: the same user can open a file that lets it
        assert subprocess.run(as_nobody, timeout=60).returncode == 0
    finally:
        os.close(fd)
        os.unlink(path)


@pytest.mark.timeout(180)
def test_arenas_follow_the_budget_down():
    """After a step down (here a cap from another limit) the next workers' arenas are sized for the
    batches the budget allows, not for the larger ones measured before: they would hold the memory
    the budget gave up."""
    loader = AdaptiveLoader(Floats(n=64, numel=1 << 20), max_batch_size=4, num_workers=2)  # 16 MiB batches
    with loader:
        assert sorted(v for b in loader for v in values_of(b)) == list(range(64))
        before = loader._pipeline.arena_bytes()
        loader._cap_budget("test", 1.0)  # one 4 MiB sample per batch
        assert sorted(v for b in loader for v in values_of(b)) == list(range(64))
        after = loader._pipeline.arena_bytes()
    assert after < before / 2, (before, after)

