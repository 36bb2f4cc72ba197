"""The adaptive-loader command: watch a running job's telemetry, report a finished one, run the stress harness."""

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
from .telemetry import RUN_END as _RUN_END


class UsageError(Exception):
    """A problem with what the user gave: printed as one line, exit status 2."""


def _safety(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line, every option with a plain-text help."""
    parser = argparse.ArgumentParser(prog="adaptive-loader", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{watch,report,stress}")
    watch = sub.add_parser("watch", help="live dashboard of a JSONL telemetry file, followed until the job ends",
                           description="Draw the live dashboard of a JSONL telemetry file (telemetry='run.jsonl'), "
                                       "following it across epochs until the loader is closed, or Ctrl-C.")
    watch.add_argument("path", help="the JSONL file the job writes (it may not exist yet)")
    watch.add_argument("--total", type=int, help="samples per epoch, for the progress bar and ETA")
    watch.add_argument("--once", action="store_true", help="draw what the file holds now and exit")
    watch.add_argument("--safety", type=_safety, default=0.8,
                       help="where the safety line of the /dev/shm gauge is drawn, as a fraction (default 0.8)")
    report = sub.add_parser("report", help="plots of a JSONL telemetry file (needs matplotlib)",
                            description="Plot a JSONL telemetry file into a PNG (and an HTML page).")
    report.add_argument("path", help="the JSONL telemetry file")
    report.add_argument("-o", "--output", help="the PNG to write (default report.png; an existing file is "
                                               "only replaced with --force or when named here)")
    report.add_argument("--force", action="store_true", help="replace report.png if it exists")
    report.add_argument("--html", help="also write an HTML page with the plots and the events")
    report.add_argument("--safety", type=_safety, default=0.8,
                        help="where the safety line is drawn, as a fraction (default 0.8)")
    sub.add_parser("stress", add_help=False, help="the stress harness (adaptive-loader stress --help)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["stress"]:
        return _stress(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "report":
            return _report(args)
        return watch_file(args.path, total=args.total, once=args.once, safety=args.safety)
    except UsageError as exc:
        print(f"adaptive-loader {args.command}: {exc}", file=sys.stderr)
        return 2


def _report(args) -> int:
    from .report import ReportError, write_report

    output = args.output or "report.png"
    if args.output is None and os.path.exists(output) and not args.force:
        raise UsageError(f"{output} exists; name the output with -o FILE, or pass --force to replace it")
    try:
        write_report(args.path, output, args.html, args.safety)
    except ReportError as exc:
        raise UsageError(str(exc)) from None
    except ImportError as exc:
        raise UsageError(f"the report needs matplotlib (pip install matplotlib): {exc}") from None
    print(f"wrote {output}" + (f" and {args.html}" if args.html else ""))
    return 0


def _stress(argv: List[str]) -> int:
    try:
        from .stress.__main__ import main as stress_main
    except ImportError:  # a clone without an install: the harness is the top-level stress/
        from stress.__main__ import main as stress_main
    return stress_main(argv, prog="adaptive-loader stress")


def watch_file(path: str, *, total: Optional[int] = None, once: bool = False, safety: float = 0.8,
               console: Optional[Console] = None, stop: Optional[threading.Event] = None,
               poll: float = 0.25, quiet: bool = False) -> int:
    """Follow ``path`` like ``tail -f`` and draw the dashboard across epochs until the run
    ends (a ``run_end`` record), ``stop`` is set, or Ctrl-C. ``once``: draw what the file holds
    and exit; a file that does not exist or holds no record is then a :class:`UsageError`."""
    dashboard = Dashboard(total_samples=total, safety=safety, console=console)
    try:
        if once:
            if not os.path.exists(path):
                raise UsageError(f"{path}: no such file")
            records = 0
            for record in _records(path, follow=False):
                dashboard.fold(record)
                records += 1
            if not records:
                raise UsageError(f"{path}: no telemetry records in it")
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


if __name__ == "__main__":
    sys.exit(main())
