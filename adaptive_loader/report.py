"""Plots of a recorded run (matplotlib): ``adaptive-loader report RUN.jsonl -o report.png``.

Throughput here is what the stress tables and the dashboard call it: samples
delivered divided by wall time (the slope of the top panel).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections import Counter
from typing import Any, Dict, List, Optional, Tuple

from .kinds import Event, Fallback, Road

__all__ = ["ReportError", "read_records", "plot_run", "write_report", "scaled_limit"]

_MARKED = tuple(kind.value for kind in Fallback) + (Event.STALL.value,)
_COLORS = {Fallback.OFF_SHM: "tab:red", Fallback.FEWER_IN_FLIGHT: "tab:orange", Fallback.FD_LIMIT: "tab:purple",
           Fallback.SHARING_STRATEGY: "tab:brown", Fallback.RECOVERY: "black", Event.STALL: "black"}
_ROAD_COLORS = {Road.MEMFD: "tab:cyan", Road.ARENA: "tab:green", Road.SHM: "tab:blue", Road.FILE: "tab:red",
                Road.INLINE: "tab:gray"}
_MIB = 2.0**20


class ReportError(ValueError):
    """A telemetry file that cannot be reported on (missing, empty, not JSONL): one line for the user."""


def read_records(path: str) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """(batch records, event records) of a JSONL telemetry file.

    A cut-off last line (a job still writing) is skipped; a missing file, one
    without a batch record, or one with other malformed lines raises
    :class:`ReportError` saying how many lines were bad.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ReportError(f"{path}: is a directory, not a JSONL telemetry file") from None
    batches, events, bad = [], [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or record.get("kind") not in ("batch", "event"):
            bad.append(number)
            continue
        (batches if record["kind"] == "batch" else events).append(record)
    if bad == [len(lines)] and batches:
        bad = []  # the last line of a file still being written
    if not any(line.strip() for line in lines):
        raise ReportError(f"{path}: the file is empty (no telemetry records)")
    if bad:
        raise ReportError(f"{path}: {len(bad)} of {len(lines)} lines are not telemetry records "
                          f"(first bad line: {bad[0]}); is it a JSONL file written with telemetry='FILE.jsonl'?")
    if not batches:
        raise ReportError(f"{path}: {len(events)} event records but no batch record to plot")
    return batches, events


def scaled_limit(limit: float, peak: float) -> Tuple[float, bool]:
    """The top of a y axis that shows a capacity ``limit`` only when it is near what moves:
    (top, whether the limit is drawn). A 25 GB limit does not flatten a 40 MB curve."""
    if limit and limit <= 3 * max(peak, 1.0):
        return max(limit, peak) * 1.05, True
    return max(peak, 1.0) * 1.25, False


def plot_run(batches: List[Dict[str, Any]], events: List[Dict[str, Any]], safety: float = 0.8):
    """A matplotlib figure over wall time: samples delivered (epochs marked), memory against its
    limits, the budget and each batch's cost, each batch's size by road; fallbacks as ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not batches:
        raise ReportError("no batch records to plot")
    t0 = min(b["time"] - b["wait_s"] for b in batches)
    t = [b["time"] - t0 for b in batches]
    memory = any(b.get("memory_ours") is not None or b.get("memory_used") is not None for b in batches)
    fig, axes = plt.subplots(5 if memory else 4, 1, figsize=(10, 12 if memory else 10), sharex=True,
                             constrained_layout=True)
    done_ax, mem_ax, budget_ax, size_ax = axes[0], axes[1], axes[-2], axes[-1]

    delivered, total = [], 0
    for b in batches:
        total += b["samples"]
        delivered.append(total)
    rate = total / max(t[-1], 1e-9)
    done_ax.plot(t, delivered, color="tab:blue", label=f"{rate:,.0f} samples/s = {total:,} samples ÷ {t[-1]:.1f} s")
    done_ax.set_ylabel("samples delivered")
    done_ax.legend(loc="upper left", fontsize="small")

    shm_used = [(b["shm_total"] - b["shm_free"]) / _MIB for b in batches]
    ours = [b["shm_ours"] / _MIB for b in batches]
    peaks = shm_used + ours
    mem_ax.plot(t, shm_used, color="tab:blue", label="/dev/shm used (all processes)")
    mem_ax.plot(t, ours, color="tab:green", alpha=0.8, label="this loader's (arenas reserved + batches)")
    if memory:
        ram_ax = axes[2]
        for key, color, label in (("memory_used", "tab:gray", "memory used (against the limit)"),
                                  ("memory_ours", "tab:purple", "this loader's (arenas, batches in flight, held)")):
            values = [float("nan") if b.get(key) is None else b[key] / _MIB for b in batches]
            if any(v == v for v in values):
                ram_ax.plot(t, values, color=color, label=label)
        known = [b[k] / _MIB for b in batches for k in ("memory_used", "memory_ours") if b.get(k) is not None]
        limits = [b["memory_limit"] / _MIB for b in batches if b.get("memory_limit")]
        top_mem, drawn_mem = scaled_limit(limits[-1] if limits else 0, max(known, default=1.0))
        if limits and drawn_mem:
            ram_ax.axhline(limits[-1], color="k", linestyle="--", linewidth=1, label="memory limit")
        elif limits:
            ram_ax.text(0.01, 0.92, f"memory limit (cgroup or host) {limits[-1]:,.0f} MiB: off the scale",
                        transform=ram_ax.transAxes, fontsize="small")
        ram_ax.set_ylim(0, top_mem)
        ram_ax.set_ylabel("memory (MiB)")
        ram_ax.legend(loc="upper right", fontsize="small")
    top, drawn = scaled_limit(batches[-1]["shm_total"] / _MIB, max(peaks))
    if drawn:
        mem_ax.axhline(batches[-1]["shm_total"] / _MIB, color="k", linestyle="--", linewidth=1, label="/dev/shm size")
        mem_ax.axhline(batches[-1]["shm_total"] / _MIB * safety, color="tab:red", linestyle=":",
                       label=f"safety line ({safety:.0%})")
    else:
        mem_ax.text(0.01, 0.92, f"/dev/shm size {batches[-1]['shm_total'] / _MIB:,.0f} MiB: off the scale",
                    transform=mem_ax.transAxes, fontsize="small")
    mem_ax.set_ylim(0, top)
    mem_ax.set_ylabel("/dev/shm (MiB)")
    mem_ax.legend(loc="upper right", fontsize="small")

    budget = [b["max_cost"] for b in batches]
    if any(v is not None for v in budget):
        budget_ax.step(t, [float("nan") if v is None else v for v in budget], where="post", label="max_cost (budget)")
    budget_ax.plot(t, [b["cost"] for b in batches], ".", markersize=3, label="batch cost")
    budget_ax.set_ylabel("cost")
    budget_ax.set_ylim(bottom=0)
    budget_ax.legend(loc="upper right", fontsize="small")

    roads = Counter(b["transport"] for b in batches)
    for road, color in _ROAD_COLORS.items():
        points = [(ti, b["samples"]) for ti, b in zip(t, batches) if b["transport"] == road]
        if points:
            size_ax.plot(*zip(*points), ".", color=color, markersize=4, label=f"{road.value} ({roads[road]} batches)")
    size_ax.set_ylabel("samples per batch")
    size_ax.set_ylim(0, max(b["samples"] for b in batches) * 1.15 + 0.5)
    size_ax.legend(loc="upper right", fontsize="small")
    size_ax.set_xlabel("seconds since the first batch was asked for")

    _mark_epochs(axes, [e["time"] - t0 for e in events if e["event"] == Event.EPOCH_END])
    marked = Counter(e["event"] for e in events if e["event"] in _MARKED)
    for event in events:
        if event["event"] in _MARKED:  # a short tick under the top edge: 200 spills do not hide the curves
            for ax in axes:
                ax.plot(event["time"] - t0, 1.0, "|", color=_COLORS[event["event"]], markersize=8, alpha=0.6,
                        transform=ax.get_xaxis_transform(), clip_on=False)
    title = "adaptive_loader run"
    if marked:
        title += "   ticks at the top: " + ", ".join(f"{k} x{v} ({_COLORS[k].replace('tab:', '')})"
                                                     for k, v in sorted(marked.items()))
    fig.suptitle(title, fontsize="medium")
    return fig


def _mark_epochs(axes, ends: List[float]) -> None:
    for number, end in enumerate(ends):
        for ax in axes:
            ax.axvline(end, color="0.6", linestyle="--", linewidth=0.8)
        axes[0].text(end, 0.02, f" end of epoch {number}", transform=axes[0].get_xaxis_transform(),
                     fontsize="x-small", color="0.4", rotation=90, va="bottom")


def write_report(path: str, output: str, html_output: Optional[str] = None, safety: float = 0.8) -> None:
    """Write the PNG of :func:`plot_run` (and, if asked, an HTML page with it and the events)."""
    batches, events = read_records(path)
    fig = plot_run(batches, events, safety)
    fig.savefig(output, dpi=100)
    if html_output:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        image = base64.b64encode(buffer.getvalue()).decode()
        rows = "".join(f"<tr><td>{e['step']}</td><td>{html.escape(e['event'])}</td><td>{html.escape(e['level'])}"
                       f"</td><td>{html.escape(e['message'])}</td></tr>" for e in events)
        samples = sum(b["samples"] for b in batches)
        with open(html_output, "w", encoding="utf-8") as f:
            f.write(f"<!doctype html><meta charset=utf-8><title>adaptive_loader report</title>"
                    f"<h1>{html.escape(os.path.basename(path))}</h1>"
                    f"<p>{len(batches)} batches, {samples} samples, {len(events)} events.</p>"
                    f"<img src='data:image/png;base64,{image}' alt='run plots'>"
                    f"<table border=1 cellpadding=4><tr><th>step</th><th>event</th><th>level</th><th>message</th>"
                    f"</tr>{rows}</table>")
    import matplotlib.pyplot as plt

    plt.close(fig)
