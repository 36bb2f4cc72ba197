"""Never a wrong batch: every batch on an arena carries a stamp at both ends, written after its
bytes, and the main process checks it before it hands out a view.

The first test is the failure seen under a real memory limit (issue 22): a worker that continued an
arena through a copy of it mapped before an earlier worker grew the ring wrote its batches where the
main process did not read them, and the user got zeros for masks. The others corrupt a slot on
purpose and see it refused: in the ring alone, and through a real loader whose samples must then
all arrive once, with their content.
"""

import os
import pickle
from multiprocessing.reduction import ForkingPickler

import pytest
import torch
from torch.utils.data import Dataset

import adaptive_loader.arena as arena_module
from adaptive_loader import AdaptiveLoader
from adaptive_loader.arena import STAMP, Arena, CorruptBatch, RingWriter, open_view, registry
from adaptive_loader.kinds import Cause, Event

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm on this machine")


def write_batch(writer, nbytes, value):
    writer.begin(nbytes)
    writer.alloc(nbytes).fill_(value)
    return writer.commit()


def test_a_writer_continuing_an_arena_grown_after_its_copy_was_mapped_writes_where_the_reader_reads():
    arena = Arena.create(4 * 4096)
    stale = pickle.loads(ForkingPickler.dumps(arena))  # what a forked worker inherits: the ring mapped at 16 KiB
    first = RingWriter(arena, worker=0)
    try:
        view = open_view(arena, arena.id, "t-stale", 0, *write_batch(first, 6000, 1))
        assert arena.grow(16 * 4096)  # the earlier worker grew the ring; the copy above does not know
        del view
        second = RingWriter(stale, worker=0)  # the next worker continues the arena through the old copy
        for value in (2, 3, 4, 5):
            batch = open_view(None, arena.id, "t-stale", 0, *write_batch(second, 20000, value))
            assert bool((batch[STAMP:STAMP + 20000] == value).all())  # before the fix: zeros, or a refusal
            del batch
    finally:
        registry.forget("t-stale")


@pytest.mark.parametrize("where", ["opening stamp", "closing stamp", "sampled bytes"])
def test_a_slot_changed_after_its_commit_is_refused(where):
    arena = Arena.create(1 << 16)
    writer = RingWriter(arena, worker=3)
    place = write_batch(writer, 20000, 7)
    end, lo, hi = place[:3]
    spot = {"opening stamp": lo + 16, "closing stamp": hi - 8, "sampled bytes": lo + STAMP + 4096}[where]
    arena.ring[spot] ^= 0xFF  # as an accounting slip would: another batch's byte where this one was
    try:
        with pytest.raises(CorruptBatch, match=f"batch 1 of worker 3 .*its {where}"):
            open_view(arena, arena.id, "t-refused", 3, *place)
        arena.ring[spot] ^= 0xFF
        assert bool((open_view(None, arena.id, "t-refused", 3, *place)[STAMP:STAMP + 20000] == 7).all())
    finally:
        registry.forget("t-refused")


def test_a_batch_read_through_the_ring_as_it_was_before_it_grew_is_refused():
    arena = Arena.create(4 * 4096)
    assert arena.grow(8 * 4096)
    writer = RingWriter(arena)
    write_batch(writer, 10000, 1)
    place = list(write_batch(writer, 10000, 2))  # bytes 10,112 to 20,240: past where the 16 KiB ring ended
    place[3] = 4 * 4096  # read through the 16 KiB ring, whose mirror puts the first batch's bytes there
    try:
        with pytest.raises(CorruptBatch, match="its closing stamp"):
            open_view(arena, arena.id, "t-size", 0, *place)
    finally:
        registry.forget("t-size")


class Filled(Dataset):
    """Sample ``i``: 64 KiB of ``i % 251`` and its index."""

    def __len__(self):
        return 40

    def __getitem__(self, i):
        return torch.full((1 << 16,), i % 251, dtype=torch.uint8), i


def test_a_loader_refuses_a_corrupted_batch_and_delivers_every_sample_once_with_its_content(tmp_path, monkeypatch):
    token = tmp_path / "corrupt-once"
    commit = RingWriter.commit

    def commit_then_corrupt_once(self):  # runs in the forked workers
        place = commit(self)
        if place[4][2] == 2:  # this writer's second batch, in whichever worker claims the token first
            try:
                os.close(os.open(token, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return place
            self.arena.ring[place[1] + STAMP:place[1] + STAMP + 8] = 0xEE
        return place

    monkeypatch.setattr(arena_module.RingWriter, "commit", commit_then_corrupt_once)
    records = []
    loader = AdaptiveLoader(Filled(), max_batch_size=4, num_workers=2, shuffle=True, telemetry=records.append,
                            multiprocessing_context="fork")
    try:
        seen = []
        for data, indices in loader:
            for row, i in zip(data, indices.tolist()):
                assert bool((row == i % 251).all()), f"sample {i} arrived with another sample's bytes"
                seen.append(i)
        assert sorted(seen) == list(range(40))  # every sample once, the refused batch's too
    finally:
        loader.close()
    assert token.exists()
    recoveries = [r for r in records if r.get("event") == Event.RECOVERY]
    assert [r["data"]["cause"] for r in recoveries] == [Cause.CORRUPT_BATCH]
    assert "not match what the worker wrote" in recoveries[0]["message"]
    epoch_end = [r for r in records if r.get("event") == Event.EPOCH_END][0]
    assert epoch_end["data"]["refused_batches"] == 1

