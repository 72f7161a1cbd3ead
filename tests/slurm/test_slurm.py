"""Slurm: submission, preemption -> checkpoint -> requeue -> resume, quoting, and the rendered script.

Runs against a real single-node cluster (slurmctld, slurmd, munge; tests/slurm/cluster.py).
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO, TINY_GPT, assert_ok, launch

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("cluster")]

SLOW_GPT = [
    *TINY_GPT,
    "recipe=tests.faults.faulty:FaultyGPT",
    "train.micro_batch_size=4",
    "optim.warmup_steps=2",
]


def slurm_cli(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m launcher.slurm <args>` in tmp_path, with this repo importable (tests/ recipes)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    full_env = {
        **os.environ,
        **(env or {}),
        "PYTHONPATH": path,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "launcher.slurm", *args],
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def submitted(result: subprocess.CompletedProcess) -> tuple[str, Path]:
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout.strip().splitlines()[-1])
    return info["job_id"], Path(info["run_dir"])


def steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line]


def test_submit_trains_on_cpu_and_passes_overrides_literally(slurm, tmp_path):
    marker = Path(f"/tmp/pwned-{uuid.uuid4().hex}")
    name = f"""semi;colon "double" 'single' $(touch {marker}) `touch {marker}`"""
    hydra_quoted = "'" + name.replace("'", "\\'") + "'"  # Hydra's own quoting of a string value
    job_id, run_dir = submitted(
        slurm_cli(
            tmp_path,
            "submit",
            "slurm=cpu",
            *TINY_GPT,
            "train.steps=12",
            "checkpoint.every=6",
            f"run.name={hydra_quoted}",
            env=slurm.env,
        )
    )
    slurm.wait_for(job_id, {""}, timeout=180)
    output = (run_dir / f"slurm-{job_id}.out").read_text()
    assert steps(run_dir) == list(range(1, 13)), output[-3000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_12", "step_6"]
    assert (run_dir / "FINISHED").exists() and "training finished" in output
    assert (run_dir / "slurm_job_id").read_text().strip() == job_id
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["run"]["name"] == name  # exactly as typed
    assert not marker.exists()  # neither sbatch, the batch shell nor srun ran the value

    status = slurm_cli(tmp_path, "status", str(run_dir), env=slurm.env)
    assert f"job {job_id}: not in the queue" in status.stdout and "training: finished" in status.stdout


def test_preemption_checkpoints_requeues_and_resumes_exactly(slurm, tmp_path):
    args = [*SLOW_GPT, "train.steps=30", "checkpoint.every=100", "recipe.delay_s=0.1"]
    job_id, run_dir = submitted(slurm_cli(tmp_path, "submit", "slurm=cpu", *args, env=slurm.env))
    deadline = time.time() + 120
    while max(steps(run_dir), default=0) < 6:
        assert time.time() < deadline, "the job never got going"
        time.sleep(0.2)
    slurm.run("scancel", "--signal=USR1", "--batch", job_id, check=True)  # what Slurm does before preempting
    slurm.wait_for(job_id, {"PENDING"}, timeout=120)
    stopped_at = max(steps(run_dir))
    assert (run_dir / "checkpoints" / f"step_{stopped_at}" / "meta.json").is_file()
    # The requeued job starts again once its old credential expires (cluster.py: cred_expire=5).
    slurm.wait_for(job_id, {""}, timeout=240)

    output = (run_dir / f"slurm-{job_id}.out").read_text()
    assert "USR1 received" in output and f"stopped by SIGTERM after step {stopped_at}" in output
    assert "SLURM_RESTART_COUNT=1" in output and f"resumed from step {stopped_at}" in output
    assert f"preempted at step {stopped_at}, checkpoint saved, requeued" in output
    assert steps(run_dir) == list(range(1, 31))  # each step exactly once
    assert (run_dir / "FINISHED").exists()
    straight = launch(args, tmp_path, nproc=2, run_dir=tmp_path / "straight")
    assert_ok(straight)
    resumed = torch.load(run_dir / "checkpoints" / "step_30" / "model.pt", weights_only=True)
    reference = straight.model(30)
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_template_submitted_by_hand(slurm, tmp_path):
    """`sbatch slurm/train.sbatch <overrides>` as a user would on a CPU partition: no GPU request to
    undo, one process per CPU of the task, the output in the run directory, and `status` on that
    run directory (it has no slurm_job_id file) without importing torch."""
    env = {
        **slurm.env,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
        "LAUNCHER_PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--cpus-per-task=2",
            str(REPO / "slurm" / "train.sbatch"),
            "recipe=digits",
            "train.steps=20",
            "train.log_every=5",
            "checkpoint.every=0",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip().split(";")[0]
    slurm.wait_for(job_id, {""}, timeout=180)
    run_dir = tmp_path / "runs" / "digits" / job_id  # named by the job id: the same across requeues
    output = (run_dir / f"slurm-{job_id}.out").read_text()
    assert steps(run_dir) == [5, 10, 15, 20], output[-2000:]
    assert (run_dir / "FINISHED").exists() and "2 processes per node" in output
    assert (tmp_path / f"slurm-{job_id}.out").read_text().strip() == (
        f"launcher.slurm: the job's output continues in runs/digits/{job_id}/slurm-{job_id}.out"
    )

    probe = (
        "import sys, launcher.slurm as s; code = s.main(sys.argv[1:]); print('torch' in sys.modules, code)"
    )
    for target in (str(run_dir), job_id):
        status = subprocess.run(
            [sys.executable, "-c", probe, "status", target],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        assert f"job {job_id}: not in the queue: final state unknown (no Slurm accounting" in status.stdout
        assert status.stdout.strip().endswith("False 0")  # torch was never imported
        assert ("training: finished" in status.stdout) == (target == str(run_dir))


def fake_cluster_tools(bin_dir: Path, log: Path) -> None:
    """srun records its argv; scontrol names two nodes; nothing else runs."""
    bin_dir.mkdir()
    tools = {
        "srun": f'#!/bin/bash\nfor a in "$@"; do printf "%s\\n" "$a"; done > {log}\n',
        "scontrol": '#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && printf "node-a\\nnode-b\\n"\nexit 0\n',
        "scancel": "#!/bin/bash\nexit 0\n",
    }
    for name, text in tools.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)


def test_dry_run_for_two_nodes_of_eight_gpus_launches_the_expected_torchrun(tmp_path):
    result = slurm_cli(
        tmp_path,
        "submit",
        "--dry-run",
        "recipe=gpt",
        "slurm.nodes=2",
        "slurm.gpus_per_node=8",
        "slurm.partition=gpu",
        "+slurm.env.NCCL_DEBUG=WARN",
        "run.dir=/scratch/run1",
    )
    assert result.returncode == 0, result.stderr
    script = result.stdout
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        '#SBATCH --partition="gpu"',
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "export NPROC_PER_NODE=8",
        "export NCCL_DEBUG=WARN",
    ):
        assert line in script.splitlines(), line
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing

    # Run the script's body with stand-ins for srun/scontrol: the command it would start, word by word.
    (tmp_path / "job.sbatch").write_text(script)
    log = tmp_path / "srun.argv"
    fake_cluster_tools(tmp_path / "bin", log)
    job_env = {
        **os.environ,
        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "node-[a-b]",
    }
    subprocess.run(
        ["bash", str(tmp_path / "job.sbatch")], cwd=tmp_path, env=job_env, capture_output=True, timeout=60
    )
    assert log.read_text().splitlines() == [
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        sys.executable,
        "-m",
        "launcher.run",
        "--nnodes=2",
        "--nproc_per_node=8",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=node-a:24242",  # 20000 + job id mod 20000: jobs sharing a node never share it
        "--rdzv_id=4242",
        "recipe=gpt",
        "slurm.nodes=2",
        "slurm.gpus_per_node=8",
        "slurm.partition=gpu",
        "+slurm.env.NCCL_DEBUG=WARN",
        "run.dir=/scratch/run1",
    ]


def test_submit_validates_at_the_jobs_world_size(tmp_path):
    result = slurm_cli(
        tmp_path,
        "submit",
        "--dry-run",
        "parallel=pipeline",
        "parallel.pp=3",
        "slurm.nodes=2",
        "slurm.gpus_per_node=2",
    )
    assert result.returncode == 2
    assert "parallel.pp=3: does not divide world_size=4" in result.stderr


def test_multirun_submits_one_job_per_sweep_point(tmp_path):
    result = slurm_cli(tmp_path, "submit", "--dry-run", "-m", "optim.lr=1e-3,1e-2", "slurm=cpu")
    assert result.returncode == 0, result.stderr
    scripts = result.stdout.split("#!/bin/bash")[1:]
    assert len(scripts) == 2
    argv = [
        shlex.split(next(line for line in script.splitlines() if line.startswith("set -- ")))[2:]
        for script in scripts
    ]
    assert [a[0] for a in argv] == ["optim.lr=0.001", "optim.lr=0.01"]  # Hydra's spelling of each point
    dirs = [a[-1] for a in argv]
    assert all(d.startswith("run.dir=") for d in dirs) and dirs[0] != dirs[1]
