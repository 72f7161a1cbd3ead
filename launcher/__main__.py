"""Entry point: compose -> validate -> process group -> train -> tear down.

python -m launcher recipe=gpt train.steps=100                      # one process
torchrun --standalone --nproc_per_node=2 -m launcher recipe=gpt    # DDP over 2 ranks
python -m launcher -m optim.lr=1e-4,3e-4                           # a sweep, one job at a time
"""

from __future__ import annotations

import logging
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from launcher import cli
from launcher.checkpoint import CheckpointError
from launcher.dist import DistEnv, dist_session
from launcher.errors import ConfigError
from launcher.loggers import configure_logging
from launcher.rundir import resolve_run_dir

log = logging.getLogger("launcher")
EXIT_CONFIG = 2


@record  # under torchrun: the failing rank's traceback reaches the agent's summary
def main() -> int:
    env = DistEnv.from_environ()
    configure_logging(env.rank)
    try:
        request = cli.parse_argv(sys.argv[1:])
        cli.register_all(request.overrides)
        if request.hydra_only:
            cli.hydra_main(lambda cfg: None)
            return 0
        jobs = cli.compose_jobs(request, env.world_size)
    except ConfigError as err:
        return report_config_error(err, env)
    if request.multirun:
        return run_sweep(env)
    return run(jobs[0], env)


def run(job: cli.Job, env: DistEnv) -> int:
    from launcher.train import train, write_config

    try:
        with dist_session(env, job.cfg.dist) as session:
            run_dir = resolve_run_dir(job.cfg.run, job.recipe_name, job.output_dir, session)
            job.cfg.run.dir = str(run_dir)
            if session.is_main:
                write_config(job.cfg, run_dir)
                log.info("run directory: %s", run_dir)
            train(job, session, run_dir)
    except ConfigError as err:
        return report_config_error(err, env)
    except CheckpointError as err:
        log.error("%s", err)
        return 1
    return 0


def run_sweep(env: DistEnv) -> int:
    """Hydra's multirun: every sweep point was validated up front; run them one after another."""
    from hydra.core.hydra_config import HydraConfig

    failed: list[int] = []

    def task(cfg) -> None:
        hydra_cfg = HydraConfig.get()
        job = cli.job_from_hydra(
            cfg, dict(hydra_cfg.runtime.choices), hydra_cfg.runtime.output_dir, env.world_size
        )
        log.info("sweep job %s: %s", hydra_cfg.job.num, " ".join(hydra_cfg.overrides.task))
        if run(job, env) != 0:
            failed.append(hydra_cfg.job.num)

    cli.hydra_main(task)
    if failed:
        log.error("sweep jobs failed: %s", failed)
    return 1 if failed else 0


def report_config_error(err: ConfigError, env: DistEnv) -> int:
    if env.is_main:
        print(f"launcher: invalid config: {err}", file=sys.stderr)
    return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
