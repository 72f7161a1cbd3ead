"""Slurm bugs a new user hit on a real cluster, each fixed and held here (issue 14).

Jobs sharing a node get their own rendezvous port; a failure is not requeued like a preemption;
#SBATCH values with spaces are quoted, and a rejected submission leaves no run directory; `status` on
a mistyped path is an error. The template by hand and `status` of a hand-made run dir: test_slurm.py.
"""

from __future__ import annotations

import re

import pytest

from tests.conftest import TINY_GPT
from tests.slurm.test_slurm import slurm_cli, steps, submitted

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240), pytest.mark.xdist_group("cluster")]


def test_two_jobs_on_one_node_each_have_their_own_rendezvous(slurm, tmp_path):
    """Both run at once on the one node (one core each); the shorter one ending must not take the
    other's c10d store with it. One of them has spaces in its run dir and job name (quoted #SBATCH)."""
    common = ["slurm=cpu", "slurm.cpus_per_task=1", "slurm.nproc_per_node=1", *TINY_GPT]
    jobs = [
        submitted(slurm_cli(tmp_path, "submit", *common, "train.steps=4", env=slurm.env)),
        submitted(
            slurm_cli(
                tmp_path,
                "submit",
                *common,
                "train.steps=16",
                f"run.dir='{tmp_path}/my runs/long one'",
                "slurm.job_name='long job'",
                env=slurm.env,
            )
        ),
    ]
    assert jobs[1][1] == tmp_path / "my runs" / "long one"
    for job_id, _ in jobs:
        slurm.wait_for(job_id, {"RUNNING", ""}, timeout=60)
    for job_id, _ in jobs:
        slurm.wait_for(job_id, {""}, timeout=180)
    outputs = [(run_dir / f"slurm-{job_id}.out").read_text() for job_id, run_dir in jobs]
    assert steps(jobs[0][1]) == list(range(1, 5)), outputs[0][-3000:]
    assert steps(jobs[1][1]) == list(range(1, 17)), outputs[1][-3000:]
    assert all("training finished" in out for out in outputs)
    ports = [int(re.search(r"rendezvous \S+:(\d+)", out).group(1)) for out in outputs]
    assert ports[0] != ports[1] and all(20000 <= p < 40000 for p in ports)
    assert "JobName=long job\n" in slurm.run("scontrol", "show", "job", jobs[1][0]).stdout


def test_a_failure_is_not_requeued(slurm, tmp_path):
    args = [*TINY_GPT, "recipe=tests.faults.faulty:FaultyGPT", "recipe.fault=raise:0:3", "train.steps=10"]
    job_id, run_dir = submitted(slurm_cli(tmp_path, "submit", "slurm=cpu", *args, env=slurm.env))
    slurm.wait_for(job_id, {""}, timeout=120)
    output = (run_dir / f"slurm-{job_id}.out").read_text()
    assert "injected fault on rank 0 at step 3" in output
    assert "training failed (exit 1), not requeued" in output
    assert output.count("SLURM_RESTART_COUNT=") == 1 and "launcher.slurm: preempted" not in output
    assert not (run_dir / "STOPPED").exists() and not (run_dir / "FINISHED").exists()
    status = slurm_cli(tmp_path, "status", str(run_dir), env=slurm.env)
    assert status.returncode == 0 and f"job {job_id}: not in the queue" in status.stdout


def test_a_rejected_submission_leaves_no_run_dir(slurm, tmp_path):
    run_dir = tmp_path / "runs" / "rejected run"
    result = slurm_cli(
        tmp_path,
        "submit",
        "slurm=cpu",
        "slurm.partition=nosuchpartition",
        f"run.dir='{run_dir}'",
        env=slurm.env,
    )
    assert result.returncode == 1
    assert "sbatch failed" in result.stderr and "partition" in result.stderr.lower()
    assert not run_dir.exists()


def test_status_of_a_mistyped_path_is_an_error(tmp_path):
    for verb in ("status", "cancel"):
        result = slurm_cli(tmp_path, verb, "runs/gpt/no-such-run")
        assert result.returncode == 2, result
        assert "target=runs/gpt/no-such-run: is neither a run directory nor a job id" in result.stderr
    (tmp_path / "empty").mkdir()
    result = slurm_cli(tmp_path, "status", "empty")
    assert result.returncode == 2 and "without slurm_job_id or slurm-<job id>.out" in result.stderr
