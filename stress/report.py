"""Plain-text tables of stress results."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

__all__ = ["results_table", "side_by_side"]

_COLUMNS = [("scenario", "scenario"), ("loader", "loader"), ("outcome", "outcome"), ("delivered", "delivered"),
            ("missing", "missing"), ("duplicated", "dup"), ("mean_batch_size", "per batch"),
            ("peak_shm_used_bytes", "peak shm"), ("shm_left", "shm left"), ("spill_left", "spill left"),
            ("seconds", "seconds"), ("samples_per_s", "samples/s"), ("fallbacks", "fallbacks")]
#: shown after "peak shm" when some run had a memory limit
_MEMORY_COLUMNS = [("memory_limit_bytes", "mem limit"), ("peak_memory_bytes", "peak mem"), ("oom_kills", "oom kills")]


def _cell(key: str, result: Dict[str, Any]) -> str:
    value = result.get(key)
    if key == "delivered":
        return f"{value}/{result['expected']}"
    if key in ("peak_shm_used_bytes", "memory_limit_bytes", "peak_memory_bytes"):
        return "-" if value is None else f"{value / 2**20:.1f} MiB"
    if key in ("shm_left", "spill_left"):  # what the run left: files in /dev/shm, entries in its spill dir
        return "-" if value is None else str(len(value))
    if key == "fallbacks":
        return ", ".join(f"{k} {v}" for k, v in sorted((value or {}).items())) or "-"
    if isinstance(value, float):
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    return "-" if value is None else str(value)


def results_table(results: Sequence[Dict[str, Any]]) -> str:
    """One row per result, columns aligned; the memory columns where some run had a memory limit."""
    columns = list(_COLUMNS)
    if any(r.get("memory_limit_bytes") is not None for r in results):
        at = [key for key, _ in columns].index("peak_shm_used_bytes") + 1
        columns[at:at] = _MEMORY_COLUMNS
    rows: List[List[str]] = [[title for _, title in columns]]
    rows += [[_cell(key, r) for key, _ in columns] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    errors = [f"  {r['scenario']}/{r['loader']}: {r['error']}" for r in results if r.get("error")]
    if errors:
        lines += ["", "errors:"] + [e[:300] for e in errors]
    notes = [f"  {r['scenario']}/{r['loader']}: " + ", ".join(f"{k} {v}" for k, v in r["notes"].items())
             for r in results if r.get("notes")]
    if notes:
        lines += ["", "notes:"] + notes
    return "\n".join(lines)


def side_by_side(vanilla: Dict[str, Any], adaptive: Dict[str, Any]) -> str:
    """The demo's closing table: one column per loader."""
    keys = [("outcome", "outcome"), ("delivered", "samples delivered"), ("missing", "missing"),
            ("duplicated", "duplicated"), ("mean_batch_size", "samples per batch (mean)"),
            ("peak_shm_used_bytes", "peak /dev/shm used"), ("shm_left", "files left in /dev/shm"),
            ("spill_left", "files left in the spill dir"), ("seconds", "seconds"), ("samples_per_s", "samples/s (samples ÷ seconds)"), ("fallbacks", "fallbacks")]
    rows = [["", "DataLoader", "AdaptiveLoader"]]
    rows += [[title, _cell(key, vanilla), _cell(key, adaptive)] for key, title in keys]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)
