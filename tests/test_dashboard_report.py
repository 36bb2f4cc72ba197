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

    assert matplotlib.image.imread(str(png)).shape[:2] in ((1000, 1000), (1200, 1000))
    html = page.read_text()
    assert "data:image/png;base64," in html and "epoch_end" in html
    batches, events = read_records(path)
    fig = plot_run(batches, events)
    labels = [ax.get_ylabel() for ax in fig.axes]
    memory = any(b.get("memory_used") is not None for b in batches)  # the memory panel, where measured
    assert labels == ["samples delivered", "/dev/shm (MiB)"] + ["memory (MiB)"] * memory + ["cost", "samples per batch"]
    assert fig.axes[-1].get_xlabel() == "seconds since the first batch was asked for"
    # the throughput in the legend is samples over wall time, the definition of the stress tables
    [legend] = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert f"{sum(b['samples'] for b in batches):,} samples" in legend and "samples/s" in legend
    # the shm axis is scaled to what moves: 48 MiB shm, so the capacity is on it
    assert fig.axes[1].get_ylim()[1] <= 48 * 1.06


def test_a_huge_limit_does_not_flatten_the_curves():
    from adaptive_loader.report import scaled_limit

    assert scaled_limit(25_000, 40) == (50.0, False)
    assert scaled_limit(64, 40) == (64 * 1.05, True)


@pytest.mark.parametrize("content, message", [
    (None, "no such file"), ("", "the file is empty"), ("hello\nworld\n", "2 of 2 lines are not telemetry"),
    ('{"kind": "event", "event": "epoch_end"}\n', "no batch record"),
])
def test_report_refuses_bad_files_with_one_line_and_status_2(tmp_path, content, message):
    from adaptive_loader.report import ReportError

    path = tmp_path / "run.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ReportError, match=message):
        write_report(str(path), str(tmp_path / "x.png"))
    out = subprocess.run([sys.executable, "-m", "adaptive_loader.cli", "report", str(path), "-o",
                          str(tmp_path / "x.png")], capture_output=True, text=True)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()


def test_report_does_not_overwrite_without_o_or_force(recorded_run, tmp_path):
    path, _ = recorded_run
    (tmp_path / "report.png").write_bytes(b"mine")
    command = [sys.executable, "-m", "adaptive_loader.cli", "report", path]
    out = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 2 and "--force" in out.stderr and (tmp_path / "report.png").read_bytes() == b"mine"
    out = subprocess.run(command + ["--force"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_help_is_plain_text_for_every_option():
    import argparse

    from adaptive_loader.cli import build_parser

    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, command in sub.choices.items():
        for action in command._actions:
            assert name == "stress" or action.help, f"{name} {action.option_strings or action.dest}: no help"
    for command in ([], ["watch"], ["report"]):
        out = subprocess.run([sys.executable, "-m", "adaptive_loader.cli", *command, "--help"], capture_output=True,
                             text=True)
        assert out.returncode == 0, out.stderr
        assert "``" not in out.stdout and ":class:" not in out.stdout


def test_watch_says_what_it_waits_for_and_follows_epochs_until_the_run_ends(tmp_path):
    import threading
    import time

    from adaptive_loader.cli import watch_file
    from adaptive_loader.telemetry import Telemetry

    path = tmp_path / "later.jsonl"
    console = Console(file=io.StringIO(), width=120, record=True, color_system=None)
    done = []
    watcher = threading.Thread(target=lambda: done.append(watch_file(str(path), console=console, poll=0.02)))
    watcher.start()
    time.sleep(0.3)
    assert watcher.is_alive()  # the file does not exist yet: it waits
    telemetry = Telemetry(str(path))
    for epoch in range(2):
        for step in range(3):
            telemetry.batch(step=epoch * 3 + step + 1, epoch=epoch, samples=2, cost=2.0, bytes=10, storages=1,
                            max_cost=None, shm_free=50, shm_total=100, shm_ours=5, fds_in_use=3, fd_limit=100,
                            ram_available=None, worker_rss=None, transport="arena", worker=0, wait_s=0.0,
                            samples_per_s=None)
        telemetry.event("epoch_end", f"epoch {epoch} done", step=epoch * 3 + 3, epoch=epoch)
        time.sleep(0.3)
        assert watcher.is_alive()  # an epoch's end is not the run's end
    telemetry.close()
    watcher.join(timeout=10)
    assert not watcher.is_alive() and done == [0]
    assert "epoch 1  step 6" in console.export_text()


def test_watch_names_a_missing_file_before_waiting(tmp_path):
    out = subprocess.run([sys.executable, "-m", "adaptive_loader.cli", "watch", str(tmp_path / "nope.jsonl"),
                          "--once"], capture_output=True, text=True)
    assert out.returncode == 2 and "no such file" in out.stderr and "Traceback" not in out.stderr
    proc = subprocess.Popen([sys.executable, "-m", "adaptive_loader.cli", "watch", str(tmp_path / "later.jsonl")],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        assert "waiting for" in proc.stderr.readline()
    finally:
        proc.kill()
        proc.wait()


def test_dashboard_as_a_live_sink_and_sparkline():
    console = Console(file=io.StringIO(), width=100, record=True, color_system=None)
    dashboard = Dashboard(total_samples=40, console=console, refresh_per_second=20)
    dataset = [{"x": i} for i in range(40)]
    assert len(list(AdaptiveLoader(dataset, batch_size=4, num_workers=1, telemetry=dashboard))) == 10
    assert "40/40 (100%)" in console.export_text()
    assert sparkline([0, 1, 2, 3, None]) == "▁▃▅█ " and sparkline([]) == ""
    assert sparkline([5, 5, 5]) == "███"  # scaled from zero: steady looks steady
    assert sparkline([5, 5, 5], high=10) == "▄▄▄"  # against the run's highest budget, not the window's


def test_the_budget_line_says_how_long_it_has_been_steady_and_against_what():
    console = Console(file=io.StringIO(), width=200, record=True, color_system=None)
    dashboard = Dashboard(console=console)
    for step, budget in enumerate([1000.0, 400.0, 400.0, 400.0], 1):
        dashboard.fold(dict(kind="batch", step=step, epoch=0, time=float(step), wait_s=0.5, samples=4, cost=390.0,
                            bytes=1 << 20, max_cost=budget, shm_free=10 << 20, shm_total=64 << 20, shm_ours=1 << 20,
                            fds_in_use=5, fd_limit=1024, transport="memfd", samples_per_s=None,
                            memory_limit=1 << 30, memory_used=256 << 20, memory_ours=64 << 20))
    console.print(dashboard.render())
    text = console.export_text()
    assert "max_cost 400, the same since step 2 (highest 1000)" in text
    assert "memory" in text and "256.0 MiB / 1024.0 MiB used (64.0 MiB ours)" in text
    # throughput: 16 samples over the 3.5 s since the first batch was asked for
    assert "4.57 samples/s this epoch" in text


def test_a_stopped_dashboard_ends_its_last_line_where_there_is_no_terminal():
    out = io.StringIO()
    dashboard = Dashboard(console=Console(file=out, width=100, color_system=None, force_terminal=False))
    dashboard.record(dict(kind="batch", step=1, epoch=0, time=1.0, wait_s=0.1, samples=4, cost=4.0, bytes=10,
                          max_cost=None, shm_free=10, shm_total=20, shm_ours=1, fds_in_use=5, fd_limit=10,
                          transport="shm", samples_per_s=None))
    dashboard.close()
    assert out.getvalue().endswith("\n")


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
