"""One scenario run, inside the sandbox. Started by :mod:`stress.harness`.

It reports through files on real disk, so the harness can read them even
after killing it: ``progress`` gets one JSON line of indices per batch,
``peak`` the highest shm use seen so far, ``result`` the outcome at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import traceback

from .scenarios import get

#: vanilla DataLoader; AdaptiveLoader as it comes; AdaptiveLoader with a new shm block per batch
LOADERS = ("vanilla", "adaptive", "adaptive-no-arena")


class _PeakShm(threading.Thread):
    """Samples /dev/shm use every few ms and keeps the maximum in a file."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.path, self.peak = path, 0

    def run(self) -> None:
        last_written = -1
        while True:
            st = os.statvfs("/dev/shm")
            self.peak = max(self.peak, (st.f_blocks - st.f_bfree) * st.f_frsize)
            if self.peak != last_written:
                with open(self.path, "w") as f:
                    f.write(str(self.peak))
                last_written = self.peak
            time.sleep(0.005)


def _short_error(exc: BaseException) -> str:
    """First and last line of the message: DataLoader nests the worker's traceback in between."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1].strip()}"
    return f"{type(exc).__name__}: {text}"[:1000]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--scenario", required=True)
    p.add_argument("--loader", choices=LOADERS, required=True)
    p.add_argument("--shm-bytes", type=int, required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dir", required=True)
    p.add_argument("--telemetry")
    args = p.parse_args()

    setup = get(args.scenario).build(args.shm_bytes, args.workers, args.quick)
    peak = _PeakShm(os.path.join(args.dir, "peak"))
    peak.start()
    progress = open(os.path.join(args.dir, "progress"), "w", buffering=1)
    result = {"outcome": "ok", "error": None, "fallbacks": {}}
    start = time.monotonic()
    loader = None
    try:
        if args.loader == "vanilla":
            from torch.utils.data import DataLoader

            loader = DataLoader(setup.dataset, **setup.vanilla)
        else:
            from adaptive_loader import AdaptiveLoader

            loader = AdaptiveLoader(setup.dataset, telemetry=args.telemetry, arena=args.loader == "adaptive",
                                    **setup.adaptive)
        progress.write("start\n")
        kept = []
        for step, batch in enumerate(loader, 1):
            progress.write(json.dumps(setup.check(batch)) + "\n")
            if setup.keep_batches:
                kept.append(batch)
            del batch
            if setup.on_batch is not None:
                setup.on_batch(step)
    except Exception as exc:  # the outcome we measure, not a bug of the harness
        result["outcome"] = "crash"
        result["error"] = _short_error(exc)
        traceback.print_exc()
    finally:
        if setup.on_end is not None:
            setup.on_end()
    result["seconds"] = time.monotonic() - start
    result["peak_shm_used_bytes"] = peak.peak
    result["fallbacks"] = getattr(loader, "fallbacks", {}) if args.loader != "vanilla" else {}
    with open(os.path.join(args.dir, "result.json"), "w") as f:
        json.dump(result, f)
    os._exit(0)  # do not wait on worker teardown: the outcome is written


if __name__ == "__main__":
    main()
