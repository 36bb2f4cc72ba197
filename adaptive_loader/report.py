"""Plots of a recorded run (matplotlib): ``adaptive-loader report RUN.jsonl -o report.png``."""

from __future__ import annotations

import base64
import html
import io
import json
import os
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["read_records", "plot_run", "write_report"]

_MARKED_EVENTS = ("off_shm", "fewer_in_flight", "fd_limit", "sharing_strategy", "recovery", "stall")
_COLORS = {"off_shm": "tab:red", "fewer_in_flight": "tab:orange", "fd_limit": "tab:purple",
           "sharing_strategy": "tab:brown", "recovery": "black", "stall": "black"}


def read_records(path: str) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """(batch records, event records) of a JSONL telemetry file; a cut-off last line is skipped."""
    batches, events = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            (batches if record.get("kind") == "batch" else events).append(record)
    return batches, events


def plot_run(batches: List[Dict[str, Any]], events: List[Dict[str, Any]], safety: float = 0.8):
    """A matplotlib figure: shm, budget and cost, bytes by transport, throughput; fallbacks marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not batches:
        raise ValueError("no batch records to plot")
    step = [b["step"] for b in batches]
    mib = 2.0**20
    fig, axes = plt.subplots(4, 1, figsize=(10, 10), sharex=True, constrained_layout=True)
    shm_ax, budget_ax, bytes_ax, rate_ax = axes
    total = [b["shm_total"] / mib for b in batches]
    shm_ax.plot(step, [(b["shm_total"] - b["shm_free"]) / mib for b in batches], label="used (all)")
    shm_ax.plot(step, [b["shm_ours"] / mib for b in batches], label="this loader's", alpha=0.8)
    shm_ax.plot(step, total, "k--", linewidth=1, label="capacity")
    shm_ax.plot(step, [t * safety for t in total], ":", color="tab:red", label=f"safety line ({safety:.0%})")
    shm_ax.set_ylabel("/dev/shm (MiB)")
    shm_ax.legend(loc="upper right", fontsize="small")

    budget = [b["max_cost"] for b in batches]
    if any(v is not None for v in budget):
        budget_ax.step(step, [float("nan") if v is None else v for v in budget], where="post", label="max_cost")
    budget_ax.plot(step, [b["cost"] for b in batches], ".", markersize=3, label="batch cost")
    budget_ax.set_ylabel("cost")
    budget_ax.legend(loc="upper right", fontsize="small")

    for transport, color in (("arena", "tab:green"), ("shm", "tab:blue"), ("file", "tab:red"), ("inline", "tab:gray")):
        points = [(b["step"], b["bytes"] / mib) for b in batches if b["transport"] == transport]
        if points:
            bytes_ax.plot(*zip(*points), ".", color=color, markersize=4, label=transport)
    bytes_ax.set_ylabel("batch size (MiB)")
    bytes_ax.legend(loc="upper right", fontsize="small")

    rate_ax.plot(step, [b["samples_per_s"] or float("nan") for b in batches])
    rate_ax.set_ylabel("samples/s")
    rate_ax.set_xlabel("step (batches delivered)")

    for event in events:
        if event["event"] in _MARKED_EVENTS:
            for ax in axes:
                ax.axvline(event["step"], color=_COLORS[event["event"]], alpha=0.35, linewidth=1)
    marked = sorted({e["event"] for e in events if e["event"] in _MARKED_EVENTS})
    title = "adaptive_loader run"
    if marked:
        title += "  (vertical lines: " + ", ".join(f"{e} = {_COLORS[e].replace('tab:', '')}" for e in marked) + ")"
    fig.suptitle(title, fontsize="medium")
    return fig


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
