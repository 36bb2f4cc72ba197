"""The ``adaptive-loader`` command: ``watch`` a running job's telemetry, ``report`` a finished one."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional

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
               console: Optional[Console] = None, poll: float = 0.25) -> int:
    """Follow ``path`` like ``tail -f`` and draw the dashboard until the epoch ends (or Ctrl-C)."""
    dashboard = Dashboard(total_samples=total, safety=safety, console=console)
    try:
        with open(path, encoding="utf-8") as f:
            if once:
                for line in f:
                    _feed(dashboard, line)
                dashboard.console.print(dashboard.render())
                return 0
            with dashboard:
                pending = ""
                while True:
                    chunk = f.readline()
                    if not chunk:
                        time.sleep(poll)
                        continue
                    pending += chunk
                    if not pending.endswith("\n"):
                        continue  # a line still being written
                    if _feed(dashboard, pending) == "epoch_end":
                        return 0
                    pending = ""
    except KeyboardInterrupt:
        return 0


def _feed(dashboard: Dashboard, line: str) -> Optional[str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    with dashboard._lock:
        dashboard.state.add(record)
    return record.get("event")


if __name__ == "__main__":
    sys.exit(main())
