"""torchrun across two namespace nodes (2 x 2 ranks, gloo): the same numbers as 4 processes on one
node, and the loss of a node: the survivor says what happened in time, and with --max-restarts and
the node back, training resumes from the last checkpoint and ends with the uninterrupted parameters.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TINY_GPT, assert_ok, launch

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]

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
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


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
