"""Follow a JSONL telemetry file and draw the live dashboard from it (``adaptive-loader watch``).

The stress harness's demo uses it too, so it lives here rather than in the command line.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Iterator, Optional

from rich.console import Console

from .dashboard import Dashboard
from .telemetry import RUN_END as _RUN_END

__all__ = ["WatchError", "watch_file"]


class WatchError(Exception):
    """``once`` was asked of a file that does not exist or holds no telemetry record."""


def watch_file(path: str, *, total: Optional[int] = None, once: bool = False, safety: float = 0.8,
               console: Optional[Console] = None, stop: Optional[threading.Event] = None,
               poll: float = 0.25, quiet: bool = False) -> int:
    """Follow ``path`` like ``tail -f`` and draw the dashboard across epochs until the run
    ends (a ``run_end`` record), ``stop`` is set, or Ctrl-C. ``once``: draw what the file holds
    and exit; a file that does not exist or holds no record is then a :class:`WatchError`."""
    dashboard = Dashboard(total_samples=total, safety=safety, console=console)
    try:
        if once:
            if not os.path.exists(path):
                raise WatchError(f"{path}: no such file")
            records = 0
            for record in _records(path, follow=False):
                dashboard.fold(record)
                records += 1
            if not records:
                raise WatchError(f"{path}: no telemetry records in it")
            dashboard.console.print(dashboard.render())
            return 0
        if not os.path.exists(path) and not quiet:
            print(f"waiting for {path} to appear (a job writing telemetry={path!r}); Ctrl-C to stop",
                  file=sys.stderr)
        with dashboard:
            for record in _records(path, follow=True, stop=stop, poll=poll):
                dashboard.fold(record)
                if record.get("event") == _RUN_END:
                    break
        return 0
    except KeyboardInterrupt:
        return 0


def _records(path: str, *, follow: bool, stop: Optional[threading.Event] = None,
             poll: float = 0.25) -> Iterator[dict]:
    """Records of a JSONL file; with ``follow``, also those appended later."""
    while follow and not os.path.exists(path):
        if stop is not None and stop.is_set():
            return
        time.sleep(poll)
    with open(path, encoding="utf-8") as f:
        pending = ""
        while True:
            pending += f.readline()
            if pending.endswith("\n"):
                try:
                    record = json.loads(pending)
                except json.JSONDecodeError:
                    record = None
                if isinstance(record, dict) and record.get("kind") in ("batch", "event"):
                    yield record
                pending = ""
            elif not follow or (stop is not None and stop.is_set()):
                return
            else:
                time.sleep(poll)  # at the end, or a line still being written
