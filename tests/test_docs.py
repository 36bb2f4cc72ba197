"""What the docs claim, checked against the code: quick commands run, kinds, options, scenarios, links."""

import os
import re
import shlex
import subprocess
import sys

import pytest

from adaptive_loader.telemetry import EVENT_KINDS, TRANSPORTS
from stress.harness import RESULT_FIELDS
from stress.sandbox import sandbox_available
from stress.scenarios import SCENARIOS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = sorted([os.path.join("docs", name) for name in os.listdir(os.path.join(REPO, "docs")) if name.endswith(".md")]
              + ["README.md"])
AVAILABLE, WHY = sandbox_available()
#: A fenced block right after this comment holds commands quick enough to run in the tests.
QUICK = "<!-- quick: the tests run these commands -->"


def read(path):
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return f.read()


def quick_commands():
    out = []
    for path in DOCS:
        for block in re.findall(re.escape(QUICK) + r"\s*```(?:bash|sh)?\n(.*?)```", read(path), re.S):
            for line in block.splitlines():
                command = line.split("  #")[0].strip()
                if command:
                    out.append(pytest.param(path, command, id=f"{path}: {command}"))
    return out


def test_some_commands_are_marked_quick():
    assert len(quick_commands()) >= 4


@pytest.mark.parametrize("path, command", quick_commands())
def test_quick_doc_command_runs(path, command, tmp_path):
    argv = shlex.split(command)
    assert argv[0] == ".venv/bin/python", f"{path}: a quick command runs the venv's python: {command}"
    if "stress" in argv and any(word in argv for word in ("run", "demo", "matrix")) and not AVAILABLE:
        pytest.skip(f"no private /dev/shm can be made here: {WHY}")
    argv = [sys.executable] + [os.path.join(REPO, a) if a.startswith("tests/") else a for a in argv[1:]]
    env = dict(os.environ, PYTHONPATH=REPO)
    out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{command}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    assert "Traceback" not in out.stderr, out.stderr[-2000:]


def test_event_kinds_and_transports_in_the_telemetry_doc_are_the_codes():
    text = read("docs/telemetry.md")
    listed = re.search(r"`event` is one of(.*?)\.\n", text, re.S).group(1)
    assert set(re.findall(r"`(\w+)`", listed)) == set(EVENT_KINDS)
    row = [line for line in text.splitlines() if line.startswith("| `transport` |")][0]
    assert set(re.findall(r"`(\w+)` \(", row)) == set(TRANSPORTS)


def _help(*argv):
    out = subprocess.run([sys.executable, "-m", *argv, "--help"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_every_option_the_docs_name_exists():
    cli = {c: _help("adaptive_loader.cli", c) for c in ("watch", "report")}
    stress = {c: _help("stress", c) for c in ("run", "matrix", "demo")}
    for path in DOCS:
        for line in read(path).splitlines():
            for tool, commands in (("adaptive-loader", cli), ("stress", stress)):
                for command, helptext in commands.items():
                    mention = re.search(rf"{tool} {command}\b(.*)", line)
                    if mention is None:
                        continue
                    for option in re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", mention.group(1).split("`")[0]):
                        assert re.search(rf"(?<![\w-]){re.escape(option)}\b", helptext), \
                            f"{path}: {tool} {command} has no option {option}"


def test_the_stress_doc_lists_every_scenario_and_result_key():
    text = read("docs/stress.md")
    rows = re.findall(r"^\| `([\w-]+)` \|", text.split("## Scenarios")[1].split("##")[0], re.M)
    assert rows == list(SCENARIOS)
    keys = re.findall(r"`(\w+)`", " ".join(re.findall(r"^\| (`[^|]+) \|", text.split("## Result schema")[1]
                                                       .split("##")[0], re.M)))
    assert keys == list(RESULT_FIELDS)
    listing = subprocess.run([sys.executable, "-m", "stress", "list"], cwd=REPO, capture_output=True, text=True)
    assert [line.split()[0] for line in listing.stdout.splitlines()] == list(SCENARIOS)
    assert "pipe" not in SCENARIOS["giant-sample"].proves  # it goes through a spill file


@pytest.mark.parametrize("path", DOCS)
def test_relative_links_point_at_files_a_clone_has(path):
    text = read(path)
    base = os.path.dirname(os.path.join(REPO, path))
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        full = os.path.normpath(os.path.join(base, target))
        assert full.startswith(REPO + os.sep) and os.path.exists(full), f"{path}: {target} is not in the repo"
    assert "../shared/" not in text or path == "docs/sampler.md", f"{path} cites a file outside the repo"


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    lines = read("README.md").split("```bash\n", 1)[1].split("```")[0].splitlines()
    assert lines == ["bash .ci/setup-demo && .venv/bin/python -m stress demo",
                     "bash .ci/setup && .venv/bin/python -m pytest"]
    assert lines[1] in read(".ci/run")
    assert "pip install adaptive_loader[" not in read("README.md")  # not on any index


def test_license_is_there_and_is_the_one_setup_cfg_names():
    assert "MIT License" in read("LICENSE") and "the adaptive_loader authors" in read("LICENSE")
    assert re.search(r"^license = MIT$", read("setup.cfg"), re.M)
