"""Fault injection with real processes (gloo, 2 ranks): each fault, what the launcher does, proven.

docs/reliability.md lists these tests beside the behaviour they prove.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launcher.train.checkpoint import sha256
from tests.conftest import REPO, TINY_GPT, Result, assert_ok, launch, relative_diff

pytestmark = [pytest.mark.dist, pytest.mark.slow]

FAULTY = [
    *TINY_GPT,
    "recipe=tests.faults.faulty:FaultyGPT",
    "train.micro_batch_size=4",
    "optim.warmup_steps=2",
]


def start(args: list[str], tmp_path: Path, run_dir: Path, torchrun_args: tuple = (), env: dict | None = None):
    """torchrun in the background, in its own session (so signals reach torchrun, as from Slurm)."""
    extra = (env or {}).pop("EXTRA_PATH", "")
    path = os.pathsep.join(p for p in (extra, str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    full_env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": path,
        **(env or {}),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        *torchrun_args,
        "-m",
        "launcher",
        *args,
        f"run.dir={run_dir}",
    ]
    return subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line]


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if max(logged_steps(run_dir), default=0) >= step:
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def worker_pid(run_dir: Path, rank: int) -> int:
    """The launcher process of `rank` in the job writing to run_dir (read from /proc)."""
    for pid in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            f"run.dir={run_dir}".encode() in cmdline
            and b"launcher" in cmdline
            and f"RANK={rank}".encode() in environ
        ):
            if b"torch.distributed.run" not in cmdline:
                return int(pid)
    raise AssertionError(f"no worker with rank {rank} for {run_dir}")


def leftover_processes(run_dir: Path) -> list[int]:
    pids = []
    for pid in os.listdir("/proc"):
        try:
            if f"run.dir={run_dir}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(int(pid))
        except OSError:
            continue
    return pids


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str]:
    """Wait for the job; one that outlives `timeout` is killed (its whole session) and fails the test."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        raise AssertionError(f"the job did not end within {timeout} s:\n{out[-3000:]}") from None
    return proc.returncode, out


def straight_run(tmp_path: Path, args: list[str]) -> Result:
    result = launch(args, tmp_path, nproc=2, run_dir=tmp_path / "straight")
    assert_ok(result)
    return result


# 1. A rank is killed; torchrun restarts the workers; resume=auto continues; nothing differs.
def test_killed_rank_is_restarted_and_resumes_exactly(tmp_path):
    args = [*FAULTY, "train.steps=16", "checkpoint.every=4", "recipe.delay_s=0.05"]
    run_dir = tmp_path / "killed"
    proc = start(args, tmp_path, run_dir, torchrun_args=("--max-restarts=1",))
    wait_for_step(run_dir, 6, proc)
    os.kill(worker_pid(run_dir, 1), signal.SIGKILL)
    code, out = finish(proc)
    assert code == 0, out[-3000:]
    assert "resumed from step" in out
    assert sorted(set(logged_steps(run_dir))) == logged_steps(run_dir) == list(range(1, 17))
    straight = straight_run(tmp_path, args)
    resumed = Result(0, out, "", run_dir)
    assert relative_diff(resumed.model(16), straight.model(16)) == 0.0


# 2. SIGTERM / SIGINT to torchrun: checkpoint at the next step boundary, exit non-zero, lose nothing.
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_checkpoints_at_step_boundary_and_resume_loses_nothing(tmp_path, sig):
    args = [*FAULTY, "train.steps=30", "checkpoint.every=100", "recipe.delay_s=0.1"]
    run_dir = tmp_path / "signalled"
    proc = start(args, tmp_path, run_dir)
    wait_for_step(run_dir, 5, proc)
    sent = time.time()
    proc.send_signal(sig)
    code, out = finish(proc)
    elapsed = time.time() - sent
    assert code != 0
    assert elapsed < 20, (elapsed, out[-4000:])  # a step (0.2 s) + a checkpoint, far below torchrun's 30 s
    stopped = max(logged_steps(run_dir))
    assert f"stopped by {sig.name} after step {stopped}; checkpoint saved" in out
    assert "Continue with the same command, or exactly:" in out
    assert "torchrun --standalone --nproc_per_node=2 -m launcher" in out and f"run.dir={run_dir}" in out
    assert (run_dir / "checkpoints" / f"step_{stopped}" / "meta.json").is_file()
    assert leftover_processes(run_dir) == []

    resumed = launch(args, tmp_path, nproc=2, run_dir=run_dir)
    assert_ok(resumed)
    assert f"resumed from step {stopped}" in resumed.output
    assert logged_steps(run_dir) == list(range(1, 31))
    assert relative_diff(resumed.model(30), straight_run(tmp_path, args).model(30)) == 0.0


# 3. Killed while writing a checkpoint: the partial one is never taken as complete.
def test_kill_during_checkpoint_write_leaves_previous_checkpoint_in_charge(tmp_path):
    args = [*FAULTY, "train.steps=12", "checkpoint.every=4"]
    run_dir = tmp_path / "crashed"
    env = {
        "EXTRA_PATH": str(REPO / "tests" / "faults" / "crash_in_save"),
        "CRASH_RANK": "1",
        "CRASH_STEP": "8",
    }
    code, out = finish(start(args, tmp_path, run_dir, env=env))
    assert code != 0
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "step_4" / "meta.json").is_file()
    assert not (ckpts / "step_8").exists() and (ckpts / ".tmp_step_8").is_dir()  # written, never committed

    resumed = launch(args, tmp_path, nproc=2, run_dir=run_dir)
    assert_ok(resumed)
    assert "resumed from step 4" in resumed.output
    assert logged_steps(run_dir) == list(range(1, 13))
    assert relative_diff(resumed.model(12), straight_run(tmp_path, args).model(12)) == 0.0


# 4. A corrupt or truncated checkpoint file: named in a warning; resume=auto falls back.
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_checkpoint_is_named_and_skipped(tmp_path, damage):
    args = [*FAULTY, "train.steps=12", "checkpoint.every=4"]
    run_dir = tmp_path / "corrupt"
    assert_ok(launch([*args, "train.stop_at_step=8"], tmp_path, nproc=2, run_dir=run_dir))
    victim = run_dir / "checkpoints" / "step_8" / ("model.pt" if damage == "flip" else "rank_1.pt")
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[len(data) // 2 : len(data) // 2 + 8] = bytes(
            b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 8]
        )
    else:
        data = data[: len(data) // 3]
    victim.write_bytes(bytes(data))

    # Asked for by path, a damaged checkpoint is an error, not a silent fresh start.
    explicit = launch([*args, f"resume={victim.parent}"], tmp_path, nproc=2, run_dir=tmp_path / "explicit")
    assert explicit.returncode != 0
    assert f"cannot resume from {victim.parent}" in explicit.output

    resumed = launch(args, tmp_path, nproc=2, run_dir=run_dir)
    assert_ok(resumed)
    assert "step_8 is unusable" in resumed.output
    if damage == "flip":  # the rank that read the file names it; the other learns only that some rank failed
        assert f"{victim}: checksum mismatch" in resumed.output
    assert "resumed from step 4" in resumed.output
    assert relative_diff(resumed.model(12), straight_run(tmp_path, args).model(12)) == 0.0


# 5. A rank hangs: the job ends within dist.timeout_s plus the shutdown grace, and nothing is left.
def test_hung_rank_ends_the_job_within_the_timeout(tmp_path):
    timeout_s, grace_s = 8, 4
    args = [
        *FAULTY,
        "train.steps=50",
        "recipe.fault=sleep:1:5",
        f"dist.timeout_s={timeout_s}",
        f"dist.shutdown_grace_s={grace_s}",
    ]
    run_dir = tmp_path / "hung"
    proc = start(args, tmp_path, run_dir)
    wait_for_step(run_dir, 3, proc)
    hung_at = time.time()
    code, out = finish(proc, timeout=120)
    elapsed = time.time() - hung_at
    assert code != 0
    assert elapsed < timeout_s + grace_s + 15, elapsed
    assert "rank 0: a collective failed during train step 5" in out
    assert "Timed out" in out or "timed out" in out
    assert (
        "did not reach a step boundary within 4 s of SIGTERM" in out
    )  # the stuck rank, ended by its watchdog
    assert leftover_processes(run_dir) == []


# 6. An exception on one rank: every rank exits promptly; its traceback appears once.
def test_exception_on_one_rank_stops_all_with_one_traceback(tmp_path):
    run_dir = tmp_path / "raised"
    started = time.time()
    code, out = finish(
        start([*FAULTY, "train.steps=50", "recipe.fault=raise:1:5"], tmp_path, run_dir), timeout=120
    )
    assert code != 0
    assert time.time() - started < 60
    assert out.count('faulty.py", line') == 1  # the failing frame, in torchrun's root-cause summary
    assert "InjectedFault: injected fault on rank 1 at step 5" in out
    assert "rank 1 failed during train step 5" in out
    assert "rank 0: a collective failed" in out  # the peer says so in one line, without a traceback
    assert leftover_processes(run_dir) == []


# 7. NaN/Inf loss: skip drops the update and counts it; stop saves the last good state and exits 3.
def test_nonfinite_loss_skip(tmp_path):
    result = launch(
        [*FAULTY, "train.steps=8", "recipe.fault=nan:1:4", "train.nonfinite=skip"], tmp_path, nproc=2
    )
    assert_ok(result)
    lines = result.train_lines()
    assert lines[-1]["nonfinite_steps"] == 1 and lines[-1]["step"] == 8
    assert all(torch.isfinite(t).all() for t in result.model(8).values())


def test_nonfinite_loss_stop(tmp_path):
    result = launch(
        [*FAULTY, "train.steps=8", "recipe.fault=nan:1:4", "train.nonfinite=stop"], tmp_path, nproc=2
    )
    assert result.returncode != 0
    assert "exitcode  : 3" in result.output
    assert "non-finite loss or gradient at step 4; the last good state (step 3)" in result.output
    assert (result.run_dir / "checkpoints" / "step_3" / "meta.json").is_file()
    assert logged_steps(result.run_dir) == [1, 2, 3]
    assert all(torch.isfinite(t).all() for t in result.model(3).values())


# 9. Disk trouble: caught at start, not after an hour.
def test_unwritable_checkpoint_directory_is_refused_at_start(tmp_path):
    run_dir = tmp_path / "disk"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("a file where the checkpoint directory should be")
    result = launch([*FAULTY, "train.steps=5"], tmp_path, nproc=2, run_dir=run_dir)
    assert "exitcode  : 2" in result.output
    assert (
        f"invalid config: run.dir={run_dir}: cannot create files in its checkpoints/ directory"
        in result.output
    )
    assert not (run_dir / "metrics.jsonl").exists()
    blocked = launch([*FAULTY, "train.steps=5"], tmp_path, run_dir=tmp_path / "disk" / "checkpoints" / "run")
    assert blocked.returncode == 2 and f"{run_dir / 'checkpoints'} is not a directory" in blocked.stderr


# 10. A planted malicious pickle is refused (weights_only), named, and skipped.
class Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_malicious_checkpoint_is_refused_and_skipped(tmp_path):
    args = [*FAULTY, "train.steps=8", "checkpoint.every=4"]
    run_dir = tmp_path / "planted"
    assert_ok(launch([*args, "train.stop_at_step=8"], tmp_path, nproc=2, run_dir=run_dir))
    ckpt = run_dir / "checkpoints" / "step_8"
    evil = ckpt / "model.pt"
    evil.write_bytes(pickle.dumps({"embed.tokens.weight": Exploit()}))
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"]["model.pt"] = sha256(evil)  # the attacker fixes the checksum too
    (ckpt / "meta.json").write_text(json.dumps(meta))
    result = launch([*args, "train.steps=10"], tmp_path, nproc=2, run_dir=run_dir)
    assert_ok(result)
    assert f"{evil}: refused to load" in result.output
    assert "resumed from step 4" in result.output
    assert not (tmp_path / "PWNED").exists()
