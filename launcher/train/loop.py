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

from launcher.config.cli import Job
from launcher.config.schema import NonFinite
from launcher.launch.dist import DistSession
from launcher.launch.rundir import STOPPED
from launcher.memory.guard import memory_guard
from launcher.observe.metrics import flops_per_micro_batch, memory_stats
from launcher.observe.profile import phase
from launcher.observe.summary import run_summary
from launcher.observe.timing import StepWindow
from launcher.parallel.lockstep import lockstep
from launcher.train import build
from launcher.train.data import eval_batches
from launcher.train.shutdown import StopFlag, StopRequested
from launcher.train.state import CheckpointState, Progress

log = logging.getLogger(__name__)

# Where the loop is, for error messages from whoever catches an exception (a hung collective says
# only "timed out"; this says during what).
WHERE = {"phase": "setup", "step": 0}


class NonFiniteLoss(RuntimeError):
    """train.nonfinite=stop: the last good state is saved; the CLI exits with code 3."""

    def __init__(self, step: int, saved: Path | None, good_step: int | None = None) -> None:
        self.step = step
        good = step - 1 if good_step is None else good_step  # later with the on-device check
        where = f"the last good state (step {good}) is in {saved}" if saved else "no step had completed"
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
    except StopRequested as err:
        if session.is_main:
            record = {"step": err.step, "signal": signal.Signals(err.signum).name, "stopped_at": time.time()}
            (run_dir / STOPPED).write_text(json.dumps(record))
        raise
    finally:
        if trainer is not None:
            trainer.logger.close()  # also when failing: wandb marks the run finished, the bar closes
            if trainer.profiler is not None:
                trainer.profiler.close()  # a window cut short by a stop or failure is still written


class Trainer:
    """The loop over optimizer steps. Its parts come from launcher/train/build.py, in the order that
    file explains (it matters for seeding and for the collectives every rank must make alike)."""

    def __init__(self, job: Job, session: DistSession, run_dir: Path, stop: StopFlag) -> None:
        cfg = self.cfg = job.cfg
        self.session, self.stop = session, stop
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.recipe = job.recipe if job.recipe is not None else job.recipe_class(cfg.recipe)
        self.started = time.time()
        self.strategy = build.strategy(cfg, self.recipe, session)
        self.optimizer, self.scheduler, self.amp, self.guard = build.optimization(cfg, self.strategy, session)
        self.stream, self.eval_set = build.data(cfg, self.recipe, self.strategy, session)
        self.checkpointer = build.checkpointer(cfg, session, run_dir)
        self.progress = Progress()
        self.state = CheckpointState(
            self.strategy,
            self.optimizer,
            self.scheduler,
            self.amp,
            self.stream,
            self.progress,
            session,
            build.identity(job),
        )
        WHERE.update(phase="resume", step=0)
        self.resumed = self.checkpointer.restore(cfg.resume, self.state.read, self.state.apply)
        if self.resumed is not None:
            log.info("resumed from step %d", self.resumed)
        self.saved_step = self.resumed
        self.metrics, self.finished_marker, self.logger = build.outputs(
            cfg, session, run_dir, self.progress.step
        )
        self.global_batch, self.unit, self.unit_per_step, self.peak = build.throughput(
            cfg, self.recipe, self.strategy, session
        )
        self.flops_per_step: float | None = None
        self.first_step_s: float | None = None
        self.last_step = cfg.train.stop_at_step or cfg.train.steps
        self.timer, self.telemetry, self.profiler = build.observation(
            cfg, session, run_dir, self.strategy, self.progress.step, self.last_step
        )
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
        if self.session.any_rank(self.stop.signum is not None)[0]:  # signalled during setup: nothing to save
            raise StopRequested(self.stop.signum or signal.SIGTERM, self.progress.step, saved=False)
        self.window = StepWindow()  # after the peers finished setup
        first_step, first_started = self.progress.step + 1, time.perf_counter()
        for step in range(self.progress.step + 1, self.last_step + 1):
            WHERE.update(phase="train step", step=step)
            self.timer.begin(self._is_log_step(step))
            with phase("data"):
                micro_batches = [next(self.stream) for _ in range(self.cfg.train.grad_accum_steps)]
            self._count_flops(micro_batches[0])
            with phase("forward_backward"):
                loss = self.strategy.forward_backward(micro_batches, self.amp)
            with phase("optimizer"):
                self.amp.unscale_(self.optimizer)
                grad_norm = self.strategy.clip_grad_norm_(self.cfg.optim.grad_clip)
                lr = self.scheduler.get_last_lr()[0]
                # One tiny CPU all-reduce per step: every rank must stop, or skip, at the same step.
                stop, nonfinite = self.session.any_rank(
                    self.stop.signum is not None,
                    not self.guard.on_device and not self._finite(loss, grad_norm),
                )
                if nonfinite:
                    self._drop_update(step)  # raises NonFiniteLoss under train.nonfinite=stop
                elif self.guard.on_device:  # no host sync: a non-finite update is dropped on the device
                    self.guard.step(self.guard.flag(loss, grad_norm, step))
                elif self.amp.step(self.optimizer, grad_norm):
                    self.progress.skipped_steps += 1
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            self.progress.step = step
            if step == first_step:
                self._first_step_done(time.perf_counter() - first_started)
            self.window.step()
            self.logger.advance()
            self._maybe_log(step, loss, lr, grad_norm)
            self._maybe_evaluate(step)
            self._maybe_save(step, force=stop)
            if self.profiler is not None:
                with self.window.excluding():
                    self.profiler.step(step)
            after_step(step)
            if stop:
                raise StopRequested(self.stop.signum or 0, step)
        if self.session.is_main and self.metrics.path.exists():
            log.info("%s", run_summary(self.metrics.path, time.time() - self.started, self.first_step_s))
        if self.progress.step >= self.cfg.train.steps and self.session.is_main:
            # What a Slurm batch script checks to tell "done" from "stopped early: requeue".
            self.finished_marker.write_text(
                json.dumps({"step": self.progress.step, "finished_at": time.time()})
            )

    def _first_step_done(self, seconds: float) -> None:
        """The first step of this start: under torch.compile it includes the compilation. Said once.
        Now that the optimizer holds its state, a checkpoint's size is known: warn if none would fit."""
        self.first_step_s = seconds
        if self.cfg.train.compile_on:
            log.info("first step took %.1f s: torch.compile compiled the model and loss", seconds)
        with self.window.excluding():
            self.checkpointer.check_space(self.state.files())

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

    def _check_dropped(self, step: int) -> None:
        """Act on steps that the on-device check dropped since the last look (see nonfinite_guard)."""
        dropped, first = self.guard.drain()
        if not dropped:
            return
        if self.cfg.train.nonfinite == NonFinite.stop:
            # No non-finite update was ever applied, so the current state is the last good one.
            raise NonFiniteLoss(first, self._save(step), good_step=step)
        log.warning("steps %d..%d: %d non-finite steps dropped (train.nonfinite=skip)", first, step, dropped)
        self.progress.nonfinite_steps += dropped

    def _count_flops(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        if self.flops_per_step is None and self.peak:
            flops = flops_per_micro_batch(self.recipe.build_model, *batch, self.recipe.loss)
            self.flops_per_step = (flops or 0.0) * self.cfg.train.grad_accum_steps

    def _is_log_step(self, step: int) -> bool:
        return step % self.cfg.train.log_every == 0 or step == self.last_step

    def _maybe_log(self, step: int, loss: torch.Tensor, lr: float, grad_norm: torch.Tensor) -> None:
        if not self._is_log_step(step):
            return
        self._check_dropped(step)
        with phase("log_sync"):
            mean_loss = self.strategy.mean_loss(loss).item()  # the sync that makes the timing honest
        step_time = self.window.seconds_per_step()
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
            record.update(self.strategy.comm_stats.step(self.window.steps))
        record.update(memory_stats(self.session.device))
        record.update(self.timer.collect())
        record.update(self.telemetry.sample())
        record["timestamp"] = time.time()
        self._emit(record)
        self.window.restart()

    def _maybe_evaluate(self, step: int) -> None:
        if self.eval_set is None or (step % self.cfg.train.eval_every and step != self.last_step):
            return
        WHERE.update(phase="evaluation", step=step)
        with phase("eval"), self.window.excluding():
            results = evaluate(self)
        if not results:  # a stream that turned out empty: say so once, never write a bare record
            log.warning("evaluation saw no samples (empty eval stream); evaluation is off for this run")
            self.eval_set = None
            return
        self._emit({"step": step, **results})

    def _maybe_save(self, step: int, force: bool) -> None:
        every = self.cfg.checkpoint.every
        if force or (every and step % every == 0) or step == self.last_step:
            self._check_dropped(step)
            self._save(step, wait=force or step == self.last_step)

    def _save(self, step: int, wait: bool = True) -> Path:
        """`wait=False`: an asynchronous save (checkpoint.async_save) may commit at the next save."""
        if self.saved_step == step:
            return self.checkpointer.root / f"step_{step}"
        WHERE.update(phase="checkpoint save", step=step)
        with phase("checkpoint"), self.window.excluding():
            path = self.checkpointer.save(
                step, self.state.files(), self.state.meta(), self.state.sharded_state(), wait
            )
        self.saved_step = step
        pending = self.checkpointer.pending is not None
        log.info("%s %s", "writing in the background" if pending else "saved", path)
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
    batches = eval_batches(
        trainer.eval_set,
        cfg.train.micro_batch_size,
        strategy.dp_rank,
        strategy.dp_size,
        cfg.train.eval_batches,
        cfg.loader,
        session.device,
        split=getattr(recipe, "split_batch", None),
    )
    if strategy.eval_in_lockstep:  # forwards are collectives: ranks with fewer batches run spare ones

        def spare(batch):
            with trainer.amp.autocast():
                strategy.eval_forward(*batch)

        batches = lockstep(batches, session, spare)
    with torch.no_grad():
        for inputs, targets in batches:
            with trainer.amp.autocast():
                outputs = strategy.eval_forward(inputs, targets)
            if outputs is None:
                continue
            n = len(targets) if isinstance(targets, torch.Tensor) else len(next(iter(targets.values())))
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
    if packed[-1].item() == 0:
        return {}
    return {k: (packed[i] / packed[-1]).item() for i, k in enumerate(keys)}
