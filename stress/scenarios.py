"""The scenarios: what each builds for vanilla DataLoader and for AdaptiveLoader.

Sizes scale with the shm size so that each scenario presses on the same limit
whatever size is chosen; ``quick`` shrinks sample counts for CI.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from . import workloads as w

__all__ = ["Scenario", "Setup", "SCENARIOS", "get"]


@dataclass
class Setup:
    """Everything a run of one scenario needs, for one shm size."""

    dataset: Any
    check: Callable[[Any], List[int]]  # batch -> indices, asserting content is intact
    vanilla: Dict[str, Any]  # DataLoader kwargs
    adaptive: Dict[str, Any]  # AdaptiveLoader kwargs
    keep_batches: bool = False  # hold every batch until the end, like a user caching them
    on_batch: Optional[Callable[[int], None]] = None  # called after batch k is received
    on_end: Optional[Callable[[], None]] = None
    prepare: Optional[Callable[[], None]] = None  # once in the child, before the loader (e.g. make the data)
    in_dir: Optional[Callable[[str], None]] = None  # given the run's own temp dir, before prepare
    # (loader, run dir, spill dir) -> notes for the result; runs before the loader (e.g. a first run killed)
    before: Optional[Callable[[str, str, Optional[str]], Dict[str, Any]]] = None

    def samples(self) -> int:
        """Samples per epoch, indexed 0..n-1 (a stream says how many it yields)."""
        return len(self.dataset) if hasattr(self.dataset, "__len__") else self.dataset.samples

@dataclass
class Scenario:
    name: str
    proves: str
    build: Callable[[int, int, bool], Setup]  # (shm_bytes, workers, quick) -> Setup
    nofile: Optional[int] = None  # ulimit -n inside the sandbox
    loaders: Optional[tuple] = None  # the loaders it makes sense for; None: all
    memory_bytes: Optional[int] = None  # the memory cgroup limit `stress run/matrix` give it without --memory
    shm_bytes: Optional[int] = None  # the /dev/shm size they give it without --shm-size


def _seed(shm: int, workers: int, quick: bool) -> Setup:
    n = 120 if quick else 1200
    costs = np.random.default_rng(0).integers(10, 1201, n)
    # a vanilla batch of 10 images (~6,000 masks) takes ~shm/3.5: a few in flight overflow it
    side = max(8, int(math.sqrt(shm / 3.5 / 6050)))
    return Setup(
        dataset=w.SegmentationDataset(costs, side=side), check=w.SegmentationDataset.check,
        vanilla=dict(batch_size=10, num_workers=workers, collate_fn=w.detection_collate),
        adaptive=dict(costs=costs, max_batch_size=10, num_workers=workers, collate_fn=w.detection_collate,
                      shuffle=True))


def _detection(shm: int, workers: int, quick: bool) -> Setup:
    # fixed, not scaled: the real workload (320x240 JPEGs, 1..150 polygon masks, ~5.6 MiB per image,
    # a batch of 8 ~45 MiB), so a 64 MiB /dev/shm holds about one batch and vanilla's four in flight overflow it
    ds = w.CocoStyleDataset(48 if quick else 400)
    return Setup(
        dataset=ds, check=w.CocoStyleDataset.check, prepare=ds.prepare,
        vanilla=dict(batch_size=8, shuffle=True, num_workers=workers, collate_fn=w.detection_collate),
        adaptive=dict(costs=ds.objects, max_batch_size=8, shuffle=True, num_workers=workers,
                      collate_fn=w.detection_collate))


def _detection_stream(shm: int, workers: int, quick: bool) -> Setup:
    # the detection workload as a stream read from 8 shards: vanilla batches of 8 as they come; adaptive
    # packs each worker's samples by objects, batches of at most 8, every sample compared in full
    ds = w.CocoStream(48 if quick else 320)
    return Setup(
        dataset=ds, check=ds.check_against_getitem, prepare=ds.prepare,
        vanilla=dict(batch_size=8, num_workers=workers, collate_fn=w.detection_collate),
        adaptive=dict(costs=ds.objects, max_batch_size=8, num_workers=workers, collate_fn=w.detection_collate))


def _memory_limit(shm: int, workers: int, quick: bool, dataset: type = w.CocoStyleDataset) -> Setup:
    # the detection workload, 96 images (48 quick): meant for a memory cgroup (--memory) with plenty of
    # /dev/shm, where vanilla's batches in flight are bounded by memory rather than by the tmpfs
    ds = dataset(48 if quick else 96)
    return Setup(
        dataset=ds, check=ds.check_against_getitem, prepare=ds.prepare,
        vanilla=dict(batch_size=8, shuffle=True, num_workers=workers, collate_fn=w.detection_collate),
        adaptive=dict(costs=ds.objects, max_batch_size=8, shuffle=True, num_workers=workers,
                      collate_fn=w.detection_collate))


def _volumes(shm: int, workers: int, quick: bool) -> Setup:
    side = max(8, int(round((shm / 24 / 4) ** (1 / 3))))  # a batch of 16 is ~2/3 of shm: two overflow it
    return Setup(
        dataset=w.VolumeDataset(48 if quick else 128, shape=(1, side, side, side)), check=w.VolumeDataset.check,
        vanilla=dict(batch_size=16, num_workers=workers),
        adaptive=dict(max_batch_size=16, num_workers=workers))


def _giant(shm: int, workers: int, quick: bool) -> Setup:
    ds = w.GiantSampleDataset(n=24, small_bytes=max(4096, shm // 64), giant_bytes=int(shm * 1.25), giant_index=7)
    return Setup(
        dataset=ds, check=w.GiantSampleDataset.check,
        vanilla=dict(batch_size=4, num_workers=workers),
        # max_cost = the giant's size keeps it alone in its batch (default collate cannot stack it with small
        # ones) whatever the memory budget allows
        adaptive=dict(costs=ds.sizes(), max_cost=float(ds.giant), max_batch_size=4, num_workers=workers))


def _many_tensors(shm: int, workers: int, quick: bool) -> Setup:
    ds = w.ManyTensorsDataset(n=40 if quick else 80, tensors=300)
    return Setup(
        dataset=ds, check=w.ManyTensorsDataset.check, keep_batches=True,
        vanilla=dict(batch_size=4, num_workers=workers),
        adaptive=dict(max_batch_size=4, num_workers=workers))


class _ShmHog:
    """Another process that fills most of /dev/shm, then lets go."""

    # Takes up to argv[1] bytes in 1 MiB steps, as much as there is: a real neighbour does not
    # wait for the loader to make room.
    CODE = ("import os,sys; f=os.open('/dev/shm/stress-hog',os.O_CREAT|os.O_RDWR,0o600); want=int(sys.argv[1]); got=0\n"
            "while got < want:\n"
            "    try: os.posix_fallocate(f, got, 1 << 20); got += 1 << 20\n"
            "    except OSError: break\n"
            "print(got, flush=True); sys.stdin.readline(); os.unlink('/dev/shm/stress-hog')")

    def __init__(self, nbytes: int, start_at: int, stop_at: int) -> None:
        self.nbytes, self.start_at, self.stop_at = nbytes, start_at, stop_at
        self.proc: Optional[subprocess.Popen] = None

    def __call__(self, step: int) -> None:
        if step == self.start_at and self.proc is None:
            self.proc = subprocess.Popen([sys.executable, "-c", self.CODE, str(self.nbytes)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            self.proc.stdout.readline()  # wait until the space is really taken
        elif step == self.stop_at:
            self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.communicate("\n", timeout=30)


def _shm_hog(shm: int, workers: int, quick: bool) -> Setup:
    n = 160 if quick else 320
    costs = np.random.default_rng(1).integers(10, 1201, n)
    side = max(8, int(math.sqrt(shm / 10 / 6050)))  # a vanilla batch is ~shm/10 until the hog arrives
    hog = _ShmHog(int(shm * 0.75), start_at=3, stop_at=(n // 10) * 2 // 3)
    return Setup(
        dataset=w.SegmentationDataset(costs, side=side), check=w.SegmentationDataset.check,
        vanilla=dict(batch_size=10, num_workers=workers, collate_fn=w.detection_collate),
        adaptive=dict(costs=costs, max_batch_size=10, num_workers=workers, collate_fn=w.detection_collate),
        on_batch=hog, on_end=hog.stop)


def _worker_kill(shm: int, workers: int, quick: bool) -> Setup:
    side = max(8, int(round((shm / 200 / 4) ** (1 / 3))))  # small: shm is not the problem here
    killed: List[int] = []

    def kill_at_third(step: int) -> None:
        if step == 3 and not killed:
            killed.append(w.kill_one_worker())

    return Setup(
        dataset=w.VolumeDataset(48 if quick else 96, shape=(1, side, side, side)), check=w.VolumeDataset.check,
        vanilla=dict(batch_size=4, num_workers=workers),
        adaptive=dict(max_batch_size=4, num_workers=workers), on_batch=kill_at_third)


def _mixed(shm: int, workers: int, quick: bool) -> Setup:
    # bf16: a sample is shm/16, a batch of 8 half of shm, so two batches in flight never fit (with a third
    # of shm per batch, vanilla on torch 2.14 found room now and then and completed)
    numel = max(1024, shm // 16 // 2)
    return Setup(
        dataset=w.MixedDataset(32 if quick else 64, big_numel=numel), check=w.MixedDataset.check,
        vanilla=dict(batch_size=8, num_workers=workers),
        adaptive=dict(max_batch_size=8, num_workers=workers))


def _shm_full(shm: int, workers: int, quick: bool) -> Setup:
    side = max(8, int(round((shm / 200 / 4) ** (1 / 3))))
    filler = os.path.join("/dev/shm", "stress-fill")

    def empty() -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(filler)

    return Setup(
        dataset=w.VolumeDataset(48 if quick else 96, shape=(1, side, side, side)), check=w.VolumeDataset.check,
        vanilla=dict(batch_size=4, num_workers=workers), adaptive=dict(max_batch_size=4, num_workers=workers),
        prepare=lambda: w.fill_shm(os.path.basename(filler)), on_end=empty)


def _poison(shm: int, workers: int, quick: bool) -> Setup:
    side = max(8, int(round((shm / 200 / 4) ** (1 / 3))))
    ds = w.PoisonDataset(48 if quick else 96, shape=(1, side, side, side), poison=9)

    def marker_in(directory: str) -> None:
        ds.marker_dir = directory

    return Setup(dataset=ds, check=w.VolumeDataset.check, in_dir=marker_in,
                 vanilla=dict(batch_size=4, num_workers=workers),
                 adaptive=dict(max_batch_size=4, num_workers=workers))


def _main_kill(shm: int, workers: int, quick: bool) -> Setup:
    from . import main_kill

    # arena="shm" bounds the blocks by /dev/shm too, so the giants' batches really take spill files
    ds = w.GiantSampleDataset(n=16 if quick else 32, small_bytes=max(4096, shm // 64), giant_bytes=int(shm * 1.1),
                              giant_index=main_kill.GIANTS[0])
    ds = main_kill.ManyGiants(ds, main_kill.GIANTS)
    adaptive = dict(costs=ds.sizes(), max_cost=float(ds.giant), max_batch_size=4, num_workers=max(1, workers),
                    arena="shm")
    return Setup(dataset=ds, check=w.GiantSampleDataset.check, vanilla=dict(batch_size=4, num_workers=workers),
                 adaptive=adaptive, before=main_kill.Killer(ds, adaptive, dict(batch_size=4, num_workers=workers)))


def _odd_tensors(shm: int, workers: int, quick: bool) -> Setup:
    n = 32 if quick else 96
    # a sample is ~shm/40 of padding, sample 5 carries more than all of /dev/shm: with arena="shm" its batch
    # cannot have a block there and goes through a spill file
    ds = w.OddTensorsDataset(n, giant=5, giant_bytes=int(shm * 1.1), pad_bytes=shm // 40)
    sizes = np.full(n, shm // 40)
    sizes[5] = int(shm * 1.1)
    return Setup(dataset=ds, check=w.OddTensorsDataset.check,
                 vanilla=dict(batch_size=8, num_workers=workers, collate_fn=w.list_collate),
                 adaptive=dict(costs=sizes, max_cost=float(sizes.max()), max_batch_size=8, num_workers=workers,
                               collate_fn=w.list_collate, arena="shm"))


def _fd_pressure(shm: int, workers: int, quick: bool) -> Setup:
    ds = w.ManyTensorsDataset(n=40 if quick else 80, tensors=200)
    return Setup(dataset=ds, check=w.ManyTensorsDataset.check,
                 vanilla=dict(batch_size=4, num_workers=workers),
                 adaptive=dict(max_batch_size=4, num_workers=workers, arena=False))


SCENARIOS: Dict[str, Scenario] = {s.name: s for s in [
    Scenario("seed", "the question's workload (10..1,200 masks per image, tuple(zip(*batch)) collate): vanilla "
             "hangs when the feeder thread hits ENOSPC; adaptive caps objects per batch by measured bytes",
             _seed),
    Scenario("detection", "COCO-style detection: 320x240 JPEGs decoded and 1..150 polygons drawn into uint8 "
             "masks per image in __getitem__, tuple(zip(*batch)) collate, batches of 8, shuffled, sizes fixed: "
             "vanilla hangs or crashes; adaptive keeps the batches of 8 the user asked for", _detection),
    Scenario("detection-stream", "the detection workload as an IterableDataset read from 8 shards split by "
             "worker (as WebDataset reads them), batches of 8: vanilla hangs in a small /dev/shm; adaptive's "
             "workers pack their samples by objects under the budget, every image once, compared in full",
             _detection_stream),
    Scenario("memory-limit", "the detection workload (96 images) in a memory cgroup: run it with --memory "
             "(default 768M) and plenty of /dev/shm (default 8G); every sample is compared with __getitem__'s "
             "output made again in the main process; an OOM kill is a crash", _memory_limit,
             memory_bytes=768 << 20, shm_bytes=8 << 30),
    Scenario("memory-limit-tv", "memory-limit through the training pipeline of torchvision's detection references "
             "(boxes clamped, area, the image as float32, a horizontal flip of image, masks and boxes): images 4x "
             "the bytes", lambda shm, workers, quick: _memory_limit(shm, workers, quick, w.TorchvisionStyleDetection),
             memory_bytes=768 << 20, shm_bytes=8 << 30),
    Scenario("volumes", "fixed-shape 3-D volumes with default collate, which allocates shm inside the worker: "
             "vanilla crashes with ENOSPC; adaptive shrinks the batch", _volumes),
    Scenario("giant-sample", "one sample larger than all of /dev/shm: adaptive sends that batch through a "
             "spill file instead", _giant),
    Scenario("many-tensors", "300 small tensors per sample (300 shm files per batch with default collate), "
             "ulimit -n 1024, batches kept alive: fds run out; adaptive raises the limit or moves to the "
             "file_system strategy", _many_tensors, nofile=1024),
    Scenario("shm-hog", "another process takes 75% of /dev/shm mid-epoch and frees it later: adaptive "
             "follows the free space down and back up", _shm_hog),
    Scenario("worker-kill", "a worker is SIGKILLed mid-epoch: adaptive rebuilds the iterator over the "
             "undelivered batches", _worker_kill),
    Scenario("mixed", "nested dicts and lists of numpy arrays, strings, bf16/bool/int8/complex tensors, "
             "checked value by value on both transports", _mixed),
    Scenario("shm-full", "/dev/shm 100% full before the loader starts: adaptive still delivers every sample "
             "(memfd arenas and blocks; in the main process if not even a semaphore fits)", _shm_full),
    Scenario("poison", "one sample kills its worker (os._exit) the first time it is loaded: adaptive recovers "
             "and delivers every sample once, without switching the sharing strategy", _poison),
    Scenario("main-kill", "the main process is SIGKILLed with batches in flight and spill files on disk; a new "
             "loader on the same spill_dir then runs: nothing of the first run is left", _main_kill,
             loaders=("vanilla", "adaptive")),
    Scenario("odd-tensors", "sparse COO/CSR, nested, a Tensor subclass with an attribute, uint16/32/64, float8, "
             "complex32, bf16, list collate, some batches on the spill road: types, dtypes and values intact",
             _odd_tensors),
    Scenario("fd-pressure", "arena=False, default collate, 200 tensors per sample, ulimit -n 256: no fd "
             "crash, every sample once", _fd_pressure, nofile=256),
]}


def get(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}") from None
