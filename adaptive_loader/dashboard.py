"""A live terminal dashboard of a loader's telemetry (uses rich).

:class:`Dashboard` is a telemetry sink: ``AdaptiveLoader(..., telemetry=Dashboard())``
or ``telemetry="dashboard"``. Its ``__call__`` only folds the record into a
:class:`RunState` under a lock; drawing happens in rich's own refresh thread,
off the loading path. ``adaptive-loader watch RUN.jsonl`` draws the same view
from a file written by a job elsewhere.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from typing import Any, Deque, Dict, Optional

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .telemetry import FALLBACK_KINDS

__all__ = ["RunState", "Dashboard", "sparkline"]

_BLOCKS = "▁▂▃▄▅▆▇█"
_HISTORY = 60


def sparkline(values, width: int = _HISTORY) -> str:
    """Unicode bars of the last ``width`` values (``None`` drawn as a space), scaled from
    zero (or the lowest value, if negative) to the highest, so a steady series looks steady."""
    values = list(values)[-width:]
    known = [v for v in values if v is not None]
    if not known:
        return ""
    low, high = min(0, min(known)), max(known)
    span = (high - low) or 1.0
    return "".join(" " if v is None else _BLOCKS[int((v - low) / span * (len(_BLOCKS) - 1))] for v in values)


class RunState:
    """What the telemetry records add up to, for the dashboard."""

    def __init__(self, total_samples: Optional[int] = None, safety: float = 0.8) -> None:
        self.total_samples = total_samples
        self.safety = safety
        self.last: Optional[Dict[str, Any]] = None
        self.epoch = 0
        self.delivered = 0
        self.budget: Deque[Optional[float]] = deque(maxlen=_HISTORY)
        self.cost: Deque[float] = deque(maxlen=_HISTORY)
        self.nbytes: Deque[int] = deque(maxlen=_HISTORY)
        self.shm_used: Deque[int] = deque(maxlen=_HISTORY)
        self.transports: Counter = Counter()
        self.fallbacks: Counter = Counter()
        self.events: Deque[str] = deque(maxlen=4)
        self.waits: Deque[tuple] = deque(maxlen=50)  # (wait_s, interval_s)
        self.started: Optional[float] = None

    def add(self, record: Dict[str, Any]) -> None:
        if record.get("kind") == "event":
            self._add_event(record)
            return
        if record["epoch"] != self.epoch:
            self.epoch, self.delivered = record["epoch"], 0
        if self.last is not None:
            self.waits.append((record["wait_s"], max(record["time"] - self.last["time"], 1e-9)))
        else:
            self.started = record["time"] - record["wait_s"]
        self.last = record
        self.delivered += record["samples"]
        self.budget.append(record["max_cost"])
        self.cost.append(record["cost"])
        self.nbytes.append(record["bytes"])
        self.shm_used.append(record["shm_total"] - record["shm_free"])
        self.transports[record["transport"]] += 1

    def _add_event(self, record: Dict[str, Any]) -> None:
        if record["event"] in FALLBACK_KINDS:
            self.fallbacks[record["event"]] += 1
        if record["event"] != "epoch_end":
            self.events.append(f"step {record['step']}: {record['event']}: {record['message']}")

    def snapshot(self) -> "RunState":
        """A copy to draw from while records keep arriving."""
        copy = object.__new__(RunState)
        copy.__dict__.update({k: (v.copy() if hasattr(v, "copy") else v) for k, v in self.__dict__.items()})
        return copy

    @property
    def waited_fraction(self) -> Optional[float]:
        """Share of the recent wall time the consumer spent waiting for batches."""
        if not self.waits:
            return None
        return min(1.0, sum(w for w, _ in self.waits) / sum(i for _, i in self.waits))


class Dashboard:
    """Live dashboard sink. Use as a context manager, or let it start on the
    first record and stop at the end of the epoch."""

    def __init__(self, total_samples: Optional[int] = None, safety: float = 0.8, refresh_per_second: float = 2,
                 console: Optional[Console] = None) -> None:
        self.state = RunState(total_samples, safety)
        self.console = console or Console(stderr=True)
        self.refresh_per_second = refresh_per_second
        self._lock = threading.Lock()
        self._live = None

    def fold(self, record: Dict[str, Any]) -> None:
        """Add a record to the state without starting or stopping anything."""
        with self._lock:
            self.state.add(record)

    def __call__(self, record: Dict[str, Any]) -> None:
        self.fold(record)
        if self._live is None and record.get("kind") == "batch":
            self.start()
        elif record.get("event") == "epoch_end":
            self.stop()

    def start(self) -> None:
        from rich.live import Live

        if self._live is None:
            self._live = Live(get_renderable=self._locked_render, console=self.console,
                              refresh_per_second=self.refresh_per_second, transient=False)
            self._live.start()

    def stop(self) -> None:
        if self._live is not None:
            self._live.refresh()
            self._live.stop()
            self._live = None

    def __enter__(self) -> "Dashboard":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _locked_render(self):
        with self._lock:  # copy under the lock, draw outside it: the sink never waits for drawing
            state = self.state.snapshot()
        return self.render(state)

    def render(self, state: Optional[RunState] = None):
        """The dashboard as a rich renderable."""
        s = state or self.state
        last = s.last
        title = f"adaptive_loader  epoch {s.epoch}  step {last['step'] if last else 0}"
        if last is None:
            return Panel(Text("waiting for the first batch..."), title=title)
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column()
        grid.add_row("progress", _progress(s))
        grid.add_row("/dev/shm", _shm_gauge(s))
        grid.add_row("budget", f"{sparkline(s.budget)}  max_cost {_num(last['max_cost'])}")
        grid.add_row("batch cost", f"{sparkline(s.cost)}  {_num(last['cost'])}  ({last['samples']} samples)")
        grid.add_row("batch bytes", f"{sparkline(s.nbytes)}  {_mib(last['bytes'])}")
        total = sum(s.transports.values())
        grid.add_row("transport", "  ".join(f"{k} {v} ({v / total:.0%})" for k, v in s.transports.most_common()))
        grid.add_row("fallbacks", "  ".join(f"{k} {v}" for k, v in sorted(s.fallbacks.items())) or "none")
        rate = last.get("samples_per_s")
        waited = s.waited_fraction
        grid.add_row("throughput", f"{_num(rate)} samples/s   waited for data {'-' if waited is None else f'{waited:.0%}'}"
                     f"   fds {last['fds_in_use']}/{last['fd_limit']}")
        parts = [grid]
        if s.events:
            parts.append(Text("\n".join(e[:160] for e in s.events), style="dim"))
        return Panel(Group(*parts), title=title, border_style="cyan")



def _progress(s: RunState) -> str:
    if not s.total_samples:
        return f"{s.delivered} samples"
    done = min(1.0, s.delivered / s.total_samples)
    bar = "█" * int(done * 30) + "░" * (30 - int(done * 30))
    rate = s.last.get("samples_per_s") if s.last else None
    eta = "" if not rate else f"  ETA {(s.total_samples - s.delivered) / rate:.0f} s"
    return f"{bar} {s.delivered}/{s.total_samples} ({done:.0%}){eta}"


def _shm_gauge(s: RunState) -> Text:
    """Used shm as a bar: this loader's part, others' part, and the safety line."""
    last, width = s.last, 40
    total = max(last["shm_total"], 1)
    used = last["shm_total"] - last["shm_free"]
    ours = min(last["shm_ours"], used)
    cells_ours = int(ours / total * width)
    cells_others = int((used - ours) / total * width)
    bar = ["█"] * cells_ours + ["▓"] * cells_others
    bar += ["░"] * (width - len(bar))
    bar[min(int(s.safety * width), width - 1)] = "|"
    text = Text("".join(bar[:width]), style="green" if used < s.safety * total else "red")
    text.append(f" {_mib(used)} / {_mib(total)} used ({_mib(ours)} ours), safety line {s.safety:.0%}")
    return text


def _mib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _num(x: Optional[float]) -> str:
    if x is None:
        return "∞"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"
