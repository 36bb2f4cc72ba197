"""A reusable shared-memory arena: one ring buffer per worker, reserved once.

Fresh shm for every batch (what DataLoader does) costs a file, an
``fallocate`` and page faults each time: ~3 GB/s here. Copying into shm that
is already mapped runs at ~25 GB/s. So each worker writes its batches into
one region it reserved once, and only a small handle crosses the pipe; the
main process builds the batch's tensors as views of the same region.

The region is a :class:`~adaptive_loader.region.SharedRegion`: a memfd where
the system has them (no ``/dev/shm`` mount bounds it; only RAM and the memory
cgroup do), else an unlinked 0600 file in ``/dev/shm``. Either is reserved
with ``posix_fallocate`` (a shortage fails at ``create``, never later with
SIGBUS), nobody else can open it, nothing is left behind if the job dies.
Its fd travels to the main process once, with the first batch.

Space is handed out as a ring. Positions only grow (``(position - base) %
capacity`` is the place), each batch takes one contiguous range, and the main process
frees ranges in the order they were taken: the ring's tail moves past a batch
once the user has dropped every tensor of it and of all earlier batches of
that worker (a ``weakref.finalize`` on the batch's buffer, whatever thread
drops it). The ring is mapped twice, back to back (``region.mirrored``), so
a batch that runs past the ring's end is still one contiguous range and no
space is skipped there. A batch that does not fit never waits: the worker
sends it another way. The header holds what both sides must see: the tail (written by
the main process), the head (written by the worker, so a worker started
later continues where the last one stopped), whether the main process has
mapped the region, the writing worker's pid, and the ring's base and capacity.

A ring grows in place (:meth:`Arena.grow`) when its batches outgrow it: the
region is reserved further and mapped again, the batches on it stay where they
are, and the main process maps the larger ring from the fd it already has.
Replacing the arena instead would hold the old one and the new one at once,
while the old one's batches are in use.
"""

from __future__ import annotations

import mmap
import os
import threading
import uuid
import weakref
from collections import deque
from typing import Deque, Dict, List, Optional, Tuple

import numpy as np
import psutil
import torch

from .region import MEMFD, SHM, SharedRegion, memfd_available, mirrored, populate

__all__ = ["Arena", "RingWriter", "ArenaFull", "ArenaUnavailable", "CorruptBatch", "open_view", "registry",
           "first_ring_bytes", "default_kind", "STAMP"]

ALIGN = 64  # bytes; every allocation starts on such a boundary
_HEADER = mmap.PAGESIZE  # bytes before the ring (whole pages: the ring is mapped on its own)
_FIELDS = 7  # int64 slots at the header's start:
_TAIL, _HEAD, _MAPPED, _WRITER, _BASE, _CAPACITY, _GENERATION = range(_FIELDS)
STAMP = ALIGN  # bytes of the stamp at each end of a batch on the ring
_MAGIC = 0x5354414D50414C31  # "STAMPAL1"
_SAMPLE_STRIDE = mmap.PAGESIZE // 8  # one 8-byte word per page goes into a stamp's sample sum


class ArenaFull(Exception):
    """The ring has no contiguous room for this allocation now."""


class CorruptBatch(RuntimeError):
    """A batch's bytes on the ring are not what its worker wrote: a failure of the loader's own.

    The batch is never handed out; its samples are dispatched again.
    """


class ArenaUnavailable(OSError, RuntimeError):
    """The memory for an arena could not be reserved (its errno says why: ENOSPC, ENOMEM...).

    An OSError; also a RuntimeError, which is what callers written for torch's
    shm allocator catch.
    """


def _aligned(nbytes: int, to: int = ALIGN) -> int:
    return -(-nbytes // to) * to


def default_kind() -> str:
    """``"memfd"`` where this system can make one, else ``"shm"``."""
    return MEMFD if memfd_available() else SHM


class Arena:
    """One worker's region of shared memory: a header page and a ring of ``capacity`` bytes
    (whole pages), mapped twice: ``ring`` is ``2 * capacity`` long, its second half the first again.

    Pickling it (to the main process, or to a worker started with spawn)
    passes its fd, whatever the sharing strategy.
    """

    def __init__(self, region: SharedRegion, arena_id: str) -> None:
        self.region = region
        self.id = arena_id
        self.kind = region.kind
        self.header = region.array[:_FIELDS * 8].view(np.int64)
        self.ring: Optional[np.ndarray] = None
        self._ring_capacity = 0
        self.ring_for(self.capacity)

    @classmethod
    def create(cls, capacity: int, kind: Optional[str] = None, shm_path: str = "/dev/shm") -> "Arena":
        """Reserve ``capacity`` bytes (plus the header) of ``kind`` (``"memfd"``, ``"shm"``; by default
        :func:`default_kind`); :class:`ArenaUnavailable` if the memory cannot be reserved."""
        _check_capacity(capacity)
        kind = default_kind() if kind is None else kind
        capacity = _aligned(capacity, mmap.PAGESIZE)
        try:
            region = SharedRegion.create(_HEADER + capacity, kind, shm_path)
        except OSError as exc:
            raise ArenaUnavailable(exc.errno, f"could not reserve a {kind} arena of {_HEADER + capacity} B: "
                                   f"{exc.strerror}") from exc
        region.array[_CAPACITY * 8:(_CAPACITY + 1) * 8].view(np.int64)[0] = capacity
        return cls(region, uuid.uuid4().hex)

    def __reduce__(self):
        return Arena, (self.region, self.id)

    @property
    def capacity(self) -> int:
        """The ring's bytes now (the writer grows it; every process reads it from the header)."""
        return int(self.header[_CAPACITY])

    @property
    def nbytes(self) -> int:
        """What the arena reserves: its header page and its ring."""
        return _HEADER + self.capacity

    def ring_for(self, capacity: int) -> np.ndarray:
        """The ring as mapped when it had ``capacity`` bytes (a batch is read through the ring it was
        written in); a larger one than mapped so far becomes ``ring``."""
        if capacity == self._ring_capacity:
            return self.ring
        try:
            ring = mirrored(self.region, _HEADER, capacity)
        except OSError as exc:
            raise ArenaUnavailable(exc.errno, f"could not map an arena's ring: {exc.strerror}") from exc
        if capacity > self._ring_capacity:
            self.ring, self._ring_capacity = ring, capacity
        return ring

    def grow(self, capacity: int) -> bool:
        """Make the ring ``capacity`` bytes (more than now) in place (writer side). The batches on it
        keep their bytes where they are, so this works only while they do not run past the ring's
        end: False (nothing changed) when they do, try again at a later batch. ArenaUnavailable
        when the memory cannot be reserved."""
        _check_capacity(capacity)
        old, capacity = self.capacity, _aligned(capacity, mmap.PAGESIZE)
        if capacity <= old:
            raise ValueError(f"an arena grows: {capacity} B is not more than its {old} B")
        tail, head = int(self.header[_TAIL]), int(self.header[_HEAD])  # a stale tail only errs on the safe side
        start = (tail - int(self.header[_BASE])) % old
        if start + head - tail > old:
            return False
        try:
            self.region.extend(_HEADER + capacity)
        except OSError as exc:
            raise ArenaUnavailable(exc.errno, f"could not grow a {self.kind} arena to {_HEADER + capacity} B: "
                                   f"{exc.strerror}") from exc
        self.ring_for(capacity)
        self.header[_BASE] = tail - start  # the batches on the ring keep their offsets under the new capacity
        self.header[_CAPACITY] = capacity
        return True

    def offset_of(self, position: int) -> int:
        """Where ring ``position`` lies in ``ring`` (in its first half)."""
        return (position - int(self.header[_BASE])) % self.capacity

    def map_pages(self, lo: int = 0, hi: Optional[int] = None, new: bool = False) -> None:
        """Map ring bytes ``[lo, hi)`` (default: both halves) into this process's page tables,
        writable, before it writes there; ``new``: pages no process has touched yet.

        Each process that uses shm maps every page with a fault of its own (fork does not copy
        the page-table entries of shared mappings). One ``madvise(MADV_POPULATE_*)`` call maps
        them all: WRITE for new pages (the kernel zeroes them as it goes), READ for the others
        (shm pages come writable, and READ takes half the time). Where the kernel lacks it
        (< 5.14), a byte per page is read: a read fault maps the 16 pages around it too. 105 MiB
        in a new process: new pages 57 ms by write faults, 31 ms in one call; pages written
        before 9 ms read a byte per page, 7 ms in one call.
        """
        part = self.ring[lo:2 * self.capacity if hi is None else hi]
        if not populate(part, write=new):
            int(part[::mmap.PAGESIZE].sum())

    def ring_tensor(self, offset: int, nbytes: int) -> torch.Tensor:
        """Bytes ``[offset, offset + nbytes)`` of the ring, as a uint8 tensor (worker side); ``offset``
        below ``capacity``, the end up to twice it (the mirror)."""
        return torch.from_numpy(self.ring[offset:offset + nbytes])


def first_ring_bytes(batch_bytes: int = 0) -> int:
    """A ring for one batch of ``batch_bytes`` and its stamps (one page for none): what a new arena starts
    with before batches are measured; it grows in place at a later batch."""
    return _aligned(max(1, batch_bytes + 2 * STAMP), mmap.PAGESIZE)


def _check_capacity(capacity: int) -> None:
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise TypeError(f"capacity must be an int, not {type(capacity).__name__}")
    if capacity <= 0:
        raise ValueError(f"capacity must be > 0 bytes, got {capacity}")


class RingWriter:
    """The worker's side: takes one contiguous range of the ring per batch.

    ``begin`` a batch, ``alloc`` its pieces, then ``commit`` (stamp it and publish the new head) or
    ``rollback``. Nothing is visible to the main process before ``commit``, so a worker killed
    half-way leaves no trace.

    Each batch carries a stamp at both of its ends, written after its bytes: the worker, the
    writer's generation (one more for each writer that takes the arena on), the batch's sequence
    number and place, and a sum of one word per page of its bytes. The main process checks both
    stamps against the handle before it hands out a view (:func:`open_view`).
    """

    def __init__(self, arena: Arena, worker: int = 0) -> None:
        self.arena = arena
        arena.ring_for(arena.capacity)  # a forked copy may have mapped the ring before an earlier writer grew it
        arena.header[_WRITER] = os.getpid()
        # ring bytes below this were written before (by an earlier writer, or by this one before the ring grew)
        self._touched_until = 0 if int(arena.header[_GENERATION]) == 0 else arena.capacity
        arena.header[_GENERATION] += 1
        self.worker, self.generation, self._sequence = worker, int(arena.header[_GENERATION]), 0
        self._lo = self._cursor = -1  # the open batch: its first position and the next free one
        self._at = 0  # where the open batch starts in the ring
        # the ring's pages are mapped here as batches first reach them: (capacity, first half up to, mirror up to)
        self._mapped_to = (arena.capacity, 0, arena.capacity)

    @property
    def announced(self) -> bool:
        """Whether the main process has mapped the arena (else batches must carry it)."""
        return bool(self.arena.header[_MAPPED])

    def room(self) -> int:
        """Free bytes of the ring, contiguous or not."""
        return self.arena.capacity - int(self.arena.header[_HEAD] - self.arena.header[_TAIL])

    def fits(self, expected: int) -> bool:
        """Whether a batch of ``expected`` bytes (its stamps besides) can begin now."""
        capacity, needed = self.arena.capacity, expected + 2 * STAMP
        return needed <= capacity and int(self.arena.header[_HEAD]) + needed - int(self.arena.header[_TAIL]) <= capacity

    def begin(self, expected: int) -> None:
        """Start a batch that should need ``expected`` contiguous bytes (its stamps besides); ArenaFull
        if they are not free."""
        if not self.fits(expected):
            raise ArenaFull(f"{expected + 2 * STAMP} B needed, {self.room()} B of {self.arena.capacity} B free")
        head = int(self.arena.header[_HEAD])
        self._lo, self._cursor = head, head + STAMP
        self._at = self.arena.offset_of(head)
        self._map_until(self._at + expected + 2 * STAMP)

    def _map_until(self, end: int) -> None:
        """Map the ring's pages up to ``end`` (into the mirror where a batch wraps) that this writer
        has not mapped yet: a batch's pages at once rather than by faults, and only those the
        batches reach, so the first batch does not wait for the whole ring."""
        capacity = self.arena.capacity
        mapped_capacity, first, mirror = self._mapped_to
        if mapped_capacity != capacity:  # grown: a new mapping of the same pages, with new ones past the old end
            self._touched_until = max(self._touched_until, first)
            first, mirror = 0, capacity
        end = min(_aligned(end, mmap.PAGESIZE), 2 * capacity)
        if min(end, capacity) > first:
            touched = min(max(first, self._touched_until), end, capacity)
            if touched > first:
                self.arena.map_pages(first, touched)
            if min(end, capacity) > touched:
                self.arena.map_pages(touched, min(end, capacity), new=True)
            first = min(end, capacity)
        if end > mirror:  # the first half's pages again: touched by now
            self.arena.map_pages(mirror, end)
            mirror = end
        self._mapped_to = (capacity, first, mirror)

    def alloc(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` of the open batch, right after its previous piece; ArenaFull if they do not fit."""
        end = self._cursor + _aligned(nbytes)
        if end - int(self.arena.header[_TAIL]) > self.arena.capacity:
            raise ArenaFull(f"{nbytes} B more do not fit after {self._cursor - self._lo} B of this batch")
        piece = self.arena.ring_tensor(self._at + self._cursor - self._lo, nbytes)
        self._cursor = end
        return piece

    def offset(self, tensor: torch.Tensor) -> Optional[int]:
        """Where ``tensor``'s data lies relative to the open batch's first byte, if in it."""
        base = self.arena.ring.ctypes.data + self._at
        offset = tensor.data_ptr() - base
        return offset if STAMP <= offset < self._cursor - self._lo else None

    def commit(self) -> Tuple[int, int, int, int, Tuple[int, int, int, int]]:
        """Stamp and publish the batch; its handle ``(end, lo, hi, capacity, stamp)``: where the ring
        is free again once it is released, the bytes ``[lo, hi)`` of the ring of ``capacity`` bytes
        that hold it, and what its stamps say (worker, generation, sequence, sample sum).
        ArenaFull if its closing stamp does not fit."""
        self.alloc(STAMP)
        lo, end = self._lo, self._cursor
        slot = self.arena.ring[self._at:self._at + (end - lo)]
        self._sequence += 1
        stamp = (self.worker, self.generation, self._sequence, _sample_sum(slot[STAMP:-STAMP]))
        words = _stamp_words(stamp, lo, end - lo)
        slot[:STAMP].view(np.uint64)[:] = words
        slot[-STAMP:].view(np.uint64)[:] = words
        self.arena.header[_HEAD] = end
        self._lo = self._cursor = -1
        return end, self._at, self._at + (end - lo), self.arena.capacity, stamp

    def rollback(self) -> None:
        self._lo = self._cursor = -1


def _sample_sum(payload: np.ndarray) -> int:
    """A sum over one 8-byte word per page of ``payload`` (a whole number of words), each weighted by
    its place: cheap (a cache line per page), and a page mapped wrongly or overwritten shows."""
    words = payload.view(np.uint64)[::_SAMPLE_STRIDE]
    return int((words * np.arange(1, len(words) + 1, dtype=np.uint64)).sum())


def _stamp_words(stamp: Tuple[int, int, int, int], position: int, nbytes: int) -> np.ndarray:
    """The stamp as written at both ends of a batch: its fields and a check over them."""
    words = np.array([_MAGIC, *stamp, position, nbytes, 0], dtype=np.uint64)
    weights = np.arange(1, len(words), dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    words[-1] = (words[:-1] * weights).sum()  # wraps modulo 2**64
    return words


def _verify(slot: np.ndarray, end: int, stamp: Tuple[int, int, int, int], arena_id: str) -> None:
    """CorruptBatch unless both stamps of the batch in ``slot`` and its sampled bytes are what the
    worker wrote (``stamp`` came through the pipe, beside the handle)."""
    expected = _stamp_words(stamp, end - len(slot), len(slot))
    wrong = [name for name, words in (("its opening stamp", slot[:STAMP]), ("its closing stamp", slot[-STAMP:]))
             if not np.array_equal(words.view(np.uint64), expected)]
    if not wrong and _sample_sum(slot[STAMP:-STAMP]) != stamp[3]:
        wrong.append("its sampled bytes")
    if wrong:
        worker, generation, sequence, _ = stamp
        raise CorruptBatch(f"batch {sequence} of worker {worker} (writer generation {generation}) on arena "
                           f"{arena_id[:8]}: {' and '.join(wrong)} {'do' if len(wrong) > 1 else 'does'} not match what the worker wrote; the batch "
                           f"is refused and its samples are dispatched again")


class _Mapped:
    """The main process's side of one arena: open batches in ring order, and the tail."""

    def __init__(self, arena: Arena, capacity: int) -> None:
        self.arena = arena
        self.pending: Deque[List] = deque()  # [end position, released], in the order the batches were taken
        # the largest ring a batch received here was written in; the arena may have grown since, and the
        # batch that tells of it is in flight (the loader counts those bytes there until it arrives)
        self.capacity = capacity
        arena.header[_MAPPED] = 1

    def release(self, entry: List) -> None:
        with registry.lock:
            entry[1] = True
            tail = None
            while self.pending and self.pending[0][1]:
                tail = self.pending.popleft()[0]
            if tail is not None and tail > self.arena.header[_TAIL]:
                self.arena.header[_TAIL] = tail

    def discard_unsent(self) -> None:
        """Free what a dead writer took but no batch brought here (must come after every batch received)."""
        head = int(self.arena.header[_HEAD])
        last = self.pending[-1][0] if self.pending else int(self.arena.header[_TAIL])
        if head > last:
            entry = [head, False]
            self.pending.append(entry)
            self.release(entry)


class _Registry:
    """Arenas this process has mapped, by id, and which is each loader's current one per worker.

    Process-wide, like torch's own cache of shared storages: the pin-memory
    thread opens batches as well as the loader. An arena another arena replaced
    stays mapped only while batches on it are open (and counts for its owner until then).
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._mapped: Dict[str, _Mapped] = {}
        self._current: Dict[str, Dict[int, str]] = {}  # owner -> worker id -> arena id
        # owner -> arenas replaced while batches on them were open: the views' finalizers keep them alive
        self._retired: Dict[str, "weakref.WeakSet[_Mapped]"] = {}

    def receive(self, arena: Optional[Arena], arena_id: str, owner: str, worker: int,
                capacity: Optional[int] = None) -> _Mapped:
        """The arena, mapped here if new: brought by a batch written in a ring of ``capacity`` bytes,
        or (``capacity`` None) made by this process."""
        with self.lock:
            mapped = self._mapped.get(arena_id)
            if mapped is None:
                if arena is None:
                    raise RuntimeError(f"a batch refers to shm arena {arena_id}, which never reached this process")
                mapped = self._mapped[arena_id] = _Mapped(arena, arena.capacity if capacity is None else capacity)
                replaced = self._current.setdefault(owner, {}).get(worker)
                self._current[owner][worker] = arena_id
                retired = self._mapped.pop(replaced, None) if replaced is not None else None
                if retired is not None and retired.pending:
                    self._retired.setdefault(owner, weakref.WeakSet()).add(retired)
            return mapped

    def arenas_of(self, owner: str) -> Dict[int, Arena]:
        """The owner's current arena of each worker, for the workers started next."""
        with self.lock:
            return {w: self._mapped[i].arena for w, i in self._current.get(owner, {}).items() if i in self._mapped}

    def writers_stopped(self, owner: str, idle: bool = False) -> None:
        """After the owner's workers were stopped: free what they took for batches never received.
        An arena whose writer may still be alive is dropped instead of reused, unless ``idle``: every
        batch dispatched to the writers came here, and they were told to exit, so none writes again."""
        with self.lock:
            for worker, arena_id in list(self._current.get(owner, {}).items()):
                mapped = self._mapped.get(arena_id)
                if mapped is not None and (idle or not _alive(int(mapped.arena.header[_WRITER]))):
                    mapped.discard_unsent()
                else:
                    self._mapped.pop(arena_id, None)
                    del self._current[owner][worker]

    def idle(self, owner: str, worker: int) -> bool:
        """Whether no batch on this worker's current arena is open here."""
        with self.lock:
            mapped = self._mapped.get(self._current.get(owner, {}).get(worker))
            return mapped is not None and not mapped.pending

    def forget_workers(self, owner: str, workers) -> None:
        """Drop these workers' arenas: the workers started next make or get new ones."""
        with self.lock:
            current = self._current.get(owner, {})
            for worker in workers:
                self._mapped.pop(current.pop(worker, None), None)

    def forget(self, owner: str) -> None:
        """The owner is done: its arenas are unmapped as soon as no batch on them is open."""
        with self.lock:
            for arena_id in self._current.pop(owner, {}).values():
                self._mapped.pop(arena_id, None)
            self._retired.pop(owner, None)

    def mapped_bytes(self, owner: str) -> int:
        """What the owner's arenas hold, as far as the batches received here tell (what an arena grew
        by since is counted with the batch in flight that will tell it): its current ones, and those
        replaced while batches on them are still open."""
        with self.lock:
            current = [self._mapped[i] for i in self._current.get(owner, {}).values() if i in self._mapped]
            retired = [m for m in self._retired.get(owner, ()) if m.pending]
            return sum(_HEADER + m.capacity for m in current + retired)


registry = _Registry()


def open_view(arena: Optional[Arena], arena_id: str, owner: str, worker: int, end: int, lo: int,
              hi: int, capacity: int, stamp: Tuple[int, int, int, int]) -> torch.Tensor:
    """The batch's bytes ``[lo, hi)`` of the ring (of ``capacity`` bytes when it was written) as a
    uint8 tensor viewing the arena, once its stamps are checked (:class:`CorruptBatch` if they do
    not match ``stamp``). When the last tensor built on it is gone, the ring up to ``end`` can go
    back to the writer."""
    mapped = registry.receive(arena, arena_id, owner, worker, capacity)
    with registry.lock:  # the pin-memory thread opens batches too
        buffer = mapped.arena.ring_for(capacity)[lo:hi]  # a new array object per batch: its finalizer is this batch's
    _verify(buffer, end, stamp, arena_id)  # a refused batch takes no place in ``pending``: its arena is dropped
    entry = [end, False]
    with registry.lock:
        mapped.pending.append(entry)
        mapped.capacity = max(mapped.capacity, capacity)
    weakref.finalize(buffer, mapped.release, entry)
    return torch.from_numpy(buffer)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie is dead for our purposes: it writes nothing)."""
    if pid <= 0:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
