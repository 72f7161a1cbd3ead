"""A real single-node Slurm cluster for the tests, from Debian's packages (see DESIGN.md section 4).

    cluster = SlurmCluster(tmp_dir); cluster.start(); ...; cluster.stop()

Installs the packages if they are missing (root only), writes a slurm.conf for this host, starts munge,
slurmctld and slurmd (they daemonize and write pid files), waits for the node to be idle, and stops
them by those pids.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
MUNGE_PID = Path("/run/munge/munged.pid")


def install_reason() -> str | None:
    """None if the Slurm daemons are (or could be made) available, else why not."""
    if all(shutil.which(cmd) for cmd in ("slurmctld", "slurmd", "sbatch", "munged")):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "Slurm is not installed and this user cannot apt-get install it (needs root on Debian/Ubuntu)"
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            return f"apt-get install {' '.join(PACKAGES)} failed: {result.stderr.strip()[-300:]}"
    return None


class SlurmCluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.host = socket.gethostname().split(".")[0]
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._started_munge = False

    def start(self) -> None:
        if subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True).returncode == 0:
            raise RuntimeError(
                "a slurmctld already runs on this machine; stop it before the tests start theirs"
            )
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self._config())
        self._start_munge()
        subprocess.run(["slurmctld", "-c"], env=self.env, check=True)  # -c: no jobs from an earlier cluster
        subprocess.run(["slurmd"], env=self.env, check=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            state = self.run("sinfo", "-h", "-o", "%T").stdout.strip()
            if state.startswith("idle"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the Slurm node never became idle (state {state!r}); see {self.root}/*.log")

    def stop(self) -> None:
        for pid_file in (self.root / "slurmd.pid", self.root / "slurmctld.pid"):
            _kill_from(pid_file)
        if self._started_munge:
            _kill_from(MUNGE_PID)

    def run(self, *cmd: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=check)

    def job_state(self, job_id: str) -> str:
        """PENDING, RUNNING, ... or '' once the job has left the queue."""
        return self.run("squeue", "-h", "-j", job_id, "-o", "%T").stdout.strip()

    def wait_for(self, job_id: str, states: set[str], timeout: float = 300) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout} s (last {state!r})")

    def _start_munge(self) -> None:
        if MUNGE_PID.exists() and _alive(int(MUNGE_PID.read_text())):
            return
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
        self._started_munge = True

    def _config(self) -> str:
        cpus = os.cpu_count() or 1
        mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 - 1024
        r = self.root
        return f"""\
ClusterName=launcher-test
SlurmctldHost={self.host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start once its revoked credential expires (default 120 s): short for tests.
AuthInfo=cred_expire=5
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
NodeName={self.host} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _kill_from(pid_file: Path) -> None:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        return
    for _ in range(50):
        if not _alive(pid):
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
