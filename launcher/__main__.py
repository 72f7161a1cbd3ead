"""Entry point: compose -> validate -> process group -> train -> tear down.

    python -m launcher recipe=gpt train.steps=100                      # one process
    torchrun --standalone --nproc_per_node=2 -m launcher recipe=gpt    # DDP over 2 ranks
    python -m launcher -m optim.lr=1e-4,3e-4                           # a sweep, one job at a time

Exit codes: 0 done; 2 invalid configuration; 3 non-finite loss (train.nonfinite=stop); 4 out of GPU
memory (explained, memory_summary.txt in the run dir); 6 disk full (or another write failure) in the
run directory, nothing saved lost; 128+N stopped by signal N after checkpointing (143 SIGTERM, 130
SIGINT, 138 SIGUSR1); 1 any other failure. Under torchrun, `python -m launcher.run` passes them on.
"""

from __future__ import annotations

# First, before the slow imports below: when one rank exits (a config error, say), torchrun SIGTERMs
# the others at once, and a rank still importing torch would die without saying what is wrong. From
# here on a signal only sets a flag (launcher/train/shutdown.py), bounded by a watchdog.
from launcher.train.shutdown import StopFlag, StopRequested

EARLY_STOP = StopFlag(grace_s=25.0) if __name__ == "__main__" else None

import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from torch.distributed.elastic.multiprocessing.errors import ErrorHandler, record  # noqa: E402

from launcher.config import cli  # noqa: E402
from launcher.config.schema import DistConfig  # noqa: E402
from launcher.config.validate import check_train_data  # noqa: E402
from launcher.errors import ConfigError  # noqa: E402
from launcher.launch import exits  # noqa: E402
from launcher.launch.diskspace import DiskFull, disk_full_message, is_disk_full  # noqa: E402
from launcher.launch.dist import DistEnv, DistSession, dist_session  # noqa: E402
from launcher.launch.rundir import continue_command, resolve_run_dir  # noqa: E402
from launcher.observe.loggers import configure_logging  # noqa: E402
from launcher.train.checkpoint import CheckpointError  # noqa: E402

log = logging.getLogger("launcher")
# Text of errors a rank sees when a *peer* died or hung: its own traceback would only add noise.
PEER_FAILURE_SIGNS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Timed out",
    "timed out",
    "Broken pipe",
    "NCCL",
    "ProcessGroup",
    "gloo",
)


@record  # under torchrun: an uncaught error's traceback reaches the agent's summary
def main() -> int:
    env = DistEnv.from_environ()
    configure_logging(env.rank)
    stop = EARLY_STOP or StopFlag(grace_s=DistConfig.shutdown_grace_s)
    try:
        return _main(env, stop)
    finally:
        stop.restore()


def _main(env: DistEnv, stop: StopFlag) -> int:
    try:
        request = cli.parse_argv(sys.argv[1:])  # raises ConfigError too
        if request.help:
            if env.is_main:
                print(cli.help_text(request.config_dir))
            return 0
        cli.register_all(request.overrides)
        if request.show_config:
            cli.compose_jobs(request, env.world_size)  # validated: --cfg never shows a config that would fail
        if request.hydra_only:
            cli.hydra_main(lambda cfg: None)
            return 0
        jobs = cli.compose_jobs(request, env.world_size)
    except ConfigError as err:
        return report_config_error(err, env)
    if request.multirun:
        return run_sweep(env, stop)
    return run(jobs[0], env, stop)


def run(job: cli.Job, env: DistEnv, stop: StopFlag, sweep: bool = False) -> int:
    """One training job. A rank of a multi-process job ends its process here, inside the session (see
    launcher/launch/exits.py), unless a sweep's next job follows."""
    from launcher.memory.allocator import configure_allocator
    from launcher.parallel import needs_process_group
    from launcher.train.loop import WHERE

    stop.grace_s = job.cfg.dist.shutdown_grace_s
    configure_allocator(job.cfg.memory)  # before CUDA initialises
    try:
        check_train_data(job.cfg, job.recipe, job.recipe_class, env.world_size)  # before any process group
        with dist_session(env, job.cfg.dist, needs_process_group(job.cfg)) as session:
            code = train_and_report(job, session, stop)
            if env.world_size > 1 and not sweep:
                exits.exit_now(code)  # never tears the group down: that could block with the GIL held
    except ConfigError as err:  # before the process group, or while it formed
        return report_config_error(err, env)
    except Exception as err:  # noqa: BLE001 - the group could not form: a peer failed, or a timeout
        return report_failure(err, env, WHERE)
    exits.cancel_deadline()  # a sweep goes on to its next job
    return code


def train_and_report(job: cli.Job, session: DistSession, stop: StopFlag) -> int:
    """Train; report how it ended, while the process group is still up; return the exit code.

    Every way out, success included, starts the exit deadline of a multi-process rank first.
    """
    from launcher.memory.guard import OutOfMemoryReported
    from launcher.train.loop import WHERE, NonFiniteLoss, train

    env, run_dir = session.env, None
    try:
        try:
            run_dir, picked, lock = resolve_run_dir(job.cfg, job.recipe_name, job.output_dir, session)
            job.cfg.run.dir = str(run_dir)
            if picked:
                log.info("continuing the unfinished run of the same config (resume=never starts a new one)")
            log.info("run directory: %s", run_dir)
            try:
                train(job, session, run_dir, stop)
            finally:
                if lock is not None:
                    lock.release()
        finally:
            if env.world_size > 1:
                exits.start_deadline(job.cfg.dist.shutdown_grace_s)
    except ConfigError as err:
        return report_config_error(err, env)
    except DiskFull as err:
        if env.is_main:
            log.error("%s", err)
        return exits.DISK
    except CheckpointError as err:
        log.error("%s", err)
        return exits.FAILURE
    except StopRequested as err:
        report_stop(err, run_dir)
        return 128 + err.signum
    except NonFiniteLoss as err:
        log.error("%s", err)
        return exits.NONFINITE
    except OutOfMemoryReported as err:  # explained and written to the run dir already
        return err.code
    except OSError as err:
        if is_disk_full(err):
            log.error("rank %d: %s", env.rank, disk_full_message(err))
            return exits.DISK
        return report_failure(err, env, WHERE)
    except Exception as err:  # noqa: BLE001 - sorted into "a peer failed" and "this rank failed"
        return report_failure(err, env, WHERE)
    return exits.OK


def report_stop(err: StopRequested, run_dir: Path | None) -> None:
    log.warning("%s. Continue with the same command, or exactly:\n  %s", err, continue_command(run_dir))


def report_failure(err: Exception, env: DistEnv, where: dict) -> int:
    """A peer's failure gets one line; this rank's own failure its traceback, shown once. A rank of a
    multi-process job exits here (launcher/launch/exits.py); one process re-raises, for Python's traceback."""
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    context = f"{where['phase']} {where['step']}" if where["step"] else where["phase"]
    launcher = "launcher.run" if os.environ.get(exits.RUN_ENV) else "torchrun"
    if env.world_size > 1 and any(sign in str(err) for sign in PEER_FAILURE_SIGNS):
        log.error(
            "rank %d: a collective failed during %s (%s: %s). Another rank died or is stuck; its own "
            "error, if any, is reported by %s",
            env.rank,
            context,
            type(err).__name__,
            first_line,
            launcher,
        )
        exits.exit_now(exits.FAILURE)
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        # torchrun prints this traceback in its failure summary (launcher.run too); printing it here as
        # well would show it twice.
        ErrorHandler().record_exception(err)
        log.error(
            "rank %d failed during %s: %s: %s (traceback in %s's summary below)",
            env.rank,
            context,
            type(err).__name__,
            first_line,
            launcher,
        )
        exits.exit_now(exits.FAILURE)
    if env.world_size > 1:  # srun without torchrun: no summary to defer to
        log.error("rank %d failed during %s", env.rank, context, exc_info=err)
        exits.exit_now(exits.FAILURE)
    raise err


def run_sweep(env: DistEnv, stop: StopFlag) -> int:
    """Hydra's multirun: every sweep point was validated up front; run them one after another."""
    from hydra.core.hydra_config import HydraConfig

    from launcher.observe.summary import sweep_table

    failed: list[int] = []
    rows: list[tuple[list[str], int, Path | None]] = []

    def task(cfg) -> None:
        hydra_cfg = HydraConfig.get()
        job = cli.job_from_hydra(
            cfg, dict(hydra_cfg.runtime.choices), hydra_cfg.runtime.output_dir, env.world_size
        )
        overrides = list(hydra_cfg.overrides.task)
        log.info("sweep job %s: %s", hydra_cfg.job.num, " ".join(overrides))
        code = run(job, env, stop, sweep=True)
        rows.append((overrides, code, Path(job.cfg.run.dir) if job.cfg.run.dir else None))
        if code != 0:
            failed.append(hydra_cfg.job.num)

    cli.hydra_main(task)
    if rows and env.is_main:
        log.info("sweep results:\n%s", sweep_table(rows))
    if failed:
        log.error("sweep jobs failed: %s", failed)
    return exits.FAILURE if failed else exits.OK


def report_config_error(err: ConfigError, env: DistEnv) -> int:
    if env.is_main:
        print(f"launcher: invalid config: {err}", file=sys.stderr)
    return exits.CONFIG


if __name__ == "__main__":
    # Skip interpreter finalization (exits.exit_now says why). Everything that needed closing
    # (checkpoints, metrics, wandb) is closed by now.
    exits.exit_now(main())
