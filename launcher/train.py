"""The training loop: one screen, one call per strategy difference.

for each optimizer step:
    forward + backward over the micro-batches (the strategy: DDP, pipeline, ...)
    unscale, clip; agree across ranks on "stop?" and "non-finite?"; step, schedule
    log, evaluate, checkpoint; stop if asked
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from launcher.checkpoint import Checkpointer
from launcher.cli import Job
from launcher.config import NonFinite
from launcher.data import TrainStream, eval_batches
from launcher.dist import DistSession
from launcher.errors import ConfigError
from launcher.loggers import build_logger
from launcher.memory.guard import memory_guard
from launcher.metrics import MetricsFile, flops_per_micro_batch, memory_stats, peak_flops
from launcher.optim import build_optimizer, build_scheduler
from launcher.parallel import build_strategy
from launcher.precision import MixedPrecision
from launcher.shutdown import StopFlag, StopRequested
from launcher.train_state import CheckpointState, Progress, seed_everything

log = logging.getLogger(__name__)

# Where the loop is, for error messages from whoever catches an exception (a hung collective says
# only "timed out"; this says during what).
WHERE = {"phase": "setup", "step": 0}
FINISHED = "FINISHED"


class NonFiniteLoss(RuntimeError):
    """train.nonfinite=stop: the last good state is saved; the CLI exits with code 3."""

    def __init__(self, step: int, saved: Path | None) -> None:
        self.step = step
        where = f"the last good state (step {step - 1}) is in {saved}" if saved else "no step had completed"
        super().__init__(
            f"non-finite loss or gradient at step {step}; {where}. resume=auto continues after "
            "the offending batch; train.nonfinite=skip drops such steps instead"
        )


def train(job: Job, session: DistSession, run_dir: Path, stop: StopFlag) -> None:
    """Train `job`; `stop` is the process's signal flag (installed at start, so no signal is lost)."""
    trainer = None
    try:
        with memory_guard(job, session, run_dir, WHERE) as memory:  # pre-flight, snapshots, OOM report
            trainer = Trainer(job, session, run_dir, stop)
            trainer.fit(after_step=memory.after_step)
    finally:
        if trainer is not None:
            trainer.logger.close()  # also when failing: wandb marks the run finished, the bar closes


class Trainer:
    def __init__(self, job: Job, session: DistSession, run_dir: Path, stop: StopFlag) -> None:
        cfg = job.cfg
        self.cfg, self.session, self.stop = cfg, session, stop
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.recipe = job.recipe_class(cfg.recipe)
        self.strategy = build_strategy(cfg, self.recipe, session)
        seed_everything(cfg.train.seed + session.rank)  # per-rank randomness (dropout), after the shared init
        self.optimizer = build_optimizer(self.strategy.module.named_parameters(), cfg.optim, session.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.steps)
        self.amp = MixedPrecision(cfg.precision, session.device)
        self.stream = TrainStream(
            self.recipe.train_dataset(),
            cfg.train.micro_batch_size,
            self.strategy.dp_rank,
            self.strategy.dp_size,
            cfg.train.seed,
            cfg.loader,
            session.device,
        )
        self.eval_set = self.recipe.eval_dataset() if cfg.train.eval_every else None

        self.checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint.keep, session)
        if not session.all_agree(self.checkpointer.check_writable()):
            raise ConfigError(
                "run.dir",
                str(run_dir),
                "cannot create files in its checkpoints/ directory",
                "fix the permissions or the path, or choose another run.dir",
            )
        self.progress = Progress()
        self.state = CheckpointState(
            self.strategy, self.optimizer, self.scheduler, self.amp, self.stream, self.progress, session
        )
        WHERE.update(phase="resume", step=0)
        self.resumed = self.checkpointer.restore(cfg.resume, self.state.read, self.state.apply)
        if self.resumed is not None:
            log.info("resumed from step %d", self.resumed)
        self.saved_step = self.resumed

        self.metrics = MetricsFile(run_dir / "metrics.jsonl")
        self.finished_marker = run_dir / FINISHED
        if session.is_main:
            self.metrics.truncate_after(self.progress.step)
            if self.progress.step < cfg.train.steps:
                self.finished_marker.unlink(missing_ok=True)  # training on (e.g. train.steps was raised)
        self.logger = build_logger(
            cfg.logger,
            session.is_main,
            self.progress.step,
            cfg.train.steps,
            run_dir,
            OmegaConf.to_container(OmegaConf.structured(cfg)),
            cfg.run.name,
        )
        tokens_per_sample = getattr(self.recipe, "tokens_per_sample", None)
        self.global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * self.strategy.dp_size
        self.unit = "tokens_per_s" if tokens_per_sample else "samples_per_s"
        self.unit_per_step = self.global_batch * (tokens_per_sample or 1)
        self.peak = peak_flops(session.device, cfg.metrics.peak_tflops)
        self.flops_per_step: float | None = None
        self.last_step = cfg.train.stop_at_step or cfg.train.steps
        log.info(
            "training %s: %d steps, global batch %d (%d per rank x %d accumulation x %d data-parallel ranks)",
            job.recipe_name,
            cfg.train.steps,
            self.global_batch,
            cfg.train.micro_batch_size,
            cfg.train.grad_accum_steps,
            self.strategy.dp_size,
        )

    def fit(self, after_step: Callable[[int], None] = lambda step: None) -> None:
        if self.resumed is not None and self.resumed >= self.last_step:
            log.info("nothing to do: the run already reached step %d", self.resumed)
        self.window_start, self.window_steps = time.perf_counter(), 0
        if self.session.any_rank(self.stop.signum is not None)[0]:  # signalled during setup: nothing to save
            raise StopRequested(self.stop.signum or signal.SIGTERM, self.progress.step, saved=False)
        for step in range(self.progress.step + 1, self.last_step + 1):
            WHERE.update(phase="train step", step=step)
            micro_batches = [next(self.stream) for _ in range(self.cfg.train.grad_accum_steps)]
            self._count_flops(micro_batches[0])
            loss = self.strategy.forward_backward(micro_batches, self.recipe.loss, self.amp)
            self.amp.unscale_(self.optimizer)
            grad_norm = self.strategy.clip_grad_norm_(self.cfg.optim.grad_clip)
            lr = self.scheduler.get_last_lr()[0]
            # One tiny CPU all-reduce per step: every rank must stop, or skip, at the same step.
            stop, nonfinite = self.session.any_rank(
                self.stop.signum is not None, not self._finite(loss, grad_norm)
            )
            if nonfinite:
                self._drop_update(step)  # raises NonFiniteLoss under train.nonfinite=stop
            elif self.amp.step(self.optimizer, grad_norm):
                self.progress.skipped_steps += 1
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.progress.step = step
            self.window_steps += 1
            self.logger.advance()
            self._maybe_log(step, loss, lr, grad_norm)
            self._maybe_evaluate(step)
            self._maybe_save(step, force=stop)
            after_step(step)
            if stop:
                raise StopRequested(self.stop.signum or 0, step)
        if self.progress.step >= self.cfg.train.steps and self.session.is_main:
            # What a Slurm batch script checks to tell "done" from "stopped early: requeue".
            self.finished_marker.write_text(
                json.dumps({"step": self.progress.step, "finished_at": time.time()})
            )

    def _finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        # Under fp16, non-finite gradients are loss-scale overflow: the GradScaler's business, not ours.
        bad = ~torch.isfinite(loss)
        if not self.amp.scaling:
            bad |= ~torch.isfinite(grad_norm)
        return not bad.item()

    def _drop_update(self, step: int) -> None:
        if self.cfg.train.nonfinite == NonFinite.stop:
            saved = None
            if self.progress.step > 0:  # the model still holds step-1's weights: the last good state
                saved = self._save(self.progress.step)
            raise NonFiniteLoss(step, saved)
        log.warning("step %d: non-finite loss or gradient, update dropped (train.nonfinite=skip)", step)
        self.progress.nonfinite_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.amp.skip(self.optimizer)

    def _count_flops(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        if self.flops_per_step is None and self.peak:
            flops = flops_per_micro_batch(self.recipe.build_model, *batch, self.recipe.loss)
            self.flops_per_step = (flops or 0.0) * self.cfg.train.grad_accum_steps

    def _maybe_log(self, step: int, loss: torch.Tensor, lr: float, grad_norm: torch.Tensor) -> None:
        if step % self.cfg.train.log_every and step != self.last_step:
            return
        mean_loss = self.strategy.mean_loss(loss).item()  # the sync that makes the timing honest
        step_time = (time.perf_counter() - self.window_start) / self.window_steps
        record: dict[str, Any] = {
            "step": step,
            "loss": mean_loss,
            "lr": lr,
            "grad_norm": grad_norm.item(),
            self.unit: self.unit_per_step / step_time,
            "step_time_s": step_time,
            "global_batch_size": self.global_batch,
        }
        if self.amp.scaling:
            record.update(skipped_steps=self.progress.skipped_steps, loss_scale=self.amp.scaler.get_scale())
        if self.progress.nonfinite_steps:
            record["nonfinite_steps"] = self.progress.nonfinite_steps
        if (
            self.flops_per_step and self.peak
        ):  # per device: a model's FLOPs are spread over its pipeline ranks
            record["mfu"] = self.flops_per_step / self.strategy.model_parallel_size / step_time / self.peak
        if self.strategy.comm_stats is not None:
            record.update(self.strategy.comm_stats.step(self.window_steps))
        record.update(memory_stats(self.session.device))
        self._emit(record)
        self.window_start, self.window_steps = time.perf_counter(), 0

    def _maybe_evaluate(self, step: int) -> None:
        if self.eval_set is None or (step % self.cfg.train.eval_every and step != self.last_step):
            return
        WHERE.update(phase="evaluation", step=step)
        self._emit({"step": step, **evaluate(self)})
        self.window_start = time.perf_counter()  # keep eval time out of step_time_s

    def _maybe_save(self, step: int, force: bool) -> None:
        every = self.cfg.checkpoint.every
        if force or (every and step % every == 0) or step == self.last_step:
            self._save(step)

    def _save(self, step: int) -> Path:
        if self.saved_step == step:
            return self.checkpointer.root / f"step_{step}"
        WHERE.update(phase="checkpoint save", step=step)
        path = self.checkpointer.save(step, self.state.files(), self.state.meta())
        self.saved_step = step
        log.info("saved %s", path)
        self.window_start = time.perf_counter()  # keep checkpoint time out of step_time_s
        return path

    def _emit(self, record: dict[str, Any]) -> None:
        if self.session.is_main:
            self.metrics.write(record)
        self.logger.log(record)


def evaluate(trainer: Trainer) -> dict[str, float]:
    """Mean eval loss (and the recipe's eval_metrics) over every rank's eval batches."""
    strategy, recipe, session, cfg = trainer.strategy, trainer.recipe, trainer.session, trainer.cfg
    extra_fn = getattr(recipe, "eval_metrics", None)
    zero = torch.zeros((), device=session.device)
    sums: dict[str, torch.Tensor] = {}
    count = zero.clone()
    strategy.module.eval()
    with torch.no_grad():
        for inputs, targets in eval_batches(
            trainer.eval_set,
            cfg.train.micro_batch_size,
            strategy.dp_rank,
            strategy.dp_size,
            cfg.train.eval_batches,
            cfg.loader,
            session.device,
            drop_last=strategy.fixed_batch_shape,
        ):
            with trainer.amp.autocast():
                outputs = strategy.eval_forward(inputs, targets)
            if outputs is None:
                continue
            n = len(targets)
            values = {"eval_loss": recipe.loss(outputs, targets)}
            if extra_fn:
                values.update(extra_fn(outputs, targets))
            for key, value in values.items():
                sums[key] = sums.get(key, zero) + value.float() * n
            count += n
    strategy.module.train()
    # Ranks without outputs (pipeline stages before the last) contribute zeros, but must know the keys.
    keys = sorted(set().union(*session.all_gather_object(sorted(sums))))
    packed = torch.stack([sums.get(k, zero) for k in keys] + [count])
    session.all_reduce(packed, "sum")
    return {k: (packed[i] / packed[-1]).item() for i, k in enumerate(keys)}
