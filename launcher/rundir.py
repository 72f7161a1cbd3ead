"""The run directory: one path, the same on every rank, chosen before anything is written."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from launcher.config import RunConfig
from launcher.dist import DistSession
from launcher.errors import ConfigError


def run_id(cfg: RunConfig, session: DistSession) -> str:
    """run.id, else the Slurm job id (stable across requeues), else torchrun's run id (stable across
    its restarts), else a timestamp chosen by rank 0 and broadcast (never `${now:}` per rank)."""
    if cfg.id:
        return cfg.id
    job = os.environ.get("SLURM_ARRAY_JOB_ID") and "{}_{}".format(
        os.environ["SLURM_ARRAY_JOB_ID"], os.environ.get("SLURM_ARRAY_TASK_ID", "0")
    )
    job = job or os.environ.get("SLURM_JOB_ID")
    if job:
        return job
    if session.env.run_id:
        return session.env.run_id
    return session.broadcast_object(new_run_id() if session.is_main else None)


def new_run_id() -> str:
    """A timestamp plus 4 random hex digits: two runs started in the same second differ."""
    return time.strftime("%Y-%m-%d_%H-%M-%S") + "_" + secrets.token_hex(2)


def resolve_run_dir(
    cfg: RunConfig, recipe_name: str, sweep_job_dir: str | None, session: DistSession
) -> Path:
    """Create (rank 0) and return the run directory; every rank gets the same path."""
    if cfg.dir:
        path = Path(cfg.dir)
    elif sweep_job_dir:
        path = Path(sweep_job_dir)
    else:
        path = Path(cfg.root) / recipe_name / run_id(cfg, session)
    error = None
    if session.is_main:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            error = err
    # Every rank learns whether rank 0 succeeded: none may wait in a collective for a rank that left.
    if not session.broadcast_object(error is None):
        raise ConfigError(
            "run.dir",
            str(path),
            f"cannot be created ({error or 'on rank 0'})",
            "choose a writable location, e.g. run.root=/scratch/runs",
        )
    return path


def write_config(cfg: Any, run_dir: Path) -> Path:
    """config.yaml (resolved); an earlier, different one is kept as config.<k>.yaml, never lost."""
    text = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    path = run_dir / "config.yaml"
    if path.exists() and path.read_text() != text:
        k = 1
        while (run_dir / f"config.{k}.yaml").exists():
            k += 1
        path.rename(run_dir / f"config.{k}.yaml")
    path.write_text(text)
    return path
