"""Worker side: collate, measure, and ship each batch through shm or, if it cannot fit, a file.

Vanilla DataLoader lets the worker's queue feeder thread pickle the batch,
which copies each tensor into its own fresh shm file; when ``/dev/shm`` is
full that thread fails, the batch is dropped and the main process waits
forever. Here the worker's main thread pickles the batch itself, copying all
its ordinary tensors into *one* new shm block (one allocation, one fd for the
main process to fetch, instead of one per tensor) and keeping only their
places in the pickle. An allocation or fd failure is caught where it happens
and the batch takes the other road: pickled by value into a spill file on
real disk, whose path is all that crosses the pipe. The feeder thread only
ever sends small messages.

With the arena on (the default), a worker first tries its reusable shm ring
(``arena``): ``default_collate`` stacks straight into it, other tensors are
copied in, and only offsets cross the pipe. A batch that does not fit there
takes the one-block road above, then the spill file.
"""

from __future__ import annotations

import contextlib
import errno
import io
import math
import os
import pickle
import resource
import time
import uuid
from collections import deque
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Tuple

import torch
import torch.multiprocessing
from torch.utils.data import default_collate, get_worker_info

from . import _torch
from ._torch import collate, collate_tensor_fn, default_collate_fn_map
from .arena import ALIGN, Arena, ArenaFull, RingWriter, _aligned, open_view
from .controller import arena_capacity
from .measure import FdState, ShmProbe, footprint, read_fds

__all__ = ["BatchStats", "Envelope", "MeasuredCollate", "WorkerSetup", "ARENA", "SHM", "FILE", "INLINE"]

ARENA = "arena"  # tensors in the worker's reusable shm ring, offsets through the pipe
SHM = "shm"  # tensors in a new shm block, handles through the pipe
FILE = "file"  # pickled by value into a spill file on disk; its path through the pipe
INLINE = "inline"  # num_workers=0: the batch never leaves the process

_RESOURCE_ERRNOS = {errno.ENOSPC, errno.ENOMEM, errno.EMFILE, errno.ENFILE}


@dataclass
class BatchStats:
    """Measured in the worker, travels with the batch."""

    sample_bytes: List[int]
    sample_storages: List[int]
    batch_bytes: int
    batch_storages: int
    handles: int  # shm handles the batch carries: fds the main process receives (file_descriptor strategy)
    transport: str
    off_shm_reason: Optional[str]
    worker_id: int
    worker_pid: int
    collate_seconds: float
    arena_miss: Optional[str] = None  # why the batch did not go through the arena, if it could have
    arena_new_bytes: int = 0  # the size of an arena this batch brings for the first time
    arena_capacity: int = 0  # the worker's ring once found too small for its batches in flight, until replaced


class Envelope:
    """A batch in transit and its stats; :meth:`open` turns it back into the batch."""

    __slots__ = ("payload", "stats", "_opened")

    def __init__(self, payload: Any, stats: BatchStats, opened: bool = False) -> None:
        self.payload = payload  # INLINE: the batch; SHM: pickled handles; FILE: the spill file's path
        self.stats = stats
        self._opened = opened or stats.transport == INLINE

    def open(self) -> Any:
        if not self._opened:
            if self.stats.transport == ARENA:
                self.payload = unpack_from_arena(self.payload)
            elif self.stats.transport == SHM:
                self.payload = unpack_batch(self.payload)
            else:
                with open(self.payload, "rb") as f:
                    batch = pickle.load(f)
                os.unlink(self.payload)
                self.payload = batch
            self._opened = True
        return self.payload

    def pin_memory(self, device: Optional[str] = None) -> "Envelope":
        """Called by DataLoader's pin-memory thread. The views of shm are dropped here and now: the
        thread keeps this envelope until its next batch, and an arena's room comes back only when
        they are gone."""
        pinned = Envelope(_torch.pin_memory(self.open(), device), self.stats, opened=True)
        self.payload = None
        return pinned


class MeasuredCollate:
    """Wraps the user's ``collate_fn``; runs in the workers.

    Args:
        collate_fn: the user's collate function.
        shm_path: where shm is mounted, to check free space before a batch goes there.
        spill_dir: a directory on real disk for batches that cannot go through shm.
        shm_keep_free: bytes of shm never to fill from here (room for others).
        allocated: optional shared int64 tensor, one slot per worker; each worker
            adds the bytes it puts in shm to its own slot, so the main process
            knows what its batches in flight really occupy.
        arena_owner: a name for the loader's arenas; ``None``: no arena, every
            batch gets a new shm block.
        arena_sizes: optional shared int64 tensor, one slot per worker: the size
            of each worker's arena, so that each takes an equal share.
        batches_in_flight, workers: the pipeline, for sizing an arena.
    """

    def __init__(self, collate_fn: Callable[[List[Any]], Any], shm_path: str, spill_dir: str,
                 shm_keep_free: int = 0, allocated: Optional[torch.Tensor] = None,
                 arena_owner: Optional[str] = None, arena_sizes: Optional[torch.Tensor] = None,
                 batches_in_flight: int = 2, workers: int = 1) -> None:
        self.collate_fn = collate_fn
        self.shm_path = shm_path
        self.spill_dir = spill_dir
        self.shm_keep_free = shm_keep_free
        self.allocated = allocated
        self.spill_prefix = f"adaptive-loader-{os.getpid()}-{uuid.uuid4().hex[:8]}-"
        self.arena_owner = arena_owner
        self.arena_sizes = arena_sizes
        self.batches_in_flight = batches_in_flight
        self.workers = workers
        self.arenas: Dict[int, Arena] = {}  # set by the main process: the arenas to continue, by worker id
        self.batch_bytes_hint = 0  # set by the main process: the cost model's bound on a batch
        self._stack_in_arena = collate_fn is default_collate  # then collate stacks straight into the ring
        self._writer: Optional[RingWriter] = None
        self._recent: Deque[int] = deque(maxlen=16)  # bytes of this worker's last batches
        self._tight_capacity = 0  # see BatchStats.arena_capacity
        self._unreported_arena_bytes = 0  # of arenas made here that no batch has told the main process of
        self._batches_made = 0
        self._fds: Optional[FdState] = None
        self._shm: Optional[ShmProbe] = None  # made at the first batch in a worker, then read per batch

    def __call__(self, samples: List[Any]) -> Envelope:
        start = time.perf_counter()
        sizes = [footprint(s, own_bytes=True) for s in samples]
        info = get_worker_info()
        if info is None:  # num_workers=0: no shm involved
            batch = self.collate_fn(samples)
            return Envelope(batch, self._stats(sizes, batch, INLINE, None, -1, start))
        needed = sum(b for b, _ in sizes)
        if self._shm is None:
            self._shm = ShmProbe(self.shm_path)
        free = self._shm.read().free
        batch, miss = None, None
        if self.arena_owner is not None:
            envelope, batch, miss = self._via_arena(samples, sizes, needed, free, info.id, start)
            if envelope is None:
                envelope = self._off_arena(samples, sizes, needed, free, info.id, start, batch)
                envelope.stats.arena_miss = miss
            envelope.stats.arena_capacity = self._tight_capacity
            return envelope
        return self._off_arena(samples, sizes, needed, free, info.id, start)

    def _off_arena(self, samples, sizes, needed, free, worker_id, start, batch=None) -> Envelope:
        """A new shm block for the batch, or a spill file where shm cannot take it."""
        if needed > free - self.shm_keep_free:
            return self._to_file(samples, sizes, f"batch needs {needed} B, shm has {free} B free", worker_id,
                                 start, batch)
        try:
            batch = self.collate_fn(samples) if batch is None else batch
            shared = _all_in_shm(batch)
            if shared is not None and self._fds_to_spare(shared):
                # Collate already put every tensor in shm: the feeder thread only passes their fds,
                # nothing it could fail on. Let it pickle, in parallel with the next batch.
                payload, handles, opened = batch, shared, True
            else:
                (payload, handles), opened = pack_batch(batch), False
        except (RuntimeError, OSError) as exc:
            if not _is_resource_error(exc):
                raise
            return self._to_file(samples, sizes, f"shm or fds ran out: {exc}", worker_id, start, batch)
        stats = self._stats(sizes, batch, SHM, None, worker_id, start, handles)
        if self.allocated is not None:
            self.allocated[worker_id] += stats.batch_bytes  # this worker's slot only: no lock needed
        return Envelope(payload, stats, opened=opened)

    # -- the arena -----------------------------------------------------------------
    def _via_arena(self, samples, sizes, needed, free, worker_id, start):
        """``(envelope, None, None)`` when the batch went into the arena; else ``(None, batch, why)``,
        ``batch`` being the collated batch if it can still be sent another way (else None)."""
        expected = needed + ALIGN * sum(s for _, s in sizes)  # each tensor may need padding
        writer, why = self._arena_writer(expected, free, worker_id)
        if writer is None:
            return None, None, why
        batch = None
        try:
            writer.begin(expected)
            if self._stack_in_arena:
                with _stacking_into(writer):
                    batch = _collate_into_ring(samples)
            else:
                batch = self.collate_fn(samples)
            ship = None if writer.announced else writer.arena
            payload, handles = pack_into_arena(batch, writer, ship, self.arena_owner, worker_id)
        except ArenaFull as exc:
            writer.rollback()
            return None, None if self._stack_in_arena else batch, f"arena full: {exc}"
        except (RuntimeError, OSError) as exc:  # e.g. a custom collate that allocates shm itself
            writer.rollback()
            if not _is_resource_error(exc):
                raise
            return None, None, f"collate ran out of shm or fds: {exc}"
        except BaseException:
            writer.rollback()
            raise
        stats = self._stats(sizes, batch, ARENA, None, worker_id, start, handles)
        stats.arena_new_bytes, self._unreported_arena_bytes = self._unreported_arena_bytes, 0
        return Envelope(payload, stats), None, None

    def _arena_writer(self, expected: int, free: int, worker_id: int):
        """This worker's ring writer, made or grown when the batches outgrow it: ``(writer, None)``
        or ``(writer or None, why a new one could not be made)``."""
        self._recent.append(expected)
        if self._writer is None and worker_id in self.arenas:
            self._writer = RingWriter(self.arenas.pop(worker_id))  # continue the arena of the last worker
            self._publish_arena_size(worker_id)
        room = free - self.shm_keep_free
        reserved = int(self.arena_sizes.sum()) if self.arena_sizes is not None else 0  # by all of our workers
        batch = max(max(self._recent), self.batch_bytes_hint)
        wanted = arena_capacity(batch, self.batches_in_flight, room + reserved, self.workers)
        current = self._writer.arena.capacity if self._writer is not None else 0
        if current < (self.batches_in_flight + 2) * batch:  # until a new arena: else the budget swings
            self._tight_capacity = current
        if self._writer is not None and wanted < 1.2 * current:
            return self._writer, None  # big enough, or growing would not be worth a new one
        if wanted == 0 or wanted > room:
            return self._writer, (f"no room for an arena: {room} B of shm left above the safety line, "
                                  f"{reserved} B in arenas, {self.workers} workers, batches of up to {batch} B")
        try:
            arena = Arena.create(wanted)
        except RuntimeError as exc:
            if not _is_resource_error(exc):
                raise
            return self._writer, f"could not reserve an arena of {wanted} B: {exc}"
        self._writer = RingWriter(arena)
        self._tight_capacity = 0
        self._publish_arena_size(worker_id)
        if self.allocated is not None:
            self.allocated[worker_id] += arena.nbytes  # in flight until the main process maps it
        self._unreported_arena_bytes += arena.nbytes
        return self._writer, None

    def _publish_arena_size(self, worker_id: int) -> None:
        if self.arena_sizes is not None:
            self.arena_sizes[worker_id] = self._writer.arena.nbytes  # this worker's slot only

    def _fds_to_spare(self, handles: int) -> bool:
        """Whether this worker has fds to spare for a batch's handles, by a wide margin
        (what is open is re-read every 16 batches)."""
        self._batches_made += 1
        if self._fds is None or self._batches_made % 16 == 0:
            self._fds = read_fds()
        return self._fds.in_use + 8 * handles < self._fds.soft_limit // 2

    def _to_file(self, samples, sizes, reason, worker_id, start, batch=None) -> Envelope:
        if batch is None:  # not collated yet, or collate itself ran out of shm
            with _collate_without_shm():
                batch = self.collate_fn(samples)
        path = os.path.join(self.spill_dir, f"{self.spill_prefix}{uuid.uuid4().hex}.pkl")
        with open(path, "wb") as f:
            pickle.dump(batch, f, pickle.HIGHEST_PROTOCOL)  # by value: tensors as bytes, no shm
        return Envelope(path, self._stats(sizes, batch, FILE, reason, worker_id, start))

    def remove_spill_files(self) -> int:
        """Delete spill files of this loader that nobody will read (after workers died)."""
        removed = 0
        with contextlib.suppress(OSError):
            for name in os.listdir(self.spill_dir):
                if name.startswith(self.spill_prefix):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(self.spill_dir, name))
                        removed += 1
        return removed

    @staticmethod
    def _stats(sizes, batch, transport, reason, worker_id, start, handles=0) -> BatchStats:
        batch_bytes, batch_storages = footprint(batch)
        return BatchStats(
            sample_bytes=[b for b, _ in sizes], sample_storages=[s for _, s in sizes],
            batch_bytes=batch_bytes, batch_storages=batch_storages, handles=handles, transport=transport,
            off_shm_reason=reason, worker_id=worker_id, worker_pid=os.getpid(),
            collate_seconds=time.perf_counter() - start)


class _PackingPickler(ForkingPickler):
    """Pickles a batch but keeps its CPU tensors out, as numbered places: plain ones
    (``tensors``) to be copied into the batch's shm block, those already in shm
    (``shared``) to travel as they are. Nothing touches shm or fds while it runs."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, pickle.HIGHEST_PROTOCOL)
        self.tensors: List[torch.Tensor] = []
        self.shared: List[torch.Tensor] = []
        self._place: Dict[int, tuple] = {}

    def persistent_id(self, obj: Any) -> Optional[tuple]:
        if type(obj) is not torch.Tensor:
            return None
        if id(obj) not in self._place:
            if _packable(obj):
                self._place[id(obj)] = ("block", len(self.tensors))
                self.tensors.append(obj)
            elif obj.device.type == "cpu" and obj.is_shared():
                self._place[id(obj)] = ("shared", len(self.shared))
                self.shared.append(obj)
            else:
                return None
        return self._place[id(obj)]


class _PlacingUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, places: Dict[str, List[torch.Tensor]]) -> None:
        super().__init__(file)
        self.places = places

    def persistent_load(self, pid: tuple) -> torch.Tensor:
        kind, number = pid
        return self.places[kind][number]


_PLAIN = (str, bytes, int, float, complex, bool, type(None))


def _all_in_shm(batch: Any) -> Optional[int]:
    """Distinct storages of ``batch`` if it is plain containers, scalars and tensors already
    in shm and nothing else (so pickling it cannot allocate); else None."""
    storages: set = set()
    stack = [batch]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            if type(item) is not torch.Tensor or not item.is_shared():
                return None
            storages.add(item.untyped_storage().data_ptr())
        elif type(item) in (dict, list, tuple) or (isinstance(item, tuple) and hasattr(item, "_fields")):
            stack.extend(item.values() if isinstance(item, dict) else item)
        elif not isinstance(item, _PLAIN):
            return None
    return len(storages)


def _stackable(obj: Any) -> bool:
    """Plain CPU tensors: their bytes can be copied into shm and viewed again."""
    return (type(obj) is torch.Tensor and obj.device.type == "cpu" and obj.layout == torch.strided
            and not obj.requires_grad and not obj.is_quantized)


def _packable(obj: Any) -> bool:
    """Plain CPU tensors not in shm yet (collate's stacked output already is: it goes as it is)."""
    return _stackable(obj) and not obj.is_shared()


def pack_batch(batch: Any) -> Tuple[bytes, int]:
    """The batch pickled for the main process, its plain tensors copied into one new
    shm block; and how many shm handles (fds) it carries."""
    inner = io.BytesIO()
    pickler = _PackingPickler(inner)
    pickler.dump(batch)
    layout, size = [], 0
    for tensor in pickler.tensors:
        layout.append((size, tensor.dtype, tuple(tensor.shape)))
        size += _aligned(tensor.nbytes)
    block = None
    if pickler.tensors:
        block = torch.empty(0, dtype=torch.uint8).set_(_torch.new_shared_storage(max(size, 1)))
        for tensor, place in zip(pickler.tensors, layout):
            _region(block, *place).copy_(tensor)
    handles = len({t.untyped_storage().data_ptr() for t in pickler.shared}) + (block is not None)
    outer = ForkingPickler.dumps((inner.getvalue(), block, layout, pickler.shared), pickle.HIGHEST_PROTOCOL)
    return bytes(outer), handles


def pack_into_arena(batch: Any, writer: RingWriter, arena: Optional[Arena], owner: str,
                    worker_id: int) -> Tuple[bytes, int]:
    """The batch pickled for the main process with its tensors in the open batch of ``writer``
    (those collate stacked there stay, the others are copied in), committed; and the shm handles
    (fds) it carries: the arena itself the first times, and tensors collate put in shm elsewhere."""
    inner = io.BytesIO()
    pickler = _PackingPickler(inner)
    pickler.dump(batch)
    layout = []
    for tensor in pickler.tensors:
        offset = 0 if tensor.nbytes == 0 else writer.offset(tensor)
        if offset is None:  # not in the ring yet: copy it in
            piece = writer.alloc(tensor.nbytes)
            offset = writer.offset(piece)
            tensor = _region(piece, 0, tensor.dtype, tuple(tensor.shape)).copy_(tensor)
        layout.append((offset, tensor.dtype, tuple(tensor.shape), tensor.stride()))
    end, lo, hi = writer.commit()
    handles = len({t.untyped_storage().data_ptr() for t in pickler.shared}) + (arena is not None)
    outer = ForkingPickler.dumps((inner.getvalue(), arena, writer.arena.id, owner, worker_id, end, lo, hi, layout,
                                  pickler.shared), pickle.HIGHEST_PROTOCOL)
    return bytes(outer), handles


def unpack_from_arena(data: bytes) -> Any:
    """The batch again, its tensors views of the worker's arena."""
    inner, arena, arena_id, owner, worker_id, end, lo, hi, layout, shared = pickle.loads(data)
    base = open_view(arena, arena_id, owner, worker_id, end, lo, hi)
    places = {"block": [_strided(base, *place) for place in layout], "shared": shared}
    return _PlacingUnpickler(io.BytesIO(inner), places).load()


def _strided(base: torch.Tensor, offset: int, dtype: torch.dtype, shape: tuple, stride: tuple) -> torch.Tensor:
    span = (1 + sum((n - 1) * st for n, st in zip(shape, stride))) * dtype.itemsize if all(shape) else 0
    return base[offset : offset + span].view(dtype).as_strided(shape, stride)


_stacking_writer: Optional[RingWriter] = None  # set while default_collate runs in the arena path


@contextlib.contextmanager
def _stacking_into(writer: RingWriter) -> Iterator[None]:
    """Make ``default_collate`` stack tensors straight into the writer's open batch."""
    global _stacking_writer
    _stacking_writer = writer
    try:
        yield
    finally:
        _stacking_writer = None


def _stack_into_ring(batch, *, collate_fn_map=None):
    """``default_collate``'s rule for tensors, with the output in the arena instead of fresh shm."""
    elem = batch[0]
    writer = _stacking_writer
    if writer is None or not all(_stackable(t) and t.shape == elem.shape and t.dtype == elem.dtype for t in batch):
        return collate_tensor_fn(batch, collate_fn_map=collate_fn_map)  # the error, or the odd tensor
    out = writer.alloc(elem.nbytes * len(batch)).view(elem.dtype).view(len(batch), *elem.shape)
    return torch.stack(batch, 0, out=out)


_ARENA_COLLATE_MAP = {**default_collate_fn_map, torch.Tensor: _stack_into_ring}


def _collate_into_ring(samples: List[Any]) -> Any:
    """``default_collate`` whose stacked tensors land in the open batch of the arena."""
    return collate(samples, collate_fn_map=_ARENA_COLLATE_MAP)


def unpack_batch(data: bytes) -> Any:
    """The batch again, its tensors views into the shared block."""
    inner, block, layout, shared = pickle.loads(data)
    places = {"block": [_region(block, *place) for place in layout], "shared": shared}
    return _PlacingUnpickler(io.BytesIO(inner), places).load()


def _region(block: torch.Tensor, offset: int, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    nbytes = math.prod(shape) * dtype.itemsize
    return block[offset : offset + nbytes].view(dtype).view(shape)


@contextlib.contextmanager
def _collate_without_shm() -> Iterator[None]:
    """Run collate as if in the main process.

    ``default_collate`` stacks straight into fresh shm when it sees a worker;
    hiding the worker info for the duration makes it allocate ordinary memory.
    """
    with _torch.hidden_worker_info():
        yield


def _is_resource_error(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS:
        return True
    text = str(exc)
    return _torch.messages.any_of(text, _torch.messages.RESOURCE)


class WorkerSetup:
    """``worker_init_fn`` wrapper: sharing strategy and fd limit first, then the user's own."""

    def __init__(self, user_fn: Optional[Callable[[int], None]], sharing_strategy: str,
                 fd_soft_limit: Optional[int]) -> None:
        self.user_fn = user_fn
        self.sharing_strategy = sharing_strategy
        self.fd_soft_limit = fd_soft_limit

    def __call__(self, worker_id: int) -> None:
        if torch.multiprocessing.get_sharing_strategy() != self.sharing_strategy:
            torch.multiprocessing.set_sharing_strategy(self.sharing_strategy)
        if self.fd_soft_limit is not None:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            if soft < self.fd_soft_limit <= hard:
                resource.setrlimit(resource.RLIMIT_NOFILE, (self.fd_soft_limit, hard))
        if self.user_fn is not None:
            self.user_fn(worker_id)
