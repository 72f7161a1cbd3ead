"""Submit training to Slurm, and look after submitted jobs.

    python -m launcher.slurm submit [--dry-run] [-m] <overrides>   # one job (or one per sweep point)
    python -m launcher.slurm status <run dir | job id>
    python -m launcher.slurm cancel <run dir | job id>

`submit` composes and validates the config exactly as training will (the world size is
slurm.nodes x processes per node), renders an sbatch script from conf/slurm/ and slurm/train.sbatch
into the run directory, submits it and prints the job id and run directory. Overrides reach the
launcher inside the job through `shlex.quote`: whatever characters a value holds, no shell runs it.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.errors import ConfigError

if TYPE_CHECKING:  # submit imports these itself: status and cancel must stay fast (no torch, no Hydra)
    from launcher.config import cli
    from launcher.config.schema import Config, SlurmConfig

TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "train.sbatch"
BODY_MARKER = "### launcher.slurm: the script body starts here"
JOB_ID_FILE = "slurm_job_id"
JOB_ID = re.compile(r"\d+(_\d+)?")
QUERY_TIMEOUT_S = 30


def procs_per_node(cfg: SlurmConfig) -> int:
    return cfg.nproc_per_node or max(cfg.gpus_per_node, 1)


def world_size(cfg: Config) -> int:
    return cfg.slurm.nodes * procs_per_node(cfg.slurm)


def check_slurm(cfg: SlurmConfig) -> None:
    """Raises ConfigError for values that would make a broken (or injectable) script."""
    for name in ("nodes", "cpus_per_task", "signal_lead_s"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"slurm.{name}", getattr(cfg, name), "must be >= 1")
    if cfg.gpus_per_node < 0:
        raise ConfigError("slurm.gpus_per_node", cfg.gpus_per_node, "must be >= 0")
    if cfg.max_requeues < -1:
        raise ConfigError("slurm.max_requeues", cfg.max_requeues, "must be >= 0, or -1 for no limit")
    if cfg.rdzv_port is not None and not 1024 <= cfg.rdzv_port <= 65535:
        raise ConfigError(
            "slurm.rdzv_port", cfg.rdzv_port, "must be a port in 1024..65535, or null (per job)"
        )
    if cfg.nproc_per_node is not None and cfg.nproc_per_node < 1:
        raise ConfigError("slurm.nproc_per_node", cfg.nproc_per_node, "must be >= 1")
    sbatch_values = {
        "job_name": cfg.job_name,
        "partition": cfg.partition,
        "account": cfg.account,
        "qos": cfg.qos,
        "time": cfg.time,
        "mem": cfg.mem,
        **{f"extra_sbatch[{i}]": v for i, v in enumerate(cfg.extra_sbatch)},
    }
    for name, value in sbatch_values.items():
        if value is not None and re.search(r"[\r\n]", value):
            raise ConfigError(f"slurm.{name}", value, "must be one line (it becomes an #SBATCH line)")
        if value is not None and name != "extra_sbatch" and '"' in value:
            raise ConfigError(
                f"slurm.{name}", value, "must not hold a double quote (#SBATCH values are quoted)"
            )
    for key in cfg.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"slurm.env.{key}", cfg.env[key], "is not a valid environment variable name")


def sbatch_quote(option: str, value: object) -> str:
    """`--option="value"`: sbatch's own parser splits #SBATCH lines at spaces outside double quotes."""
    text = str(value)
    if re.search(r'["\r\n]', text):
        raise ConfigError(option, text, "cannot be written in an #SBATCH line (a double quote or a newline)")
    return f'--{option}="{text}"'


def render(job: cli.Job, overrides: list[str], run_dir: Path, python: str) -> str:
    """The sbatch script for `job`: #SBATCH lines and exports from cfg.slurm, then train.sbatch's body."""
    s = job.cfg.slurm
    sbatch = [
        sbatch_quote("job-name", s.job_name or "launcher-" + job.recipe_name),
        f"--nodes={s.nodes}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={s.cpus_per_task}",
        sbatch_quote("time", s.time),
        f"--signal=B:USR1@{s.signal_lead_s}",
        "--requeue",
        "--open-mode=append",
        # sbatch expands %j (and any other %x) in --output: a literal % is written %%.
        sbatch_quote("output", str(run_dir).replace("%", "%%") + "/slurm-%j.out"),
        sbatch_quote("chdir", Path.cwd()),
    ]
    if s.gpus_per_node:
        sbatch.append(f"--gpus-per-node={s.gpus_per_node}")
    for name in ("partition", "account", "qos", "mem"):
        if getattr(s, name):
            sbatch.append(sbatch_quote(name, getattr(s, name)))
    sbatch += s.extra_sbatch
    exports = {
        "LAUNCHER_PYTHON": python,
        "NPROC_PER_NODE": str(procs_per_node(s)),
        "MAX_REQUEUES": str(s.max_requeues),
        **({"RDZV_PORT": str(s.rdzv_port)} if s.rdzv_port else {}),  # else one per job (train.sbatch)
        **s.env,
    }
    # The job's run.dir is the resolved one below; a run.dir the user typed would only repeat it.
    args = [o for o in overrides if not o.lstrip("+").startswith("run.dir=")] + [f"run.dir={run_dir}"]
    body = TEMPLATE.read_text().split(BODY_MARKER, 1)[1].split("\n", 1)[1]
    return "\n".join(
        [
            "#!/bin/bash",
            f"# Rendered by `python -m launcher.slurm submit` on {time.strftime('%Y-%m-%d %H:%M:%S')}.",
            f"# Submit it again with: sbatch {run_dir / 'train.sbatch'}",
            *(f"#SBATCH {option}" for option in sbatch),
            "",
            *(f"export {key}={shlex.quote(value)}" for key, value in exports.items()),
            *s.setup,
            "# The launcher's arguments, each quoted: the shell passes them on without interpreting them.",
            "set -- " + " ".join(shlex.quote(arg) for arg in args),
            body,
        ]
    )


def submit(overrides: list[str], multirun: bool, dry_run: bool) -> int:
    from launcher.config import cli
    from launcher.launch.rundir import new_run_id

    request = cli.Request(
        overrides, multirun=multirun, config_dir=None, config_name=cli.CONFIG_NAME, hydra_only=False
    )
    cli.register_all(request.overrides)
    # Validated as training will see it: one job per sweep point, at the job's world size.
    jobs = cli.compose_jobs(
        request,
        world_size,
        allow_multirun_world=True,
        cuda=lambda c: c.slurm.gpus_per_node > 0,
        size_for=None,  # micro_batch_size=auto is sized on the node, for its GPU
    )
    stamp = new_run_id()
    for k, job in enumerate(jobs):
        check_slurm(job.cfg.slurm)
        suffix = f"-{k}" if len(jobs) > 1 else ""
        run_dir = Path(
            job.cfg.run.dir or Path(job.cfg.run.root) / job.recipe_name / (stamp + suffix)
        ).resolve()
        script = render(job, job.overrides, run_dir, sys.executable)
        if dry_run:
            print(script)
            continue
        created = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "train.sbatch"
        path.write_text(script)
        result = subprocess.run(
            ["sbatch", "--parsable", str(path)], capture_output=True, text=True, timeout=QUERY_TIMEOUT_S
        )
        if result.returncode != 0:
            # Leave nothing half-made: a run dir of ours goes; in a user's existing one only our script.
            shutil.rmtree(run_dir) if created else path.unlink()
            print(f"launcher.slurm: sbatch failed: {result.stderr.strip()}", file=sys.stderr)
            return 1
        job_id = result.stdout.strip().split(";")[0]
        (run_dir / JOB_ID_FILE).write_text(job_id + "\n")
        print(json.dumps({"job_id": job_id, "run_dir": str(run_dir)}))
    return 0


def job_id_of(target: str) -> tuple[str, Path | None]:
    """The job id of a run directory (submitted by `submit` or by hand) or of a job id itself.

    Raises ConfigError for a path that does not exist and is no job id, and for a run dir without one.
    """
    path = Path(target)
    if path.is_dir():
        if (path / JOB_ID_FILE).is_file():
            return (path / JOB_ID_FILE).read_text().strip(), path
        # By hand: runs/<recipe>/<job id>, and the job's output <run dir>/slurm-<job id>.out.
        outputs = sorted(path.glob("slurm-*.out"), key=lambda p: p.stat().st_mtime, reverse=True)
        candidates = [p.name[len("slurm-") : -len(".out")] for p in outputs] + [path.name]
        for job_id in candidates:
            if JOB_ID.fullmatch(job_id):
                return job_id, path
        raise ConfigError(
            "target",
            target,
            f"is a directory without {JOB_ID_FILE} or slurm-<job id>.out",
            "give the job id instead (squeue --me lists them)",
        )
    if JOB_ID.fullmatch(target):
        return target, None
    raise ConfigError(
        "target", target, "is neither a run directory nor a job id", "check the path (ls runs/<recipe>/)"
    )


def final_state(job_id: str) -> str:
    """COMPLETED, FAILED, CANCELLED ... from accounting (sacct), else a sentence saying it is unknown."""
    try:
        result = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"],
            capture_output=True,
            text=True,
            timeout=QUERY_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired):
        result = None
    states = result.stdout.split() if result is not None and result.returncode == 0 else []
    if states:
        return states[-1]
    return "final state unknown (no Slurm accounting: sacct has no record)"


def status(target: str) -> int:
    job_id, run_dir = job_id_of(target)
    queue = subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%T %M %R"],
        capture_output=True,
        text=True,
        timeout=QUERY_TIMEOUT_S,
    )
    if queue.returncode != 0 and "Invalid job id" not in queue.stderr:
        print(f"launcher.slurm: squeue failed: {queue.stderr.strip()}", file=sys.stderr)
        return 1
    state = queue.stdout.strip() or f"not in the queue: {final_state(job_id)}"
    print(f"job {job_id}: {state}")
    if run_dir is not None:
        if (run_dir / "FINISHED").exists():
            print("training: finished")
        elif (run_dir / "STOPPED").exists():
            stopped = json.loads((run_dir / "STOPPED").read_text())
            print(f"training: stopped by {stopped['signal']} at step {stopped['step']}, checkpoint saved")
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().strip():
            print("last metrics:", metrics.read_text().strip().splitlines()[-1])
    return 0


def cancel(target: str) -> int:
    job_id, _ = job_id_of(target)
    return subprocess.run(["scancel", job_id], timeout=QUERY_TIMEOUT_S).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launcher.slurm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    submit_parser = verbs.add_parser("submit", help="render and sbatch a training job")
    submit_parser.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    submit_parser.add_argument("-m", "--multirun", action="store_true", help="one job per sweep point")
    submit_parser.add_argument("overrides", nargs="*")
    for verb in ("status", "cancel"):
        verbs.add_parser(verb).add_argument("target", help="run directory or job id")
    args = parser.parse_args(argv)
    try:
        if args.verb == "submit":
            return submit(args.overrides, args.multirun, args.dry_run)
        return status(args.target) if args.verb == "status" else cancel(args.target)
    except ConfigError as err:
        print(
            f"launcher: invalid config: {err}" if args.verb == "submit" else f"launcher.slurm: {err}",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
