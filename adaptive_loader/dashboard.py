"""A live terminal dashboard of a loader's telemetry (uses rich).

:class:`Dashboard` is a telemetry sink (``record``/``close``):
``AdaptiveLoader(..., telemetry=Dashboard())`` or ``telemetry="dashboard"``.
``record`` only folds the record into a :class:`RunState` under a lock; drawing
happens in rich's own refresh thread, off the loading path.
``adaptive-loader watch RUN.jsonl`` draws the same view from a file written by
a job elsewhere. Throughput is samples delivered divided by wall time, as in
the stress tables and the report.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from typing import Any, Deque, Dict, Optional

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .kinds import Event, Fallback

_FALLBACKS = frozenset(kind.value for kind in Fallback)
_RUN_END = getattr(Event, "RUN_END", "run_end")  # the plain string until kinds.Event has it

__all__ = ["RunState", "Dashboard", "sparkline"]

_BLOCKS = "▁▂▃▄▅▆▇█"
_HISTORY = 60


def sparkline(values, width: int = _HISTORY, high: Optional[float] = None) -> str:
    """Unicode bars of the last ``width`` values (``None`` drawn as a space), scaled from
    zero (or the lowest value, if negative) to ``high`` (default: the highest shown), so a
    steady series looks steady."""
    values = list(values)[-width:]
    known = [v for v in values if v is not None]
    if not known:
        return ""
    low, high = min(0, min(known)), max(known + ([high] if high is not None else []))
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
        self.started: Optional[float] = None  # when this epoch's first batch was asked for
        self.run_started: Optional[float] = None
        self.run_delivered = 0
        self.budget_high: Optional[float] = None  # the highest finite budget of the run
        self.budget_since: Optional[int] = None  # the step from which the budget has been what it is
        self.ended = False  # a run_end record was seen

    def add(self, record: Dict[str, Any]) -> None:
        if record.get("kind") == "event":
            self._add_event(record)
            return
        if record["epoch"] != self.epoch or self.started is None:
            self.epoch, self.delivered = record["epoch"], 0
            self.started = record["time"] - record["wait_s"]
        if self.run_started is None:
            self.run_started = self.started
        if self.last is not None:
            self.waits.append((record["wait_s"], max(record["time"] - self.last["time"], 1e-9)))
        if self.last is None or record["max_cost"] != self.last["max_cost"]:
            self.budget_since = record["step"]
        if record["max_cost"] is not None:
            self.budget_high = max(self.budget_high or 0.0, record["max_cost"])
        self.last = record
        self.delivered += record["samples"]
        self.run_delivered += record["samples"]
        self.budget.append(record["max_cost"])
        self.cost.append(record["cost"])
        self.nbytes.append(record["bytes"])
        self.shm_used.append(record["shm_total"] - record["shm_free"])
        self.transports[record["transport"]] += 1

    def _add_event(self, record: Dict[str, Any]) -> None:
        kind = record["event"]
        if kind in _FALLBACKS:
            self.fallbacks[kind] += 1
        if kind == _RUN_END:
            self.ended = True
        if kind in (Event.EPOCH_END, _RUN_END):
            return
        if self.events and self.events[-1][0] == kind:  # a run of one kind is one line
            _, first, count, _ = self.events.pop()
            self.events.append((kind, first, count + 1, record))
        else:
            self.events.append((kind, record["step"], 1, record))

    def event_lines(self):
        """The last events, a run of one kind as one line."""
        for kind, first, count, last in self.events:
            steps = f"step {first}" if count == 1 else f"steps {first}-{last['step']}, {count}x"
            yield f"{steps}: {kind}: {last['message']}"

    def rate(self, run: bool = False) -> Optional[float]:
        """Samples delivered divided by the wall time since the first batch was asked for
        (this epoch, or with ``run`` the whole run)."""
        started = self.run_started if run else self.started
        if self.last is None or started is None:
            return None
        return (self.run_delivered if run else self.delivered) / max(self.last["time"] - started, 1e-9)

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

    def record(self, record: Dict[str, Any]) -> None:
        """The sink: fold the record, start drawing on the first batch, stop at an epoch's end."""
        self.fold(record)
        if self._live is None and record.get("kind") == "batch":
            self.start()
        elif record.get("event") in (Event.EPOCH_END, _RUN_END):
            self.stop()

    __call__ = record

    def close(self) -> None:
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
            if not self.console.is_terminal:
                self.console.file.write("\n")  # rich leaves the last line open where it cannot redraw

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
        if last.get("memory_limit"):
            grid.add_row("memory", _memory_gauge(s))
        steady = "" if s.budget_since is None or s.budget_since == last["step"] else \
            f", the same since step {s.budget_since}"
        grid.add_row("budget", f"{sparkline(s.budget, high=s.budget_high)}  max_cost {_num(last['max_cost'])}"
                               f"{steady}" + ("" if s.budget_high is None else f" (highest {_num(s.budget_high)})"))
        grid.add_row("batch cost", f"{sparkline(s.cost)}  {_num(last['cost'])}  ({last['samples']} samples)")
        grid.add_row("batch bytes", f"{sparkline(s.nbytes)}  {_mib(last['bytes'])}")
        total = sum(s.transports.values())
        grid.add_row("transport", "  ".join(f"{k} {v} ({v / total:.0%})" for k, v in s.transports.most_common()))
        grid.add_row("fallbacks", "  ".join(f"{k} {v}" for k, v in sorted(s.fallbacks.items())) or "none")
        waited = s.waited_fraction
        grid.add_row("throughput", f"{_num(s.rate())} samples/s this epoch, {_num(s.rate(run=True))} in the run "
                     f"(samples ÷ wall time)   waited for data {'-' if waited is None else f'{waited:.0%}'}"
                     f"   fds {last['fds_in_use']}/{last['fd_limit']}")
        parts = [grid]
        if s.events:
            parts.append(Text("\n".join(e[:160] for e in s.event_lines()), style="dim"))
        return Panel(Group(*parts), title=title, border_style="cyan")



def _progress(s: RunState) -> str:
    if not s.total_samples:
        return f"{s.delivered} samples"
    done = min(1.0, s.delivered / s.total_samples)
    bar = "█" * int(done * 30) + "░" * (30 - int(done * 30))
    rate = s.rate()
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


def _memory_gauge(s: RunState) -> Text:
    """Memory (the memory cgroup's limit, else the host's RAM) as a bar: this loader's part, the rest."""
    last, width = s.last, 40
    limit = max(last["memory_limit"], 1)
    ours = min(last.get("memory_ours") or 0, limit)
    used = max(min(last.get("memory_used") or 0, limit), ours)
    cells_ours = int(ours / limit * width)
    bar = ["█"] * cells_ours + ["▓"] * max(0, int(used / limit * width) - cells_ours)
    bar += ["░"] * (width - len(bar))
    text = Text("".join(bar[:width]), style="green" if used < s.safety * limit else "red")
    used_text = "-" if last.get("memory_used") is None else _mib(used)
    text.append(f" {used_text} / {_mib(limit)} used ({_mib(last.get('memory_ours'))} ours)")
    return text


def _mib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _num(x: Optional[float]) -> str:
    if x is None:
        return "∞"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"
