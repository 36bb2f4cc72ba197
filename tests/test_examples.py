"""The examples run as a user runs them: a subprocess from the repository root."""

import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASKRCNN = os.path.join(REPO, "examples", "maskrcnn_style_training.py")
SUMMARY = re.compile(r"^epoch (\d+): (\d+) batches, (\d+) images, (\d+) objects, mean loss ([\d.]+), "
                     r"max_cost ([\d.e+inf]+), fallbacks \{.*\}, every image once: yes", re.MULTILINE)


def run_example(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, MASKRCNN, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def summaries(stdout):
    return [(int(m[1]), int(m[3]), int(m[4])) for m in SUMMARY.finditer(stdout)]  # epoch, images, objects


def test_maskrcnn_style_example_trains_and_prints_a_summary_per_epoch(tmp_path):
    telemetry = tmp_path / "run.jsonl"
    out = run_example("--epochs", "2", "--images", "24", "--max-cost", "1500", "--max-batch-size", "4",
                      "--telemetry", str(telemetry), "--checkpoint", str(tmp_path / "ck.pt"))
    epochs = summaries(out)
    assert [e for e, _, _ in epochs] == [0, 1], out
    assert all(images == 24 for _, images, _ in epochs), out
    assert epochs[0][2] == epochs[1][2] > 24 * 10  # the same objects each epoch, 10..1200 per image
    records = [json.loads(line) for line in telemetry.read_text().splitlines()]
    batches = [r for r in records if r["kind"] == "batch"]
    assert batches and all(r["samples"] <= 4 and r["cost"] <= 1500 for r in batches)
    assert [r["epoch"] for r in records if r.get("event") == "epoch_end"] == [0, 1]


def test_maskrcnn_style_example_resumes_mid_epoch(tmp_path):
    checkpoint = str(tmp_path / "ck.pt")
    common = ["--epochs", "2", "--images", "24", "--max-cost", "1500", "--max-batch-size", "4",
              "--checkpoint", checkpoint]
    out = run_example(*common, "--stop-after", "3")
    assert "stopped after 3 batches in epoch 0" in out and summaries(out) == [], out
    out = run_example(*common, "--resume")
    assert "resumed from" in out, out
    # the example checks itself that every image of the interrupted epoch came exactly once
    assert [(e, images) for e, images, _ in summaries(out)] == [(0, 24), (1, 24)], out


WEBDATASET = os.path.join(REPO, "examples", "webdataset_detection.py")
STREAM_SUMMARY = re.compile(r"^epoch (\d+): (\d+) batches, (\d+) images, (\d+) objects, max_cost ([\d.e+inf]+), "
                            r"fallbacks \{.*\}, every image once: yes", re.MULTILINE)


def test_webdataset_detection_example_reads_every_image_once_per_epoch():
    pytest.importorskip("webdataset", reason="webdataset is in the dev extra: the example needs it")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, WEBDATASET, "--images", "48", "--max-cost", "150"], cwd=REPO,
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    epochs = [(int(m[1]), int(m[2]), int(m[3]), int(m[4])) for m in STREAM_SUMMARY.finditer(result.stdout)]
    assert [e for e, _, _, _ in epochs] == [0, 1], result.stdout
    assert all(images == 48 for _, _, images, _ in epochs), result.stdout
    assert epochs[0][3] == epochs[1][3] >= 48  # the same objects each epoch, 1..150 per image
    # at most 8 images and 150 objects a batch (no image has more than 150): at least the lower bound
    assert all(batches >= max(48 // 8, -(-objects // 150)) for _, batches, _, objects in epochs), result.stdout
