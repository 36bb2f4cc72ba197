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
