"""The adaptive-loader command: watch a running job's telemetry, report a finished one, run the stress harness."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import List, NoReturn, Optional

from .watch import WatchError, watch_file

#: Tells the harness the program name for its usage line (stress/__main__.py reads it).
STRESS_PROG_ENV = "ADAPTIVE_LOADER_STRESS_PROG"


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
    except (UsageError, WatchError) as exc:
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


def _stress(argv: List[str]) -> NoReturn:
    """Become the stress harness, ``python -m adaptive_loader.stress ARGV`` (``python -m stress`` in a
    clone without an install). The library never imports its harness (the harness imports the library),
    so the harness runs as its own program; exec, not a child, so that signals and the exit status are
    the harness's own. Does not return."""
    module = "adaptive_loader.stress" if importlib.util.find_spec("adaptive_loader.stress") else "stress"
    env = dict(os.environ, **{STRESS_PROG_ENV: "adaptive-loader stress"})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


if __name__ == "__main__":
    sys.exit(main())
