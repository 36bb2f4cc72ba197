"""Records and sinks of adaptive_loader.telemetry."""

import json
import logging
import pathlib

import pytest

from adaptive_loader.telemetry import (
    BATCH_FIELDS, EVENT_FIELDS, EVENT_KINDS, SCHEMA_VERSION, JsonlSink, Telemetry)

AUTO_FIELDS = ("schema", "kind", "time")


def batch_fields(step=1):
    """Every field a batch record takes from the caller, with plausible values."""
    values = dict(step=step, epoch=0, samples=4, cost=12.5, bytes=4096, storages=2, max_cost=100.0,
                  shm_free=1 << 30, shm_total=1 << 31, shm_ours=8192, fds_in_use=42, fd_limit=1024,
                  ram_available=1 << 33, worker_rss=123456, transport="shm", worker=0, wait_s=0.01,
                  samples_per_s=400.0)
    assert set(values) == set(BATCH_FIELDS) - set(AUTO_FIELDS)  # keeps this helper in step with the schema
    return values


def read_lines(path):
    """The records of a JSONL file, less the run_end record ``close()`` appends."""
    text = pathlib.Path(path).read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [r for r in map(json.loads, text.splitlines()) if r.get("event") != "run_end"]


def test_schema_constants():
    assert len(set(BATCH_FIELDS)) == len(BATCH_FIELDS)
    assert len(set(EVENT_FIELDS)) == len(EVENT_FIELDS)
    assert set(AUTO_FIELDS) <= set(BATCH_FIELDS)
    assert set(AUTO_FIELDS) <= set(EVENT_FIELDS)
    assert isinstance(SCHEMA_VERSION, int)


def test_jsonl_batch_record_has_exactly_the_batch_fields(tmp_path):
    path = tmp_path / "t.jsonl"
    tel = Telemetry(str(path))
    returned = tel.batch(**batch_fields(step=7))
    tel.close()
    [line] = read_lines(path)
    assert set(line) == set(BATCH_FIELDS)
    assert len(line) == len(BATCH_FIELDS)
    assert line["schema"] == SCHEMA_VERSION
    assert line["kind"] == "batch"
    assert isinstance(line["time"], float)
    assert line["step"] == 7 and line["transport"] == "shm" and line["max_cost"] == 100.0
    assert line == returned


def test_jsonl_event_record_has_exactly_the_event_fields(tmp_path):
    path = tmp_path / "t.jsonl"
    tel = Telemetry(path)
    returned = tel.event("budget", "lower max_cost 10 -> 5", step=3, epoch=1, level=logging.WARNING,
                         max_cost=5.0, per_batch_bytes=1024)
    tel.close()
    [line] = read_lines(path)
    assert set(line) == set(EVENT_FIELDS)
    assert len(line) == len(EVENT_FIELDS)
    assert line["schema"] == SCHEMA_VERSION
    assert line["kind"] == "event"
    assert line["event"] == "budget"
    assert line["level"] == "WARNING"
    assert line["message"] == "lower max_cost 10 -> 5"
    assert (line["step"], line["epoch"]) == (3, 1)
    assert line["data"] == {"max_cost": 5.0, "per_batch_bytes": 1024}
    assert line == returned


def test_jsonl_one_valid_line_per_record_in_order(tmp_path):
    path = tmp_path / "t.jsonl"
    tel = Telemetry(path)
    for step in range(5):
        tel.batch(**batch_fields(step=step))
        tel.event(EVENT_KINDS[step % len(EVENT_KINDS)], f"message {step}\nwith a newline", step=step, epoch=0)
    tel.close()
    lines = read_lines(path)
    assert len(lines) == 10
    assert [r["kind"] for r in lines] == ["batch", "event"] * 5
    assert [r["step"] for r in lines] == [s for s in range(5) for _ in range(2)]
    assert lines[1]["message"] == "message 0\nwith a newline"
    for r in lines:
        assert set(r) == set(BATCH_FIELDS if r["kind"] == "batch" else EVENT_FIELDS)


def test_jsonl_lines_are_flushed_before_close(tmp_path):
    path = tmp_path / "t.jsonl"
    tel = Telemetry(path)
    tel.event("stall", "first", step=0, epoch=0)
    assert len(read_lines(path)) == 1  # readable while the sink is still open
    tel.close()


def test_jsonl_sink_appends_to_an_existing_file(tmp_path):
    path = tmp_path / "t.jsonl"
    for step in range(2):
        tel = Telemetry(path)
        tel.batch(**batch_fields(step=step))
        tel.close()
    assert [r["step"] for r in read_lines(path)] == [0, 1]


def test_jsonl_sink_in_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sink = JsonlSink("bare.jsonl")
    sink({"a": 1})
    sink.close()
    assert read_lines(tmp_path / "bare.jsonl") == [{"a": 1}]


def test_path_in_a_missing_directory_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Telemetry(str(tmp_path / "missing" / "t.jsonl"))
    with pytest.raises(ValueError):
        JsonlSink(tmp_path / "missing" / "t.jsonl")
    assert not (tmp_path / "missing").exists()


def test_callable_sink_receives_dicts():
    got = []
    tel = Telemetry(got.append)
    b = tel.batch(**batch_fields())
    e = tel.event("stall", "no batch for 60 s", step=1, epoch=0, waited_s=60.0)
    assert got == [b, e]
    assert all(isinstance(r, dict) for r in got)
    assert set(got[0]) == set(BATCH_FIELDS)
    assert set(got[1]) == set(EVENT_FIELDS)
    assert got[1]["data"] == {"waited_s": 60.0}


def test_list_of_sinks_fans_out(tmp_path):
    first, second, nested = [], [], []
    path = tmp_path / "t.jsonl"
    tel = Telemetry([first.append, str(path), (second.append, [nested.append])])
    assert len(tel.sinks) == 4
    tel.batch(**batch_fields())
    tel.event("epoch_end", "done", step=1, epoch=0)
    tel.close()
    assert first == second == nested
    assert [r.get("event") for r in first] == [None, "epoch_end", "run_end"]
    assert read_lines(path) == json.loads(json.dumps(first[:2]))


def test_no_sinks_still_returns_records():
    tel = Telemetry()
    assert tel.sinks == []
    assert set(tel.batch(**batch_fields())) == set(BATCH_FIELDS)
    assert set(tel.event("recovery", "restarted", step=0, epoch=0)) == set(EVENT_FIELDS)
    tel.close()


@pytest.mark.parametrize("bad", [42, 3.5, {"path": "x"}, object(), b"t.jsonl", [print, 7]])
def test_bad_spec_raises_type_error(bad):
    with pytest.raises(TypeError):
        Telemetry(bad)


@pytest.mark.parametrize("level", [logging.INFO, logging.WARNING])
def test_events_are_logged_at_their_level(caplog, level):
    caplog.set_level(logging.DEBUG, logger="adaptive_loader")
    rec = Telemetry().event("off_shm", "batch 3 went through the pipe", step=3, epoch=0, level=level)
    assert rec["level"] == logging.getLevelName(level)
    mine = [r for r in caplog.records if r.name == "adaptive_loader"]
    assert len(mine) == 1
    assert mine[0].levelno == level
    assert "off_shm" in mine[0].getMessage()
    assert "batch 3 went through the pipe" in mine[0].getMessage()


def test_events_below_the_logger_level_are_not_logged_but_still_emitted(caplog):
    caplog.set_level(logging.WARNING, logger="adaptive_loader")
    got = []
    Telemetry(got.append).event("budget", "quiet", step=0, epoch=0, level=logging.INFO)
    assert [r for r in caplog.records if r.name == "adaptive_loader"] == []
    assert len(got) == 1


def test_batches_are_logged_at_debug(caplog):
    caplog.set_level(logging.DEBUG, logger="adaptive_loader")
    Telemetry().batch(**batch_fields(step=11))
    mine = [r for r in caplog.records if r.name == "adaptive_loader"]
    assert len(mine) == 1
    assert mine[0].levelno == logging.DEBUG
    assert "batch 11" in mine[0].getMessage()


def test_batches_are_not_logged_at_info(caplog):
    caplog.set_level(logging.INFO, logger="adaptive_loader")
    Telemetry().batch(**batch_fields())
    assert [r for r in caplog.records if r.name == "adaptive_loader"] == []


def test_telemetry_does_not_import_the_dashboard():
    import subprocess
    import sys

    code = ("import sys, adaptive_loader.telemetry as t; t.Telemetry(lambda r: None).close(); "
            "print('adaptive_loader.dashboard' in sys.modules, 'rich' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_the_dashboard_is_resolved_by_name_only_when_asked_for():
    from adaptive_loader.dashboard import Dashboard
    from adaptive_loader.telemetry import Sink

    tel = Telemetry(["dashboard"], total_samples=10)
    [sink] = tel.sinks
    assert isinstance(sink, Dashboard) and isinstance(sink, Sink)
    assert sink.state.total_samples == 10
    tel.close()


def test_registered_sinks_and_objects_with_record_and_close(tmp_path):
    from adaptive_loader.telemetry import register_sink

    class Collect:
        def __init__(self, total_samples=None, safety=0.8):
            self.records, self.closed, self.total = [], False, total_samples

        def record(self, record):
            self.records.append(record)

        def close(self):
            self.closed = True

    register_sink("collect-test", Collect)
    mine = Collect()
    tel = Telemetry(["collect-test", mine], total_samples=3)
    named = tel.sinks[0]
    tel.batch(**batch_fields())
    tel.close()
    assert named.total == 3 and named.closed and mine.closed
    assert [r["kind"] for r in named.records] == ["batch", "event"] and named.records == mine.records
    assert named.records[-1]["event"] == "run_end"
    with pytest.raises(ValueError, match="sink name"):
        register_sink("a:b", Collect)
    with pytest.raises(TypeError, match="factory"):
        register_sink("x", 42)


def test_close_ends_the_run_with_a_valid_run_end_event_once(tmp_path):
    from adaptive_loader.telemetry import validate_record

    path = tmp_path / "t.jsonl"
    tel = Telemetry(path)
    tel.batch(**batch_fields(step=5))
    tel.close()
    tel.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r.get("event") for r in lines] == [None, "run_end"] and lines[-1]["step"] == 5
    for line in lines:
        validate_record(line)


def test_optional_memory_fields_are_valid_when_present_or_absent():
    from adaptive_loader.telemetry import validate_record

    record = Telemetry().batch(**batch_fields())
    validate_record(record)
    validate_record(dict(record, memory_limit=1 << 30, memory_used=None, memory_ours=123, transport="memfd"))
    with pytest.raises(ValueError, match="memory_used"):
        validate_record(dict(record, memory_used="lots"))
    with pytest.raises(ValueError, match="extra"):
        validate_record(dict(record, memory_spare=1))


def test_kinds_come_from_the_enums():
    from adaptive_loader.kinds import Event, Fallback, Road
    from adaptive_loader.telemetry import FALLBACK_KINDS, TRANSPORTS

    assert set(FALLBACK_KINDS) == {k.value for k in Fallback}
    assert {k.value for k in Event} <= set(EVENT_KINDS)
    assert set(TRANSPORTS) == {k.value for k in Road}


def test_repeated_events_are_logged_first_in_full_then_summarised(caplog):
    from adaptive_loader.telemetry import LogSink

    now = [0.0]
    caplog.set_level(logging.INFO, logger="adaptive_loader")
    tel = Telemetry()
    tel._log = LogSink(every=10.0, clock=lambda: now[0])
    for step in range(1, 201):  # 200 spills in 20 s
        now[0] = step * 0.1
        tel.event("off_shm", f"batch {step} went through a spill file", step=step, epoch=0, level=logging.WARNING)
    tel.event("budget", "lower max_cost 100 -> 50", step=201, epoch=0)
    tel.event("epoch_end", "epoch 0 done", step=201, epoch=0)
    tel.event("off_shm", "batch 202 went through a spill file", step=202, epoch=1, level=logging.WARNING)
    tel.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "adaptive_loader"]
    spills = [line for line in lines if line.startswith("off_shm")]
    assert spills[0] == "off_shm: batch 1 went through a spill file"
    assert len(spills) <= 5, lines  # first in full, a summary every 10 s and at the epoch's end, then epoch 1's first
    summaries = [line for line in spills if "more batches went through a spill file" in line]
    assert sum(int(line.split()[1]) for line in summaries) == 199
    assert spills[-1] == "off_shm: batch 202 went through a spill file"  # a new epoch: in full again
    assert "budget: lower max_cost 100 -> 50" in lines and "epoch_end: epoch 0 done" in lines
    assert lines.index("epoch_end: epoch 0 done") > lines.index(summaries[-1])
    assert all("inf" not in line.split() for line in lines)


def test_a_new_jsonl_file_is_readable_by_its_owner_only(tmp_path):
    import os
    import stat

    path = tmp_path / "t.jsonl"
    Telemetry(path).close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
