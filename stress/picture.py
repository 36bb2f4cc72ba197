"""One picture of two runs on the same axes: vanilla DataLoader beside AdaptiveLoader.

Drawn from the timelines the harness writes (``run_case(..., timeline=FILE)``):
samples delivered over time, /dev/shm and memory used against their limits,
samples per batch; a hang or crash marked where it happened, epochs marked.
Throughput is samples delivered divided by wall time, as in the tables.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Sequence

__all__ = ["plot_runs", "write_picture"]

_MIB = 2.0**20
_COLORS = {"vanilla": "tab:orange", "adaptive": "tab:blue", "adaptive-no-arena": "tab:green"}


def plot_runs(runs: Sequence[Dict[str, Any]], title: str = ""):
    """A matplotlib figure of the given timelines, one colour per loader."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from adaptive_loader.report import scaled_limit

    fig, (done_ax, shm_ax, mem_ax, size_ax) = plt.subplots(4, 1, figsize=(10, 11), sharex=True,
                                                           constrained_layout=True)
    every = (done_ax, shm_ax, mem_ax, size_ax)
    peak_mem, peak_shm, biggest = 1.0, 1.0, 1
    for run in runs:
        color = _COLORS.get(run["loader"], "tab:gray")
        name = {"vanilla": "DataLoader", "adaptive": "AdaptiveLoader"}.get(run["loader"], run["loader"])
        batches, usage = run["batches"], run["usage"]
        times = [0.0] + [b[0] for b in batches]
        delivered = [0]
        for b in batches:
            delivered.append(delivered[-1] + b[2])
        end = run["seconds"]
        times.append(end)
        delivered.append(delivered[-1])
        per_s = run["samples_per_s"]
        rate = "" if per_s is None else f", {per_s:,.0f} samples/s" if per_s >= 10 else f", {per_s:.2g} samples/s"
        done_ax.plot(times, delivered, color=color, label=f"{name}: {run['outcome']}, {delivered[-1]:,} samples "
                                                          f"in {end:.1f} s{rate}")
        if run["outcome"] != "ok":
            last = batches[-1][0] if batches else 0.0
            done_ax.plot([end], [delivered[-1]], "X", color="tab:red", markersize=12)
            waited = f"no batch after {last:.1f} s" if batches else "no batch at all"
            why = f"{waited}: called a hang at {end:.0f} s" if run["outcome"] == "hang" else f"crashed at {end:.1f} s"
            # right of the mark, above the epoch marks' labels at the bottom of the panel and below a run still going
            done_ax.annotate(f"{name}: {why}", (end, delivered[-1]), textcoords="offset points", xytext=(20, 80),
                             ha="left", color="tab:red", fontsize="small",
                             arrowprops=dict(arrowstyle="-", color="tab:red", linewidth=0.8))
            if run["outcome"] == "hang":
                for ax in every:
                    ax.axvspan(last, end, color="tab:red", alpha=0.06,
                               label=f"{name}: waiting, no batch" if ax is done_ax else None)
        if usage:
            ut = [u[0] for u in usage]
            shm_ax.plot(ut, [u[1] / _MIB for u in usage], color=color, label=f"{name}: /dev/shm used")
            peak_shm = max(peak_shm, max(u[1] for u in usage) / _MIB)
            memory = [u[2] for u in usage if u[2] is not None]
            if memory:
                mem_ax.plot(ut, [float("nan") if u[2] is None else u[2] / _MIB for u in usage], color=color,
                            label=f"{name}: memory of the loader's processes (PSS)")
                peak_mem = max(peak_mem, max(memory) / _MIB)
        if batches:
            size_ax.plot([b[0] for b in batches], [b[2] for b in batches], ".", color=color, markersize=4,
                         label=f"{name}: mean {run['mean_batch_size']} samples per batch")
            biggest = max(biggest, max(b[2] for b in batches))
            ends = [prev[0] for prev, b in zip(batches, batches[1:]) if b[1] != prev[1]]
            for number, when in enumerate(ends):
                for ax in every:
                    ax.axvline(when, color=color, linestyle="--", linewidth=0.8, alpha=0.6)
                done_ax.text(when, 0.02, f" {name}: end of epoch {number}", transform=done_ax.get_xaxis_transform(),
                             fontsize="x-small", color=color, rotation=90, va="bottom")
    shm = runs[0]["shm_size_bytes"] / _MIB
    top, drawn = scaled_limit(shm, peak_shm)
    if drawn:
        shm_ax.axhline(shm, color="k", linestyle="--", linewidth=1, label=f"/dev/shm size ({shm:.0f} MiB)")
    else:
        shm_ax.text(0.01, 0.9, f"/dev/shm size {shm:,.0f} MiB: off the scale", transform=shm_ax.transAxes,
                    fontsize="small")
    shm_ax.set_ylim(0, top)
    shm_ax.set_ylabel("/dev/shm (MiB)")
    shm_ax.legend(loc="upper right", fontsize="x-small")
    limit = runs[0].get("memory_limit")
    top, _ = scaled_limit(limit / _MIB if limit else 0, peak_mem)
    if limit and limit / _MIB > top:
        mem_ax.text(0.01, 0.92, f"memory limit (cgroup or RAM): {limit / _MIB:,.0f} MiB, off the scale",
                    transform=mem_ax.transAxes, fontsize="small")
    elif limit:
        mem_ax.axhline(limit / _MIB, color="tab:purple", linestyle="--", label="memory limit")
    mem_ax.set_ylim(0, top)
    mem_ax.set_ylabel("memory (MiB)")
    mem_ax.legend(loc="upper right", fontsize="x-small")
    done_ax.set_ylabel("samples delivered")
    done_ax.set_ylim(bottom=0)
    done_ax.legend(loc="upper left", fontsize="small")
    size_ax.set_ylabel("samples per batch")
    size_ax.set_ylim(0, biggest * 1.2 + 0.5)
    size_ax.legend(loc="lower right", fontsize="small")
    size_ax.set_xlabel("seconds since the loop started (throughput = samples delivered ÷ these seconds)")
    fig.suptitle(title or "DataLoader beside AdaptiveLoader", fontsize="medium")
    return fig


def write_picture(timelines: Sequence[str], output: str, title: str = "") -> None:
    """Read the harness's timeline files and write the figure as a PNG."""
    runs: List[Dict[str, Any]] = []
    for path in timelines:
        with open(path) as f:
            runs.append(json.load(f))
    fig = plot_runs(runs, title)
    fig.savefig(output, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
