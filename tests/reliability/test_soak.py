"""Soak: the exit paths of a 2-rank job, many times, two jobs at a time: no hang, every exit in its bound.

    LAUNCHER_SOAK_RUNS=20 .venv/bin/python -m pytest tests/reliability/test_soak.py -s   # the long version

CI runs LAUNCHER_SOAK_RUNS=2 per path. Every worker here has a process-group teardown that blocks
forever (tests/faults/hang_in_teardown): no exit path may depend on `destroy_process_group` returning.
Each run's exit time is measured from its trigger (the rank's own report line, the signal, the kill) to
the end of `python -m launcher.run`; a run that outlives HANG_S is a hang (killed, and the test fails).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_GPT
from tests.reliability.test_faults import leftover_processes, logged_steps, worker_pid
from tests.reliability.test_launcher_run import BLOCKED_TEARDOWN

pytestmark = [pytest.mark.dist, pytest.mark.slow]

RUNS = int(os.environ.get("LAUNCHER_SOAK_RUNS", "2"))
GRACE_S = 10
HANG_S = 240
FAULTY = [
    *TINY_GPT,
    "recipe=tests.faults.faulty:FaultyGPT",
    "train.micro_batch_size=4",
    "optim.warmup_steps=2",
    f"dist.shutdown_grace_s={GRACE_S}",
]


@dataclass
class ExitPath:
    """One exit path: how to start it, what ends it, the exit code and the bound on the exit time."""

    args: list[str]
    code: int
    bound_s: float
    trigger: str = ""
    """A line of output that starts the clock, or "" when the test acts (a signal, a kill)."""
    torchrun_args: list[str] = field(default_factory=list)


PATHS = {
    # Refused after the gloo group is up: a file where the checkpoint directory should be.
    "config error after group": ExitPath([*FAULTY, "train.steps=5"], 2, GRACE_S, "invalid config: run.dir="),
    "recipe exception at a step": ExitPath(
        [*FAULTY, "train.steps=50", "recipe.fault=raise:1:3"], 1, GRACE_S, "rank 1 failed during train step 3"
    ),
    "SIGTERM stop": ExitPath([*FAULTY, "train.steps=200", "recipe.delay_s=0.05"], 143, GRACE_S),
    # Restarted by torchrun, resumed from step 2's checkpoint, finished: includes a clean exit.
    "kill -9, restarts": ExitPath(
        [*FAULTY, "train.steps=8", "checkpoint.every=2", "recipe.delay_s=0.1"],
        0,
        150,
        torchrun_args=["--max-restarts=1"],
    ),
}


@dataclass
class Outcome:
    path: str
    code: int | None
    exit_s: float | None
    hung: bool
    output: str
    leftovers: list[int]
    run_dir: Path


def soak_once(name: str, run_dir: Path) -> Outcome:
    spec = PATHS[name]
    if name == "config error after group":
        run_dir.mkdir(parents=True)
        (run_dir / "checkpoints").write_text("a file where the checkpoint directory should be")
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(BLOCKED_TEARDOWN), str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "launcher.run", "--standalone", "--nproc_per_node=2", *spec.torchrun_args]
    proc = subprocess.Popen(
        [*cmd, *spec.args, f"run.dir={run_dir}"],
        cwd=run_dir.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), line) for line in proc.stdout))
    reader.start()
    started, triggered = time.monotonic(), None
    if name in ("SIGTERM stop", "kill -9, restarts"):
        while max(logged_steps(run_dir), default=0) < 3 and proc.poll() is None:
            if time.monotonic() - started > HANG_S:
                break
            time.sleep(0.05)
        if proc.poll() is None:
            if name == "SIGTERM stop":
                proc.send_signal(signal.SIGTERM)
            else:
                os.kill(worker_pid(run_dir, 1), signal.SIGKILL)
            triggered = time.monotonic()
    try:
        proc.wait(timeout=max(1.0, HANG_S - (time.monotonic() - started)))
        hung = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        hung = True
    ended = time.monotonic()
    reader.join(timeout=10)
    if spec.trigger:
        triggered = next((t for t, line in lines if spec.trigger in line), None)
    leftovers = leftover_processes(run_dir)
    for pid in leftovers:  # never left running, even when the test fails
        os.kill(pid, signal.SIGKILL)
    return Outcome(
        name,
        None if hung else proc.returncode,
        None if triggered is None or hung else ended - triggered,
        hung,
        "".join(line for _, line in lines),
        leftovers,
        run_dir,
    )


@pytest.mark.timeout(max(600, 40 * RUNS * len(PATHS)))  # the long version outlives the 600 s default
def test_every_exit_path_ends_in_its_bound_two_jobs_at_a_time(tmp_path):
    plan = [name for _ in range(RUNS) for name in PATHS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(lambda job: soak_once(job[1], tmp_path / f"run{job[0]}"), enumerate(plan)))

    rows = []
    for name, spec in PATHS.items():
        mine = [o for o in outcomes if o.path == name]
        times = [o.exit_s for o in mine if o.exit_s is not None]
        rows.append(
            f"{name:28s} runs {len(mine):3d}  hangs {sum(o.hung for o in mine)}  "
            f"codes {sorted({o.code for o in mine}, key=str)} (want {spec.code})  "
            f"exit max {max(times, default=float('nan')):6.2f} s  mean "
            f"{sum(times) / max(len(times), 1):6.2f} s  (bound {spec.bound_s:g} s)"
        )
    print("\nsoak, 2 jobs at a time:\n" + "\n".join(rows))
    for outcome in outcomes:
        spec = PATHS[outcome.path]
        detail = f"{outcome.path}:\n{outcome.output[-3000:]}"
        assert not outcome.hung, detail
        assert outcome.code == spec.code, detail
        assert outcome.exit_s is not None and outcome.exit_s < spec.bound_s, (outcome.exit_s, detail)
        assert outcome.leftovers == [], detail
        assert "Traceback" not in outcome.output or outcome.path == "recipe exception at a step", detail
    raised = [o for o in outcomes if o.path == "recipe exception at a step"]
    assert all(
        "Another rank died or is stuck; its own error, if any, is reported by launcher.run" in o.output
        for o in raised
    )
    stopped = [o for o in outcomes if o.path == "SIGTERM stop"]
    assert all("  python -m launcher.run --standalone --nproc_per_node=2 " in o.output for o in stopped)
    restarted = [o for o in outcomes if o.path == "kill -9, restarts"]
    assert all("resumed from step" in o.output for o in restarted)
    assert all(logged_steps(o.run_dir) == list(range(1, 9)) for o in restarted)
