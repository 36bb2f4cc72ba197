"""The stress harness's command line: list, run with JSON out, refusal without a sandbox."""

import json
import os
import subprocess
import sys

import pytest

from stress.harness import RESULT_FIELDS
from stress.sandbox import parse_size, sandbox_available
from stress.scenarios import SCENARIOS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AVAILABLE, WHY = sandbox_available()


def stress(*args, env=None):
    return subprocess.run([sys.executable, "-m", "stress", *args], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=300)


def test_list_names_every_scenario():
    out = stress("list")
    assert out.returncode == 0
    assert [line.split()[0] for line in out.stdout.splitlines()] == list(SCENARIOS)


@pytest.mark.skipif(not AVAILABLE, reason=f"no private /dev/shm can be made here: {WHY}")
def test_run_writes_results_with_the_documented_schema(tmp_path):
    out_file = tmp_path / "r.json"
    out = stress("run", "giant-sample", "--loader", "adaptive", "--shm-size", "32M", "--quick",
                 "--json", str(out_file))
    assert out.returncode == 0, out.stdout + out.stderr
    [result] = json.loads(out_file.read_text())
    assert tuple(result) == RESULT_FIELDS
    assert result["outcome"] == "ok" and result["shm_size_bytes"] == 32 * 2**20
    assert result["peak_shm_used_bytes"] <= 32 * 2**20
    assert "giant-sample" in out.stdout and "ok" in out.stdout


def test_without_a_sandbox_it_refuses_instead_of_using_the_real_shm(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    os.symlink(sys.executable, empty / "python3")
    env = dict(os.environ, PATH=str(empty))  # no unshare on PATH
    out = stress("run", "seed", env=env)
    assert out.returncode == 2
    assert "unshare" in out.stderr and "Refusing" in out.stderr


@pytest.mark.parametrize("text, value", [("64M", 64 * 2**20), ("1G", 2**30), ("512k", 512 * 1024),
                                         ("1000", 1000), ("1.5M", int(1.5 * 2**20)), ("64MiB", 64 * 2**20)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.skipif(not AVAILABLE, reason=f"no private /dev/shm can be made here: {WHY}")
def test_epochs_are_counted_one_by_one_and_the_timeline_is_written(tmp_path):
    from stress.harness import run_case

    timeline = tmp_path / "timeline.json"
    result = run_case("giant-sample", "adaptive", shm_bytes=32 * 2**20, quick=True, epochs=2,
                      timeline=str(timeline))
    n = len(SCENARIOS["giant-sample"].build(32 * 2**20, 2, True).dataset)
    assert result["outcome"] == "ok" and result["epochs"] == 2
    assert result["expected"] == result["delivered"] == 2 * n and result["missing"] == result["duplicated"] == 0
    assert result["batches"] >= 2 * n / 4 and result["mean_batch_size"] == round(2 * n / result["batches"], 2)
    series = json.loads(timeline.read_text())
    assert sum(b[2] for b in series["batches"]) == 2 * n and {b[1] for b in series["batches"]} == {0, 1}
    assert series["usage"] and series["memory_limit"] > 0 and series["outcome"] == "ok"


def test_adaptive_loader_stress_runs_the_same_harness():
    out = subprocess.run([sys.executable, "-m", "adaptive_loader.cli", "stress", "list"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert [line.split()[0] for line in out.stdout.splitlines()] == list(SCENARIOS)
    helptext = subprocess.run([sys.executable, "-m", "adaptive_loader.cli", "stress", "--help"], cwd=REPO,
                              capture_output=True, text=True, timeout=120).stdout
    assert helptext.startswith("usage: adaptive-loader stress")
    assert stress("--help").stdout.startswith("usage: python -m stress")


def test_adaptive_loader_stress_passes_on_the_harness_errors_and_exit_status():
    """The subcommand runs the harness as its own program (the library does not import it)."""
    out = subprocess.run([sys.executable, "-m", "adaptive_loader.cli", "stress", "run", "no-such-scenario"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("usage: adaptive-loader stress run") and "no-such-scenario" in out.stderr


def test_the_detection_workload_decodes_jpegs_and_draws_polygons():
    from stress.workloads import CocoStyleDataset, detection_collate

    dataset = CocoStyleDataset(6, max_objects=150)
    with pytest.raises(RuntimeError, match="prepare"):
        dataset[0]
    dataset.prepare()
    image, target, index = dataset[3]
    assert tuple(image.shape) == (3, 240, 320) and index == 3
    assert tuple(target["masks"].shape) == (dataset.objects[3], 240, 320) and target["masks"].max() == 1
    assert target["boxes"].shape == (dataset.objects[3], 4)
    assert CocoStyleDataset.check(detection_collate([dataset[i] for i in range(6)])) == list(range(6))
    assert 1 <= dataset.objects.min() and dataset.objects.max() <= 150
