"""The stress harness: vanilla DataLoader beside AdaptiveLoader in a private small /dev/shm.

From a clone: python -m stress {list,run,matrix,demo}; installed: adaptive-loader stress ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Any, Dict, List, Optional

from .child import LOADERS
from .harness import run_case
from .report import results_table, side_by_side
from .sandbox import parse_size, sandbox_available
from .scenarios import SCENARIOS, get


DEMO_SCENARIO = "detection"


def main(argv: Optional[List[str]] = None, prog: str = "python -m stress") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the scenarios and what each proves")
    run = sub.add_parser("run", help="one scenario")
    run.add_argument("scenario", choices=list(SCENARIOS))
    run.add_argument("--loader", choices=[*LOADERS, "both"], default="both",
                     help="both: vanilla and adaptive; adaptive-no-arena: a new shm block per batch")
    matrix = sub.add_parser("matrix", help="every scenario with both loaders")
    matrix.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset")
    matrix.add_argument("--loaders", default="vanilla,adaptive", help=f"comma-separated subset of {', '.join(LOADERS)}")
    demo = sub.add_parser("demo", help=f"the {DEMO_SCENARIO} scenario in 64 MiB: vanilla, then adaptive with its "
                                       f"live dashboard, then one picture of both")
    demo.add_argument("--scenario", choices=list(SCENARIOS), default=DEMO_SCENARIO,
                      help=f"the workload (default {DEMO_SCENARIO})")
    for p in (run, matrix, demo):
        p.add_argument("--shm-size", default="64M", help="size of the private /dev/shm (default 64M)")
        p.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
        p.add_argument("--epochs", type=int, default=3 if p is demo else 1,
                       help=f"epochs per run (default {3 if p is demo else 1}); every sample once in each")
        p.add_argument("--hang-after", type=float, default=20.0,
                       help="seconds without a batch that count as a hang (default 20)")
        p.add_argument("--quick", action="store_true", help="fewer samples (CI)")
        p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    demo.add_argument("--out", default="stress-results",
                      help="folder for the telemetry, the timelines and the picture (default stress-results)")
    args = parser.parse_args(argv)

    if args.command == "list":
        for scenario in SCENARIOS.values():
            print(f"{scenario.name:14} {scenario.proves}")
        return 0
    if args.epochs < 1 or args.workers < 0 or args.hang_after <= 0:
        parser.error("--epochs must be at least 1, --workers at least 0, --hang-after positive")
    ok, why = sandbox_available()
    if not ok:
        print(f"cannot run: {why}. Refusing to run on the machine's own /dev/shm.", file=sys.stderr)
        return 2
    shm = parse_size(args.shm_size)
    if args.command == "demo":
        return _demo(args, shm)
    names = [args.scenario] if args.command == "run" else [get(n.strip()).name for n in args.scenarios.split(",")]
    if args.command == "matrix":
        loaders = [name.strip() for name in args.loaders.split(",")]
        unknown = sorted(set(loaders) - set(LOADERS))
        if unknown:
            parser.error(f"unknown loader(s) {', '.join(unknown)}; choose from {', '.join(LOADERS)}")
    else:
        loaders = ["vanilla", "adaptive"] if args.loader == "both" else [args.loader]
    if args.command == "run" and get(args.scenario).loaders and args.loader != "both" \
            and args.loader not in get(args.scenario).loaders:
        parser.error(f"{args.scenario} runs with {', '.join(get(args.scenario).loaders)} only")
    results = [_run_with_progress(name, loader, shm, args) for name in names for loader in loaders
               if not get(name).loaders or loader in get(name).loaders]
    print(results_table(results))
    _write_json(args.json, results)
    bad = [r for r in results if r["loader"] != "vanilla" and not _adaptive_ok(r)]
    return 1 if bad else 0


def _demo(args, shm: int) -> int:
    name = args.scenario
    print(f"The {name} scenario in a private {shm / 2**20:.0f} MiB /dev/shm (a common container default), "
          f"{args.workers} workers, {args.epochs} epochs: {get(name).proves}.\n")
    os.makedirs(args.out, exist_ok=True)
    paths = {key: os.path.join(args.out, f"demo-{key}") for key in
             ("adaptive.jsonl", "vanilla-timeline.json", "adaptive-timeline.json", "report.png", "picture.png")}
    for path in paths.values():
        if os.path.exists(path):
            os.unlink(path)
    print(f"1. plain DataLoader: a run that delivers no batch for {args.hang_after:g} s is called a hang and killed.")
    vanilla = _run_with_progress(name, "vanilla", shm, args, timeline=paths["vanilla-timeline.json"])
    print(f"\n2. AdaptiveLoader on the same data, its live dashboard following {paths['adaptive.jsonl']}:")
    adaptive = _run_with_dashboard(name, shm, args, paths["adaptive.jsonl"], paths["adaptive-timeline.json"])
    print()
    print(side_by_side(vanilla, adaptive))
    for result in (vanilla, adaptive):
        if result["error"]:
            print(f"\n{result['loader']}: {result['error'][:400]}")
    _write_pictures(args, name, shm, paths)
    _write_json(args.json, [vanilla, adaptive])
    return 0 if _adaptive_ok(adaptive) else 1


def _run_with_dashboard(name: str, shm: int, args, telemetry: str, timeline: str) -> Dict[str, Any]:
    """The adaptive run, with the live dashboard following its telemetry file."""
    from adaptive_loader.cli import watch_file

    stop = threading.Event()
    total = len(get(name).build(shm, args.workers, args.quick).dataset)
    watcher = threading.Thread(target=watch_file, args=(telemetry,),
                               kwargs=dict(total=total, stop=stop, poll=0.1, quiet=True), daemon=True)
    watcher.start()
    try:
        result = run_case(name, "adaptive", shm_bytes=shm, workers=args.workers, quick=args.quick,
                          epochs=args.epochs, hang_after=args.hang_after, telemetry=telemetry, timeline=timeline)
    finally:
        stop.set()
        watcher.join(timeout=10)
    print(f"\n{name} / adaptive {result['outcome']:5} {result['delivered']}/{result['expected']} samples "
          f"in {result['seconds']:.1f} s; telemetry in {telemetry}")
    return result


def _write_pictures(args, name: str, shm: int, paths: Dict[str, str]) -> None:
    try:
        from .picture import write_picture

        write_picture([paths["vanilla-timeline.json"], paths["adaptive-timeline.json"]], paths["picture.png"],
                      title=f"{name} scenario, private {shm / 2**20:.0f} MiB /dev/shm, {args.workers} workers: "
                            f"DataLoader beside AdaptiveLoader")
        print(f"\npicture of both runs: {paths['picture.png']}")
        from adaptive_loader.report import write_report

        write_report(paths["adaptive.jsonl"], paths["report.png"])
        print(f"the adaptive run in detail: {paths['report.png']}  (adaptive-loader report "
              f"{paths['adaptive.jsonl']} -o {paths['report.png']})")
    except ImportError as exc:
        print(f"\nno picture ({exc}); pip install matplotlib")
    except (OSError, ValueError) as exc:
        print(f"\nno picture: {exc}")


def _run_with_progress(name: str, loader: str, shm: int, args, timeline: Optional[str] = None) -> Dict[str, Any]:
    label = f"{name} / {loader:17}"
    interactive = sys.stdout.isatty()
    said = {"at": 0.0}

    def tick(delivered: int, idle: float, limit: float) -> None:
        waiting = f"no batch for {idle:.0f} s; calling it a hang at {limit:.0f} s" if idle >= 2 else ""
        if interactive:
            print(f"\r{label} {delivered} samples  {waiting}".ljust(78), end="", flush=True)
        elif waiting and idle - said["at"] >= 5:  # a line every 5 s where the terminal cannot redraw
            said["at"] = idle
            print(f"{label} {delivered} samples  {waiting}", flush=True)
        elif idle < 2:
            said["at"] = 0.0

    started = time.monotonic()
    result = run_case(name, loader, shm_bytes=shm, workers=args.workers, quick=args.quick, epochs=args.epochs,
                      hang_after=args.hang_after, on_tick=tick, timeline=timeline)
    line = (f"{label} {result['outcome']:5} {result['delivered']}/{result['expected']} samples in "
            f"{result['seconds']:.1f} s (run {time.monotonic() - started:.0f} s with start-up)")
    print(("\r" if interactive else "") + line.ljust(78), flush=True)
    return result


def _adaptive_ok(result: Dict[str, Any]) -> bool:
    return result["outcome"] == "ok" and result["missing"] == 0 and result["duplicated"] == 0


def _write_json(path: str, results: List[Dict[str, Any]]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
