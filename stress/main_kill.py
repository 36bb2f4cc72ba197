"""The main-kill scenario's first run: a loader whose main process is SIGKILLed mid-epoch.

:class:`Killer` (the scenario's ``before`` hook, in the child) starts
``python -m stress.main_kill FILE`` (the victim: one loader, its dataset and
keywords pickled in ``FILE``), waits until the victim has a batch in hand and,
for AdaptiveLoader, a spill file on disk, SIGKILLs the victim's main process
only, and waits for its orphaned workers to go. Then the child's ordinary run
starts a second loader on the same ``spill_dir``; the harness checks what is left.
"""

from __future__ import annotations

import glob
import os
import pickle
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from .workloads import GiantSampleDataset

__all__ = ["GIANTS", "ManyGiants", "Killer"]

#: the samples bigger than /dev/shm; none in the first batch, so the victim's first batch arrives
GIANTS = (4, 5, 6)
WAIT_FOR_SPILL_S = 60.0
WORKER_GRACE_S = 15.0  # orphaned workers notice their dead parent at torch's next 5 s status check


class ManyGiants(GiantSampleDataset):
    """:class:`GiantSampleDataset` with several giant samples."""

    def __init__(self, base: GiantSampleDataset, giants: Sequence[int]) -> None:
        super().__init__(base.n, base.small, base.giant, base.giant_index)
        self.giants = tuple(i for i in giants if i < base.n)

    def sizes(self):
        sizes = super().sizes()
        sizes[list(self.giants)] = self.giant
        return sizes

    def __getitem__(self, i: int):
        import torch

        nbytes = self.giant if i in self.giants else self.small
        return torch.full((nbytes // 4,), float(i)), i


def spill_files(spill_dir: Optional[str], pid: int) -> List[str]:
    """The spill files of the loader whose main process is ``pid``."""
    if not spill_dir:
        return []
    return glob.glob(os.path.join(spill_dir, f"adaptive-loader-spill-{pid}-*", "*"))


class Killer:
    """The ``before`` hook: run the victim, kill it, report what it left (notes for the result)."""

    def __init__(self, dataset: Any, adaptive: Dict[str, Any], vanilla: Dict[str, Any]) -> None:
        self.dataset, self.adaptive, self.vanilla = dataset, adaptive, vanilla

    def __call__(self, loader: str, run_dir: str, spill_dir: Optional[str]) -> Dict[str, Any]:
        import psutil

        adaptive = loader != "vanilla"
        options = dict(self.adaptive, spill_dir=spill_dir) if adaptive else dict(self.vanilla)
        if loader == "adaptive-no-arena":
            options["arena"] = False
        spec = os.path.join(run_dir, "victim.pickle")
        ready = os.path.join(run_dir, "victim-ready")
        with open(spec, "wb") as f:
            pickle.dump({"adaptive": adaptive, "dataset": self.dataset, "options": options, "ready": ready}, f)
        victim = subprocess.Popen([sys.executable, "-m", f"{__package__}.main_kill", spec])
        notes: Dict[str, Any] = {"victim_pid": victim.pid}
        deadline = time.monotonic() + WAIT_FOR_SPILL_S
        while time.monotonic() < deadline and victim.poll() is None:
            if os.path.exists(ready) and (not adaptive or spill_files(spill_dir, victim.pid)):
                break
            time.sleep(0.02)
        if not adaptive:
            time.sleep(0.5)  # its workers fill the prefetch queue meanwhile
        if victim.poll() is not None:
            notes["problem"] = f"the first run ended by itself (exit status {victim.returncode}) before the kill"
            return notes
        workers = [p for p in psutil.Process(victim.pid).children(recursive=True)]
        notes["spill_files_at_kill"] = len(spill_files(spill_dir, victim.pid))
        notes["shm_files_at_kill"] = len(os.listdir("/dev/shm"))
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        notes["spill_files_after_kill"] = len(spill_files(spill_dir, victim.pid))
        stale = os.path.join(spill_dir, f"adaptive-loader-spill-{victim.pid}-*") if spill_dir else None
        notes["spill_dirs_after_kill"] = len(glob.glob(stale)) if stale else 0
        if adaptive and not notes["spill_files_after_kill"]:
            notes["problem"] = "no spill file of the first run was on disk at the kill"
        started = time.monotonic()
        _, alive = psutil.wait_procs(workers, timeout=WORKER_GRACE_S)
        notes["orphans_exit_s"] = round(time.monotonic() - started, 2)
        notes["orphans_killed"] = len(alive)
        for proc in alive:  # still there: not ours to wait for longer; the check is what the loader leaves
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        return notes


def _victim(spec_path: str) -> None:
    with open(spec_path, "rb") as f:
        spec = pickle.load(f)
    if spec["adaptive"]:
        from adaptive_loader import AdaptiveLoader

        loader = AdaptiveLoader(spec["dataset"], **spec["options"])
    else:
        from torch.utils.data import DataLoader

        loader = DataLoader(spec["dataset"], **spec["options"])
    for _batch in loader:
        with open(spec["ready"], "w") as f:
            f.write("1")
        time.sleep(0.3)  # a training step: meanwhile the workers fill what may be in flight


if __name__ == "__main__":
    _victim(sys.argv[1])
