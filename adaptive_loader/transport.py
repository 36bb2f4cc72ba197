"""Worker side: collate, measure, and ship each batch by the road the rules give it.

Vanilla DataLoader lets the worker's queue feeder thread pickle the batch,
which copies each tensor into its own fresh shm file; when ``/dev/shm`` is
full that thread fails, the batch is dropped and the main process waits
forever. Here the worker's main thread takes the batch apart itself
(:mod:`~adaptive_loader.codec`: the structure pickled in memory, the tensors'
bytes as pieces) and puts the pieces on one of these roads, in this order:

- the worker's reusable arena (a ring in a memfd or in ``/dev/shm``):
  ``default_collate`` stacks straight into it, other tensors are copied in,
  only offsets cross the pipe;
- one new shared block for the whole batch (a memfd or an unlinked ``/dev/shm``
  file): one fd for the main process, however many tensors;
- a spill file on real disk (:mod:`~adaptive_loader.spill`): raw bytes in a
  private file, the structure through the pipe.

Torch never allocates shm here for ``default_collate`` (so no ``torch_*``
file can be left by a failed allocation), and every failure to get memory
or fds is caught where it happens: the batch takes the next road. The
feeder thread only ever sends small messages. Which road a batch may take
(the off-shm line, arena growth, fds to spare) is decided by the rules the
main process hands over (``routing.WorkerRules``); this module carries them out.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import resource
from collections import deque
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.multiprocessing
from torch.utils.data import default_collate, get_worker_info

from . import _torch
from ._torch import collate, collate_tensor_fn, default_collate_fn_map
from .arena import ALIGN, Arena, ArenaFull, RingWriter, default_kind, first_ring_bytes, open_view
from .codec import decode, encode, piece_views
from .kinds import Road
from .measure import FdState, ShmProbe, footprint, heap_before_batch, heap_growth, leaves, mark_heap_base, read_fds
from .region import MEMFD, SharedRegion
from .spill import SpillDir, read_spill

if TYPE_CHECKING:  # the decide layer's object, handed over by the main process; never imported here
    from .routing import WorkerRules

__all__ = ["BatchStats", "Envelope", "MeasuredCollate", "WorkerSetup", "ARENA", "SHM", "FILE", "INLINE", "MEMFD_ROAD",
           "pack_batch", "unpack_batch"]

ARENA, SHM, FILE, INLINE = Road.ARENA, Road.SHM, Road.FILE, Road.INLINE
MEMFD_ROAD = Road.MEMFD

_RESOURCE_ERRNOS = {errno.ENOSPC, errno.ENOMEM, errno.EMFILE, errno.ENFILE}
_pin_memory = _torch.pin_memory  # what the pin thread applies to an opened batch


@dataclass
class BatchStats:
    """Measured in the worker, travels with the batch."""

    sample_bytes: List[int]
    batch_bytes: int
    batch_storages: int
    handles: int  # fds the batch carries to the main process
    transport: str  # a kinds.Road
    off_shm_reason: Optional[str]
    worker_id: int
    worker_pid: int
    arena_miss: Optional[str] = None  # why the batch did not go through the arena, if it could have
    arena_new_bytes: int = 0  # arena bytes (a new arena, or what one grew by) this batch first tells of
    arena_capacity: int = 0  # the worker's ring once found too small for its batches in flight and unable to grow
    block_kind: Optional[str] = None  # Road.SHM: "memfd" or "shm", what the block is
    stream: Any = None  # a stream's batch: its stream.StreamMeta (which samples of which worker's stream)
    heap: int = 0  # the heap its process gained since it started making batches, read as the batch was made


class Envelope:
    """A batch in transit and its stats; :meth:`open` turns it back into the batch."""

    __slots__ = ("payload", "stats", "_opened")

    def __init__(self, payload: Any, stats: BatchStats, opened: bool = False) -> None:
        self.payload = payload  # INLINE: the batch; else what the road's unpack reads
        self.stats = stats
        self._opened = opened or stats.transport == INLINE

    def open(self) -> Any:
        if not self._opened:
            road = self.stats.transport
            if road in (Road.ARENA, Road.MEMFD):
                self.payload = unpack_from_arena(self.payload)
            elif road == Road.SHM:
                self.payload = unpack_batch(self.payload)
            else:
                self.payload = unpack_spilled(self.payload)
            self._opened = True
        return self.payload

    def __reduce__(self):
        return _received, (self.payload, self.stats, self._opened)

    def pin_memory(self, device: Optional[str] = None) -> "Envelope":
        """Called by DataLoader's pin-memory thread. The views of shm are dropped here and now: the
        thread keeps this envelope until its next batch, and an arena's room comes back only when
        they are gone."""
        pinned = Envelope(_pin_memory(self.open(), device), self.stats, opened=True)
        self.payload = None
        return pinned


def _received(payload: Any, stats: BatchStats, opened: bool) -> Envelope:
    """An envelope arriving in the main process. The fds its road carries are fetched now, from the
    worker that sent them, as torch fetches its own when a batch comes off the queue: later that
    worker may be gone (a stream's worker exits once its stream ended, its last batches still waiting
    here for their turn)."""
    if not opened and stats.transport in (Road.ARENA, Road.MEMFD, Road.SHM):
        payload = pickle.loads(payload)
    return Envelope(payload, stats, opened)


class MeasuredCollate:
    """Wraps the user's ``collate_fn``; runs in the workers.

    Args:
        collate_fn: the user's collate function.
        shm_path: where shm is mounted, to check free space before a batch goes there.
        spill_dir: a directory on real disk for batches that cannot go through shared memory (a private
            directory is made in it), or a :class:`~adaptive_loader.spill.SpillDir` the loader made.
        shm_keep_free, batches_in_flight, workers: what the rules are made of when ``rules`` is not given.
        allocated: optional shared int64 tensor, one slot per worker; each worker
            adds the bytes it puts in shared memory to its own slot, so the main
            process knows what its batches in flight really occupy.
        arena_owner: a name for the loader's arenas; ``None``: no arena.
        arena_sizes: optional shared int64 tensor, one slot per worker: the size
            of each worker's arena, so that each takes an equal share.
        rules: the decide layer's ``WorkerRules`` (off-shm line, arena growth, fds to spare).
        arena_kind: ``"memfd"`` or ``"shm"``, for arenas and blocks; ``None``: memfd where available.
    """

    def __init__(self, collate_fn: Callable[[List[Any]], Any], shm_path: str, spill_dir: Union[str, SpillDir],
                 shm_keep_free: int = 0, allocated: Optional[torch.Tensor] = None,
                 arena_owner: Optional[str] = None, arena_sizes: Optional[torch.Tensor] = None,
                 batches_in_flight: int = 2, workers: int = 1, rules: Optional["WorkerRules"] = None,
                 arena_kind: Optional[str] = None) -> None:
        if arena_kind not in (None, "memfd", "shm"):
            raise ValueError(f"arena_kind must be 'memfd', 'shm' or None, got {arena_kind!r}")
        self.collate_fn = collate_fn
        self.shm_path = shm_path
        self.spill = spill_dir if isinstance(spill_dir, SpillDir) else SpillDir.create(spill_dir)
        self.spill_dir = os.path.dirname(self.spill.path)
        if rules is None:
            raise TypeError("MeasuredCollate needs rules= (a routing.WorkerRules the main process builds)")
        self.rules = rules
        self.allocated = allocated
        self.arena_owner = arena_owner
        self.arena_sizes = arena_sizes
        self.kind = arena_kind if arena_kind is not None else default_kind()
        self.arenas: Dict[int, Arena] = {}  # set by the main process: the arenas to continue, by worker id
        self.batch_bytes_hint = 0  # set by the main process: the cost model's bound on a batch
        self._default = collate_fn is default_collate  # then collate stacks straight into the ring or plain memory
        self._writer: Optional[RingWriter] = None
        self._recent: Deque[int] = deque(maxlen=16)  # bytes of this worker's last batches
        self._tight_capacity = 0  # see BatchStats.arena_capacity
        self._unreported_arena_bytes = 0  # of arenas made here that no batch has told the main process of
        self._batches_made = 0
        self._fds: Optional[FdState] = None
        self._shm: Optional[ShmProbe] = None  # made at the first batch in a worker, then read per batch

    @property
    def shm_keep_free(self) -> int:
        return self.rules.keep_free

    def __call__(self, samples: List[Any]) -> Envelope:
        sizes = [footprint(s, own_bytes=True) for s in samples]
        info = get_worker_info()
        if info is None:  # num_workers=0: no shm involved
            batch = self.collate_fn(samples)
            return Envelope(batch, self._stats(sizes, batch, INLINE, None, -1))
        if self._shm is None:  # the first batch in this worker: open what a later fd shortage would deny
            self._shm = ShmProbe(self.shm_path)
            self.spill.prepare()
        heap_before_batch()
        self._batches_made += 1
        needed = sum(b for b, _ in sizes)
        free = self._shm.read().free
        if self.arena_owner is None:
            return self._off_arena(samples, sizes, needed, free, info.id)
        envelope, batch, miss = self._via_arena(samples, sizes, needed, free, info.id)
        if envelope is None:
            envelope = self._off_arena(samples, sizes, needed, free, info.id, batch)
            envelope.stats.arena_miss = miss
        envelope.stats.arena_capacity = self._tight_capacity
        return envelope

    def _collate_plain(self, samples: List[Any]) -> Any:
        """The batch in ordinary memory: ``default_collate`` stacks without shm, a user's collate runs
        as it would (it may put tensors in shm itself)."""
        return _collate_plain(samples) if self._default else self.collate_fn(samples)

    def _off_arena(self, samples, sizes, needed, free, worker_id, batch=None) -> Envelope:
        """One new shared block for the batch, or a spill file where that cannot be had."""
        reason = self.rules.off_shm(needed, free, self.kind)
        if reason is None:
            try:
                batch = self._collate_plain(samples) if batch is None else batch
                self._fds = read_fds()  # fresh: a new block costs far more than listing the fds
                share = self._fds_to_spare(1 + _shared_storages(batch))
                if not self._fds_to_spare(1):
                    reason = "fds are short: not even one for a block"
                else:
                    payload, handles = pack_batch(batch, self.kind, self.shm_path, share=share)
                    stats = self._stats(sizes, batch, SHM, None, worker_id, handles)
                    stats.block_kind = self.kind
                    if self.allocated is not None:
                        self.allocated[worker_id] += stats.batch_bytes  # this worker's slot only: no lock needed
                    return Envelope(payload, stats)
            except (RuntimeError, OSError) as exc:
                if not _is_resource_error(exc):
                    raise
                reason, batch = f"shared memory or fds ran out: {exc}", None
            # out of the except clause: its traceback no longer holds what the failed attempt allocated
        return self._to_file(samples, sizes, reason, worker_id, batch)

    # -- the arena -----------------------------------------------------------------
    def _via_arena(self, samples, sizes, needed, free, worker_id):
        """``(envelope, None, None)`` when the batch went into the arena; else ``(None, batch, why)``,
        ``batch`` being the collated batch if it can still be sent another way (else None)."""
        expected = needed + ALIGN * sum(s for _, s in sizes)  # each tensor may need padding
        writer, why = self._arena_writer(expected, free, worker_id)
        if writer is None:
            return None, None, why
        batch = None
        try:
            writer.begin(expected)
            if self._default:
                with _stacking_into(writer):
                    batch = _collate_into_ring(samples)
            else:
                batch = self.collate_fn(samples)
            ship = None if writer.announced else writer.arena
            share = self._fds_to_spare(_shared_storages(batch) + (ship is not None))
            payload, handles = pack_into_arena(batch, writer, ship, self.arena_owner, worker_id, share=share)
        except ArenaFull as exc:
            writer.rollback()
            return None, None if self._default else batch, f"arena full: {exc}"
        except (RuntimeError, OSError) as exc:  # e.g. a custom collate that allocates shm itself
            writer.rollback()
            if not _is_resource_error(exc):
                raise
            return None, None, f"collate ran out of shm or fds: {exc}"
        except BaseException:
            writer.rollback()
            raise
        road = Road.MEMFD if writer.arena.kind == MEMFD else Road.ARENA
        stats = self._stats(sizes, batch, road, None, worker_id, handles)
        stats.arena_new_bytes, self._unreported_arena_bytes = self._unreported_arena_bytes, 0
        return Envelope(payload, stats), None, None

    def _arena_writer(self, expected: int, free: int, worker_id: int):
        """This worker's ring writer, made or grown when the batches outgrow it: ``(writer, None)``
        or ``(writer or None, why it could not be made or grown)``."""
        self._recent.append(expected)
        if self._writer is None and worker_id in self.arenas:
            self._writer = RingWriter(self.arenas.pop(worker_id), worker_id)  # continue the arena of the last worker
            self._publish_arena_size(worker_id)
        reserved = int(self.arena_sizes.sum()) if self.arena_sizes is not None else 0  # by all of our workers
        room = self.rules.arena_room(free, self.kind, reserved)
        batch = max(max(self._recent), self.batch_bytes_hint)
        wanted = self.rules.arena_wanted(batch, room, reserved)
        first = self._batches_made == 1 and not self.batch_bytes_hint
        if first:  # a new worker's first batch, nothing measured before: room for this batch now and the rest
            # of the ring at the next batch, so the first batch does not wait for every page of it to be zeroed
            wanted = min(wanted, first_ring_bytes(expected))
        current = self._writer.arena.capacity if self._writer is not None else 0
        tight = not first and self.rules.arena_tight(current, batch)  # small on purpose: no cap on the budget
        if self._writer is not None and self.rules.keep_arena(wanted, current) and not tight:
            if self._writer.fits(expected) or current > room:
                return self._writer, None
            # large enough, yet full: the user holds batches on it beyond those in flight. A new ring, as
            # DataLoader gives each batch memory of its own; the old one goes with the last view on it
            return self._reserve(current, worker_id, replace=True)
        if wanted <= current or wanted - current > room:
            if tight:  # until it can grow: else the budget swings
                self._tight_capacity = current
            return self._writer, (f"no room for {'a larger' if current else 'an'} arena: {room} B of "
                                  f"{'shm' if self.kind == 'shm' else 'memory'} left above the safety line, "
                                  f"{reserved} B in arenas, batches of up to {batch} B")
        self._tight_capacity = 0  # there is room: the arena is made or grows now, or at a later batch
        result = self._reserve(wanted, worker_id, replace=self._writer is None)
        if tight and result[1] is not None:
            self._tight_capacity = current
        return result

    def _reserve(self, capacity: int, worker_id: int, replace: bool):
        """A new arena of ``capacity`` bytes (``replace``), else the current one grown to it:
        ``(writer, None)``, or ``(writer or None, why not)``."""
        before = self._writer.arena.nbytes if self._writer is not None and not replace else 0
        try:
            if replace:
                self._writer = RingWriter(Arena.create(capacity, kind=self.kind, shm_path=self.shm_path), worker_id)
            elif not self._writer.arena.grow(capacity):
                return self._writer, None  # its batches run past the ring's end now: it grows at a later batch
        except (RuntimeError, OSError) as exc:
            if not _is_resource_error(exc):
                raise
            return self._writer, f"could not reserve an arena of {capacity} B: {exc}"
        self._publish_arena_size(worker_id)
        added = self._writer.arena.nbytes - before
        if self.allocated is not None:
            self.allocated[worker_id] += added  # in flight until a batch tells the main process
        self._unreported_arena_bytes += added
        return self._writer, None

    def _publish_arena_size(self, worker_id: int) -> None:
        if self.arena_sizes is not None:
            self.arena_sizes[worker_id] = self._writer.arena.nbytes  # this worker's slot only

    def _fds_to_spare(self, handles: int) -> bool:
        """Whether this worker may send a batch carrying ``handles`` fds (the rules say how far from
        the limit it must stay; what is open is re-read as often as they say)."""
        if handles == 0:
            return True
        if self._fds is None or self.rules.read_fds_now(self._batches_made):
            self._fds = read_fds()
        return self.rules.fds_to_spare(self._fds.in_use, self._fds.soft_limit, handles)

    def _to_file(self, samples, sizes, reason, worker_id, batch=None) -> Envelope:
        if batch is None:  # not collated yet, or collate itself ran out of shm
            with _collate_without_shm():
                batch = self.collate_fn(samples)
        encoded = encode(batch, share=False)
        pieces = [p.numpy() for p in encoded.pieces]
        path, total, offsets = self.spill.write(pieces)
        payload = (path, total, offsets, encoded.sizes, encoded.structure, encoded.tensors)
        return Envelope(payload, self._stats(sizes, batch, FILE, reason, worker_id))

    def remove_spill_files(self) -> int:
        """Delete spill files of this loader that nobody will read (after workers died)."""
        return self.spill.remove_files()

    @staticmethod
    def _stats(sizes, batch, transport, reason, worker_id, handles=0) -> BatchStats:
        batch_bytes, batch_storages = footprint(batch, own_bytes=True)
        return BatchStats(
            sample_bytes=[b for b, _ in sizes], batch_bytes=batch_bytes, batch_storages=batch_storages,
            handles=handles, transport=transport, off_shm_reason=reason, worker_id=worker_id,
            worker_pid=os.getpid(), heap=heap_growth())


def _shared_storages(batch: Any) -> int:
    """Distinct storages of plain tensors already in shm in ``batch``: the fds torch would pass."""
    storages = (t.untyped_storage() for t in leaves(batch)
                if type(t) is torch.Tensor and t.layout == torch.strided and t.is_cpu)
    return len({storage.data_ptr() for storage in storages if storage.is_shared()})


# -- the roads' pack and unpack ------------------------------------------------------------------

def pack_batch(batch: Any, kind: str = MEMFD, shm_path: str = "/dev/shm", share: bool = True) -> Tuple[bytes, int]:
    """The batch pickled for the main process, its tensors' bytes copied into one new shared block
    of ``kind``; and how many fds it carries. With ``share``, tensors already in shm go as they are
    (an fd each); else they are copied too."""
    encoded = encode(batch, share=share)
    offsets = encoded.packed_offsets()
    region = None
    if encoded.pieces:
        region = SharedRegion.create(max(encoded.nbytes, 1), kind, shm_path)
        try:
            for piece, offset in zip(encoded.pieces, offsets):
                region.tensor(offset, piece.numel()).copy_(piece)
            payload = ForkingPickler.dumps((encoded.structure, encoded.tensors, offsets, encoded.sizes, region,
                                            encoded.shared), pickle.HIGHEST_PROTOCOL)
        finally:
            region.close()  # the fd to pass is already duplicated for the main process to fetch
    else:
        payload = ForkingPickler.dumps((encoded.structure, encoded.tensors, offsets, encoded.sizes, None,
                                        encoded.shared), pickle.HIGHEST_PROTOCOL)
    return bytes(payload), encoded.shared_handles + (region is not None)


def unpack_batch(data: bytes) -> Any:
    """The batch again, its tensors views of the shared block (``data``: as packed, or received)."""
    structure, tensors, offsets, sizes, region, shared = _loaded(data)
    if region is None:
        return decode(structure, tensors, [], shared)
    try:
        return decode(structure, tensors, piece_views(region.array, offsets, sizes), shared)
    finally:
        region.close()  # the fd goes now; the mapping with the last view


def pack_into_arena(batch: Any, writer: RingWriter, arena: Optional[Arena], owner: str, worker_id: int,
                    share: bool = True) -> Tuple[bytes, int]:
    """The batch pickled for the main process with its tensors' bytes in the open batch of ``writer``
    (those collate stacked there stay, the others are copied in), committed; and the fds it carries:
    the arena itself the first times, and tensors collate put in shm elsewhere (with ``share``)."""
    encoded = encode(batch, share=share)
    offsets = []
    for piece in encoded.pieces:
        offset = writer.offset(piece) if piece.numel() else None
        if offset is None:  # not in the ring yet: copy it in
            target = writer.alloc(piece.numel())
            offset = writer.offset(target) if piece.numel() else 0
            target.copy_(piece)
        offsets.append(offset)
    place = writer.commit()
    handles = encoded.shared_handles + (arena is not None)
    payload = ForkingPickler.dumps((encoded.structure, encoded.tensors, offsets, encoded.sizes, arena,
                                    writer.arena.id, owner, worker_id, place, encoded.shared),
                                   pickle.HIGHEST_PROTOCOL)
    return bytes(payload), handles


def unpack_from_arena(data: bytes) -> Any:
    """The batch again, its tensors views of the worker's arena (``data``: as packed, or received)."""
    structure, tensors, offsets, sizes, arena, arena_id, owner, worker_id, place, shared = _loaded(data)
    base = open_view(arena, arena_id, owner, worker_id, *place).numpy()
    return decode(structure, tensors, piece_views(base, offsets, sizes), shared)


def _loaded(data: Any) -> tuple:
    """A road's payload unpickled: as packed (bytes), or already on arrival (see ``_received``)."""
    return pickle.loads(data) if isinstance(data, (bytes, bytearray, memoryview)) else data


def unpack_spilled(payload: tuple) -> Any:
    """The batch again from its spill file (read as raw bytes, then removed) and the structure that
    came through the pipe."""
    path, total, offsets, sizes, structure, tensors = payload
    data = read_spill(path, total)
    return decode(structure, tensors, piece_views(data, offsets, sizes))


# -- collate into the ring, or into plain memory ------------------------------------------------------

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


def _stackable(obj: Any) -> bool:
    """Plain CPU tensors: their bytes can be stacked into the ring and viewed again."""
    return (type(obj) is torch.Tensor and obj.device.type == "cpu" and obj.layout == torch.strided
            and not obj.is_nested and not obj.requires_grad and not obj.is_quantized)


def _stack_tensors(batch, *, collate_fn_map=None):
    """``default_collate``'s rule for tensors, its output in the arena when one is open, else in
    ordinary memory (never in fresh shm: torch's failed allocations leave files behind)."""
    elem = batch[0]
    writer = _stacking_writer
    if writer is None or not all(_stackable(t) and t.shape == elem.shape and t.dtype == elem.dtype for t in batch):
        with _torch.hidden_worker_info():  # the error, a subclass, or an odd tensor: torch's own rule
            return collate_tensor_fn(batch, collate_fn_map=collate_fn_map)
    out = writer.alloc(elem.nbytes * len(batch)).view(elem.dtype).view(len(batch), *elem.shape)
    return torch.stack(batch, 0, out=out)


_STACKING_MAP = {**default_collate_fn_map, torch.Tensor: _stack_tensors}


def _collate_into_ring(samples: List[Any]) -> Any:
    """``default_collate`` whose stacked tensors land in the open batch of the arena."""
    return collate(samples, collate_fn_map=_STACKING_MAP)


def _collate_plain(samples: List[Any]) -> Any:
    """``default_collate`` in ordinary memory, the worker info left as it is for everything else."""
    return collate(samples, collate_fn_map=_STACKING_MAP)


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


#: A worker's ``oom_score_adj``: the OOM killer takes a worker before the main process. The main process
#: maps every arena, so by resident size it would often be the one killed, and with it the job; a dead
#: worker is a failure the loader recovers from (``Cause.OOM_KILLED``).
WORKER_OOM_SCORE_ADJ = 1000


def _first_for_the_oom_killer() -> None:
    """Raise this process's ``oom_score_adj`` (raising needs no privilege; where it cannot be written,
    e.g. no /proc, nothing changes)."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(WORKER_OOM_SCORE_ADJ))
    except OSError:
        pass


_forking_workers = False


@contextlib.contextmanager
def forking_workers() -> Iterator[None]:
    """While our workers are forked: each child raises its ``oom_score_adj`` at once, not only in
    ``WorkerSetup``. A fork copies the parent's resident size and its score, so until then an OOM kill
    (a worker of the last iterator may still be using memory) could take the main process."""
    global _forking_workers
    _forking_workers = True
    try:
        yield
    finally:
        _forking_workers = False


def _after_fork_in_child() -> None:
    if _forking_workers:
        _first_for_the_oom_killer()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class WorkerSetup:
    """``worker_init_fn`` wrapper: sharing strategy and fd limit first, then the user's own."""

    def __init__(self, user_fn: Optional[Callable[[int], None]], sharing_strategy: str,
                 fd_soft_limit: Optional[int], heap_copies: bool = False) -> None:
        self.user_fn = user_fn
        self.sharing_strategy = sharing_strategy
        self.fd_soft_limit = fd_soft_limit
        self.heap_copies = heap_copies  # count the pages copied on write too (under a memory limit)

    def __call__(self, worker_id: int) -> None:
        mark_heap_base(self.heap_copies)  # before the user's init: what it allocates is this worker's memory too
        _first_for_the_oom_killer()
        if torch.multiprocessing.get_sharing_strategy() != self.sharing_strategy:
            torch.multiprocessing.set_sharing_strategy(self.sharing_strategy)
        if self.fd_soft_limit is not None:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            if soft < self.fd_soft_limit <= hard:
                resource.setrlimit(resource.RLIMIT_NOFILE, (self.fd_soft_limit, hard))
        if self.user_fn is not None:
            self.user_fn(worker_id)
