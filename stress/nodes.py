"""Simulated nodes on one machine, each with its own network, memory cgroup and /dev/shm; a torchrun in each.

Node ``i`` is a network namespace holding the interface ``alnode<i>`` at 192.0.2.(i+1)/24 (the
documentation range): with two nodes the two ends of one veth pair, with more each node's veth is
plugged into a bridge in a hub namespace. Each node's torchrun runs in a memory cgroup of its own
(:class:`.cgroup.MemoryCgroup`, joined *before* ``ip netns exec``, which remounts /sys without the
cgroup tree) and in a private mount namespace with a tmpfs of its own size on /dev/shm (as
:func:`.sandbox.sandbox_command` makes it) and the cgroup tree mounted again, so that the ranks
see their node's limit as they would in a container. Everything is removed on the way out, failure, timeout,
Ctrl-C and SIGTERM included; :func:`leftovers` says what of ours is still there. Needs root.

    results = run_nodes(["tests/ranks/node_ranks.py"], [NodeSpec(4 << 30, 64 << 20), NodeSpec(1 << 30, 1 << 30)])
    results[1].oom_kills, results[1].ranks  # each rank writes JSON files to $NODE_OUT_DIR

From a clone: ``python -m stress.nodes --memory 4G,1536M --shm 64M,1G -- tests/ranks/node_ranks.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from .cgroup import MemoryCgroup, list_groups, memory_cgroup_available
from .sandbox import parse_size, sandbox_available, sandbox_command

__all__ = ["NodeSpec", "NodeResult", "Network", "run_nodes", "nodes_available", "leftovers", "NETNS_PREFIX"]

#: Every namespace made here is named NETNS_PREFIX + "<pid of its maker>-<random hex>-<node or 'hub'>".
NETNS_PREFIX = "adaptive-node-"
LINK_PREFIXES = ("alnode", "alport")  # a node's interface, a hub's bridge port
SUBNET = "192.0.2"  # TEST-NET-1 (RFC 5737): never routed, so it cannot clash with a real network
OUT_ENV = "NODE_OUT_DIR"  # where a node's ranks write their JSON files
MASTER_PORT = 29500  # torchrun's default; node 0's namespace is fresh, so nothing else holds it
TAIL_CHARS = 6000
# From a clone the harness is the top-level package ``stress``: its parent goes on the ranks' path
# (installed as ``adaptive_loader.stress``, the package is importable already).
_PATH_FOR_RANKS = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) if __package__ == "stress" else None


@dataclass
class NodeSpec:
    """One node: its memory cgroup's limit and its /dev/shm size, in bytes."""

    memory_bytes: int
    shm_bytes: int


@dataclass
class NodeResult:
    """How one node's torchrun ended: exit status (-9: SIGKILLed), output tails, its cgroup's counters,
    and the JSON every rank of the node wrote (by rank)."""

    node: int
    returncode: Optional[int]
    timed_out: bool
    stdout: str
    stderr: str
    limit_bytes: int
    peak_bytes: Optional[int]
    oom_kills: Optional[int]
    oom_victims: Optional[List[str]] = None  # "pid name" of each, from the kernel log (None: unreadable)
    ranks: List[Dict[str, Any]] = field(default_factory=list)


def address(node: int) -> str:
    return f"{SUBNET}.{node + 1}"


def interface(node: int) -> str:
    return f"{LINK_PREFIXES[0]}{node}"


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip() or result.returncode}")


def _netns_names() -> List[str]:
    result = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def _maker_dead(name: str) -> bool:
    try:
        os.kill(int(name[len(NETNS_PREFIX):].split("-")[0]), 0)
    except (ValueError, ProcessLookupError):
        return True
    except PermissionError:
        pass
    return False


class Network:
    """``nodes`` network namespaces joined as the module says: made on entry, deleted on exit.
    Entering also deletes the namespaces of makers that died (SIGKILL) without deleting theirs."""

    def __init__(self, nodes: int) -> None:
        if not 2 <= nodes <= 253:
            raise ValueError(f"between 2 and 253 nodes, not {nodes}")
        self.tag = f"{NETNS_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        self.names = [f"{self.tag}-{i}" for i in range(nodes)]
        self._made: List[str] = []

    def __enter__(self) -> "Network":
        for stale in _netns_names():
            if stale.startswith(NETNS_PREFIX) and _maker_dead(stale):
                subprocess.run(["ip", "netns", "delete", stale], capture_output=True)
        try:
            self._build()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _build(self) -> None:
        hub = f"{self.tag}-hub" if len(self.names) > 2 else None
        for name in self.names + ([hub] if hub else []):
            _ip("netns", "add", name)
            self._made.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        if hub is None:  # created straight inside the namespaces: no name is ever taken in the host's
            _ip("link", "add", interface(0), "netns", self.names[0], "type", "veth",
                "peer", "name", interface(1), "netns", self.names[1])
        else:
            _ip("-n", hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", hub, "link", "set", "br0", "up")
            for i, name in enumerate(self.names):
                port = f"{LINK_PREFIXES[1]}{i}"
                _ip("link", "add", interface(i), "netns", name, "type", "veth", "peer", "name", port, "netns", hub)
                _ip("-n", hub, "link", "set", port, "master", "br0", "up")
        for i, name in enumerate(self.names):
            _ip("-n", name, "addr", "add", f"{address(i)}/24", "dev", interface(i))
            _ip("-n", name, "link", "set", interface(i), "up")

    def __exit__(self, *exc: Any) -> None:
        errors = []
        for name in reversed(self._made):  # a namespace's veth ends go with it
            result = subprocess.run(["ip", "netns", "delete", name], capture_output=True, text=True)
            if result.returncode != 0:
                errors.append(f"{name}: {result.stderr.strip()}")
        self._made.clear()
        if errors:
            raise RuntimeError("could not delete network namespaces: " + "; ".join(errors))


@functools.lru_cache(maxsize=None)
def nodes_available() -> Tuple[bool, str]:
    """(True, '') if nodes can be made here, else (False, why)."""
    if os.geteuid() != 0:
        return False, f"simulated nodes need root (network namespaces): uid {os.geteuid()}"
    if shutil.which("ip") is None:
        return False, "the ip command is missing (iproute2)"
    for available in (sandbox_available, memory_cgroup_available):
        ok, why = available()
        if not ok:
            return False, why
    try:
        with Network(2):
            pass
    except (OSError, RuntimeError) as exc:
        return False, f"cannot make network namespaces joined by a veth pair: {exc}"
    return True, ""


def leftovers(pid: Optional[int] = None) -> List[str]:
    """What of ours is still there (made by ``pid``, if given): namespaces, their mounts under
    /run/netns, interfaces in the host's namespace, memory cgroups. Empty after a clean run."""
    prefix = NETNS_PREFIX + (f"{pid}-" if pid is not None else "")
    found = [f"netns {name}" for name in _netns_names() if name.startswith(prefix)]
    with open("/proc/self/mounts") as f:
        found += [f"mount {line.split()[1]}" for line in f if line.split()[1].startswith(f"/run/netns/{prefix}")]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    found += [f"link {line.split(':')[1].strip()}" for line in links.splitlines()
              if line.split(":")[1].strip().startswith(LINK_PREFIXES)]
    return found + [f"cgroup {path}" for path in list_groups(pid)]


def _mount_cgroup_tree(version: str) -> str:
    """Shell steps that mount the cgroup tree again in the node's mount namespace, as a container
    has it, so the loader can read its node's limit and OOM kills (``ip netns exec`` left /sys without it)."""
    if version == "v2":
        return "mount -t cgroup2 cgroup2 /sys/fs/cgroup"
    return ("mount -t tmpfs -o size=64k cgroups /sys/fs/cgroup && mkdir /sys/fs/cgroup/memory && "
            "mount -t cgroup -o memory cgroup /sys/fs/cgroup/memory")


def _node_command(argv: Sequence[str], node: int, nodes: int, nproc_per_node: int, master_port: int,
                  network: Network, group: MemoryCgroup, spec: NodeSpec) -> List[str]:
    """cgroup, then network namespace, then mount namespace (/dev/shm, cgroup tree), then torchrun."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--node_rank", str(node),
                "--nproc_per_node", str(nproc_per_node), "--master_addr", address(0), "--master_port",
                str(master_port), "--local_addr", address(node), *argv]
    in_mount_ns = ["sh", "-c", f'{_mount_cgroup_tree(group.version)} && exec "$@"', "sh", *torchrun]
    # the cgroup first: ip netns exec remounts /sys, after which the group could not be named
    return group.command(["ip", "netns", "exec", network.names[node], *sandbox_command(in_mount_ns, spec.shm_bytes)])


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While inside, SIGTERM ends the program as Ctrl-C does, by an exception, so the ``with`` blocks clean up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _node_env(node: int, out: str, env: Optional[Dict[str, str]]) -> Dict[str, str]:
    node_env = dict(os.environ, **(env or {}))
    node_env.update({OUT_ENV: out, "GLOO_SOCKET_IFNAME": interface(node), "OMP_NUM_THREADS": "1",
                     "PYTHONUNBUFFERED": "1",
                     "PYTHONPATH": os.pathsep.join(filter(None, [_PATH_FOR_RANKS, node_env.get("PYTHONPATH")]))})
    return node_env


def _wait(procs: List[subprocess.Popen], deadline: float, after_failure_s: float) -> None:
    """Wait for every node until ``deadline``; once one fails the others get ``after_failure_s``."""
    while any(p.poll() is None for p in procs):
        if any(p.returncode not in (None, 0) for p in procs):
            deadline = min(deadline, time.monotonic() + after_failure_s)
            after_failure_s = float("inf")  # set once, from the first failure
        if time.monotonic() > deadline:
            return
        time.sleep(0.1)


def run_nodes(argv: Sequence[str], specs: Sequence[NodeSpec], *, nproc_per_node: int = 2, timeout: float = 300.0,
              after_failure_s: float = 30.0, env: Optional[Dict[str, str]] = None,
              master_port: int = MASTER_PORT) -> List[NodeResult]:
    """Run ``torchrun ... argv`` (a script and its arguments) on ``len(specs)`` simulated nodes
    and return how each ended. Past ``timeout`` s, or ``after_failure_s`` after a node failed,
    what still runs is killed. Nothing made here outlives the call."""
    with _sigterm_raises(), tempfile.TemporaryDirectory(prefix=NETNS_PREFIX) as work, \
            contextlib.ExitStack() as stack:
        network = stack.enter_context(Network(len(specs)))
        groups = [stack.enter_context(MemoryCgroup(spec.memory_bytes)) for spec in specs]  # removed first
        procs, logs = [], []
        try:
            for i, (spec, group) in enumerate(zip(specs, groups)):
                out = os.path.join(work, f"node{i}")
                os.mkdir(out)
                logs.append(tuple(stack.enter_context(open(os.path.join(out, name), "w+"))
                                  for name in ("stdout", "stderr")))
                command = _node_command(argv, i, len(specs), nproc_per_node, master_port, network, group, spec)
                procs.append(subprocess.Popen(command, env=_node_env(i, out, env), stdin=subprocess.DEVNULL,
                                              stdout=logs[-1][0], stderr=logs[-1][1], start_new_session=True))
            _wait(procs, time.monotonic() + timeout, after_failure_s)
            cut_off = [proc.poll() is None for proc in procs]
        finally:  # also on Ctrl-C/SIGTERM: kill every node before the groups and namespaces go
            for group in groups:
                group.kill()
            for proc in procs:
                proc.wait()
        results = []
        for i, (proc, group, (stdout, stderr)) in enumerate(zip(procs, groups, logs)):
            usage = group.usage()
            results.append(NodeResult(i, proc.returncode, cut_off[i], _tail(stdout), _tail(stderr),
                                      usage.limit_bytes, usage.peak_bytes, usage.oom_kills, _oom_victims(group),
                                      _rank_files(os.path.join(work, f"node{i}"))))
        return results


def _tail(f: Any) -> str:
    f.seek(0)
    return f.read()[-TAIL_CHARS:]


def _oom_victims(group: MemoryCgroup) -> Optional[List[str]]:
    """The processes the OOM killer killed in ``group``, as the kernel log names them: best effort, and
    the kernel rate-limits these reports (about 10 per 5 s), so a burst of kills names only some."""
    try:
        log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if log.returncode != 0:
        return None
    pattern = re.compile(rf"oom_memcg=/{re.escape(os.path.basename(group.path))},.*?task=([^,]+),pid=(\d+)")
    return [f"{m.group(2)} {m.group(1)}" for m in pattern.finditer(log.stdout)]


def _rank_files(directory: str) -> List[Dict[str, Any]]:
    ranks = []
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        try:
            with open(path) as f:
                ranks.append(json.load(f))
        except (OSError, ValueError) as exc:
            ranks.append({"file": os.path.basename(path), "unreadable": str(exc)})
    return sorted(ranks, key=lambda r: r.get("rank", -1))


def main(args: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stress.nodes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory", default="4G,4G", help="each node's memory limit, comma-separated")
    parser.add_argument("--shm", default="1G,1G", help="each node's /dev/shm size, comma-separated")
    parser.add_argument("--nproc-per-node", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("argv", nargs="+", help="the script torchrun runs, then its arguments (after --)")
    opts = parser.parse_args(args)
    memory, shm = opts.memory.split(","), opts.shm.split(",")
    if len(memory) != len(shm):
        parser.error("--memory and --shm need one size per node each")
    available, why = nodes_available()
    if not available:
        print(f"cannot make nodes here: {why}", file=sys.stderr)
        return 2
    specs = [NodeSpec(parse_size(m), parse_size(s)) for m, s in zip(memory, shm)]
    results = run_nodes(opts.argv, specs, nproc_per_node=opts.nproc_per_node, timeout=opts.timeout)
    json.dump([asdict(r) for r in results], sys.stdout, indent=1)
    print()
    return 0 if all(r.returncode == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
