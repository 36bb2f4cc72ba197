"""Spill files for real: a private directory, 0600 files, a second real user, a real SIGKILL, a real ulimit."""

import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest
import torch
from torch.utils.data._utils import worker as torch_worker

from adaptive_loader.pipeline import measured_collate
from adaptive_loader.spill import PREFIX, SpillDir, read_spill, remove_stale
from adaptive_loader.transport import FILE, MeasuredCollate

ROOT = os.geteuid() == 0
SETPRIV = shutil.which("setpriv")
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code, *, preexec=None, user=None, timeout=60):
    command = [sys.executable, "-c", textwrap.dedent(code)]
    if user is not None:
        entry = pwd.getpwnam(user)
        command = [SETPRIV, f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups"] + command
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=HERE,
                          env={**os.environ, "PYTHONPATH": HERE}, preexec_fn=preexec)


@pytest.fixture
def shared_parent():
    """A world-writable sticky directory that another user can reach, like /tmp."""
    parent = tempfile.mkdtemp(prefix="spill-test-", dir="/tmp")
    os.chmod(parent, 0o1777)
    yield parent
    shutil.rmtree(parent, ignore_errors=True)


def pieces(*arrays):
    return [np.frombuffer(np.ascontiguousarray(a).tobytes(), dtype=np.uint8) for a in arrays]


def test_the_directory_is_private_and_named_after_its_process(tmp_path):
    spill = SpillDir.create(str(tmp_path))
    st = os.lstat(spill.path)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
    assert os.path.dirname(spill.path) == str(tmp_path)
    assert os.path.basename(spill.path).startswith(f"{PREFIX}{os.getpid()}-")
    spill.close()
    assert not os.path.exists(spill.path)


@pytest.mark.parametrize("bad, error", [(None, TypeError), (3, TypeError), ("/no/such/dir", ValueError)])
def test_a_bad_spill_dir_is_refused_at_construction(bad, error):
    with pytest.raises(error, match="spill_dir"):
        SpillDir.create(bad)


def test_files_are_0600_even_under_umask_000_and_hold_raw_bytes_only(tmp_path):
    spill = SpillDir.create(str(tmp_path))
    old = os.umask(0)
    try:
        path, total, offsets = spill.write(pieces(np.arange(10, dtype=np.int64), np.ones(3, dtype=np.float32)))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    raw = open(path, "rb").read()
    assert len(raw) == total and raw[offsets[0]:offsets[0] + 80] == np.arange(10, dtype=np.int64).tobytes()
    assert b"\x80\x04" not in raw[:offsets[0]] and b"\x80\x05" not in raw  # no pickle protocol marker anywhere
    data = read_spill(path, total)
    assert data[offsets[1]:offsets[1] + 12].view(np.float32).tolist() == [1.0, 1.0, 1.0]
    assert not os.path.exists(path)  # read once, then gone


def test_a_spill_file_others_could_write_is_not_read(tmp_path):
    spill = SpillDir.create(str(tmp_path))
    path, total, _ = spill.write(pieces(np.zeros(4)))
    os.chmod(path, 0o666)
    with pytest.raises(PermissionError, match="not a private file"):
        read_spill(path, total)


def test_a_symlink_in_place_of_a_spill_file_is_not_followed(tmp_path):
    spill = SpillDir.create(str(tmp_path))
    target = tmp_path / "elsewhere"
    target.write_bytes(b"\0" * 64)
    link = os.path.join(spill.path, "link.bin")
    os.symlink(target, link)
    with pytest.raises(OSError):
        read_spill(link, 64)
    assert target.exists()


def test_a_directory_whose_mode_was_opened_up_is_not_used(tmp_path):
    spill = SpillDir.create(str(tmp_path))
    os.chmod(spill.path, 0o755)
    with pytest.raises(PermissionError, match="mode 755"):
        spill.write(pieces(np.zeros(2)))


def test_a_replaced_directory_is_not_used(tmp_path):
    spill = SpillDir.create(str(tmp_path))
    clone = SpillDir.__new__(SpillDir)
    clone.__setstate__(spill.__getstate__())  # as a spawned worker gets it
    os.rename(spill.path, spill.path + "-moved")
    os.mkdir(spill.path, 0o700)
    with pytest.raises(PermissionError, match="was replaced"):
        clone.write(pieces(np.zeros(2)))
    shutil.rmtree(spill.path + "-moved")


@pytest.mark.skipif(not (ROOT and SETPRIV), reason="needs root and setpriv to act as the second user 'nobody'")
def test_another_real_user_can_neither_read_nor_plant_spill_files(shared_parent):
    spill = SpillDir.create(shared_parent)
    path, total, _ = spill.write(pieces(np.arange(100, dtype=np.int64)))
    probe = run_python(f"""
        import os
        results = {{}}
        for name, action in [("read", lambda: open({path!r}, "rb").read()),
                             ("list", lambda: os.listdir({spill.path!r})),
                             ("plant", lambda: open(os.path.join({spill.path!r}, "x.bin"), "wb")),
                             ("remove", lambda: os.unlink({path!r}))]:
            try:
                action()
                results[name] = "done"
            except PermissionError:
                results[name] = "denied"
        print(results)
    """, user="nobody")
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == str({"read": "denied", "list": "denied", "plant": "denied", "remove": "denied"})
    assert read_spill(path, total)[64:64 + 800].view(np.int64).tolist() == list(range(100))
    # a directory with our prefix that another user made is never touched by our clean-up
    theirs = run_python(f"""
        import os
        path = os.path.join({shared_parent!r}, "{PREFIX}999999-1-theirs")
        os.mkdir(path, 0o700)
        print(path)
    """, user="nobody")
    assert theirs.returncode == 0, theirs.stderr
    remove_stale(shared_parent)
    assert os.path.isdir(theirs.stdout.strip())


def _spill_and_wait(parent):
    return run_python_popen(f"""
        import sys, time
        import numpy as np
        from adaptive_loader.spill import SpillDir
        spill = SpillDir.create({parent!r})
        spill.write([np.zeros(1 << 20, dtype=np.uint8)])
        print(spill.path, flush=True)
        time.sleep(120)
    """)


def run_python_popen(code):
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True,
                            cwd=HERE, env={**os.environ, "PYTHONPATH": HERE})


@pytest.mark.timeout(120)
def test_a_sigkilled_main_process_leaves_its_dir_and_the_next_start_removes_it(tmp_path):
    killed, alive = _spill_and_wait(str(tmp_path)), _spill_and_wait(str(tmp_path))
    try:
        killed_dir, alive_dir = killed.stdout.readline().strip(), alive.stdout.readline().strip()
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(30)
        assert os.path.isdir(killed_dir) and os.listdir(killed_dir)  # SIGKILL: no clean-up ran
        spill = SpillDir.create(str(tmp_path))  # the next loader's start
        assert not os.path.exists(killed_dir)
        assert os.path.isdir(alive_dir) and os.listdir(alive_dir)  # a live process's dir is not touched
        spill.close()
    finally:
        for process in (killed, alive):
            if process.poll() is None:
                process.kill()
                process.wait(30)
    assert os.path.exists(alive_dir)  # killed now too: it left its dir, which the next start removes
    SpillDir.create(str(tmp_path)).close()
    assert not os.path.exists(alive_dir)


def test_a_dir_of_a_reused_pid_is_stale(tmp_path):
    """Same pid, another start time: the process that made it is gone."""
    stale = tmp_path / f"{PREFIX}{os.getpid()}-12345-abcdef"
    stale.mkdir(mode=0o700)
    (stale / "x.bin").write_bytes(b"x")
    plain = tmp_path / "unrelated"
    plain.mkdir()
    assert remove_stale(str(tmp_path)) == 1
    assert not stale.exists() and plain.exists()


def test_a_symlink_named_like_a_stale_dir_is_left_alone(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_bytes(b"x")
    os.symlink(victim, tmp_path / f"{PREFIX}1-1-link")
    remove_stale(str(tmp_path))
    assert (victim / "keep").exists()


@pytest.mark.timeout(60)
def test_spilling_and_reading_need_no_new_fd_when_all_are_taken(tmp_path):
    """A real lowered RLIMIT_NOFILE, every fd taken: the spare fd held since the start does the job."""
    result = run_python(f"""
        import errno, json, os, resource
        import numpy as np
        from adaptive_loader.spill import SpillDir, read_spill
        spill = SpillDir.create({str(tmp_path)!r})
        spill.prepare()
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        held = []
        try:
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        except OSError as exc:
            assert exc.errno == errno.EMFILE
        path, total, offsets = spill.write([np.arange(1000, dtype=np.uint8)])
        data = read_spill(path, total)
        print(json.dumps({{"held": len(held), "ok": data[offsets[0]:offsets[0] + 1000].tolist() ==
                          list(np.arange(1000, dtype=np.uint8))}}))
    """)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["ok"] and out["held"] > 0


class _Worker:
    id, num_workers = 0, 1


def test_a_spilled_batch_of_odd_dtypes_crosses_intact(tmp_path, monkeypatch):
    monkeypatch.setattr(torch_worker, "_worker_info", _Worker())
    odd = ("uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2", "bool", "bfloat16")  # as this torch has them
    batch = [torch.arange(6).to(getattr(torch, name)) for name in odd if hasattr(torch, name)]
    batch.append(torch.zeros(3, dtype=torch.complex32))
    collate = measured_collate(lambda xs: xs[0], "/dev/shm", str(tmp_path), shm_keep_free=1 << 62, arena_kind="shm")
    envelope = collate([batch])
    assert envelope.stats.transport == FILE
    out = envelope.open()
    for a, b in zip(batch, out):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.view(torch.uint8).tolist() == b.view(torch.uint8).tolist()
