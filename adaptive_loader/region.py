"""Shared memory on an fd, reserved now, mapped with public APIs only.

A region is either a memfd (``memfd_create``: anonymous shared memory that no
``/dev/shm`` mount bounds, charged to the memory cgroup like any RAM) or a file
in the ``/dev/shm`` mount, created ``O_EXCL`` with mode 0600 and unlinked at
once (nothing is ever left behind, nobody else can open it). Either way its
pages are reserved with ``posix_fallocate``, so a shortage fails at
``create`` with an ``OSError`` (ENOSPC, ENOMEM) and never later as SIGBUS,
whatever torch version is installed.

Pickling a region passes its fd with ``multiprocessing.reduction.DupFd``
(what torch does for its own shm): through DataLoader's worker queues, to
workers started with fork, spawn or forkserver, under any sharing strategy.
A region keeps its fd while it is open, to pass it on; ``close`` gives the
fd back at once, and the mapping goes with the last view of it.

:func:`mirrored` maps part of a region twice, back to back, for a ring whose
ranges may run past its end (Python's ``mmap`` cannot choose an address, so
this one goes through libc's ``mmap`` by ctypes).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
import uuid
import weakref
from multiprocessing.reduction import DupFd

import numpy as np
import torch

__all__ = ["MEMFD", "SHM", "KINDS", "memfd_available", "SharedRegion", "mirrored"]

MEMFD, SHM = "memfd", "shm"
KINDS = (MEMFD, SHM)
# Python < 3.13's mmap keeps a duplicate of the fd as long as the mapping lives; 3.13 can be told not to.
_MMAP_KWARGS = {"trackfd": False} if sys.version_info >= (3, 13) else {}
_NAME = "adaptive_loader"  # what /proc/PID/maps shows a memfd as; the prefix of /dev/shm files


def memfd_available() -> bool:
    """Whether this Python and kernel can make a memfd (Linux >= 3.17, Python >= 3.8)."""
    if not hasattr(os, "memfd_create"):
        return False
    try:
        fd = os.memfd_create(_NAME, os.MFD_CLOEXEC)
    except OSError:  # ENOSYS on an old kernel, EPERM under a seccomp filter
        return False
    os.close(fd)
    return True


def _new_shm_file(path: str) -> int:
    """A new file at ``path`` that only this user can open (the caller unlinks it)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(path, flags, 0o600)  # the umask can only take bits away from 0600


def _new_fd(kind: str, shm_path: str) -> int:
    if kind == MEMFD:
        fd = os.memfd_create(_NAME, os.MFD_CLOEXEC)
        os.fchmod(fd, 0o600)  # a memfd is born 0777; it has no name, but /proc/PID/fd/N is a path
        return fd
    path = os.path.join(shm_path, f"{_NAME}_{os.getpid()}_{uuid.uuid4().hex}")
    fd = _new_shm_file(path)
    os.unlink(path)
    return fd


class SharedRegion:
    """``nbytes`` of shared memory, the whole mapping as the uint8 array ``array``.

    Build one with :meth:`create`; pickle it to share it with another process.
    """

    def __init__(self, fd: int, nbytes: int, kind: str) -> None:
        """Map ``nbytes`` of ``fd``; the region owns ``fd`` from now on (it closes it)."""
        self._fd = fd
        self._close_fd = weakref.finalize(self, os.close, fd)
        self.kind = kind
        self.nbytes = nbytes
        try:
            self._mmap = mmap.mmap(fd, nbytes, **_MMAP_KWARGS)
        except BaseException:
            self._close_fd()
            raise
        self.array = np.frombuffer(self._mmap, dtype=np.uint8)

    @classmethod
    def create(cls, nbytes: int, kind: str = MEMFD, shm_path: str = "/dev/shm") -> "SharedRegion":
        """Reserve ``nbytes`` of shared memory of ``kind`` (``"memfd"`` or ``"shm"``, a file in ``shm_path``).

        OSError with its errno (ENOSPC, ENOMEM, EMFILE...) when it cannot be reserved.
        """
        if isinstance(nbytes, bool) or not isinstance(nbytes, int):
            raise TypeError(f"nbytes must be an int, not {type(nbytes).__name__}")
        if nbytes <= 0:
            raise ValueError(f"nbytes must be > 0, got {nbytes}")
        if kind not in KINDS:
            raise ValueError(f"kind must be {MEMFD!r} or {SHM!r}, got {kind!r}")
        if kind == MEMFD and not hasattr(os, "memfd_create"):
            raise ValueError("kind 'memfd' needs os.memfd_create (Linux >= 3.17); use 'shm'")
        fd = _new_fd(kind, shm_path)
        try:
            os.posix_fallocate(fd, 0, nbytes)  # the pages exist now: a shortage fails here, not as SIGBUS
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, nbytes, kind)

    def extend(self, nbytes: int) -> None:
        """Reserve the fd's memory up to ``nbytes`` (more than now); OSError when it cannot be had.
        ``array`` keeps its size: map what lies past it with :func:`mirrored`."""
        size = self.size()
        if nbytes > size:
            os.posix_fallocate(self.fileno(), size, nbytes - size)

    def size(self) -> int:
        """The bytes the fd holds now (``nbytes`` or more, once extended)."""
        return os.fstat(self.fileno()).st_size

    @property
    def closed(self) -> bool:
        return not self._close_fd.alive

    def fileno(self) -> int:
        """The region's fd (the region's own: do not close it)."""
        if self.closed:
            raise ValueError("the region is closed")
        return self._fd

    def tensor(self, offset: int, nbytes: int) -> torch.Tensor:
        """Bytes ``[offset, offset + nbytes)`` of the region as a uint8 tensor viewing it."""
        if self.array is None:
            raise ValueError("the region is closed")
        if offset < 0 or nbytes < 0 or offset + nbytes > self.nbytes:
            raise ValueError(f"bytes [{offset}, {offset + nbytes}) are not inside a region of {self.nbytes} B")
        return torch.from_numpy(self.array[offset:offset + nbytes])

    def __reduce__(self):
        return _rebuild_region, (DupFd(self.fileno()), self.nbytes, self.kind)

    def close(self) -> None:
        """Let go of the region. Views made of it stay valid; the memory (and the fd the
        mapping holds) is freed when the last of them is gone."""
        self._close_fd()
        mapping, self._mmap, self.array = self._mmap, None, None
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:  # views of it exist: the mapping goes with the last of them
                pass

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd {self._fd}"
        return f"SharedRegion({self.kind}, {self.nbytes} B, {state})"


def _rebuild_region(dup_fd, nbytes: int, kind: str) -> SharedRegion:
    fd = dup_fd.detach()
    try:
        size = os.fstat(fd).st_size
        if size < nbytes:
            raise ValueError(f"the fd received holds {size} B, not the region's {nbytes} B")
    except BaseException:
        os.close(fd)
        raise
    return SharedRegion(fd, nbytes, kind)


# -- a mapping twice over, for a ring -------------------------------------------------
_PROT_NONE, _MAP_FIXED, _MAP_NORESERVE = 0, 0x10, 0x4000  # Linux's values: Python's mmap module lacks them
_libc = None


def _mmap_calls():
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long)
        libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        _libc = libc
    return _libc


_MADV_POPULATE_READ, _MADV_POPULATE_WRITE = 22, 23  # Linux >= 5.14; Python's mmap module lacks them
_populate_works = True


def populate(array: np.ndarray, write: bool) -> bool:
    """Map the pages of ``array`` (viewing a shared mapping) into this process's page
    tables in one call, writable with ``write``, instead of one fault per page or per 16 pages.
    False where the kernel cannot (before 5.14, or the pages cannot be had): the caller touches them."""
    global _populate_works
    if not _populate_works or not array.size:
        return _populate_works
    advice = _MADV_POPULATE_WRITE if write else _MADV_POPULATE_READ
    start = array.ctypes.data - array.ctypes.data % mmap.PAGESIZE
    if _mmap_calls().madvise(start, array.ctypes.data + array.nbytes - start, advice) == 0:
        return True
    if ctypes.get_errno() == errno.EINVAL:  # an older kernel: do not ask again
        _populate_works = False
    return False


class _Unmap:
    """Unmaps an address range when the last array viewing it is gone."""

    def __init__(self, address: int, nbytes: int) -> None:
        self.address, self.nbytes = address, nbytes

    def __del__(self) -> None:
        if _libc is not None:  # None at interpreter exit, when the process's mappings go anyway
            _libc.munmap(self.address, self.nbytes)


def mirrored(region: SharedRegion, offset: int, nbytes: int) -> np.ndarray:
    """Bytes ``[offset, offset + nbytes)`` of ``region`` mapped twice, back to back: a uint8 array
    of ``2 * nbytes`` whose second half is the first half again, so a range that starts in the
    first half and is at most ``nbytes`` long is contiguous, wherever the ring wraps.

    ``offset`` and ``nbytes`` must be multiples of the page size. The mapping lives as long as
    the array or any view of it; it does not need the region to stay open. OSError if the
    system refuses it.
    """
    page = mmap.PAGESIZE
    size = region.size()
    if offset % page or nbytes % page or nbytes <= 0 or offset + nbytes > size:
        raise ValueError(f"bytes [{offset}, {offset + nbytes}) are not whole pages inside a region of "
                         f"{size} B")
    libc = _mmap_calls()
    failed = ctypes.c_void_p(-1).value
    # reserve the address range, then put the same pages at both halves of it
    base = libc.mmap(None, 2 * nbytes, _PROT_NONE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
    if base in (None, failed):
        errno = ctypes.get_errno()
        raise OSError(errno, f"could not reserve {2 * nbytes} B of address space: {os.strerror(errno)}")
    unmap = _Unmap(base, 2 * nbytes)  # from here on, unmapped whatever happens
    for half in (base, base + nbytes):
        if libc.mmap(half, nbytes, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | _MAP_FIXED,
                     region.fileno(), offset) != half:
            errno = ctypes.get_errno()
            raise OSError(errno, f"could not map {nbytes} B of the region twice: {os.strerror(errno)}")
    buffer = (ctypes.c_uint8 * (2 * nbytes)).from_address(base)
    buffer.unmap = unmap  # the array below keeps ``buffer`` alive, and ``buffer`` the mapping
    return np.frombuffer(buffer, dtype=np.uint8)
