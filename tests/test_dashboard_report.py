"""Telemetry of a real small-shm run: schema, the dashboard drawn headless, the report image."""

import io
import json
import os
import subprocess
import sys

import pytest
from rich.console import Console

from adaptive_loader import AdaptiveLoader
from adaptive_loader.dashboard import Dashboard, sparkline
from adaptive_loader.report import plot_run, read_records, write_report
from adaptive_loader.telemetry import validate_record
from stress.harness import run_case
from stress.sandbox import sandbox_available

AVAILABLE, WHY = sandbox_available()


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """Telemetry of the shm-hog scenario in a real 48 MiB /dev/shm (off-shm batches, budget moves)."""
    if not AVAILABLE:
        pytest.skip(f"no private /dev/shm can be made here: {WHY}")
    path = str(tmp_path_factory.mktemp("run") / "run.jsonl")
    result = run_case("shm-hog", "adaptive", shm_bytes=48 * 2**20, quick=True, telemetry=path)
    assert result["outcome"] == "ok"
    return path, result


def test_every_record_matches_the_schema(recorded_run):
    path, result = recorded_run
    with open(path) as f:
        records = [json.loads(line) for line in f]
    for record in records:
        validate_record(record)
    batches = [r for r in records if r["kind"] == "batch"]
    assert sum(r["samples"] for r in batches) == result["expected"]
    assert {r["event"] for r in records if r["kind"] == "event"} >= {"budget", "epoch_end"}


def test_schema_violations_are_named():
    with pytest.raises(ValueError, match="kind must be"):
        validate_record({"kind": "nope"})
    with pytest.raises(ValueError, match="missing"):
        validate_record({"schema": 1, "kind": "event"})


def test_dashboard_renders_headless(recorded_run):
    path, result = recorded_run
    console = Console(file=io.StringIO(), width=180, record=True, color_system=None)
    dashboard = Dashboard(total_samples=result["expected"], console=console)
    batches, events = read_records(path)
    for record in batches + events:
        dashboard.fold(record)
    console.print(dashboard.render())
    text = console.export_text()
    last = batches[-1]
    for expected in ("progress", "/dev/shm", "safety line 80%", "budget", "max_cost", "batch cost",
                     "batch bytes", "transport", "shm ", "fallbacks", "throughput", "waited for data",
                     f"{result['expected']}/{result['expected']} (100%)", f"step {last['step']}",
                     f"fds {last['fds_in_use']}/{last['fd_limit']}"):
        assert expected in text, expected


def test_watch_once_from_the_command_line(recorded_run):
    path, result = recorded_run
    out = subprocess.run([sys.executable, "-m", "adaptive_loader.cli", "watch", path, "--once", "--total",
                          str(result["expected"])], capture_output=True, text=True, check=True)
    assert "adaptive_loader" in out.stdout + out.stderr and "/dev/shm" in out.stdout + out.stderr


def test_report_image_and_html(recorded_run, tmp_path):
    path, _ = recorded_run
    png, page = tmp_path / "report.png", tmp_path / "report.html"
    subprocess.run([sys.executable, "-m", "adaptive_loader.cli", "report", path, "-o", str(png), "--html",
                    str(page)], check=True, capture_output=True)
    import matplotlib.image

    assert matplotlib.image.imread(str(png)).shape[:2] == (1000, 1000)
    html = page.read_text()
    assert "data:image/png;base64," in html and "epoch_end" in html
    fig = plot_run(*read_records(path))
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert labels == ["/dev/shm (MiB)", "cost", "batch size (MiB)", "samples/s"]
    assert fig.axes[-1].get_xlabel() == "step (batches delivered)"


def test_report_refuses_a_file_without_batches(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no batch records"):
        write_report(str(empty), str(tmp_path / "x.png"))


def test_dashboard_as_a_live_sink_and_sparkline():
    console = Console(file=io.StringIO(), width=100, record=True, color_system=None)
    dashboard = Dashboard(total_samples=40, console=console, refresh_per_second=20)
    dataset = [{"x": i} for i in range(40)]
    assert len(list(AdaptiveLoader(dataset, batch_size=4, num_workers=1, telemetry=dashboard))) == 10
    assert "40/40 (100%)" in console.export_text()
    assert sparkline([0, 1, 2, 3, None]) == "▁▃▅█ " and sparkline([]) == ""
    assert sparkline([5, 5, 5]) == "███"  # scaled from zero: steady looks steady


def test_tensorboard_sink(tmp_path):
    pytest.importorskip("tensorboard", reason="the TensorBoard sink needs the tensorboard package")
    dataset = [{"x": i} for i in range(12)]
    list(AdaptiveLoader(dataset, batch_size=4, telemetry=f"tensorboard:{tmp_path}"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = os.listdir(tmp_path)
    assert files, "no event file"
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert len(events.Scalars("adaptive_loader/samples")) == 3
