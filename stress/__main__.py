"""python -m stress {list,run,matrix,demo}: vanilla DataLoader beside AdaptiveLoader in a small /dev/shm."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from typing import Any, Dict, List

from .child import LOADERS
from .harness import run_case
from .report import results_table, side_by_side
from .sandbox import parse_size, sandbox_available
from .scenarios import SCENARIOS, get


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stress", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the scenarios and what each proves")
    run = sub.add_parser("run", help="one scenario")
    run.add_argument("scenario", choices=list(SCENARIOS))
    run.add_argument("--loader", choices=[*LOADERS, "both"], default="both",
                     help="both: vanilla and adaptive; adaptive-no-arena: a new shm block per batch")
    matrix = sub.add_parser("matrix", help="every scenario with both loaders")
    matrix.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset")
    matrix.add_argument("--loaders", default="vanilla,adaptive", help=f"comma-separated subset of {', '.join(LOADERS)}")
    demo = sub.add_parser("demo", help="the seed scenario in 64 MiB, vanilla then adaptive")
    for p in (run, matrix, demo):
        p.add_argument("--shm-size", default="64M", help="size of the private /dev/shm (default 64M)")
        p.add_argument("--workers", type=int, default=2)
        p.add_argument("--hang-after", type=float, default=20.0, help="seconds without a batch that count as a hang")
        p.add_argument("--quick", action="store_true", help="fewer samples (CI)")
        p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    demo.add_argument("--out", default="stress-results", help="folder for the telemetry and report image")
    args = parser.parse_args(argv)

    if args.command == "list":
        for scenario in SCENARIOS.values():
            print(f"{scenario.name:14} {scenario.proves}")
        return 0
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
    results = [_run_with_progress(name, loader, shm, args) for name in names for loader in loaders]
    print(results_table(results))
    _write_json(args.json, results)
    bad = [r for r in results if r["loader"] != "vanilla" and not _adaptive_ok(r)]
    return 1 if bad else 0


def _demo(args, shm: int) -> int:
    print(f"The seed's instance-segmentation workload in a private {shm / 2**20:.0f} MiB /dev/shm "
          f"(a common container default), {args.workers} workers.\n")
    os.makedirs(args.out, exist_ok=True)
    telemetry = os.path.join(args.out, "demo-adaptive.jsonl")
    if os.path.exists(telemetry):
        os.unlink(telemetry)
    vanilla = _run_with_progress("seed", "vanilla", shm, args)
    adaptive = _run_with_dashboard("seed", shm, args, telemetry)
    print()
    print(side_by_side(vanilla, adaptive))
    for result in (vanilla, adaptive):
        if result["error"]:
            print(f"\n{result['loader']}: {result['error'][:400]}")
    _write_report(telemetry, os.path.join(args.out, "demo-report.png"))
    _write_json(args.json, [vanilla, adaptive])
    return 0 if _adaptive_ok(adaptive) else 1


def _run_with_dashboard(name: str, shm: int, args, telemetry: str) -> Dict[str, Any]:
    """The adaptive run, with the live dashboard following its telemetry file."""
    from adaptive_loader.cli import watch_file

    stop = threading.Event()
    total = len(get(name).build(shm, args.workers, args.quick).dataset)
    watcher = threading.Thread(target=watch_file, args=(telemetry,),
                               kwargs=dict(total=total, stop=stop, poll=0.1), daemon=True)
    watcher.start()
    try:
        result = run_case(name, "adaptive", shm_bytes=shm, workers=args.workers, quick=args.quick,
                          hang_after=args.hang_after, telemetry=telemetry)
    finally:
        stop.set()
        watcher.join(timeout=10)
    print(f"\n{name} / adaptive {result['outcome']:5} {result['delivered']}/{result['expected']} samples "
          f"in {result['seconds']:.1f} s; telemetry in {telemetry}")
    return result


def _write_report(telemetry: str, output: str) -> None:
    try:
        from adaptive_loader.report import write_report

        write_report(telemetry, output)
        print(f"\nreport: {output}  (adaptive-loader report {telemetry} -o {output})")
    except ImportError as exc:
        print(f"\nno report image ({exc}); pip install matplotlib")
    except (OSError, ValueError) as exc:
        print(f"\nno report image: {exc}")


def _run_with_progress(name: str, loader: str, shm: int, args) -> Dict[str, Any]:
    label = f"{name} / {loader:17}"
    interactive = sys.stdout.isatty()

    def show(delivered: int) -> None:
        if interactive:
            print(f"\r{label} {delivered} samples", end="", flush=True)

    result = run_case(name, loader, shm_bytes=shm, workers=args.workers, quick=args.quick,
                      hang_after=args.hang_after, on_progress=show)
    line = f"{label} {result['outcome']:5} {result['delivered']}/{result['expected']} samples in {result['seconds']:.1f} s"
    print(("\r" if interactive else "") + line.ljust(60), flush=True)
    return result


def _adaptive_ok(result: Dict[str, Any]) -> bool:
    return result["outcome"] == "ok" and result["missing"] == 0 and result["duplicated"] == 0


def _write_json(path: str, results: List[Dict[str, Any]]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
