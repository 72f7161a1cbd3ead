"""A Slurm job over two namespace nodes, through the launcher's real commands: `submit
slurm.nodes=2` runs one task per node with the rendezvous on node1; USR1 stops every rank at a step
boundary with a checkpoint, the job is requeued, resumes on both nodes and finishes with the
parameters of an uninterrupted run, each step logged once; `status` reports it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TINY_GPT, assert_ok, launch
from tests.multinode.cluster import TwoNodeSlurm
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


def steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line]


def test_two_node_job_is_preempted_requeued_and_resumes_exactly(cluster, tmp_path):
    result = launcher_slurm(cluster, tmp_path, "submit", *JOB_SHAPE, *ARGS)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout.strip().splitlines()[-1])
    job_id, run_dir = info["job_id"], Path(info["run_dir"])
    deadline = time.time() + 150
    while max(steps(run_dir), default=0) < 4:
        out = run_dir / f"slurm-{job_id}.out"
        assert time.time() < deadline, out.read_text()[-3000:] if out.exists() else "no output"
        time.sleep(0.2)
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

    straight = launch(ARGS, tmp_path, nproc=2, run_dir=tmp_path / "straight")
    assert_ok(straight)
    resumed = torch.load(run_dir / "checkpoints" / "step_16" / "model.pt", weights_only=True)
    reference = straight.model(16)
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
