"""The ``adaptive-loader`` command: ``watch`` a running job's telemetry, ``report`` a finished one."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Iterator, List, Optional

from rich.console import Console

from .dashboard import Dashboard
from .report import write_report


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="adaptive-loader", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    watch = sub.add_parser("watch", help="live dashboard of a JSONL telemetry file")
    watch.add_argument("path")
    watch.add_argument("--total", type=int, help="samples per epoch, for the progress bar and ETA")
    watch.add_argument("--once", action="store_true", help="draw what the file holds now and exit")
    watch.add_argument("--safety", type=float, default=0.8)
    report = sub.add_parser("report", help="plots of a JSONL telemetry file")
    report.add_argument("path")
    report.add_argument("-o", "--output", default="report.png")
    report.add_argument("--html", help="also write an HTML page with the plots and the events")
    report.add_argument("--safety", type=float, default=0.8)
    args = parser.parse_args(argv)
    if args.command == "report":
        write_report(args.path, args.output, args.html, args.safety)
        print(f"wrote {args.output}" + (f" and {args.html}" if args.html else ""))
        return 0
    return watch_file(args.path, total=args.total, once=args.once, safety=args.safety)


def watch_file(path: str, *, total: Optional[int] = None, once: bool = False, safety: float = 0.8,
               console: Optional[Console] = None, stop: Optional[threading.Event] = None,
               poll: float = 0.25) -> int:
    """Follow ``path`` like ``tail -f`` and draw the dashboard until the epoch
    ends, ``stop`` is set, or Ctrl-C. ``once``: draw what the file holds and exit."""
    dashboard = Dashboard(total_samples=total, safety=safety, console=console)
    try:
        if once:
            for record in _records(path, follow=False):
                dashboard.fold(record)
            dashboard.console.print(dashboard.render())
            return 0
        with dashboard:
            for record in _records(path, follow=True, stop=stop, poll=poll):
                dashboard.fold(record)
                if record.get("event") == "epoch_end":
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
                    yield json.loads(pending)
                except json.JSONDecodeError:
                    pass
                pending = ""
            elif not follow or (stop is not None and stop.is_set()):
                return
            else:
                time.sleep(poll)  # at the end, or a line still being written


if __name__ == "__main__":
    sys.exit(main())
