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

__all__ = ["SCHEMA_VERSION", "BATCH_FIELDS", "EVENT_FIELDS", "EVENT_KINDS", "Telemetry", "JsonlSink"]

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
#: The values of an event record's ``event`` key.
EVENT_KINDS = ("budget", "off_shm", "fewer_in_flight", "fd_limit", "sharing_strategy", "recovery",
               "stall", "warning", "epoch_end")

Record = Dict[str, Any]
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


class Telemetry:
    """Fans records out to logging and the user's sinks."""

    def __init__(self, spec: SinkSpec = None) -> None:
        self.sinks: List[Callable[[Record], None]] = _make_sinks(spec)

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
        for sink in self.sinks:
            if isinstance(sink, JsonlSink):
                sink.close()


def _make_sinks(spec: SinkSpec) -> List[Callable[[Record], None]]:
    if spec is None:
        return []
    if isinstance(spec, (str, os.PathLike)):
        return [JsonlSink(spec)]
    if callable(spec):
        return [spec]
    if isinstance(spec, (list, tuple)):
        return [sink for item in spec for sink in _make_sinks(item)]
    raise TypeError(f"telemetry must be a path, a callable, or a list of them, not {type(spec).__name__}")
