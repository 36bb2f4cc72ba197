"""A WebDataset detection stream (tests/stream_data.py) read by a loader: images/s, and whether it
hangs. Runs in whatever /dev/shm it finds; for a small one, run it in a private mount namespace:

    .venv/bin/python tests/benchmarks/stream_webdataset.py --loader dataloader [--runs 3]
    unshare -m sh -c 'mount -t tmpfs -o size=64M tmpfs /dev/shm && \\
        exec .venv/bin/python tests/benchmarks/stream_webdataset.py --loader dataloader --runs 1'

The data: 8 shards, 320 images of 320x240, 1..150 masks each (~36 on average, ~2.8 MB of masks
per sample), written once to --data (default: a temporary directory outside /dev/shm, removed at
the end). Each run builds a fresh loader (batches of 8, 2 workers, the tuple(zip(*batch)) collate)
and reads --epochs epochs; images/s is images delivered / seconds from the loader's creation to its
last batch (worker start included). A run with no batch for --hang-after seconds is a hang: it is
reported and the process exits 3 (its workers are killed); a run that raises is an error (exit 1).
The last line is the summary as JSON. To add a loader, write a builder like
:func:`build_dataloader` and list it in ``LOADERS``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, Iterable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/, for stream_data
from stream_data import (check_detection_sample, load_digests, objects, tuple_collate,  # noqa: E402
                         webdataset_detection, write_detection_shards)


def build_dataloader(dataset, *, batch_size: int, num_workers: int, collate_fn: Callable,
                     timeout: float) -> Iterable:
    """Plain ``torch.utils.data.DataLoader`` (its own ``timeout`` bounds the wait for each batch)."""
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_fn,
                      timeout=timeout if num_workers > 0 else 0)


def build_adaptive(dataset, *, batch_size: int, num_workers: int, collate_fn: Callable, timeout: float) -> Iterable:
    """AdaptiveLoader over the stream, its workers packing by objects per image, at most ``batch_size``."""
    from adaptive_loader import AdaptiveLoader

    return AdaptiveLoader(dataset, costs=objects, max_batch_size=batch_size, num_workers=num_workers,
                          collate_fn=collate_fn, timeout=timeout if num_workers > 0 else 0)


def build_adaptive_wrapped(dataset, *, batch_size: int, num_workers: int, collate_fn: Callable,
                           timeout: float) -> Iterable:
    """``AdaptiveLoader.wrap(DataLoader(stream, batch_size=...))``: the user's DataLoader, unchanged."""
    from adaptive_loader import AdaptiveLoader

    return AdaptiveLoader.wrap(build_dataloader(dataset, batch_size=batch_size, num_workers=num_workers,
                                                collate_fn=collate_fn, timeout=timeout))


_SCRATCH: list = []  # a temporary data directory to remove, also when a hang ends the process

#: name -> builder(dataset, *, batch_size, num_workers, collate_fn, timeout) -> iterable of batches.
#: An "adaptive" entry goes here (e.g. AdaptiveLoader over the stream, costs from stream_data.objects).
LOADERS: Dict[str, Callable[..., Iterable]] = {"dataloader": build_dataloader, "adaptive": build_adaptive,
                                               "adaptive-wrapped": build_adaptive_wrapped}


def build_loader(name: str, dataset, **kwargs) -> Iterable:
    """The loader named ``name`` over ``dataset``."""
    return LOADERS[name](dataset, **kwargs)


def shm_used() -> Optional[int]:
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def shm_size() -> Optional[int]:
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_blocks * st.f_frsize


class Watch:
    """Samples /dev/shm use every 20 ms and notices when no batch came for ``hang_after`` s."""

    def __init__(self, hang_after: float, on_hang: Callable[[float], None]) -> None:
        self.hang_after, self.on_hang = hang_after, on_hang
        self.last = time.monotonic()
        self.peak = shm_used() or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def progress(self) -> None:
        self.last = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, shm_used() or 0)
            idle = time.monotonic() - self.last
            if idle > self.hang_after:
                self.on_hang(idle)
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def kill_children() -> None:
    """SIGKILL this process's own descendants (the loader's workers)."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass


def urls_keys(urls) -> set:
    """Every key the shards hold (read from the tar indexes, once)."""
    if not hasattr(urls_keys, "cache"):
        import tarfile

        urls_keys.cache = {m.name.split(".")[0] for u in urls for m in tarfile.open(u).getmembers()}
    return urls_keys.cache


def one_run(args, urls, digests) -> Dict[str, Any]:
    dataset = webdataset_detection(urls)
    images = batches = masks = 0
    state: Dict[str, Any] = {}

    def on_hang(idle: float) -> None:
        state.update(outcome="hang", idle=idle)
        result = dict(outcome="hang", images=images, batches=batches, seconds=round(time.perf_counter() - start, 2),
                      peak_shm_mib=round(watch.peak / 2**20, 1),
                      error=f"no batch for {idle:.0f} s")
        print(json.dumps(result), flush=True)
        kill_children()
        for path in _SCRATCH:
            shutil.rmtree(path, ignore_errors=True)
        os._exit(3)

    start = time.perf_counter()
    watch = Watch(args.hang_after, on_hang)
    once = True  # every image exactly once in each epoch
    try:
        loader = build_loader(args.loader, dataset, batch_size=args.batch_size, num_workers=args.workers,
                              collate_fn=tuple_collate, timeout=args.hang_after)
        for _ in range(args.epochs):
            keys = []
            for batch in loader:
                watch.progress()
                for sample in zip(*batch):
                    masks += objects(sample)
                    if digests is not None:
                        check_detection_sample(sample, digests)
                keys.extend(batch[0])
                images += len(batch[0])
                batches += 1
            once = once and len(keys) == len(set(keys)) == len(urls_keys(urls))
        getattr(loader, "close", lambda: None)()
        del loader
        outcome, error = ("ok", None) if once else ("error", "not every image exactly once in each epoch")
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        # DataLoader(timeout=...) raising "DataLoader timed out after N seconds" is the same hang
        outcome = "hang" if "timed out" in str(e) else "error"
        error = f"{type(e).__name__}: {e}"[:400]
    seconds = time.perf_counter() - start
    watch.stop()
    return dict(outcome=outcome, images=images, batches=batches, masks=masks, seconds=round(seconds, 2),
                images_per_batch=round(images / batches, 2) if batches else None,
                images_per_s=round(images / seconds, 1) if seconds > 0 else None,
                peak_shm_mib=round(watch.peak / 2**20, 1), error=error)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loader", choices=sorted(LOADERS), default="dataloader")
    parser.add_argument("--data", help="shard directory (written there if it holds no shards; default: a temp dir)")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--size", default="320x240", help="WIDTHxHEIGHT (default 320x240)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1, help="epochs per run (default 1)")
    parser.add_argument("--runs", type=int, default=3, help="runs, each with a fresh loader (default 3)")
    parser.add_argument("--hang-after", type=float, default=60.0, help="seconds without a batch that make a hang")
    parser.add_argument("--check", action="store_true", help="check every sample's content (slower: digests)")
    args = parser.parse_args()

    size = tuple(int(v) for v in args.size.lower().split("x"))
    scratch = None
    directory = args.data
    if directory is None:
        scratch = directory = tempfile.mkdtemp(prefix="stream-wds-", dir=os.environ.get("TMPDIR", "/tmp"))
        _SCRATCH.append(scratch)
    urls = sorted(glob.glob(os.path.join(directory, "shard-*.tar")))
    if not urls or (args.check and not os.path.exists(os.path.join(directory, "digests.json"))):
        begun = time.perf_counter()
        urls = write_detection_shards(directory, shards=args.shards, images=args.images, size=size,
                                      digests=args.check)
        print(f"wrote {len(urls)} shards to {directory} in {time.perf_counter() - begun:.1f} s", flush=True)
    digests = load_digests(directory) if args.check else None
    total = shm_size()
    print(f"loader={args.loader} shards={len(urls)} batch_size={args.batch_size} workers={args.workers} "
          f"epochs={args.epochs} /dev/shm={'?' if total is None else f'{total / 2**20:.0f} MiB'}", flush=True)
    try:
        results = []
        for run in range(args.runs):
            result = one_run(args, urls, digests)
            results.append(result)
            print(json.dumps(dict(run=run, **result)), flush=True)
            if result["outcome"] != "ok":
                break
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    rates = [r["images_per_s"] for r in results if r["outcome"] == "ok"]
    summary = dict(loader=args.loader, shm_mib=None if total is None else round(total / 2**20),
                   outcome=results[-1]["outcome"], runs=len(results),
                   images_per_s=rates, median_images_per_s=statistics.median(rates) if rates else None,
                   error=results[-1]["error"])
    print(json.dumps(summary), flush=True)
    return {"ok": 0, "hang": 3}.get(summary["outcome"], 1)


if __name__ == "__main__":
    sys.exit(main())
