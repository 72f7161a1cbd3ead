"""The Trainer's parts, one small factory each. `Trainer.__init__` (loop.py) calls them in this order,
and the order is part of the contract:

1. `strategy`: the recipe's model, built and wrapped by the parallel strategy (the same initial
   parameters on every rank), then this rank's own seed: dropout differs per rank, the init must not;
2. `optimization`: optimizer, learning-rate schedule, mixed precision, the non-finite guard;
3. `data`: the training stream (this rank's shard) and the eval set;
4. `checkpointer`: every rank agrees that its directory is writable (a collective). The Trainer then
   restores the newest checkpoint, once every part it holds exists (collectives again);
5. `outputs`: what the run directory gets once the restored step is known: config.yaml, metrics.jsonl
   cut back to that step, the markers of an earlier attempt removed, the logger;
6. `throughput` and `observation`: what a log line measures (units per step, peak FLOP/s), the step
   timer, GPU telemetry, starts.jsonl and the profiler.

Every rank builds them in the same order, so that their collectives pair up.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from launcher.config.cli import Job
from launcher.config.schema import Config
from launcher.errors import ConfigError
from launcher.launch.dist import DistSession
from launcher.launch.rundir import FINISHED, STOPPED, write_config
from launcher.observe.loggers import build_logger
from launcher.observe.metrics import MetricsFile, peak_flops
from launcher.observe.profile import build_profiler
from launcher.observe.starts import record_start
from launcher.observe.summary import model_line
from launcher.observe.telemetry import GpuTelemetry
from launcher.observe.timing import StepTimer
from launcher.parallel import build_strategy
from launcher.parallel.strategy import Strategy
from launcher.train.checkpoint import Checkpointer
from launcher.train.data import TrainStream, is_streaming
from launcher.train.nonfinite_guard import NonFiniteGuard
from launcher.train.optim import build_optimizer, build_scheduler, step_on_local_shards
from launcher.train.precision import MixedPrecision
from launcher.train.state import seed_everything

log = logging.getLogger(__name__)


def strategy(cfg: Config, recipe: Any, session: DistSession) -> Strategy:
    """The recipe's model on this rank, built and wrapped by the `parallel=` strategy; then this rank's
    seed, for what differs per rank (dropout), now that the shared initialisation is done."""
    built = build_strategy(cfg, recipe, session)
    log.info("model: %s", model_line(built.module, built.model_parallel_size))
    if cfg.optim.warmup_steps > cfg.train.steps:
        log.warning(
            "optim.warmup_steps=%d is longer than train.steps=%d: the learning rate never peaks",
            cfg.optim.warmup_steps,
            cfg.train.steps,
        )
    seed_everything(cfg.train.seed + session.rank)  # per-rank randomness (dropout), after the shared init
    return built


def optimization(
    cfg: Config, built: Strategy, session: DistSession
) -> tuple[torch.optim.Optimizer, Any, MixedPrecision, NonFiniteGuard]:
    """(optimizer, learning-rate scheduler, mixed precision, non-finite guard) for the strategy's model."""
    optimizer = build_optimizer(built.module.named_parameters(), cfg.optim, built.param_device)
    step_on_local_shards(optimizer)  # sharded (DTensor) parameters: the step skips DTensor's dispatch
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    amp = MixedPrecision(cfg.precision, session.device)
    return optimizer, scheduler, amp, NonFiniteGuard(optimizer, session.device, amp.scaling)


def data(cfg: Config, recipe: Any, built: Strategy, session: DistSession) -> tuple[TrainStream, Any]:
    """(this rank's training stream, the eval set or None when train.eval_every=0).

    Raises:
        ConfigError: evaluation is on and the recipe's eval dataset is empty.
    """
    stream = TrainStream(
        recipe.train_dataset(),
        cfg.train.micro_batch_size,
        built.dp_rank,
        built.dp_size,
        cfg.train.seed,
        cfg.loader,
        session.device,
        split=getattr(recipe, "split_batch", None),
    )
    eval_set = recipe.eval_dataset() if cfg.train.eval_every else None
    if eval_set is not None and not is_streaming(eval_set) and len(eval_set) == 0:
        raise ConfigError(
            "train.eval_every",
            cfg.train.eval_every,
            f"the recipe's eval dataset ({type(eval_set).__name__}) is empty",
            "use train.eval_every=0, or give the recipe eval data",
        )
    return stream, eval_set


def checkpointer(cfg: Config, session: DistSession, run_dir: Path) -> Checkpointer:
    """Collective: the run's checkpointer, once every rank can write in its directory.

    Raises:
        ConfigError: some rank cannot create files in `<run_dir>/checkpoints`.
    """
    made = Checkpointer(run_dir / "checkpoints", cfg.checkpoint.keep, session, cfg.checkpoint.async_save)
    if not session.all_agree(made.check_writable()):
        raise ConfigError(
            "run.dir",
            str(run_dir),
            "cannot create files in its checkpoints/ directory",
            "fix the permissions or the path, or choose another run.dir",
        )
    return made


def identity(job: Job) -> dict[str, Any]:
    """What a checkpoint must have been saved under to be resumed (train/state.py checks it)."""
    cfg = job.cfg
    return {
        "recipe": f"{job.recipe_class.__module__}:{job.recipe_class.__qualname__}",
        "recipe_config": OmegaConf.to_container(
            OmegaConf.structured(cfg.recipe), resolve=True, enum_to_str=True
        ),
        "micro_batch_size": cfg.train.micro_batch_size,
        "seed": cfg.train.seed,
    }


def outputs(cfg: Config, session: DistSession, run_dir: Path, step: int) -> tuple[MetricsFile, Path, Any]:
    """(metrics.jsonl, the FINISHED marker's path, the logger), training on from `step` (the restored
    one). Rank 0 writes config.yaml now that training starts, so it never describes a failed attempt."""
    if session.is_main:
        write_config(cfg, run_dir, step)
    metrics = MetricsFile(run_dir / "metrics.jsonl")
    finished_marker = run_dir / FINISHED
    if session.is_main:
        metrics.truncate_after(step)
        if step < cfg.train.steps:
            finished_marker.unlink(missing_ok=True)  # training on (e.g. train.steps was raised)
        (run_dir / STOPPED).unlink(missing_ok=True)  # this attempt has not been stopped (yet)
    logger = build_logger(
        cfg.logger,
        session.is_main,
        step,
        cfg.train.steps,
        run_dir,
        OmegaConf.to_container(OmegaConf.structured(cfg)),
        cfg.run.name,
    )
    return metrics, finished_marker, logger


def throughput(
    cfg: Config, recipe: Any, built: Strategy, session: DistSession
) -> tuple[int, str, int, float | None]:
    """(global batch in samples, the rate's metrics key, units per optimizer step, peak FLOP/s or None):
    tokens when the recipe says how many a sample holds, else samples."""
    tokens_per_sample = getattr(recipe, "tokens_per_sample", None)
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * built.dp_size
    unit = "tokens_per_s" if tokens_per_sample else "samples_per_s"
    peak = peak_flops(session.device, cfg.metrics.peak_tflops)
    return global_batch, unit, global_batch * (tokens_per_sample or 1), peak


def observation(
    cfg: Config, session: DistSession, run_dir: Path, built: Strategy, step: int, last_step: int
) -> tuple[StepTimer, GpuTelemetry, Any]:
    """(step timer, GPU telemetry, profiler or None) for steps step+1..last_step; rank 0 records this
    start in starts.jsonl."""
    # No exposed-comm timing under torch.compile: hooks added for one step would make Dynamo recompile.
    timed_comm = built.comm_stats is not None and built.times_exposed_comm and not cfg.train.compile_on
    comm_params = built.module.parameters() if timed_comm else None
    timer = StepTimer(cfg.metrics.step_timing, session.device, comm_params)
    telemetry = GpuTelemetry(cfg.metrics.gpu_telemetry, session)
    if session.is_main:
        record_start(run_dir, step, session.world_size)
    profiler = build_profiler(cfg.profile, run_dir, session, step + 1, last_step, timer)
    return timer, telemetry, profiler
