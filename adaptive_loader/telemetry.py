"""Records of what the loader saw and decided, and where they go.

One record per batch (``kind="batch"``) and one per decision or incident
(``kind="event"``), as flat JSON-able dicts with a schema version. Every
record goes to ``logging.getLogger("adaptive_loader")`` (batches at DEBUG,
events at INFO or WARNING) and to the sinks chosen with ``telemetry=``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

__all__ = ["SCHEMA_VERSION", "BATCH_FIELDS", "EVENT_FIELDS", "EVENT_KINDS", "FALLBACK_KINDS", "FIELD_TYPES", "Telemetry",
           "JsonlSink", "TensorBoardSink", "validate_record"]

logger = logging.getLogger("adaptive_loader")

SCHEMA_VERSION = 1

#: Every batch record has exactly these keys.
BATCH_FIELDS = (
    "schema", "kind", "time", "step", "epoch", "samples", "cost", "bytes", "storages", "max_cost",
    "shm_free", "shm_total", "shm_ours", "fds_in_use", "fd_limit", "ram_available", "worker_rss",
    "transport", "worker", "wait_s", "samples_per_s",
)
#: Every event record has exactly these keys.
EVENT_FIELDS = ("schema", "kind", "time", "step", "epoch", "event", "level", "message", "data")
#: The fallbacks, as counted in ``AdaptiveLoader.fallbacks`` and the dashboard.
FALLBACK_KINDS = ("off_shm", "fewer_in_flight", "fd_limit", "sharing_strategy", "recovery")
#: The values of an event record's ``event`` key.
EVENT_KINDS = ("budget", *FALLBACK_KINDS, "stall", "epoch_end")

#: The type of each field; a tuple means "one of".
FIELD_TYPES: Dict[str, Any] = {
    "schema": int, "kind": str, "time": float, "step": int, "epoch": int, "samples": int, "cost": (int, float),
    "bytes": int, "storages": int, "max_cost": (int, float, type(None)), "shm_free": int, "shm_total": int,
    "shm_ours": int, "fds_in_use": int, "fd_limit": int, "ram_available": (int, type(None)),
    "worker_rss": (int, type(None)), "transport": str, "worker": int, "wait_s": float,
    "samples_per_s": (float, type(None)), "event": str, "level": str, "message": str, "data": dict,
}
TRANSPORTS = ("arena", "shm", "file", "inline")

Record = Dict[str, Any]


def validate_record(record: Record) -> None:
    """Raise ``ValueError`` naming the first way ``record`` departs from the schema."""
    kind = record.get("kind")
    fields = {"batch": BATCH_FIELDS, "event": EVENT_FIELDS}.get(kind)
    if fields is None:
        raise ValueError(f"kind must be 'batch' or 'event', got {kind!r}")
    if record.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"schema must be {SCHEMA_VERSION}, got {record.get('schema')!r}")
    if set(record) != set(fields):
        raise ValueError(f"{kind} record keys differ: missing {sorted(set(fields) - set(record))}, "
                         f"extra {sorted(set(record) - set(fields))}")
    for key in fields:
        expected = FIELD_TYPES[key]
        if isinstance(record[key], bool) or not isinstance(record[key], expected):
            raise ValueError(f"{key} = {record[key]!r} is not {expected}")
    if kind == "batch" and record["transport"] not in TRANSPORTS:
        raise ValueError(f"transport {record['transport']!r} not in {TRANSPORTS}")
    if kind == "event" and record["event"] not in EVENT_KINDS:
        raise ValueError(f"event {record['event']!r} not in {EVENT_KINDS}")
SinkSpec = Union[None, str, "os.PathLike[str]", Callable[[Record], None], Sequence[Any]]


class JsonlSink:
    """Appends one JSON line per record to a file, flushed per line."""

    def __init__(self, path: Union[str, "os.PathLike[str]"]) -> None:
        directory = os.path.dirname(os.fspath(path)) or "."
        if not os.path.isdir(directory):
            raise ValueError(f"telemetry path {os.fspath(path)!r}: directory {directory!r} does not exist")
        self.path = os.fspath(path)
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")
        self._lock = threading.Lock()

    def __call__(self, record: Record) -> None:
        line = json.dumps(record, separators=(",", ":"))
        with self._lock:
            self._file.write(line + "\n")

    def close(self) -> None:
        self._file.close()


class TensorBoardSink:
    """Batch fields as TensorBoard scalars (``torch.utils.tensorboard``), events as text."""

    SCALARS = ("samples", "cost", "bytes", "max_cost", "shm_free", "shm_ours", "fds_in_use", "wait_s",
               "samples_per_s")

    def __init__(self, log_dir: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(f"telemetry='tensorboard:{log_dir}' needs the tensorboard package "
                              f"(pip install tensorboard): {exc}") from exc
        self.writer = SummaryWriter(log_dir)

    def __call__(self, record: Record) -> None:
        if record["kind"] == "batch":
            for key in self.SCALARS:
                if record.get(key) is not None:
                    self.writer.add_scalar(f"adaptive_loader/{key}", record[key], record["step"])
        else:
            self.writer.add_text(f"adaptive_loader/{record['event']}", record["message"], record["step"])

    def close(self) -> None:
        self.writer.close()


class Telemetry:
    """Fans records out to logging and the user's sinks.

    ``spec`` is a JSONL path, a callable, ``"dashboard"`` (a live terminal
    dashboard), ``"tensorboard:DIR"``, or a list of these.
    """

    def __init__(self, spec: SinkSpec = None, *, total_samples: Optional[int] = None, safety: float = 0.8) -> None:
        self.sinks: List[Callable[[Record], None]] = _make_sinks(spec, total_samples, safety)

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
                  "epoch": epoch, "event": event, "level": logging.getLevelName(level), "message": message,
                  "data": data}
        logger.log(level, "%s: %s", event, message)
        self._emit(record)
        return record

    def _emit(self, record: Record) -> None:
        for sink in self.sinks:
            sink(record)

    def close(self) -> None:
        """Close the sinks this object opened (files, TensorBoard writers, the dashboard)."""
        from .dashboard import Dashboard

        for sink in self.sinks:
            if isinstance(sink, (JsonlSink, TensorBoardSink)):
                sink.close()
            elif isinstance(sink, Dashboard):
                sink.stop()


def _make_sinks(spec: SinkSpec, total_samples: Optional[int], safety: float) -> List[Callable[[Record], None]]:
    if spec is None:
        return []
    if isinstance(spec, str) and spec == "dashboard":
        from .dashboard import Dashboard

        return [Dashboard(total_samples=total_samples, safety=safety)]
    if isinstance(spec, str) and spec.startswith("tensorboard:"):
        return [TensorBoardSink(spec.split(":", 1)[1])]
    if isinstance(spec, (str, os.PathLike)):
        return [JsonlSink(spec)]
    if callable(spec):
        return [spec]
    if isinstance(spec, (list, tuple)):
        return [sink for item in spec for sink in _make_sinks(item, total_samples, safety)]
    raise TypeError(f"telemetry must be a path, a callable, 'dashboard', 'tensorboard:DIR', or a list of "
                    f"them, not {type(spec).__name__}")
