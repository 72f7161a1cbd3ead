"""Two "nodes" on one Linux machine: network namespaces joined by a veth pair, each with its own
address and hostname (node1 10.213.0.1, node2 10.213.0.2), for multi-node tests without a cluster.

    nodes = NamespaceNodes(); nodes.start(); proc = nodes.popen(0, [...]); ...; nodes.stop()

A command runs in a node through `nsenter --net` and `unshare --uts --mount`, with the node's hostname
set and `/etc/netns/<ns>/hosts` bind-mounted over /etc/hosts, naming both nodes: torchrun's
rendezvous and gloo resolve `node1`/`node2` to the namespace addresses, and the only link between them
is the veth pair, so traffic goes only between the addresses created here. (`nsenter` + `unshare
--mount` stand in for `ip netns exec`, which would hide /sys/fs/cgroup from slurmd.) Every process is started
in its own session and stopped by its pid; `stop()` also kills whatever is still inside a namespace
(all of it ours) and deletes the namespaces. Namespaces left by a crashed run (their owner pid dead)
are removed by `start()`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

PREFIX = "lmn"  # launcher multinode: names are <PREFIX><owner pid>n<k>
SUBNET = "10.213.0"
HOSTNAMES = ("node1", "node2")
CMD_TIMEOUT_S = 20


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=CMD_TIMEOUT_S, check=check)


def unavailable_reason() -> str | None:
    """None if namespaces can be made here (root, `ip`, `unshare`), else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare", "nsenter"):
        if not shutil.which(tool):
            return f"`{tool}` is not installed"
    probe = f"{PREFIX}{os.getpid()}probe"
    try:
        result = _ip("netns", "add", probe, check=False)
        if result.returncode != 0:
            return f"`ip netns add` failed: {result.stderr.strip()}"
        uts = subprocess.run(
            ["nsenter", f"--net=/run/netns/{probe}", "unshare", "--uts", "--mount", "hostname", "probe"],
            capture_output=True,
            text=True,
            timeout=CMD_TIMEOUT_S,
        )
        if uts.returncode != 0:
            return f"`unshare --uts` in a namespace failed: {uts.stderr.strip()}"
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"namespaces cannot be set up: {err}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def kill_pids(pids: list[int], grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL whatever is still there after grace_s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + grace_s
        while time.time() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)


def remove_stale() -> None:
    """Delete namespaces (and their processes) that a crashed earlier run of these tests left behind."""
    names = _ip("netns", "list", check=False).stdout.split()
    for name in names:
        match = re.fullmatch(rf"{PREFIX}(\d+)(n\d|probe)", name)
        if match and not _alive(int(match.group(1))):
            _delete_namespace(name)


def _delete_namespace(name: str) -> None:
    pids = [int(p) for p in _ip("netns", "pids", name, check=False).stdout.split()]
    kill_pids(pids, grace_s=2.0)
    _ip("netns", "del", name, check=False)  # takes its end of the veth pair (and so the pair) with it
    shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)


class NamespaceNodes:
    def __init__(self) -> None:
        tag = f"{PREFIX}{os.getpid()}"
        self.namespaces = [f"{tag}n{k + 1}" for k in range(len(HOSTNAMES))]
        self.addresses = [f"{SUBNET}.{k + 1}" for k in range(len(HOSTNAMES))]
        self.hostnames = list(HOSTNAMES)
        self.veths = [f"{tag}v{k + 1}" for k in range(len(HOSTNAMES))]
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        remove_stale()
        hosts = "127.0.0.1 localhost\n" + "".join(
            f"{addr} {name}\n" for addr, name in zip(self.addresses, self.hostnames)
        )
        _ip("link", "add", self.veths[0], "type", "veth", "peer", "name", self.veths[1])
        for ns, veth, addr in zip(self.namespaces, self.veths, self.addresses):
            _ip("netns", "add", ns)
            (Path("/etc/netns") / ns).mkdir(parents=True, exist_ok=True)
            (Path("/etc/netns") / ns / "hosts").write_text(hosts)
            _ip("link", "set", veth, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", veth)
            _ip("-n", ns, "link", "set", veth, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def command(self, node: int, cmd: list[str]) -> list[str]:
        """`cmd` as run on node `node` (0 or 1): in its network namespace, under its hostname, with its
        /etc/hosts. Not `ip netns exec`, which remounts /sys and so hides the cgroup tree slurmd needs."""
        ns = self.namespaces[node]
        inner = f'mount --bind /etc/netns/{ns}/hosts /etc/hosts && hostname "$0" && exec "$@"'
        return ["nsenter", f"--net=/run/netns/{ns}", "unshare", "--uts", "--mount", "sh", "-c", inner,
                self.hostnames[node], *cmd]  # fmt: skip

    def popen(self, node: int, cmd: list[str], **kwargs) -> subprocess.Popen:
        """Start `cmd` on a node in its own session; `stop()` kills it by pid if it is still running."""
        proc = subprocess.Popen(self.command(node, cmd), start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def run(self, node: int, cmd: list[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.command(node, cmd), capture_output=True, text=True, timeout=timeout, **kwargs
        )

    def pids(self, node: int) -> list[int]:
        """Every process running in the node's namespace."""
        return [int(p) for p in _ip("netns", "pids", self.namespaces[node], check=False).stdout.split()]

    def kill_node(self, node: int) -> None:
        """Node loss: SIGKILL every process on the node at once, no chance to say goodbye."""
        for pid in self.pids(node):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def set_link(self, node: int, up: bool) -> None:
        _ip("-n", self.namespaces[node], "link", "set", self.veths[node], "up" if up else "down")

    def stop(self) -> None:
        kill_pids([p.pid for p in self.procs if p.poll() is None])
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for ns in self.namespaces:
            _delete_namespace(ns)
