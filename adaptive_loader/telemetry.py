"""Records of what the loader saw and decided, and where they go.

One record per batch (``kind="batch"``) and one per decision or incident
(``kind="event"``), as flat JSON-able dicts with a schema version. Every
record goes to ``logging.getLogger("adaptive_loader")`` (batches at DEBUG,
events at INFO or WARNING, repeated events summarised) and to the sinks chosen
with ``telemetry=``. A sink is anything with ``record(dict)`` and ``close()``
(:class:`Sink`), or a plain callable; named sinks (``"dashboard"``) are
registered with :func:`register_sink` and imported only when asked for.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from typing import Protocol, runtime_checkable

from .kinds import Event, Fallback, Road

__all__ = ["SCHEMA_VERSION", "BATCH_FIELDS", "OPTIONAL_BATCH_FIELDS", "EVENT_FIELDS", "EVENT_KINDS",
           "FALLBACK_KINDS", "FIELD_TYPES", "TRANSPORTS", "RUN_END", "Sink", "Telemetry", "JsonlSink",
           "TensorBoardSink", "CallableSink", "LogSink", "register_sink", "make_sinks", "validate_record"]

logger = logging.getLogger("adaptive_loader")

SCHEMA_VERSION = 1

#: Every batch record has these keys.
BATCH_FIELDS = (
    "schema", "kind", "time", "step", "epoch", "samples", "cost", "bytes", "storages", "max_cost",
    "shm_free", "shm_total", "shm_ours", "fds_in_use", "fd_limit", "ram_available", "worker_rss",
    "transport", "worker", "wait_s", "samples_per_s",
)
#: Batch keys a record may carry or leave out (``None``: not measured).
OPTIONAL_BATCH_FIELDS = ("memory_limit", "memory_used", "memory_ours", "budget_version")  # the last: streams
#: Every event record has exactly these keys.
EVENT_FIELDS = ("schema", "kind", "time", "step", "epoch", "event", "level", "message", "data")
#: The fallbacks, as counted in ``AdaptiveLoader.fallbacks`` and the dashboard.
FALLBACK_KINDS = tuple(kind.value for kind in Fallback)
# The loader was closed: no more records follow. Until kinds.Event has the member, the plain string.
RUN_END = getattr(Event, "RUN_END", "run_end")
#: The values of an event record's ``event`` key.
EVENT_KINDS = tuple(dict.fromkeys([kind.value for kind in Event] + [str(RUN_END)]))
#: The values of a batch record's ``transport`` key.
TRANSPORTS = tuple(road.value for road in Road)

_OPTIONAL_INT = (int, type(None))
#: The type of each field; a tuple means "one of".
FIELD_TYPES: Dict[str, Any] = {
    "schema": int, "kind": str, "time": float, "step": int, "epoch": int, "samples": int, "cost": (int, float),
    "bytes": int, "storages": int, "max_cost": (int, float, type(None)), "shm_free": int, "shm_total": int,
    "shm_ours": int, "fds_in_use": int, "fd_limit": int, "ram_available": _OPTIONAL_INT,
    "worker_rss": _OPTIONAL_INT, "transport": str, "worker": int, "wait_s": float,
    "samples_per_s": (float, type(None)), "event": str, "level": str, "message": str, "data": dict,
    "memory_limit": _OPTIONAL_INT, "memory_used": _OPTIONAL_INT, "memory_ours": _OPTIONAL_INT, "budget_version": int,
}

Record = Dict[str, Any]


def validate_record(record: Record) -> None:
    """Raise ``ValueError`` naming the first way ``record`` departs from the schema."""
    kind = record.get("kind")
    fields = {"batch": BATCH_FIELDS, "event": EVENT_FIELDS}.get(kind)
    if fields is None:
        raise ValueError(f"kind must be 'batch' or 'event', got {kind!r}")
    if record.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"schema must be {SCHEMA_VERSION}, got {record.get('schema')!r}")
    optional = set(OPTIONAL_BATCH_FIELDS) if kind == "batch" else set()
    missing, extra = set(fields) - set(record), set(record) - set(fields) - optional
    if missing or extra:
        raise ValueError(f"{kind} record keys differ: missing {sorted(missing)}, extra {sorted(extra)}")
    for key in record:
        expected = FIELD_TYPES[key]
        if isinstance(record[key], bool) or not isinstance(record[key], expected):
            raise ValueError(f"{key} = {record[key]!r} is not {expected}")
    if kind == "batch" and record["transport"] not in TRANSPORTS:
        raise ValueError(f"transport {record['transport']!r} not in {TRANSPORTS}")
    if kind == "event" and record["event"] not in EVENT_KINDS:
        raise ValueError(f"event {record['event']!r} not in {EVENT_KINDS}")


@runtime_checkable
class Sink(Protocol):
    """Where records go: ``record`` is called once per record (keep it cheap, it runs on the
    loading path), ``close`` once at the end."""

    def record(self, record: Record) -> None: ...

    def close(self) -> None: ...


SinkSpec = Union[None, str, "os.PathLike[str]", Sink, Callable[[Record], None], Sequence[Any]]


class CallableSink:
    """A plain callable taking a record, as a :class:`Sink` (``close`` does nothing)."""

    def __init__(self, function: Callable[[Record], None]) -> None:
        self.function = function

    def record(self, record: Record) -> None:
        self.function(record)

    def close(self) -> None:
        pass


class JsonlSink:
    """Appends one JSON line per record to a file, flushed per line."""

    def __init__(self, path: Union[str, "os.PathLike[str]"]) -> None:
        directory = os.path.dirname(os.fspath(path)) or "."
        if not os.path.isdir(directory):
            raise ValueError(f"telemetry path {os.fspath(path)!r}: directory {directory!r} does not exist")
        self.path = os.fspath(path)
        # 0o600: the records name paths, sizes and pids; another user has no business reading them
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._file = open(fd, "a", buffering=1, encoding="utf-8")
        self._lock = threading.Lock()

    def record(self, record: Record) -> None:
        line = json.dumps(record, separators=(",", ":"))
        with self._lock:
            self._file.write(line + "\n")

    __call__ = record

    def close(self) -> None:
        self._file.close()


class TensorBoardSink:
    """Batch fields as TensorBoard scalars (``torch.utils.tensorboard``), events as text."""

    SCALARS = ("samples", "cost", "bytes", "max_cost", "shm_free", "shm_ours", "memory_used", "memory_ours",
               "fds_in_use", "wait_s", "samples_per_s")

    def __init__(self, log_dir: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(f"telemetry='tensorboard:{log_dir}' needs the tensorboard package "
                              f"(pip install tensorboard): {exc}") from exc
        self.writer = SummaryWriter(log_dir)

    def record(self, record: Record) -> None:
        if record["kind"] == "batch":
            for key in self.SCALARS:
                if record.get(key) is not None:
                    self.writer.add_scalar(f"adaptive_loader/{key}", record[key], record["step"])
        else:
            self.writer.add_text(f"adaptive_loader/{record['event']}", record["message"], record["step"])

    __call__ = record

    def close(self) -> None:
        self.writer.close()


#: Events that can come once per batch: the first of a run of them is logged in full, the rest summarised.
AGGREGATED = (Event.OFF_SHM.value, Event.BUDGET.value)
_WHAT = {Event.OFF_SHM.value: "more batches went through a spill file (slower than shm; nothing is lost)",
         Event.BUDGET.value: "more budget changes"}


class LogSink:
    """Events to ``logging``. Of each kind in :data:`AGGREGATED`, the first per epoch is logged in
    full; later ones are counted and logged as one summary line every ``every`` seconds and at
    the end of the epoch, so a run that spills 200 batches logs a few lines, not 200."""

    def __init__(self, log: logging.Logger = logger, every: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log, self.every, self.clock = log, every, clock
        self._lock = threading.Lock()
        self._pending: Dict[str, Tuple[int, int, Record, float]] = {}  # kind -> (count, first step, last, since)
        self._seen: Dict[str, int] = {}  # kind -> the epoch it was last logged in full

    def record(self, record: Record) -> None:
        if record.get("kind") != "event":
            return
        kind, level = record["event"], logging.getLevelName(record["level"])
        if not isinstance(level, int):
            level = logging.INFO
        lines: List[Tuple[int, str]] = []
        with self._lock:
            if kind in AGGREGATED and self._seen.get(kind) == record["epoch"]:
                count, first, _, since = self._pending.get(kind, (0, record["step"], record, self.clock()))
                self._pending[kind] = (count + 1, first, record, since)
                if self.clock() - since >= self.every:
                    lines.append(self._summary(kind))
            else:
                if kind in AGGREGATED:
                    self._seen[kind] = record["epoch"]
                if kind in (Event.EPOCH_END.value, RUN_END):
                    lines += [self._summary(k) for k in list(self._pending)]
                lines.append((level, f"{kind}: {record['message']}"))
        for line_level, text in lines:
            self.log.log(line_level, "%s", text)

    def _summary(self, kind: str) -> Tuple[int, str]:
        count, first, last, since = self._pending.pop(kind)
        text = f"{kind}: {count} {_WHAT.get(kind, 'more such events')} in epoch {last['epoch']}, steps {first}-" \
               f"{last['step']}, {self.clock() - since:.0f} s; the last: {last['message']}"
        level = logging.getLevelName(last["level"])
        return (level if isinstance(level, int) else logging.INFO), text

    def close(self) -> None:
        with self._lock:
            lines = [self._summary(k) for k in list(self._pending)]
        for level, text in lines:
            self.log.log(level, "%s", text)


_REGISTRY: Dict[str, Union[str, Callable[..., Any]]] = {
    # a name -> a factory, or "module:attribute" imported when first asked for
    "dashboard": "adaptive_loader.dashboard:Dashboard",
}


def register_sink(name: str, factory: Union[str, Callable[..., Any]]) -> None:
    """Make ``telemetry=name`` build a sink with ``factory(total_samples=..., safety=...)``;
    ``factory`` may be a ``"module:attribute"`` string, imported only when the name is used."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"a sink name is a non-empty string without ':', got {name!r}")
    if not (callable(factory) or (isinstance(factory, str) and ":" in factory)):
        raise TypeError(f"factory must be a callable or 'module:attribute', not {factory!r}")
    _REGISTRY[name] = factory


def _resolve(factory: Union[str, Callable[..., Any]]) -> Callable[..., Any]:
    if callable(factory):
        return factory
    module, attribute = factory.split(":", 1)
    return getattr(importlib.import_module(module), attribute)


def make_sinks(spec: SinkSpec, total_samples: Optional[int] = None, safety: float = 0.8) -> List[Sink]:
    """The sinks a ``telemetry=`` value stands for, each with ``record`` and ``close``."""
    if spec is None:
        return []
    if isinstance(spec, str) and spec in _REGISTRY:
        return [_resolve(_REGISTRY[spec])(total_samples=total_samples, safety=safety)]
    if isinstance(spec, str) and spec.startswith("tensorboard:"):
        return [TensorBoardSink(spec.split(":", 1)[1])]
    if isinstance(spec, (str, os.PathLike)):
        return [JsonlSink(spec)]
    if isinstance(spec, Sink):
        return [spec]
    if callable(spec):
        return [CallableSink(spec)]
    if isinstance(spec, (list, tuple)):
        return [sink for item in spec for sink in make_sinks(item, total_samples, safety)]
    raise TypeError(f"telemetry must be a path, a callable, {', '.join(map(repr, _REGISTRY))}, 'tensorboard:DIR', "
                    f"or a list of them, not {type(spec).__name__}")


class Telemetry:
    """Fans records out to logging and the user's sinks.

    ``spec`` is a JSONL path, a callable or :class:`Sink`, ``"dashboard"`` (a
    live terminal dashboard), ``"tensorboard:DIR"``, or a list of these.
    """

    def __init__(self, spec: SinkSpec = None, *, total_samples: Optional[int] = None, safety: float = 0.8,
                 log_every: float = 30.0) -> None:
        self._spec = (spec, total_samples, safety, log_every)
        self.sinks: List[Sink] = make_sinks(spec, total_samples, safety)
        self._log = LogSink(every=log_every)
        self._closed = False
        self._where = (0, 0)  # (step, epoch) of the last record, for the run_end event

    @property
    def wants_batches(self) -> bool:
        """Whether a batch record goes anywhere (sinks, or logging at DEBUG)."""
        return bool(self.sinks) or logger.isEnabledFor(logging.DEBUG)

    def batch(self, **fields: Any) -> Record:
        record = {"schema": SCHEMA_VERSION, "kind": "batch", "time": time.time(), **fields}
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("batch %(step)s: %(samples)s samples, cost %(cost)s, %(bytes)s B via %(transport)s, "
                         "max_cost %(max_cost)s, shm free %(shm_free)s", record)
        self._emit(record)
        return record

    def event(self, event: str, message: str, *, step: int, epoch: int, level: int = logging.INFO,
              **data: Any) -> Record:
        record = {"schema": SCHEMA_VERSION, "kind": "event", "time": time.time(), "step": step,
                  "epoch": epoch, "event": str(event), "level": logging.getLevelName(level), "message": message,
                  "data": data}
        self._log.record(record)
        self._emit(record)
        return record

    def _emit(self, record: Record) -> None:
        self._where = (record.get("step", 0), record.get("epoch", 0))
        for sink in self.sinks:
            sink.record(record)

    def reopen(self) -> None:
        """After :meth:`close`: the sinks again (files appended to, a new dashboard), for a loader
        iterated after it was closed."""
        if not self._closed:
            return
        spec, total_samples, safety, log_every = self._spec
        self.sinks = make_sinks(spec, total_samples, safety)
        self._log = LogSink(every=log_every)
        self._closed = False

    def close(self) -> None:
        """Say the run ended (a ``run_end`` event, for ``adaptive-loader watch``), then close the sinks
        this object opened (files, TensorBoard writers, the dashboard). A second call does nothing."""
        if self._closed:
            return
        self._closed = True
        if self.sinks:
            step, epoch = self._where
            record = {"schema": SCHEMA_VERSION, "kind": "event", "time": time.time(), "step": step,
                      "epoch": epoch, "event": str(RUN_END), "level": "INFO",
                      "message": "the loader was closed; no more records follow", "data": {}}
            self._emit(record)
        self._log.close()
        for sink in self.sinks:
            if not isinstance(sink, CallableSink):
                sink.close()
