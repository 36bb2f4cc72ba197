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

from .cgroup import exit_on_sigterm, memory_cgroup_available
from .child import LOADERS, VANILLA_LOADERS
from .harness import run_case
from .report import results_table, side_by_side
from .sandbox import parse_size, sandbox_available
from .scenarios import SCENARIOS, get


DEMO_SCENARIO = "detection"
DEFAULT_SHM = "64M"
#: Set by ``adaptive-loader stress`` (adaptive_loader/cli.py), which runs this program: its usage line's name.
PROG_ENV = "ADAPTIVE_LOADER_STRESS_PROG"


def main(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    prog = prog or os.environ.get(PROG_ENV) or "python -m stress"
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
        p.add_argument("--shm-size", help=f"size of the private /dev/shm (default {DEFAULT_SHM}; the scenario's own "
                                          f"where it names one: memory-limit 8G)")
        p.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
        p.add_argument("--epochs", type=int, default=3 if p is demo else 1,
                       help=f"epochs per run (default {3 if p is demo else 1}); every sample once in each")
        p.add_argument("--hang-after", type=float, default=20.0,
                       help="seconds without a batch that count as a hang (default 20)")
        p.add_argument("--quick", action="store_true", help="fewer samples (CI)")
        p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    for p in (run, matrix):
        p.add_argument("--memory", metavar="SIZE",
                       help="run each case in a fresh memory cgroup of SIZE, e.g. 768M (needs root; 0: none; "
                            "default none, except the scenario's own where it names one: memory-limit 768M)")
    demo.add_argument("--out", default="stress-results",
                      help="folder for the telemetry, the timelines and the picture (default stress-results)")
    args = parser.parse_args(argv)
    exit_on_sigterm()  # a run in a memory cgroup must not outlive the harness, nor its group

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
    if args.command == "demo":
        return _demo(args, _shm_for(args.scenario, args))
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
    limited = [name for name in names if _memory_for(name, args)]
    ok, why = memory_cgroup_available() if limited else (True, "")
    if not ok and (args.command == "run" or args.memory):
        print(f"cannot run with a memory limit: {why}. Run as root on a machine with cgroup v1 or v2 memory "
              f"control, or pass --memory 0 to run without one.", file=sys.stderr)
        return 2
    if not ok:
        print(f"skipping {', '.join(limited)}: it runs in a memory cgroup and none can be made here ({why})",
              file=sys.stderr)
        names = [name for name in names if name not in limited]
    results = [_run_with_progress(name, loader, _shm_for(name, args), args, memory=_memory_for(name, args))
               for name in names for loader in loaders if not get(name).loaders or loader in get(name).loaders]
    print(results_table(results))
    _write_json(args.json, results)
    bad = [r for r in results if r["loader"] not in VANILLA_LOADERS and not _adaptive_ok(r)]
    return 1 if bad else 0


def _shm_for(name: str, args) -> int:
    """--shm-size, else the scenario's own size, else the default."""
    return parse_size(args.shm_size) if args.shm_size else get(name).shm_bytes or parse_size(DEFAULT_SHM)


def _memory_for(name: str, args) -> Optional[int]:
    """--memory (0: none), else the scenario's own limit; None: no memory cgroup."""
    if getattr(args, "memory", None) is not None:
        return parse_size(args.memory) or None
    return get(name).memory_bytes


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
    from adaptive_loader.watch import watch_file

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


def _run_with_progress(name: str, loader: str, shm: int, args, timeline: Optional[str] = None,
                       memory: Optional[int] = None) -> Dict[str, Any]:
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
                      hang_after=args.hang_after, on_tick=tick, timeline=timeline, memory_bytes=memory)
    line = (f"{label} {result['outcome']:5} {result['delivered']}/{result['expected']} samples in "
            f"{result['seconds']:.1f} s (run {time.monotonic() - started:.0f} s with start-up)")
    if memory:
        peak = result["peak_memory_bytes"]
        line += (f"; memory peak {'?' if peak is None else f'{peak / 2**20:.0f}'} of {memory / 2**20:.0f} MiB, "
                 f"{result['oom_kills']} OOM kills")
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
