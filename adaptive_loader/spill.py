"""Spill files: the last road, private to this user and this loader, never unpickled from disk.

Each loader gets its own directory, made with ``mkdtemp`` under ``spill_dir``
(mode 0700) and named after the main process (pid and start time), so the
next loader to start removes what a killed one left. Files are created
``O_EXCL | O_NOFOLLOW`` with mode 0600 inside it; the directory's owner, mode
and inode are checked before each use. A file holds only raw tensor bytes
behind a small header: the batch's structure is pickled in memory and
travels through the worker's pipe, so whatever is on disk is read back as
bytes, never as objects.

A worker out of fds can still spill: it holds one spare fd (opened at its
first batch) and gives it up for the moment it needs one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import struct
import tempfile
import threading
import uuid
import weakref
from typing import List, Optional, Sequence, Tuple

import numpy as np
import psutil

__all__ = ["SpillDir", "read_spill", "remove_stale", "PREFIX", "HEADER_BYTES"]

PREFIX = "adaptive-loader-spill-"
HEADER_BYTES = 64
_MAGIC = b"ALSPILL1"
_HEADER = struct.Struct("<8sQQ")  # magic, file bytes, pieces
_SPILL_ALIGN = 64
_FD_ERRNOS = (errno.EMFILE, errno.ENFILE)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class _SpareFd:
    """One fd this process keeps in reserve, given up while it opens a file it could not otherwise."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.fd: Optional[int] = None
        self.pid = 0

    def hold(self) -> None:
        with self.lock:
            if self.fd is None or self.pid != os.getpid():  # a forked child holds its own
                with contextlib.suppress(OSError):
                    self.fd, self.pid = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), os.getpid()

    def open(self, path: str, flags: int, mode: int = 0o600, dir_fd: Optional[int] = None) -> int:
        """``os.open``; on EMFILE with the spare fd given up for it (taken again by :meth:`hold`)."""
        try:
            return os.open(path, flags, mode, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno not in _FD_ERRNOS:
                raise
            with self.lock:
                if self.fd is None or self.pid != os.getpid():
                    raise
                os.close(self.fd)
                self.fd = None
            return os.open(path, flags, mode, dir_fd=dir_fd)


    def adopt(self) -> None:
        """In a child just forked: the spare fd inherited is this process's own now."""
        self.lock = threading.Lock()
        if self.fd is not None:
            self.pid = os.getpid()


_spare = _SpareFd()
if hasattr(os, "register_at_fork"):  # a forked worker starts with its spare fd, before any user code runs
    os.register_at_fork(after_in_child=_spare.adopt)


def _start_token(pid: int) -> Optional[str]:
    """A process's start time, in centiseconds: with the pid, it names one process for good."""
    try:
        return str(int(round(psutil.Process(pid).create_time() * 100)))
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _owner_alive(pid: int, token: str) -> bool:
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        started = int(round(process.create_time() * 100))
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # someone else's process: leave it be
    try:
        return abs(started - int(token)) <= 1  # else the pid was reused by a later process
    except ValueError:
        return True


def remove_stale(parent: str) -> int:
    """Remove the spill directories under ``parent`` that are ours (this user's) and whose main
    process is gone; leave every other entry alone. How many were removed."""
    removed = 0
    uid = os.geteuid()
    with contextlib.suppress(OSError), os.scandir(parent) as entries:
        for entry in entries:
            if not entry.name.startswith(PREFIX):
                continue
            fields = entry.name[len(PREFIX):].split("-")
            try:
                st = entry.stat(follow_symlinks=False)
                pid = int(fields[0])
                token = fields[1]
            except (OSError, ValueError, IndexError):
                continue
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or _owner_alive(pid, token):
                continue
            try:
                shutil.rmtree(entry.path)  # fd-based on Linux: a link planted inside is removed, not followed
                removed += 1
            except OSError:
                pass
    return removed


class _DirFd:
    """The spill directory's fd in one process, kept apart from the :class:`SpillDir` so its
    finalizer can close it (a loader dropped without ``close()`` must not leak it)."""

    def __init__(self) -> None:
        self.fd: Optional[int] = None
        self.pid = 0

    def mine(self) -> bool:
        return self.fd is not None and self.pid == os.getpid()

    def set(self, fd: int) -> None:
        self.close()
        self.fd, self.pid = fd, os.getpid()

    def close(self) -> None:
        if self.mine():
            with contextlib.suppress(OSError):
                os.close(self.fd)
        self.fd = None


def _remove_tree(path: str, owner_pid: int, dir_fd: _DirFd) -> None:
    dir_fd.close()
    if os.getpid() == owner_pid:  # a forked worker inherits this finalizer: never let it remove the dir
        shutil.rmtree(path, ignore_errors=True)


def _check_parent(parent: str) -> str:
    if not isinstance(parent, (str, os.PathLike)):
        raise TypeError(f"spill_dir must be a path, got {type(parent).__name__}")
    parent = os.fspath(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"spill_dir {parent!r} is not a writable directory; batches that cannot go through "
                         f"shared memory are written there")
    return parent


class SpillDir:
    """One loader's private directory of spill files. Made in the main process with :meth:`create`;
    removed (with whatever is in it) by :meth:`close`, when it is collected, or at exit."""

    def __init__(self, path: str, dev: int, ino: int, owner_pid: int) -> None:
        self.path = path
        self._id = (dev, ino)
        self._owner_pid = owner_pid
        self._dir = _DirFd()
        self._finalizer: Optional[weakref.finalize] = None

    @classmethod
    def create(cls, parent: str) -> "SpillDir":
        """A new private directory under ``parent``; stale ones of dead processes are removed first.
        TypeError/ValueError if ``parent`` is no writable directory."""
        parent = _check_parent(parent)
        remove_stale(parent)
        pid = os.getpid()
        path = tempfile.mkdtemp(prefix=f"{PREFIX}{pid}-{_start_token(pid) or 0}-", dir=parent)
        st = os.lstat(path)
        spill = cls(path, st.st_dev, st.st_ino, pid)
        spill._finalizer = weakref.finalize(spill, _remove_tree, path, pid, spill._dir)
        spill._check(os.open(path, _DIR_FLAGS), keep=True)
        _spare.hold()
        return spill

    def __getstate__(self) -> dict:
        return {"path": self.path, "_id": self._id, "_owner_pid": self._owner_pid}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _dir=_DirFd(), _finalizer=None)
        _spare.hold()  # a spawned worker: while its fds are still plentiful

    def _check(self, fd: int, keep: bool) -> int:
        """``fd`` (the directory's, just opened) if it is still our private directory; else it is
        closed and PermissionError raised. With ``keep`` it becomes the fd files are made in."""
        try:
            self._verify(fd)
        except PermissionError:
            os.close(fd)
            raise
        if keep:
            self._dir.set(fd)
        return fd

    def _verify(self, fd: int) -> None:
        st = os.fstat(fd)
        problem = None
        if (st.st_dev, st.st_ino) != self._id:
            problem = "was replaced"
        elif st.st_uid != os.geteuid():
            problem = f"belongs to uid {st.st_uid}, not to us ({os.geteuid()})"
        elif stat.S_IMODE(st.st_mode) != 0o700:
            problem = f"has mode {stat.S_IMODE(st.st_mode):o}, not 700"
        if problem is not None:
            raise PermissionError(errno.EPERM, f"spill directory {self.path} {problem}: not writing batches there")

    def prepare(self) -> None:
        """Open and check the directory and hold a spare fd now, while fds are plentiful
        (a worker calls it at its first batch)."""
        self._open_dir()
        _spare.hold()

    def _open_dir(self) -> int:
        """The directory's fd, opened and checked once per process: files are made relative to it,
        so a path swapped meanwhile cannot redirect them."""
        held = self._dir
        if held.fd is not None and not held.mine():  # inherited through fork
            try:
                self._verify(held.fd)
                held.pid = os.getpid()
            except OSError:  # not our directory's fd (any more): open it again
                held.fd = None
        if held.fd is None:
            self._check(_spare.open(self.path, _DIR_FLAGS), keep=True)
        else:
            self._verify(held.fd)  # its owner and mode, before each use
        return held.fd

    def write(self, pieces: Sequence[np.ndarray]) -> Tuple[str, int, List[int]]:
        """A new spill file holding ``pieces`` (uint8 arrays) behind the header: its path, its size,
        and each piece's offset in it."""
        offsets, at = [], HEADER_BYTES
        for piece in pieces:
            offsets.append(at)
            at += -(-len(piece) // _SPILL_ALIGN) * _SPILL_ALIGN
        total = max(at, HEADER_BYTES)
        dir_fd = self._open_dir()
        name = f"{uuid.uuid4().hex}.bin"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = _spare.open(name, flags, 0o600, dir_fd=dir_fd)
        try:
            os.fchmod(fd, 0o600)  # a umask can take away our own read bit
            os.ftruncate(fd, total)
            _write_all(fd, _HEADER.pack(_MAGIC, total, len(pieces)), 0)
            for piece, offset in zip(pieces, offsets):
                _write_all(fd, memoryview(piece), offset)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dir_fd)
            raise
        os.close(fd)
        _spare.hold()
        return os.path.join(self.path, name), total, offsets

    def remove_files(self) -> int:
        """Delete the spill files nobody will read (after workers died); how many."""
        removed = 0
        with contextlib.suppress(OSError):
            for name in os.listdir(self.path):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.path, name))
                    removed += 1
        return removed

    def close(self) -> None:
        """Remove the directory and everything in it (main process only), and close its fd."""
        self._dir.close()
        if self._finalizer is not None:
            self._finalizer()


def _write_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def read_spill(path: str, total: int) -> np.ndarray:
    """The bytes of the spill file at ``path`` (``total`` of them, as its writer said), checked and
    read into memory; the file is removed. PermissionError if it is not ours or others may write it."""
    fd = _spare.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        parent = os.lstat(os.path.dirname(path))
        mine = os.geteuid()
        if (not stat.S_ISREG(st.st_mode) or st.st_uid != mine or st.st_mode & 0o077
                or parent.st_uid != mine or stat.S_IMODE(parent.st_mode) != 0o700):
            raise PermissionError(errno.EPERM, f"spill file {path} is not a private file of ours: not reading it")
        if st.st_size != total or total < HEADER_BYTES:
            raise ValueError(f"spill file {path} holds {st.st_size} B, its writer wrote {total} B")
        data = np.empty(total, dtype=np.uint8)
        view, offset = memoryview(data), 0
        while offset < total:
            n = os.preadv(fd, [view[offset:]], offset)
            if n == 0:
                raise ValueError(f"spill file {path} ended after {offset} of {total} B")
            offset += n
    finally:
        os.close(fd)
        _spare.hold()
    magic, size, _ = _HEADER.unpack_from(data)
    if magic != _MAGIC or size != total:
        raise ValueError(f"spill file {path} has no valid header")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return data
