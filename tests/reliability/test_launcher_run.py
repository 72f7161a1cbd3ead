"""python -m launcher.run: torchrun's flags and launch, the launcher's exit code, one line per failure."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from launcher.launch.run import root_cause, split_argv
from tests.conftest import REPO, TINY_GPT

FAULTY = [*TINY_GPT, "recipe=tests.faults.faulty:FaultyGPT", "train.micro_batch_size=4"]
BLOCKED_TEARDOWN = REPO / "tests" / "faults" / "hang_in_teardown"


def launcher_run(args: list[str], tmp_path: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """`python -m launcher.run --standalone --nproc_per_node=2 <args>`, its workers' process-group
    teardown blocking forever: no exit may wait for it (launcher/launch/exits.py)."""
    path = (str(BLOCKED_TEARDOWN), str(REPO), os.environ.get("PYTHONPATH", ""))
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in path if p),
    }
    cmd = [sys.executable, "-m", "launcher.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


# Config errors that exited 1 under torchrun, with ~30 lines of ChildFailedError traceback.
@pytest.mark.dist
@pytest.mark.parametrize(
    "overrides, says",
    [
        (["parallel=pipeline", "parallel.pp=3"], "parallel.pp=3"),
        (["parallel=pipeline", "parallel.schedule=1F1B"], "parallel.schedule=1F1B"),
        (["train.micro_batch_size=100000"], "train.micro_batch_size=100000"),
        (["run.dir=/proc/1/launcher_run"], "run.dir=/proc/1/launcher_run"),
    ],
    ids=["pipeline-layout", "schedule-case", "micro-batch", "run-dir-in-proc"],
)
def test_a_config_error_exits_2_with_one_line_per_rank(tmp_path, overrides, says):
    args = [*TINY_GPT, "train.steps=2", *overrides]
    if not any(a.startswith("run.dir=") for a in overrides):
        args.append(f"run.dir={tmp_path / 'run'}")
    result = launcher_run(args, tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 2, out[-3000:]
    assert out.count(f"launcher: invalid config: {says}") == 1, out[-3000:]
    assert "Traceback" not in out and "ChildFailedError" not in out
    assert "launcher.run: rank 0 " in out and "launcher.run: rank 1 " in out
    assert out.count("exited with 2: invalid configuration") == 2


@pytest.mark.dist
def test_a_non_finite_stop_exits_3_and_torchrun_flags_pass_through(tmp_path):
    run_dir = tmp_path / "run"
    # --max-restarts given as two words and a launcher sweep flag lookalike after it: split correctly.
    result = launcher_run(
        ["--max-restarts", "0", *FAULTY, "train.steps=4", "recipe.fault=nan:1:3", f"run.dir={run_dir}"],
        tmp_path,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 3, out[-3000:]
    assert "non-finite loss or gradient at step 3; the last good state (step 2)" in out
    assert "Traceback" not in out
    assert (run_dir / "checkpoints" / "step_2" / "meta.json").is_file()


def test_split_argv_ends_torchrun_options_at_the_first_word_it_does_not_know():
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    argv = ["--standalone", "--nproc_per_node", "2", "-r3", "--max_restarts=1", "recipe=gpt", "-m", "x=1,2"]
    assert split_argv(argv, parser) == (argv[:5], ["recipe=gpt", "-m", "x=1,2"])
    # The launcher's own flags are never torchrun's, even first: -m is a sweep, --help the launcher's.
    assert split_argv(["-m", "optim.lr=1,2"], parser) == ([], ["-m", "optim.lr=1,2"])
    assert split_argv(["--nnodes=1", "--cfg", "job"], parser) == (["--nnodes=1"], ["--cfg", "job"])


@dataclass
class Failure:  # the fields of torch's ProcessFailure that root_cause reads
    exitcode: int
    timestamp: int = 100
    pid: int = 1
    error_file_data: dict = field(default_factory=lambda: {"message": "<NONE>"})


RECORDED = {
    "message": {"message": "InjectedFault", "extraInfo": {"py_callstack": "Traceback ...", "timestamp": 1}}
}


@pytest.mark.parametrize(
    "failures, cause",
    [
        ({0: Failure(1), 1: Failure(2)}, 1),  # a config error beats a peer's "collective failed"
        ({0: Failure(1), 1: Failure(1, error_file_data=RECORDED)}, 1),  # the rank's own exception
        ({0: Failure(1), 1: Failure(-9)}, 1),  # kill -9 of rank 1, rank 0 lost its peer
        ({0: Failure(-15), 1: Failure(-9)}, 1),  # torchrun's closing SIGTERM is an echo
        ({0: Failure(143), 1: Failure(143)}, 0),  # a signal stop: any rank, the same code
        ({0: Failure(1), 1: Failure(143)}, 0),  # rank 1 hung: rank 0 timed out, rank 1's watchdog
        ({0: Failure(1, timestamp=101), 1: Failure(1, timestamp=100)}, 1),  # then the earliest
        ({0: Failure(6), 1: Failure(1)}, 0),  # disk full on rank 0
    ],
)
def test_root_cause_is_the_failure_the_others_echo(failures, cause):
    assert root_cause(failures)[0] == cause
