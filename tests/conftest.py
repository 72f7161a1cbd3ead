"""Shared helpers: run the real CLI (one process or torchrun) and read what it left on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

# Small, fast settings shared by the CLI tests: a 2-layer byte GPT on a slice of the stdlib corpus.
TINY_GPT = [
    "recipe=gpt",
    "recipe.model.d_model=32",
    "recipe.model.n_layers=2",
    "recipe.model.n_heads=2",
    "recipe.model.seq_len=32",
    "recipe.data.max_bytes=400000",
    "train.eval_every=0",
    "checkpoint.every=0",
    "train.log_every=1",
    "logger.progress_bar=false",
]


# 150 steps on 2 ranks that show learning on real data in seconds on 2 CPU cores (eval at the end).
GPT_150 = [
    "recipe=gpt",
    "recipe.model.d_model=64",
    "recipe.model.n_layers=2",
    "recipe.model.n_heads=2",
    "recipe.model.seq_len=64",
    "recipe.data.max_bytes=2000000",
    "train.steps=150",
    "train.micro_batch_size=16",
    "optim.lr=3e-3",
    "train.eval_every=150",
    "train.eval_batches=8",
    "train.log_every=50",
    "checkpoint.every=0",
]
DIGITS_150 = [
    "recipe=digits",
    "train.steps=150",
    "train.micro_batch_size=32",
    "optim.lr=3e-3",
    "train.eval_every=150",
    "train.eval_batches=0",
    "train.log_every=50",
    "checkpoint.every=0",
]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    run_dir: Path

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def metrics(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def train_lines(self) -> list[dict]:
        return [m for m in self.metrics() if "loss" in m]

    def eval_lines(self) -> list[dict]:
        return [m for m in self.metrics() if "eval_loss" in m]

    def model(self, step: int | None = None, name: str = "model.pt") -> dict[str, torch.Tensor]:
        ckpts = self.run_dir / "checkpoints"
        if step is None:
            step = max(int(p.name.split("_")[1]) for p in ckpts.glob("step_*"))
        if name == "model.pt" and (ckpts / f"step_{step}" / "sharded").is_dir():  # FSDP: DCP shards
            from launcher.train.sharded_checkpoint import load_full_model

            return load_full_model(ckpts / f"step_{step}")
        return torch.load(ckpts / f"step_{step}" / name, weights_only=True)


def launch(
    args: list[str],
    tmp_path: Path,
    nproc: int = 0,
    timeout: float = 300,
    env: dict | None = None,
    run_dir: Path | None = None,
    torchrun_args: tuple = (),
    pass_run_dir: bool = True,
) -> Result:
    """Run `python -m launcher` (nproc=0) or `torchrun --standalone --nproc_per_node=nproc -m launcher`.

    The run directory defaults to tmp_path/run and is passed as run.dir, unless `args` set run.dir
    themselves or `pass_run_dir` is False (the launcher then chooses, under tmp_path/runs).
    """
    run_dir = run_dir or tmp_path / "run"
    own_dir = next((a.split("=", 1)[1] for a in args if a.startswith("run.dir=")), None)
    run_dir = Path(own_dir) if own_dir else run_dir
    # The repo on the path: tests may name helper recipes under tests/ by import path.
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    full_env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": path,
        **(env or {}),
    }
    if nproc:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *torchrun_args,
            "-m",
            "launcher",
        ]
    else:
        cmd = [sys.executable, "-m", "launcher"]
    proc = subprocess.run(
        [*cmd, *args, *([f"run.dir={run_dir}"] if pass_run_dir and not own_dir else [])],
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr, run_dir)


def run_cli_in_process(args: list[str], tmp_path: Path, env: dict | None = None) -> Result:
    """The launcher's own entry point (`launcher.__main__.main`) with `args` as argv, in this process.

    The same code as `python -m launcher` minus the interpreter start (about 5 s of importing torch on
    2 cores), for the many cases that end in validation. Runs in tmp_path with `env` applied; a
    `run.dir` is appended unless `args` name one.
    """
    import contextlib
    import io

    from launcher import __main__ as entry

    run_dir = tmp_path / "run"
    own_dir = any(a.startswith("run.dir=") for a in args)
    argv = ["launcher", *args, *([] if own_dir else [f"run.dir={run_dir}"])]
    saved_env, saved_argv, saved_cwd = dict(os.environ), sys.argv, os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.update(env or {})
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID"):
            os.environ.pop(key, None)
        sys.argv = argv
        os.chdir(tmp_path)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = entry.main()
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
    return Result(code, out.getvalue(), err.getvalue(), run_dir)


def assert_ok(result: Result) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.output[-4000:]}"


def newest_intact_checkpoint(run_dir: Path) -> int:
    """The step of run_dir's newest committed checkpoint, after checking every file against meta.json's
    checksums and loading it (weights_only): what resume=auto would take."""
    from launcher.train.checkpoint import complete_checkpoints, load_file, read_meta

    newest = complete_checkpoints(run_dir / "checkpoints")[0]
    meta = read_meta(newest)
    for name in meta["files"]:
        load_file(newest, name, meta)
    return meta["step"]


def relative_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest per-tensor ||a - b|| / ||b|| over a state dict (on the CPU: a sharded checkpoint loads
    where it was saved, a plain one on the CPU)."""
    assert a.keys() == b.keys()

    def cpu(t: torch.Tensor) -> torch.Tensor:
        return t.detach().double().cpu()

    return max(((cpu(a[k]) - cpu(b[k])).norm() / cpu(b[k]).norm().clamp_min(1e-12)).item() for k in a)


@pytest.fixture
def tiny_gpt() -> list[str]:
    return list(TINY_GPT)
