"""The run directory: one path, the same on every rank, chosen before anything is written.

Which directory a run uses (the rule users rely on to continue a stopped run):
1. `run.dir` if given;
2. else `<run.root>/<recipe>/<id>` with id = `run.id`, else the Slurm job id (stable across requeues);
3. else, unless `resume=never`, the newest *unfinished* run under `<run.root>/<recipe>/` whose
   `config.yaml` equals this config (ignoring keys that do not change what is trained, IGNORED
   below) and that no live process holds: rerunning the command you stopped continues it;
4. else torchrun's run id (stable across torchrun's own restarts), else a new timestamp.
`<run.root>/<recipe>/latest` points at the directory last started.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from launcher.config.schema import RunConfig
from launcher.errors import ConfigError
from launcher.launch.dist import DistSession
from launcher.launch.exits import RUN_ENV

log = logging.getLogger(__name__)

CONFIG = "config.yaml"
FINISHED = "FINISHED"
"""Written by rank 0 when training reached train.steps."""
STOPPED = "STOPPED"
"""Written by rank 0 when a signal stopped training: a Slurm script requeues only after such a stop."""
LOCK = ".lock"
# Keys that say how or where to run, not what is trained: a run stopped and rerun with a different
# value of these is the same run.
IGNORED = (
    "run",
    "resume",
    "logger",
    "dist",
    "slurm",
    "train.stop_at_step",
    "metrics",
    "profile",
    "memory",
    "estimate",
)


def run_id(cfg: RunConfig, session: DistSession) -> str | None:
    """run.id, else the Slurm job id (stable across requeues); None to let the other rules choose."""
    if cfg.id:
        return cfg.id
    job = os.environ.get("SLURM_ARRAY_JOB_ID") and "{}_{}".format(
        os.environ["SLURM_ARRAY_JOB_ID"], os.environ.get("SLURM_ARRAY_TASK_ID", "0")
    )
    return job or os.environ.get("SLURM_JOB_ID") or None


def new_run_id() -> str:
    """A timestamp plus 4 random hex digits: two runs started in the same second differ."""
    return time.strftime("%Y-%m-%d_%H-%M-%S") + "_" + secrets.token_hex(2)


def resolve_run_dir(
    cfg: Any, recipe_name: str, sweep_job_dir: str | None, session: DistSession
) -> tuple[Path, bool, RunLock | None]:
    """Create (rank 0) and return the run directory (the same on every rank), whether an unfinished
    run of the same config was picked up, and rank 0's lock on it (release it when done)."""
    run = cfg.run
    picked = False
    if run.dir:
        path = Path(run.dir)
    elif sweep_job_dir:
        path = Path(sweep_job_dir)
    else:
        parent = Path(run.root) / recipe_name
        chosen = run_id(run, session)
        if chosen is None and session.is_main:
            found = None if cfg.resume == "never" else find_unfinished(parent, comparable(cfg))
            picked = found is not None
            chosen = found.name if found else (session.env.run_id or new_run_id())
        chosen, picked = session.broadcast_object((chosen, picked) if session.is_main else None)
        path = parent / chosen
    problem, lock = None, None
    if session.is_main:
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".probe"
            probe.write_bytes(b"ok")
            probe.unlink()
            lock = RunLock.acquire(path)
            if lock is None:
                problem = "another live process is training in this directory"
        except OSError as err:
            problem = f"cannot be created or written ({err})"
    # Every rank learns whether rank 0 succeeded: none may wait in a collective for a rank that left.
    problem = session.broadcast_object(problem)
    if problem:
        raise ConfigError(
            "run.dir",
            str(path),
            problem,
            "wait for it, or choose another run.dir"
            if lock is None and "live process" in problem
            else "fix its permissions, or choose a writable location, e.g. run.root=/scratch/runs",
        )
    if session.is_main and not sweep_job_dir:
        link_latest(path)
    return path, picked, lock


def comparable(cfg: Any) -> dict:
    """The config as plain data without the IGNORED keys: what makes two runs the same run."""
    data = (
        cfg
        if isinstance(cfg, dict)
        else OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)
    )
    data = yaml.safe_load(yaml.safe_dump(data))  # plain types, as read back from config.yaml
    for key in IGNORED:
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return data


def find_unfinished(parent: Path, config: dict) -> Path | None:
    """The newest run under `parent` with this config, not finished, not held by a live process."""
    if not parent.is_dir():
        return None
    runs = [p for p in parent.iterdir() if p.is_dir() and not p.is_symlink() and (p / CONFIG).is_file()]
    for path in sorted(runs, key=lambda p: (p / CONFIG).stat().st_mtime, reverse=True):
        if (path / FINISHED).exists() or is_locked(path):
            continue
        try:
            saved = comparable(yaml.safe_load((path / CONFIG).read_text()) or {})
        except (OSError, yaml.YAMLError):
            continue
        if saved == config:
            return path
    return None


def is_locked(run_dir: Path) -> bool:
    try:
        with open(run_dir / LOCK, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(f, fcntl.LOCK_UN)
        return False
    except OSError:
        return True


class RunLock:
    """Held by rank 0 while a run trains, so a second launch of the same config starts its own run."""

    def __init__(self, file: Any) -> None:
        self.file = file

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock | None:
        """The lock, or None when a live process holds it."""
        file = open(run_dir / LOCK, "a")  # noqa: SIM115 - held for the run's lifetime
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            file.close()
            return None
        return cls(file)

    def release(self) -> None:
        self.file.close()


def link_latest(run_dir: Path) -> None:
    """`<parent>/latest` -> run_dir (relative), replaced atomically; best effort."""
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest_{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(run_dir.name)
        os.replace(tmp, link)
    except OSError:
        tmp.unlink(missing_ok=True)


def write_config(cfg: Any, run_dir: Path, step: int) -> Path:
    """config.yaml (resolved), written when training starts, so it describes an attempt that trained.
    An earlier, different one is kept as config.step_<step>.yaml: the step from which it changed."""
    text = OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True)
    path, tmp = run_dir / CONFIG, run_dir / f".{CONFIG}.tmp"
    try:
        tmp.write_text(text)  # whole or not at all: a full disk never leaves half a config.yaml
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    if path.exists() and path.read_text() != text:
        path.rename(run_dir / f"config.step_{step}.yaml")
    os.replace(tmp, path)
    return path


def continue_command(run_dir: Path) -> str:
    """The exact command that continues this run (how this process was started, plus run.dir)."""
    args = [a for a in sys.argv[1:] if not a.startswith("run.dir=")] + [f"run.dir={run_dir}"]
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if os.environ.get("TORCHELASTIC_RUN_ID") and local:
        nnodes = int(os.environ.get("WORLD_SIZE", local)) // int(local)
        via_run = bool(os.environ.get(RUN_ENV))  # started by python -m launcher.run
        tool = ["python", "-m", "launcher.run"] if via_run else ["torchrun"]
        head = [*tool, "--standalone"] if nnodes == 1 else [*tool, f"--nnodes={nnodes}", "..."]
        head += [f"--nproc_per_node={local}"] + ([] if via_run else ["-m", "launcher"])
    else:
        head = ["python", "-m", "launcher"]
    return shlex.join(head + args)
