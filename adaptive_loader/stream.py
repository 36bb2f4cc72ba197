"""Streams, worker side: batch an IterableDataset under the budget in force, and say where each batch came from.

On the map-style road the main process plans (the sampler) and the workers
fetch. A stream cannot be planned from outside: only the worker that reads
its shards knows what comes next. So here each worker wraps its share of the
user's stream in a :class:`StreamBatcher`: it reads samples, costs them,
keeps them in a small bucketing buffer and sends batches that fit the budget
the main process publishes in shared memory (:class:`SharedBudget`; a new
budget reaches a worker at its next batch, and each batch carries the version
it was packed under).

Every batch says which samples of its worker's stream it holds (their
positions, counted from the start of the worker's stream this epoch) and,
for a dataset with ``state_dict()``, a state from which the rest can be read
again. The main process commits that when the batch reaches the user
(:mod:`~adaptive_loader.stream_plan`); a worker started again after a failure
gets a :class:`Resume` and reads on from there, skipping what was delivered.
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from .packing import pack_padded, pack_pool
from .region import MEMFD, SHM, SharedRegion, memfd_available
from .transport import Envelope, MeasuredCollate

__all__ = ["SharedBudget", "StreamBatcher", "StreamBatch", "StreamMeta", "Resume", "StreamNotDeterministic",
           "sample_key", "fold_key", "is_stateful", "StreamCollate", "FirstOf"]

logger = logging.getLogger("adaptive_loader")

#: Samples a worker may hold back before the oldest one goes out in whatever batch packs it.
AGE_LIMIT_BUFFERS = 2
#: While the budget is below the user's cap, or the main process caps the buffer (under a memory limit), a
#: worker's buffer holds samples worth at most this many budgets
BUFFER_BATCHES = 1


class StreamNotDeterministic(RuntimeError):
    """A stream read again gave other samples than it gave the first time: resuming it would
    deliver some twice and lose others."""


def is_stateful(dataset: Any) -> bool:
    """Whether ``dataset`` follows the Stateful protocol (``state_dict``/``load_state_dict``)."""
    return callable(getattr(dataset, "state_dict", None)) and callable(getattr(dataset, "load_state_dict", None))


def sample_key(sample: Any) -> Optional[str]:
    """A sample's own name, if it carries one: ``__key__`` (WebDataset), ``key`` or ``id`` in a dict,
    or a string first element of a tuple. Used to tell a stream read again from a different one."""
    if isinstance(sample, dict):
        for name in ("__key__", "key", "id"):
            value = sample.get(name)
            if value is not None:
                return str(value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value)
        return None
    if isinstance(sample, (tuple, list)) and sample and isinstance(sample[0], str):
        return sample[0]
    return None


def fold_key(digest: str, key: Optional[str]) -> str:
    """The running digest of a worker's keys in stream order, one more key folded in (``""`` to start)."""
    h = hashlib.blake2b(digest.encode(), digest_size=16)
    h.update(b"\x00" if key is None else key.encode() + b"\x01")
    return h.hexdigest()


class SharedBudget:
    """The budget (version, max_cost, max_batch_size, buffer cap) in a few bytes of shared memory:
    the main process writes, workers read at each batch. The version is written last and read
    first and last, so a worker never packs under half an update. Pickles as its region's fd."""

    def __init__(self, region: Optional[SharedRegion] = None) -> None:
        if region is None:
            region = _small_region(32)
        self.region = region
        self.values = region.array[:32].view(np.float64)

    def publish(self, max_cost: float, max_batch_size: Optional[int], buffer_cap: float = math.inf) -> int:
        version = int(self.values[0]) + 1
        self.values[1] = max_cost
        self.values[2] = math.inf if max_batch_size is None else max_batch_size
        self.values[3] = buffer_cap
        self.values[0] = version
        return version

    def read(self) -> Tuple[int, float, float, float]:
        """``(version, max_cost, max_batch_size, buffer_cap)``; no cap is ``inf``."""
        while True:
            version = self.values[0]
            max_cost, size, cap = float(self.values[1]), float(self.values[2]), float(self.values[3])
            if self.values[0] == version:
                return int(version), max_cost, size, cap

    def __reduce__(self):
        return SharedBudget, (self.region,)


def _small_region(nbytes: int) -> SharedRegion:
    last: Optional[OSError] = None
    for kind in (MEMFD, SHM) if memfd_available() else (SHM,):
        try:
            return SharedRegion.create(nbytes, kind)
        except OSError as exc:
            last = exc
    raise OSError(f"no shared memory for the stream's budget ({nbytes} bytes): {last}")


@dataclass
class Resume:
    """Where a worker's stream goes on: from ``start`` (with ``state``, the dataset's state there,
    or from the beginning when None), skipping the positions in ``delivered``. ``digest`` is the
    running digest of the keys below ``low`` (every position below it was delivered), to check a
    stream replayed from its beginning; ``keys`` the keys of the positions in ``delivered``."""

    start: int = 0
    state: Any = None
    low: int = 0
    delivered: Set[int] = field(default_factory=set)
    digest: str = ""
    keys: Dict[int, Optional[str]] = field(default_factory=dict)
    done: bool = False


@dataclass
class StreamMeta:
    """What a batch says of itself (travels in ``BatchStats.stream``)."""

    worker: int
    positions: List[int]
    costs: List[float]  # in the budget's units
    version: int
    keys: List[Optional[str]]
    low: int  # every position of this worker below it is in this batch or an earlier one
    state: Any = None  # the dataset's state at ``low``, if it has one
    last: bool = False  # the worker's stream ended with this batch
    drop: bool = False  # drop_last: a short last batch, committed but not handed to the user
    passthrough: bool = False  # the dataset batched itself: one position is one batch
    repeat: bool = False  # uneven="pad": a rank that ran dry hands this batch out again


@dataclass
class StreamBatch:
    """A worker's batch before collation: the samples and what they are."""

    samples: List[Any]
    meta: StreamMeta


@dataclass
class _Item:
    position: int
    sample: Any
    cost: float
    group: Any
    key: Optional[str]


class StreamBatcher(IterableDataset):
    """Wraps the user's stream; in each worker it yields :class:`StreamBatch` es.

    Args:
        dataset: the user's IterableDataset (it sees ``get_worker_info()`` as under DataLoader).
        budget: the :class:`SharedBudget` the main process publishes.
        costs: ``costs(sample) -> number`` (e.g. objects per image); None: batches by count,
            in stream order, as DataLoader makes them.
        group_fn: ``group_fn(sample) -> hashable``: a batch never mixes groups.
        cost: ``"sum"`` or ``"padded"`` (a batch costs ``len * max``); quadratic: ``c + q*c**2``.
        buffer_size: samples each worker holds to pack from (costs only).
        passthrough: the dataset yields batches itself (``batch_size=None``): each goes as it is.
        drop_last: a worker's last batch, if short of ``max_batch_size``, is not handed out.
        user_max_cost: the user's cap (a sample above it is warned of; above the budget only, it goes alone).
    """

    def __init__(self, dataset: Any, budget: SharedBudget, *, costs: Optional[Callable[[Any], float]] = None,
                 group_fn: Optional[Callable[[Any], Any]] = None, cost: str = "sum", quadratic: float = 0.0,
                 buffer_size: int = 64, passthrough: bool = False, drop_last: bool = False,
                 user_max_cost: float = math.inf) -> None:
        self.dataset = dataset
        self.budget = budget
        self.costs = costs
        self.group_fn = group_fn
        self.padded = cost == "padded"
        self.quadratic = quadratic
        self.buffer_size = buffer_size
        self.passthrough = passthrough
        self.drop_last = drop_last
        self.user_max_cost = user_max_cost
        self.resume: Dict[int, Resume] = {}  # by worker id, set by the main process before workers start
        self.stateful = is_stateful(dataset)

    def __iter__(self) -> Iterator[StreamBatch]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        return _WorkerStream(self, worker, self.resume.get(worker, Resume())).batches()


class _WorkerStream:
    """One worker's pass over its share of the stream."""

    def __init__(self, batcher: StreamBatcher, worker: int, resume: Resume) -> None:
        self.b = batcher
        self.worker = worker
        self.resume = resume
        self.position = resume.start  # the position of the next sample read
        self.buffer: List[_Item] = []
        self.replayed = ""  # the digest of the keys of replayed positions below resume.low
        self.states: Dict[int, Any] = {self.position: resume.state}  # the dataset's state before each position
        self.warned_oversized = False

    def batches(self) -> Iterator[StreamBatch]:
        if self.resume.done:
            return
        dataset = self.b.dataset
        if self.resume.state is not None:
            dataset.load_state_dict(self.resume.state)
        source = iter(dataset)
        exhausted = False
        while True:
            while not exhausted and self._wants_more():
                exhausted = not self._read(source)
            batch = self._next_batch(final=exhausted)
            if batch is None:
                if exhausted:
                    return
                continue
            yield batch

    # -- reading -------------------------------------------------------------------------
    def _wants_more(self) -> bool:
        """Whether to read another sample before the next batch. By cost: until the buffer holds
        ``buffer_size`` samples (fewer while the main process caps it: before anything is measured,
        and for good under a memory limit), and, while the budget is below the user's cap or the
        buffer is capped, samples worth ``BUFFER_BATCHES`` budgets: the buffer is memory too."""
        _, max_cost, size, cap = self.b.budget.read()
        if self.b.passthrough or self.b.costs is None:
            return len(self.buffer) < (1 if self.b.passthrough else max(1, int(min(size, max_cost))))
        if len(self.buffer) >= min(self.b.buffer_size, cap):
            return False
        if max_cost < self.b.user_max_cost or math.isfinite(cap):
            return sum(item.cost for item in self.buffer) < BUFFER_BATCHES * max_cost
        return True

    def _read(self, source: Iterator[Any]) -> bool:
        """Read the next sample that was not delivered yet; False at the end of the stream."""
        while True:
            try:
                sample = next(source)
            except StopIteration:
                self._check_replay_complete()
                return False
            position, key = self.position, sample_key(sample)
            self.position += 1
            if self.b.stateful:
                self.states[self.position] = self.b.dataset.state_dict()
            if self._already_delivered(position, key):
                self.states.pop(position, None)
                continue
            self.buffer.append(_Item(position, sample, self._cost(sample), self._group(sample), key))
            return True

    def _already_delivered(self, position: int, key: Optional[str]) -> bool:
        resume = self.resume
        if position < resume.low:
            self.replayed = fold_key(self.replayed, key)
            if position == resume.low - 1:
                self._check_digest()
            return True
        if position in resume.delivered:
            known = resume.keys.get(position)
            if known is not None and key != known:
                raise StreamNotDeterministic(
                    f"worker {self.worker}: read again, position {position} of its stream is {key!r}, but "
                    f"{known!r} was delivered there: the stream is not deterministic, so resuming it would deliver "
                    f"some samples twice and lose others. Make the stream's order depend only on the epoch "
                    f"(seeded shuffles), or give the dataset state_dict()/load_state_dict()")
            return True
        return False

    def _check_digest(self) -> None:
        resume = self.resume
        if resume.state is None and resume.digest and self.replayed != resume.digest:
            raise StreamNotDeterministic(
                f"worker {self.worker}: read again from its beginning, the first {resume.low} samples of its stream "
                f"carry other keys than those delivered: the stream is not deterministic, so resuming it would "
                f"deliver some samples twice and lose others. Make the stream's order depend only on the epoch "
                f"(seeded shuffles), or give the dataset state_dict()/load_state_dict()")

    def _check_replay_complete(self) -> None:
        missing = [p for p in self.resume.delivered if p >= self.position] + (
            [self.resume.low - 1] if self.position < self.resume.low else [])
        if missing:
            raise StreamNotDeterministic(
                f"worker {self.worker}: read again, its stream ended at position {self.position}, before position "
                f"{max(missing)} that was delivered: the stream is not deterministic (or shorter than before)")

    def _cost(self, sample: Any) -> float:
        if self.b.costs is None:
            return 1.0
        c = float(self.b.costs(sample))
        if not math.isfinite(c) or c < 0:
            raise ValueError(f"costs(sample) gave {c!r}: a cost must be a finite number >= 0")
        return c + self.b.quadratic * c * c

    def _group(self, sample: Any) -> Any:
        return self.b.group_fn(sample) if self.b.group_fn is not None else None

    # -- batching --------------------------------------------------------------------------
    def _next_batch(self, final: bool) -> Optional[StreamBatch]:
        if not self.buffer:
            return None
        version, max_cost, size, _ = self.b.budget.read()
        if self.b.passthrough:
            chosen = [0]
        elif self.b.costs is None:
            chosen = list(range(min(len(self.buffer), max(1, int(min(size, max_cost))))))
        else:
            chosen = self._pack(max_cost, size, final)
            if chosen is None:
                return None
        items = [self.buffer[i] for i in chosen]
        taken = set(chosen)
        self.buffer = [item for i, item in enumerate(self.buffer) if i not in taken]
        last = final and not self.buffer
        drop = last and self.b.drop_last and not self.b.passthrough and len(items) < size < math.inf
        return StreamBatch([item.sample for item in items], self._meta(items, version, last, drop))

    def _meta(self, items: List[_Item], version: int, last: bool, drop: bool) -> StreamMeta:
        low = min((item.position for item in self.buffer), default=self.position)
        state = None
        if self.b.stateful:
            state = self.states.get(low)
            for position in [p for p in self.states if p < low]:
                del self.states[position]
        return StreamMeta(worker=self.worker, positions=[item.position for item in items],
                          costs=[item.cost for item in items], version=version,
                          keys=[item.key for item in items], low=low, state=state, last=last, drop=drop,
                          passthrough=self.b.passthrough)

    def _pack(self, max_cost: float, size: float, final: bool) -> Optional[List[int]]:
        """The buffer positions of the next batch: an oversized sample alone; the batch of the
        oldest sample once it has waited too long; else the fullest batch a packing of the buffer
        makes. Before the stream ends, only from a full buffer (see :meth:`_wants_more`)."""
        buffer = self.buffer
        if not final and self._wants_more():
            return None
        for i, item in enumerate(buffer):
            if item.cost > max_cost:
                if item.cost > self.b.user_max_cost:
                    self._warn_oversized(item.cost, self.b.user_max_cost)
                return [i]
        cap = len(buffer) if math.isinf(size) else max(1, int(size))
        batches: List[Tuple[float, List[int]]] = []  # (fill, buffer positions)
        groups: Dict[Any, List[int]] = {}
        for i, item in enumerate(buffer):
            groups.setdefault(item.group, []).append(i)
        oldest = 0
        for members in groups.values():
            costs = np.array([buffer[i].cost for i in members], np.float64)
            assigned = (pack_padded(costs, max_cost, cap, leave_partial=not final) if self.b.padded
                        else pack_pool(costs, max_cost, cap))
            for b in range(int(assigned.max()) + 1 if len(assigned) else 0):
                chosen = [members[j] for j in np.flatnonzero(assigned == b)]
                if not chosen:
                    continue
                total = (len(chosen) * float(costs[assigned == b].max())) if self.b.padded else float(
                    costs[assigned == b].sum())
                fill = max(len(chosen) / cap, total / max_cost if math.isfinite(max_cost) and max_cost > 0 else 0)
                waited = self.position - buffer[oldest].position
                if oldest in chosen and waited > AGE_LIMIT_BUFFERS * self.b.buffer_size:
                    return chosen
                batches.append((fill, chosen))
        if not batches:  # nothing placed (cannot happen with costs <= max_cost): the oldest alone
            return [0]
        return max(batches, key=lambda fb: (fb[0], -min(fb[1])))[1]

    def _warn_oversized(self, cost: float, max_cost: float) -> None:
        if not self.warned_oversized:
            self.warned_oversized = True
            warnings.warn(f"a sample of cost {cost:g} > max_cost {max_cost:g} goes in a batch of its own "
                          f"(worker {self.worker}; said once per worker and epoch)", stacklevel=2)


class StreamCollate:
    """The workers' collate for a stream: the measuring collate over a :class:`StreamBatch`'s samples,
    with the batch's :class:`StreamMeta` in its stats."""

    def __init__(self, measured: MeasuredCollate) -> None:
        self.measured = measured

    def __call__(self, batch: StreamBatch) -> Envelope:
        envelope = self.measured(batch.samples)
        envelope.stats.stream = batch.meta
        return envelope


class FirstOf:
    """Collate for a dataset that batches itself (``batch_size=None``): the one item, through the
    user's ``collate_fn`` (DataLoader's ``default_convert`` if none)."""

    def __init__(self, collate_fn: Callable[[Any], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, samples: List[Any]) -> Any:
        return self.collate_fn(samples[0])
