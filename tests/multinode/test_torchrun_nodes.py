"""torchrun across two namespace nodes (2 x 2 ranks, gloo): the same numbers as 4 processes on one
node, and the loss of a node: the survivor says what happened in time; without restarts the job ends
on both nodes, and with --max-restarts and the node back, training resumes from the last checkpoint
and ends with the uninterrupted parameters, bit for bit.
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

pytestmark = [pytest.mark.dist, pytest.mark.timeout(360), pytest.mark.xdist_group("cluster")]

STEPS = 8
ARGS = [
    *TINY_GPT,
    "recipe=tests.faults.faulty:FaultyGPT",
    "train.micro_batch_size=4",
    "optim.warmup_steps=2",
    f"train.steps={STEPS}",
    "checkpoint.every=2",
    "dist.timeout_s=30",
    "dist.shutdown_grace_s=10",
]
PORT = 29411


def node_env() -> dict:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    # Without it, a node that comes back fresh waits for a store address nobody publishes (torch 2.13:
    # the surviving agent keeps its shared store; the newcomer expects a new one): docs/multinode.md.
    share = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **share}


def torchrun(nodes, node: int, args: list[str], run_dir: Path, log: Path, *torchrun_args: str):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=2",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={nodes.hostnames[0]}:{PORT}",
        f"--rdzv_id=job-{run_dir.name}",
        *torchrun_args,
        "-m",
        "launcher",
        *args,
        f"run.dir={run_dir}",
    ]
    out = log.open("w")
    return nodes.popen(node, cmd, cwd=run_dir.parent, env=node_env(), stdout=out, stderr=out, text=True)


def wait(proc, timeout: float = 180) -> int:
    return proc.wait(timeout=timeout)


def train_lines(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if '"loss"' in line]


def params(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / f"step_{step}" / "model.pt", weights_only=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same training as 4 processes on one node."""
    tmp = tmp_path_factory.mktemp("single_node")
    result = launch(ARGS, tmp, nproc=4, timeout=240)
    assert_ok(result)
    return result.run_dir


def test_two_nodes_equal_four_processes_on_one(nodes, reference, tmp_path):
    run_dir = tmp_path / "two_nodes"
    procs = [torchrun(nodes, k, ARGS, run_dir, tmp_path / f"node{k + 1}.log") for k in (0, 1)]
    codes = [wait(p) for p in procs]
    logs = [(tmp_path / f"node{k + 1}.log").read_text() for k in (0, 1)]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    got, want = train_lines(run_dir), train_lines(reference)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in got] == [m["loss"] for m in want]
    final, ref = params(run_dir, STEPS), params(reference, STEPS)
    assert all(torch.equal(final[k], ref[k]) for k in ref)
    assert "world_size=4" in logs[0] + logs[1]


def wait_for_step(run_dir: Path, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while max((m["step"] for m in train_lines(run_dir)), default=0) < step:
        assert time.time() < deadline, f"step {step} not reached in {timeout} s"
        time.sleep(0.05)


def wait_for_text(log: Path, text: str, deadline: float) -> float:
    while text not in log.read_text():
        if time.time() > deadline:
            raise AssertionError(f"{text!r} not in {log.name} in time:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    return time.time()


def test_node_loss_is_reported_and_a_restart_resumes_exactly(nodes, reference, tmp_path):
    """Every process of node 2 is SIGKILLed mid-step. Node 1's ranks say a peer died (well within
    dist.timeout_s + grace), nothing is left on node 2; torchrun on node 1 (--max-restarts=1) waits for
    the node to come back, and training resumes from the last checkpoint to the reference parameters."""
    args = [*ARGS, "recipe.delay_s=0.3"]
    run_dir = tmp_path / "node_loss"
    restart = ("--max-restarts=1", "--rdzv_conf=join_timeout=120")
    logs = [tmp_path / "node1.log", tmp_path / "node2.log", tmp_path / "node2_back.log"]
    survivor = torchrun(nodes, 0, args, run_dir, logs[0], *restart)
    torchrun(nodes, 1, args, run_dir, logs[1], *restart)
    wait_for_step(run_dir, 3)
    nodes.kill_node(1)
    killed_at = time.time()
    reported = wait_for_text(logs[0], "Another rank died or is stuck", killed_at + 30 + 10)
    assert reported - killed_at < 30 + 10
    assert nodes.pids(1) == []
    saved = sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))
    assert saved and saved[-1] >= 2
    assert survivor.poll() is None  # waiting for the node to come back

    back = torchrun(nodes, 1, args, run_dir, logs[2], *restart)
    codes = [wait(survivor), wait(back)]
    text = [log.read_text() for log in logs]
    assert codes == [0, 0], text[0][-3000:] + text[2][-3000:]
    assert f"resumed from step {saved[-1]}" in text[0] + text[2]
    assert [m["step"] for m in train_lines(run_dir)] == list(range(1, STEPS + 1))  # each step once
    # Bit-identical, before the loss and after the resume on re-formed ranks.
    numbers = [[(m["step"], m["loss"], m["grad_norm"]) for m in train_lines(d)] for d in (run_dir, reference)]
    assert numbers[0] == numbers[1]
    final, ref = params(run_dir, STEPS), params(reference, STEPS)
    assert all(torch.equal(final[k], ref[k]) for k in ref)
    assert nodes.pids(0) == [] and nodes.pids(1) == []


def test_node_loss_without_restarts_ends_the_job_on_both_nodes(nodes, reference, tmp_path):
    """No --max-restarts: node 2 is SIGKILLed mid-step and the whole job ends within dist.timeout_s +
    grace, saying why, with nothing left on either node and the last checkpoint intact; the same command
    later (resume=auto) continues from it to the uninterrupted parameters."""
    args = [*ARGS, "recipe.delay_s=0.3"]
    run_dir = tmp_path / "lost"
    logs = [tmp_path / "node1.log", tmp_path / "node2.log"]
    survivor = torchrun(nodes, 0, args, run_dir, logs[0])
    torchrun(nodes, 1, args, run_dir, logs[1])
    wait_for_step(run_dir, 3)
    nodes.kill_node(1)
    killed_at = time.time()
    code = wait(survivor, timeout=30 + 10 + 30)
    ended_in = time.time() - killed_at
    text = logs[0].read_text()
    assert code != 0 and ended_in < 30 + 10, (code, ended_in, text[-3000:])
    assert "Another rank died or is stuck" in text
    assert nodes.pids(0) == [] and nodes.pids(1) == []
    saved = newest_intact_checkpoint(run_dir)
    assert saved >= 2

    again = [torchrun(nodes, k, args, run_dir, tmp_path / f"again{k + 1}.log") for k in (0, 1)]
    assert [wait(p) for p in again] == [0, 0], (tmp_path / "again1.log").read_text()[-3000:]
    assert f"resumed from step {saved}" in (tmp_path / "again1.log").read_text()
    final, ref = params(run_dir, STEPS), params(reference, STEPS)
    assert all(torch.equal(final[k], ref[k]) for k in ref)
