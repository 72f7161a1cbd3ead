"""A Slurm job over two namespace nodes, through the launcher's real commands: `submit
slurm.nodes=2` runs one task per node with the rendezvous on node1; USR1 stops every rank at a step
boundary with a checkpoint, the job is requeued, resumes on both nodes and finishes with the
parameters of an uninterrupted run, each step logged once; `status` reports it. Node loss: training
processes killed on node2 fail the job (not requeued, nothing left); the whole of node2 lost gets the
job requeued by Slurm, which resumes when the node is back.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TINY_GPT, assert_ok, launch, newest_intact_checkpoint
from tests.multinode.cluster import TwoNodeSlurm
from tests.multinode.nodes import kill_pids
from tests.slurm.cluster import install_reason

pytestmark = [pytest.mark.integration, pytest.mark.timeout(480), pytest.mark.xdist_group("cluster")]

ARGS = [
    *TINY_GPT,
    "recipe=tests.faults.faulty:FaultyGPT",
    "train.micro_batch_size=4",
    "optim.warmup_steps=2",
    "train.steps=16",
    "checkpoint.every=100",
    "recipe.delay_s=0.1",
]
JOB_SHAPE = ["slurm=cpu", "slurm.nodes=2", "slurm.nproc_per_node=1", "slurm.cpus_per_task=2"]


@pytest.fixture(scope="module")
def cluster(nodes, tmp_path_factory):
    reason = install_reason()
    if reason:
        pytest.skip(f"no Slurm: {reason}")
    slurm = TwoNodeSlurm(nodes, tmp_path_factory.mktemp("two_node_slurm"))
    try:
        slurm.start()
    except RuntimeError as err:
        slurm.stop()
        pytest.skip(f"the two-node Slurm cluster did not come up: {err}")
    yield slurm
    slurm.stop()


def launcher_slurm(cluster: TwoNodeSlurm, cwd: Path, *args: str):
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return cluster.run(sys.executable, "-m", "launcher.slurm", *args, env=env, timeout=120, cwd=cwd)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The final parameters of the same training without interruption (2 processes on one node)."""
    straight = launch(ARGS, tmp_path_factory.mktemp("straight"), nproc=2)
    assert_ok(straight)
    return straight.model(16)


def submit_and_wait_for_step(cluster: TwoNodeSlurm, cwd: Path, step: int, *extra: str) -> tuple[str, Path]:
    """Submit the two-node job; return its id and run dir once it has logged `step`."""
    result = launcher_slurm(cluster, cwd, "submit", *JOB_SHAPE, *ARGS, *extra)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout.strip().splitlines()[-1])
    job_id, run_dir = info["job_id"], Path(info["run_dir"])
    deadline = time.time() + 150
    while max(steps(run_dir), default=0) < step:
        out = run_dir / f"slurm-{job_id}.out"
        assert time.time() < deadline, out.read_text()[-3000:] if out.exists() else "no output"
        time.sleep(0.2)
    return job_id, run_dir


def steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line]


def test_two_node_job_is_preempted_requeued_and_resumes_exactly(cluster, uninterrupted, tmp_path):
    job_id, run_dir = submit_and_wait_for_step(cluster, tmp_path, 4)
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    cluster.wait_for(job_id, {"PENDING"}, timeout=90)
    stopped_at = max(steps(run_dir))
    assert (run_dir / "checkpoints" / f"step_{stopped_at}" / "meta.json").is_file()
    assert json.loads((run_dir / "STOPPED").read_text())["step"] == stopped_at
    cluster.wait_for(job_id, {""}, timeout=180)

    output = (run_dir / f"slurm-{job_id}.out").read_text()
    assert output.count("nodes node[1-2], 1 processes per node, rendezvous node1:") == 2, output[-3000:]
    assert f"preempted at step {stopped_at}, checkpoint saved, requeued" in output
    assert "SLURM_RESTART_COUNT=1" in output and f"resumed from step {stopped_at}" in output
    assert "world_size=2" in output and "training finished" in output
    assert steps(run_dir) == list(range(1, 17))  # each step once
    assert (run_dir / "FINISHED").exists() and not (run_dir / "STOPPED").exists()

    status = launcher_slurm(cluster, tmp_path, "status", str(run_dir))
    assert status.returncode == 0 and f"job {job_id}: not in the queue" in status.stdout
    assert "training: finished" in status.stdout
    assert cluster.nodes.pids(1) == [cluster.daemons[2].pid]  # only node2's slurmd is left there

    resumed = torch.load(run_dir / "checkpoints" / "step_16" / "model.pt", weights_only=True)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_losing_a_node_fails_the_job_without_a_requeue_and_leaves_nothing(cluster, tmp_path):
    """The training processes on node2 (torchrun and its rank) SIGKILLed mid-step, Slurm's own daemons
    spared, as under the kernel's OOM killer: the whole step ends, the job fails and is not requeued as
    if preempted, no job process is left on either node, the last checkpoint is intact."""
    job_id, run_dir = submit_and_wait_for_step(cluster, tmp_path, 4, "checkpoint.every=2")
    training = [p for p in cluster.nodes.pids(1) if "python" in _cmdline(p)]
    assert len(training) == 2, [_cmdline(p) for p in cluster.nodes.pids(1)]  # torchrun and rank 1
    kill_pids(training, grace_s=0)
    killed_at = time.time()
    try:
        cluster.wait_for(job_id, {""}, timeout=60)
    except TimeoutError as err:
        left = [_cmdline(p) for k in (0, 1) for p in cluster.nodes.pids(k)]
        out = (run_dir / f"slurm-{job_id}.out").read_text()
        raise AssertionError(f"{err}\n{out[-4000:]}\nstill running:\n" + "\n".join(left)) from None
    ended_in = time.time() - killed_at

    output = (run_dir / f"slurm-{job_id}.out").read_text()
    assert ended_in < 30, ended_in
    assert "training failed (exit 137), not requeued: a failure would repeat" in output, output[-3000:]
    assert "preempted" not in output and "SLURM_RESTART_COUNT=1" not in output
    assert not (run_dir / "FINISHED").exists()
    deadline = time.time() + 15  # slurmstepd tidies up for a moment after the job left the queue
    while _job_processes(cluster) and time.time() < deadline:
        time.sleep(0.2)
    assert _job_processes(cluster) == []
    assert newest_intact_checkpoint(run_dir) >= 2  # step 4's save may have been cut short by the kill
    status = launcher_slurm(cluster, tmp_path, "status", str(run_dir))
    assert (
        f"job {job_id}: not in the queue" in status.stdout
        and f'"step": {max(steps(run_dir))}' in status.stdout
    )


def test_a_lost_node_is_requeued_by_slurm_and_resumes_when_it_is_back(cluster, uninterrupted, tmp_path):
    """The whole of node2 gone (slurmd too: the machine died). Slurm marks it DOWN after SlurmdTimeout
    and requeues the job (it asked for --requeue); when node2's slurmd is back, the job runs again,
    resumes from the last checkpoint and finishes with the uninterrupted parameters."""
    job_id, run_dir = submit_and_wait_for_step(cluster, tmp_path, 4, "checkpoint.every=2")
    cluster.nodes.kill_node(1)
    cluster.wait_for(job_id, {"PENDING"}, timeout=90)
    saved = newest_intact_checkpoint(run_dir)  # nothing runs now
    assert "node2 down" in cluster.run("sinfo", "-h", "-N", "-o", "%N %T").stdout
    cluster.restart_slurmd(1)
    cluster.wait_for(job_id, {""}, timeout=180)
    output = (run_dir / f"slurm-{job_id}.out").read_text()
    ctld = (cluster.root / "slurmctld.log").read_text()
    assert f"requeue job JobId={job_id} due to failure of node node2" in ctld, output[-3000:]
    assert "SLURM_RESTART_COUNT=1" in output and f"resumed from step {saved}" in output
    assert (run_dir / "FINISHED").exists()
    assert steps(run_dir) == list(range(1, 17))
    resumed = torch.load(run_dir / "checkpoints" / "step_16" / "model.pt", weights_only=True)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def _cmdline(pid: int) -> str:
    try:
        return f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return f"{pid}: gone"


def _job_processes(cluster: TwoNodeSlurm) -> list[str]:
    """Processes on either node other than Slurm's daemons (slurmctld's script helper included)."""
    daemons = {d.pid for d in cluster.daemons}
    found = [_cmdline(p) for k in (0, 1) for p in cluster.nodes.pids(k) if p not in daemons]
    return [c for c in found if "slurmscript" not in c and not c.endswith("gone")]
