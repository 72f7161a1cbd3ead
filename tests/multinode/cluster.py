"""A real two-node Slurm cluster over the namespace nodes (tests/multinode/nodes.py).

slurmctld runs on node1; one slurmd per node, each in its node's namespace under its own NodeName
(`-N`), at the node's address; one munged (in the host namespace: its socket is a file, reachable
from both). The daemons run in the foreground (`-D`) as children started here, so they are stopped
by their pids; their logs are under the cluster's directory. Client commands (sbatch, squeue, the
launcher's submit) run on node1, the cluster's "login node".
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from tests.multinode.nodes import NamespaceNodes, kill_pids
from tests.slurm.cluster import MUNGE_PID, SlurmCluster, _alive

QUERY_TIMEOUT_S = 30


class TwoNodeSlurm:
    def __init__(self, nodes: NamespaceNodes, root: Path) -> None:
        self.nodes, self.root = nodes, root
        self.conf = root / "slurm.conf"
        self.env_vars = {"SLURM_CONF": str(self.conf)}
        self.daemons: list[subprocess.Popen] = []
        self._munge = SlurmCluster(root)  # only for its munged start-up (and whether it started one)

    def start(self) -> None:
        for sub in ("state", *(f"spool-{name}" for name in self.nodes.hostnames)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self._config())
        self._munge._start_munge()
        self._daemon(0, ["slurmctld", "-D", "-c"])
        for k in range(len(self.nodes.hostnames)):
            time.sleep(0.5)  # slurmctld first: the slurmds register with it
            self._daemon(k, ["slurmd", "-D", "-N", self.nodes.hostnames[k]])
        deadline = time.time() + 60
        states = ""
        while time.time() < deadline:
            if any(d.poll() is not None for d in self.daemons):
                break
            states = self.run("sinfo", "-h", "-N", "-o", "%N %T").stdout
            if states.count("idle") == len(self.nodes.hostnames):
                return
            time.sleep(0.5)
        raise RuntimeError(
            f"the Slurm nodes never became idle ({states!r}); see {self.root}/*.log, daemons.out"
        )

    def restart_slurmd(self, node: int) -> None:
        """Bring a lost node back: a fresh slurmd, which registers and returns the node to service."""
        self._daemon(node, ["slurmd", "-D", "-N", self.nodes.hostnames[node]])

    def _daemon(self, node: int, cmd: list[str]) -> None:
        env = {"SLURM_CONF": str(self.conf), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        log = (self.root / "daemons.out").open("a")
        self.daemons.append(self.nodes.popen(node, cmd, env=env, stdout=log, stderr=log))

    def stop(self) -> None:
        kill_pids([d.pid for d in self.daemons if d.poll() is None])
        for daemon in self.daemons:
            try:
                daemon.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if self._munge._started_munge and MUNGE_PID.exists():
            pid = int(MUNGE_PID.read_text())
            if _alive(pid):
                kill_pids([pid])

    def run(self, *cmd: str, env: dict | None = None, timeout: float = QUERY_TIMEOUT_S, **kwargs):
        """A command on node1 with this cluster's SLURM_CONF."""
        full_env = {**os.environ, **self.env_vars, **(env or {})}
        return self.nodes.run(0, list(cmd), env=full_env, timeout=timeout, **kwargs)

    def job_state(self, job_id: str) -> str:
        return self.run("squeue", "-h", "-j", job_id, "-o", "%T").stdout.strip()

    def wait_for(self, job_id: str, states: set[str], timeout: float = 180) -> str:
        deadline = time.time() + timeout
        state = None
        while time.time() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout} s (last {state!r})")

    def _config(self) -> str:
        r = self.root
        nodes = "".join(
            f"NodeName={name} NodeAddr={addr} CPUs=2 RealMemory=1000 State=UNKNOWN\n"
            for name, addr in zip(self.nodes.hostnames, self.nodes.addresses)
        )
        return f"""\
ClusterName=launcher-two-nodes
SlurmctldHost={self.nodes.hostnames[0]}({self.nodes.addresses[0]})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool-%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# A node whose slurmd stops answering is DOWN after 10 s (default 300 s): node-loss tests stay short.
SlurmdTimeout=10
JobRequeue=1
# A requeued job starts at the next backfill pass: every second here, not every 30 s.
SchedulerParameters=bf_interval=1
{nodes}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
