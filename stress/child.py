"""One scenario run, inside the sandbox. Started by the harness (``harness.py``).

It reports through files on real disk, so the harness can read them even
after killing it: ``progress`` gets one JSON line of indices per batch (and an
``epoch N`` line before each epoch), ``timeline`` one ``[seconds, epoch,
samples, shm used]`` line per batch, ``usage`` ``[seconds, shm used, memory
used]`` every 0.2 s, ``peak`` the highest shm use seen so far, ``result.json``
the outcome at the end. ``pid`` names its process group (it makes its own, so
the watchdog can kill it and its workers and still list what they left).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import traceback
from typing import Any, Dict, Optional

#: vanilla DataLoader; AdaptiveLoader as it comes; AdaptiveLoader with a new shm block per batch; vanilla
#: DataLoader with ``num_workers=0`` (every batch made in the main process: the memory floor of a run)
LOADERS = ("vanilla", "adaptive", "adaptive-no-arena", "vanilla-main")
VANILLA_LOADERS = ("vanilla", "vanilla-main")


def shm_used() -> int:
    st = os.statvfs("/dev/shm")
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def memory_limit() -> int:
    """The smallest of this process's memory cgroup limit (v2 or v1, at the usual mount) and the host's RAM."""
    import psutil

    limits = [psutil.virtual_memory().total]
    try:
        with open("/proc/self/cgroup") as f:
            groups = [line.strip().split(":", 2) for line in f if line.strip()]
    except OSError:
        groups = []
    for _, controllers, path in groups:
        if controllers == "":
            candidates = [f"/sys/fs/cgroup{path}/memory.max"]
        elif "memory" in controllers.split(","):
            candidates = [f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
        else:
            continue
        for candidate in candidates:
            try:
                with open(candidate) as f:
                    text = f.read().strip()
            except OSError:
                continue
            if text.isdigit():
                limits.append(int(text))
            break
    return min(limits)


def memory_used() -> Optional[int]:
    """Proportional set size of this process and its workers (shared pages split, not counted twice)."""
    import psutil

    total = 0
    try:
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_full_info().pss
            except (psutil.Error, AttributeError):
                pass
    except psutil.Error:
        return None
    return total


class _Usage(threading.Thread):
    """Samples /dev/shm every few ms (the peak, in a file) and, every 0.2 s, shm and memory use."""

    def __init__(self, directory: str, start: float) -> None:
        super().__init__(daemon=True)
        self.path, self.peak, self.start_time = os.path.join(directory, "peak"), 0, start
        self.usage = open(os.path.join(directory, "usage"), "w", buffering=1)

    def run(self) -> None:
        last_written, next_usage = -1, 0.0
        while True:
            used = shm_used()
            self.peak = max(self.peak, used)
            if self.peak != last_written:
                with open(self.path, "w") as f:
                    f.write(str(self.peak))
                last_written = self.peak
            now = time.monotonic()
            if now >= next_usage:
                self.usage.write(json.dumps([round(now - self.start_time, 3), used, memory_used()]) + "\n")
                next_usage = now + 0.2
            time.sleep(0.005)


def _short_error(exc: BaseException) -> str:
    """First and last line of the message: DataLoader nests the worker's traceback in between."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1].strip()}"
    return f"{type(exc).__name__}: {text}"[:1000]


def adaptive_options(scenario: Dict[str, Any], loader: str, telemetry: Optional[str],
                     spill_dir: Optional[str]) -> Dict[str, Any]:
    """AdaptiveLoader's keywords: the scenario's, the harness's spill_dir; ``adaptive-no-arena``
    always means ``arena=False``."""
    options: Dict[str, Any] = dict(telemetry=telemetry, arena=True)
    if spill_dir:
        options["spill_dir"] = spill_dir
    options.update(scenario)
    if loader == "adaptive-no-arena":
        options["arena"] = False
    return options


def vanilla_options(scenario: Dict[str, Any], loader: str) -> Dict[str, Any]:
    """DataLoader's keywords: the scenario's; ``vanilla-main`` the same batches with no workers."""
    if loader != "vanilla-main":
        return dict(scenario)
    options = {k: v for k, v in scenario.items() if k not in ("prefetch_factor", "persistent_workers")}
    return dict(options, num_workers=0)


def _wait_for_workers(timeout: float = 3.0) -> None:
    """Let the loader's workers end (a closed loader joins them; vanilla's go with its iterator)."""
    import psutil

    try:  # those still there get the leftovers check's own grace, then are killed
        psutil.wait_procs(psutil.Process().children(recursive=True), timeout=timeout)
    except psutil.Error:
        pass


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--scenario", required=True)
    p.add_argument("--loader", choices=LOADERS, required=True)
    p.add_argument("--shm-bytes", type=int, required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dir", required=True)
    p.add_argument("--telemetry")
    p.add_argument("--spill-dir", help="the spill_dir of AdaptiveLoader (the harness's own, checked afterwards)")
    args = p.parse_args()
    os.setpgid(0, 0)  # before the slow imports: the watchdog kills this group, not the sandbox's shell
    with open(os.path.join(args.dir, "pid"), "w") as f:
        f.write(str(os.getpid()))

    from .scenarios import get

    setup = get(args.scenario).build(args.shm_bytes, args.workers, args.quick)
    if setup.in_dir is not None:
        setup.in_dir(args.dir)
    if setup.prepare is not None:
        setup.prepare()
    notes: Dict[str, Any] = {}
    if setup.before is not None:  # e.g. a first run killed mid-epoch
        notes = setup.before(args.loader, args.dir, args.spill_dir) or {}
        with open(os.path.join(args.dir, "notes.json"), "w") as f:  # read even if what follows hangs
            json.dump(notes, f)
    start = time.monotonic()
    with open(os.path.join(args.dir, "limits.json"), "w") as f:
        json.dump({"memory_limit": memory_limit(), "start": start}, f)
    usage = _Usage(args.dir, start)
    usage.start()
    progress = open(os.path.join(args.dir, "progress"), "w", buffering=1)
    timeline = open(os.path.join(args.dir, "timeline"), "w", buffering=1)
    result: Dict[str, Any] = {"outcome": "ok", "error": None, "fallbacks": {}, "notes": notes}
    loader = None
    try:
        if args.loader in VANILLA_LOADERS:
            from torch.utils.data import DataLoader

            loader = DataLoader(setup.dataset, **vanilla_options(setup.vanilla, args.loader))
        else:
            from adaptive_loader import AdaptiveLoader

            loader = AdaptiveLoader(setup.dataset, **adaptive_options(setup.adaptive, args.loader, args.telemetry,
                                                                      args.spill_dir))
        progress.write("start\n")
        kept = []
        step = 0
        for epoch in range(args.epochs):
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            progress.write(f"epoch {epoch}\n")
            for batch in loader:
                step += 1
                indices = setup.check(batch)
                progress.write(json.dumps(indices) + "\n")
                timeline.write(json.dumps([round(time.monotonic() - start, 4), epoch, len(indices), shm_used()]) + "\n")
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
    if notes.get("problem") and result["outcome"] == "ok":
        result["outcome"], result["error"] = "crash", notes["problem"]
    result["seconds"] = time.monotonic() - start
    result["peak_shm_used_bytes"] = usage.peak
    result["fallbacks"] = getattr(loader, "fallbacks", {}) if args.loader not in VANILLA_LOADERS else {}
    if args.loader not in VANILLA_LOADERS and loader is not None:
        try:
            loader.close()  # ends the telemetry with its run_end record
        except Exception:  # noqa: BLE001 - the outcome is already measured
            traceback.print_exc()
    with open(os.path.join(args.dir, "result.json"), "w") as f:  # before the teardown: no hang is read into it
        json.dump(result, f)
    loader = None
    _wait_for_workers()
    os._exit(0)  # the outcome is written; the leftovers check waits for (or kills) what is still running


if __name__ == "__main__":
    main()
