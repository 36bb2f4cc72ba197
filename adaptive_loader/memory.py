"""The real memory limits of this process: its memory cgroup and the kernel's RAM counters.

``/dev/shm``'s size is a mount option, not a reserve of memory: pages written
there, like pages of a memfd, are RAM charged to the writer's memory cgroup.
So the bound that matters is the tightest memory cgroup limit on the way from
this process's group to the root of its hierarchy (v1 or v2, found through
``/proc/self/cgroup`` and ``/proc/self/mountinfo``), and ``MemTotal`` /
``MemAvailable`` of ``/proc/meminfo``. ``psutil.virtual_memory()`` reports the
host's RAM, not a container's. See ``docs/memory.md``.

Everything here reads; nothing decides.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

__all__ = ["MemoryState", "read_memory", "read_meminfo", "read_oom_kills", "resolve_memory_budget", "V1_UNLIMITED"]

#: cgroup v1 writes "no limit" as the largest page-aligned int64 (2**63 - 4096 with 4 KiB pages);
#: anything from 2**62 up is read as no limit.
V1_UNLIMITED = 1 << 62


@dataclass(frozen=True)
class MemoryState:
    """What this process may still allocate, in bytes.

    limit: the tightest memory cgroup limit up to the root of the hierarchy, or MemTotal if smaller.
    used: bytes charged against that limit (cgroup usage minus inactive file cache, as ``docker
    stats`` shows; MemTotal - MemAvailable on the host).
    available: what can still be allocated: the least headroom of any limited cgroup level, and
    at most MemAvailable.
    shmem: ``Shmem`` of /proc/meminfo, machine-wide: tmpfs (``/dev/shm``) and memfd pages.
    source: where ``limit`` comes from: ``"cgroup v2 /kubepods/..."``, ``"cgroup v1 /docker/..."``
    or ``"host"``.
    cgroup: this process's memory cgroup (``"cgroup v1 /x"``), limited or not; ``""`` if none.
    """

    limit: int
    used: int
    available: int
    shmem: int
    source: str
    cgroup: str = ""


def _read(path: str) -> Optional[str]:
    """The file's text, or None if it cannot be read (os.read: a third of the cost of open())."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b"".join(chunks).decode("utf-8", "replace")
            chunks.append(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)


def _path(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def read_meminfo(root: str = "/", names: Optional[Tuple[str, ...]] = None) -> Dict[str, int]:
    """``/proc/meminfo`` as bytes by field name (``"MemTotal"``, ``"MemAvailable"``, ``"Shmem"``...);
    only ``names`` if given (those missing are left out)."""
    text = _read(_path(root, "/proc/meminfo"))
    if text is None:
        raise OSError(f"cannot read {_path(root, '/proc/meminfo')}")
    if names is None:
        lines = text.splitlines()
    else:  # a search per field instead of parsing ~50 lines: a fifth of the time
        text = "\n" + text
        lines = []
        for name in names:
            start = text.find(f"\n{name}:")
            if start >= 0:
                lines.append(text[start + 1:text.find("\n", start + 1)])
    fields = {}
    for line in lines:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[name.strip()] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return fields


# -- where the memory cgroup is --------------------------------------------------------------------

@dataclass(frozen=True)
class _Level:
    """One cgroup directory on the way up: where its files are and its name in the hierarchy."""

    directory: str
    name: str


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (``\\040``)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mounts(mountinfo: str) -> List[Tuple[str, str, str, List[str]]]:
    """(root, mount point, filesystem type, super options) of each line of mountinfo."""
    mounts = []
    for line in mountinfo.splitlines():
        before, sep, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        mounts.append((_unescape(fields[3]), _unescape(fields[4]), tail[0], tail[2].split(",")))
    return mounts


def _memberships(cgroup_text: str) -> Tuple[Optional[str], Optional[str]]:
    """This process's cgroup path in the v1 memory hierarchy and in the v2 unified one."""
    v1 = v2 = None
    for line in cgroup_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v1, v2


def _levels(root: str, mount_root: str, mount_point: str, path: str) -> List[_Level]:
    """The cgroup directories from this process's group up to the top of what the mount shows.

    The mount shows the hierarchy from ``mount_root`` down: a container without a cgroup
    namespace sees its own group ``/docker/<id>`` mounted at ``/sys/fs/cgroup/memory``. A path
    outside what the mount shows resolves to the mount point itself.
    """
    if mount_root == "/":
        relative = path
    elif path == mount_root or path.startswith(mount_root.rstrip("/") + "/"):
        relative = path[len(mount_root.rstrip("/")):]
    else:
        relative = "/"
    parts = [p for p in relative.split("/") if p]
    top = _path(root, mount_point)
    while parts and not os.path.isdir(os.path.join(top, *parts)):
        parts.pop()  # the group is not visible under this mount: take the deepest one that is
    base = mount_root.rstrip("/")
    return [_Level(os.path.join(top, *parts[:n]), base + "/" + "/".join(parts[:n]) if n else mount_root)
            for n in range(len(parts), -1, -1)]


@functools.lru_cache(maxsize=16)
def _locate(root: str, cgroup_text: str) -> Tuple[Optional[str], Tuple[_Level, ...]]:
    """(``"v1"``/``"v2"``, the levels from the process's group up) or (None, ()) without a memory cgroup.

    Cached by the text of /proc/self/cgroup: mountinfo is read again only when the group changes.
    """
    v1_path, v2_path = _memberships(cgroup_text)
    mounts = _mounts(_read(_path(root, "/proc/self/mountinfo")) or "")
    if v1_path is not None:
        for mount_root, mount_point, fstype, options in mounts:
            if fstype == "cgroup" and "memory" in options:
                return "v1", tuple(_levels(root, mount_root, mount_point, v1_path))
    if v2_path is not None:
        for mount_root, mount_point, fstype, _options in mounts:
            if fstype == "cgroup2":
                levels = _levels(root, mount_root, mount_point, v2_path)
                controllers = _read(os.path.join(levels[-1].directory, "cgroup.controllers")) or ""
                if "memory" in controllers.split() or os.path.exists(os.path.join(levels[0].directory,
                                                                                  "memory.max")):
                    return "v2", tuple(levels)
    return None, ()


# -- reading it ---------------------------------------------------------------------------------------

_FILES = {"v1": ("memory.limit_in_bytes", "memory.usage_in_bytes", ("total_inactive_file", "inactive_file")),
          "v2": ("memory.max", "memory.current", ("inactive_file",))}


def _number(text: Optional[str]) -> Optional[int]:
    if text is None:
        return None
    text = text.strip()
    return int(text) if text.isdigit() else None  # v2 writes "max" for no limit


def _stat(text: Optional[str], names: Tuple[str, ...]) -> int:
    values = {}
    for line in (text or "").splitlines():
        name, _, value = line.partition(" ")
        values[name] = value
    for name in names:
        if values.get(name, "").strip().isdigit():
            return int(values[name])
    return 0


def _limited_levels(version: str, levels: Tuple[_Level, ...]) -> List[Tuple[int, int, str]]:
    """(limit, used, name) of each level that has a limit."""
    limit_file, usage_file, inactive_names = _FILES[version]
    found = []
    for level in levels:
        limit = _number(_read(os.path.join(level.directory, limit_file)))
        if limit is None or (version == "v1" and limit >= V1_UNLIMITED):
            continue
        usage = _number(_read(os.path.join(level.directory, usage_file))) or 0
        inactive = _stat(_read(os.path.join(level.directory, "memory.stat")), inactive_names)
        found.append((limit, max(0, usage - inactive), level.name))
    return found


def read_memory(root: str = "/") -> MemoryState:
    """The memory limit of this process and what is left of it (``root`` prefixes every path read)."""
    meminfo = read_meminfo(root, ("MemTotal", "MemFree", "MemAvailable", "Shmem"))
    total, mem_available = meminfo["MemTotal"], meminfo.get("MemAvailable", meminfo.get("MemFree", 0))
    shmem = meminfo.get("Shmem", 0)
    version, levels = _locate(root, _read(_path(root, "/proc/self/cgroup")) or "")
    cgroup = f"cgroup {version} {levels[0].name}" if levels else ""
    limited = _limited_levels(version, levels) if levels else []
    if limited:
        limit, used, name = min(limited)
        if limit < total:
            headroom = min(level_limit - level_used for level_limit, level_used, _ in limited)
            return MemoryState(limit, used, max(0, min(headroom, mem_available)), shmem,
                               f"cgroup {version} {name}", cgroup)
    return MemoryState(total, max(0, total - mem_available), mem_available, shmem, "host", cgroup)


_OOM_FILES = {"v1": "memory.oom_control", "v2": "memory.events"}


def read_oom_kills(root: str = "/") -> Optional[int]:
    """Processes the kernel's OOM killer has killed in this process's memory cgroup and the groups
    above it (``oom_kill`` of v1 ``memory.oom_control``, v2 ``memory.events``), summed over the
    levels; None without a memory cgroup or where the kernel does not count them."""
    version, levels = _locate(root, _read(_path(root, "/proc/self/cgroup")) or "")
    counts = [_field(_read(os.path.join(level.directory, _OOM_FILES[version])), "oom_kill") for level in levels]
    known = [count for count in counts if count is not None]
    return sum(known) if known else None


def _field(text: Optional[str], name: str) -> Optional[int]:
    for line in (text or "").splitlines():
        key, _, value = line.partition(" ")
        if key == name and value.strip().isdigit():
            return int(value)
    return None


# -- the user's budget ----------------------------------------------------------------------------------

def resolve_memory_budget(value, detected: int) -> int:
    """Bytes of a user's ``memory_budget=``: None is ``detected``; an int > 0 is bytes; a float
    in (0, 1] is that fraction of ``detected``."""
    if isinstance(detected, bool) or not isinstance(detected, numbers.Integral) or detected < 0:
        raise ValueError(f"detected must be an int >= 0 bytes, got {detected!r}")
    if value is None:
        return int(detected)
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, numbers.Real)):
        raise TypeError("memory_budget must be None, a number of bytes (int > 0) or a fraction of the "
                        f"detected memory (float in (0, 1]), not {type(value).__name__}")
    if isinstance(value, numbers.Integral):
        if value <= 0:
            raise ValueError(f"memory_budget in bytes must be > 0, got {value}")
        return int(value)
    value = float(value)
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError("memory_budget as a float is a fraction of the detected memory, in (0, 1]; "
                         f"got {value!r} (give bytes as an int)")
    return int(value * detected)
