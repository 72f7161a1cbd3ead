"""The training loop: one screen, one call per strategy difference.

for each optimizer step:
    forward + backward over the micro-batches (the strategy: DDP, pipeline, ...)
    unscale, clip, step, schedule
    log, evaluate, checkpoint
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from launcher.checkpoint import Checkpointer, CheckpointError, load_file, read_meta
from launcher.cli import Job
from launcher.data import Position, TrainStream, eval_batches
from launcher.dist import DistSession
from launcher.errors import ConfigError
from launcher.loggers import build_logger
from launcher.metrics import MetricsFile, flops_per_micro_batch, memory_stats, peak_flops
from launcher.optim import build_optimizer, build_scheduler
from launcher.parallel import Strategy, build_strategy
from launcher.parallel.comm_hooks import hook_state_dict, load_hook_state
from launcher.precision import MixedPrecision

log = logging.getLogger(__name__)


@dataclass
class Progress:
    step: int = 0
    """Optimizer steps completed."""
    skipped_steps: int = 0
    """fp16 steps the GradScaler skipped for inf/NaN gradients (they still count as steps)."""


def train(job: Job, session: DistSession, run_dir: Path) -> None:
    cfg, train_cfg = job.cfg, job.cfg.train
    if train_cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    recipe = job.recipe_class(cfg.recipe)
    strategy = build_strategy(cfg, recipe, session)
    seed_everything(train_cfg.seed + session.rank)  # per-rank randomness (dropout) after the shared init
    optimizer = build_optimizer(strategy.module.named_parameters(), cfg.optim, session.device)
    scheduler = build_scheduler(optimizer, cfg.optim, train_cfg.steps)
    amp = MixedPrecision(cfg.precision, session.device)
    stream = TrainStream(
        recipe.train_dataset(),
        train_cfg.micro_batch_size,
        strategy.dp_rank,
        strategy.dp_size,
        train_cfg.seed,
        cfg.loader,
        session.device,
    )
    eval_set = recipe.eval_dataset() if train_cfg.eval_every else None

    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint.keep, session)
    if not session.all_agree(checkpointer.check_writable()):
        raise ConfigError(
            "run.dir",
            str(run_dir),
            "its checkpoints/ directory is not writable on every rank",
            "fix the permissions or choose another run.dir",
        )
    progress = Progress()
    ckpt_state = CheckpointState(strategy, optimizer, scheduler, amp, stream, progress, session)
    resumed = checkpointer.restore(cfg.resume, ckpt_state.read, ckpt_state.apply)
    if resumed is not None:
        log.info("resumed from step %d", resumed)

    metrics = MetricsFile(run_dir / "metrics.jsonl")
    if session.is_main:
        metrics.truncate_after(progress.step)
    logger = build_logger(
        cfg.logger,
        session.is_main,
        progress.step,
        train_cfg.steps,
        run_dir,
        OmegaConf.to_container(OmegaConf.structured(cfg)),
    )
    tokens_per_sample = getattr(recipe, "tokens_per_sample", None)
    global_batch = train_cfg.micro_batch_size * train_cfg.grad_accum_steps * strategy.dp_size
    unit_per_step, unit = (
        (global_batch * tokens_per_sample, "tokens_per_s")
        if tokens_per_sample
        else (global_batch, "samples_per_s")
    )
    peak = peak_flops(session.device, cfg.metrics.peak_tflops)
    flops_per_step = None
    log.info(
        "training %s: %d steps, global batch %d (%d per rank x %d accumulation x %d data-parallel ranks)",
        job.recipe_name,
        train_cfg.steps,
        global_batch,
        train_cfg.micro_batch_size,
        train_cfg.grad_accum_steps,
        strategy.dp_size,
    )

    last_step = train_cfg.stop_at_step or train_cfg.steps
    window_start, window_steps = time.perf_counter(), 0
    for step in range(progress.step + 1, last_step + 1):
        micro_batches = [next(stream) for _ in range(train_cfg.grad_accum_steps)]
        if flops_per_step is None and peak:
            flops = flops_per_micro_batch(recipe.build_model, *micro_batches[0], recipe.loss)
            flops_per_step = (flops or 0.0) * train_cfg.grad_accum_steps
        loss = strategy.forward_backward(micro_batches, recipe.loss, amp)
        amp.unscale_(optimizer)
        grad_norm = strategy.clip_grad_norm_(cfg.optim.grad_clip)
        lr = scheduler.get_last_lr()[0]
        if amp.step(optimizer, grad_norm):
            progress.skipped_steps += 1
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.step = step
        window_steps += 1
        logger.advance()

        if step % train_cfg.log_every == 0 or step == last_step:
            mean_loss = strategy.mean_loss(loss).item()  # the sync that makes the timing honest
            step_time = (time.perf_counter() - window_start) / window_steps
            record: dict[str, Any] = {
                "step": step,
                "loss": mean_loss,
                "lr": lr,
                "grad_norm": grad_norm.item(),
                unit: unit_per_step / step_time,
                "step_time_s": step_time,
                "global_batch_size": global_batch,
            }
            if amp.scaling:
                record.update(skipped_steps=progress.skipped_steps, loss_scale=amp.scaler.get_scale())
            if flops_per_step and peak:  # per device: the model's FLOPs are spread over its pipeline ranks
                record["mfu"] = flops_per_step / strategy.model_parallel_size / step_time / peak
            if strategy.comm_stats is not None:
                record.update(strategy.comm_stats.step(window_steps))
            record.update(memory_stats(session.device))
            if session.is_main:
                metrics.write(record)
            logger.log(record)
            window_start, window_steps = time.perf_counter(), 0

        if eval_set is not None and (step % train_cfg.eval_every == 0 or step == last_step):
            record = {"step": step, **evaluate(strategy, eval_set, recipe, amp, job, session)}
            if session.is_main:
                metrics.write(record)
            logger.log(record)

        every = cfg.checkpoint.every
        if (every and step % every == 0) or step == last_step:
            path = checkpointer.save(step, ckpt_state.files(), ckpt_state.meta())
            log.info("saved %s", path)
            window_start = time.perf_counter()  # keep checkpoint time out of step_time_s
    logger.close()
    if resumed is not None and resumed >= last_step:
        log.info("nothing to do: the run already reached step %d", resumed)


def evaluate(
    strategy: Strategy, dataset: Any, recipe: Any, amp: MixedPrecision, job: Job, session: DistSession
) -> dict[str, float]:
    """Mean eval loss (and the recipe's eval_metrics) over every rank's eval batches."""
    cfg = job.cfg
    extra_fn = getattr(recipe, "eval_metrics", None)
    sums: dict[str, torch.Tensor] = {}
    count = torch.zeros((), device=session.device)
    strategy.module.eval()
    with torch.no_grad():
        for inputs, targets in eval_batches(
            dataset,
            cfg.train.micro_batch_size,
            strategy.dp_rank,
            strategy.dp_size,
            cfg.train.eval_batches,
            cfg.loader,
            session.device,
            drop_last=strategy.fixed_batch_shape,
        ):
            with amp.autocast():
                outputs = strategy.eval_forward(inputs, targets)
            if outputs is None:
                continue
            n = len(targets)
            values = {"eval_loss": recipe.loss(outputs, targets)}
            if extra_fn:
                values.update(extra_fn(outputs, targets))
            for key, value in values.items():
                sums[key] = sums.get(key, torch.zeros((), device=session.device)) + value.float() * n
            count += n
    strategy.module.train()
    # Ranks without outputs (pipeline stages before the last) contribute zeros, but must know the keys.
    keys = sorted(set().union(*session.all_gather_object(sorted(sums))))
    packed = torch.stack([sums.get(k, torch.zeros((), device=session.device)) for k in keys] + [count])
    session.all_reduce(packed, "sum")
    return {k: (packed[i] / packed[-1]).item() for i, k in enumerate(keys)}


class CheckpointState:
    """What a checkpoint holds for this rank, and how to put it back."""

    def __init__(
        self,
        strategy: Strategy,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        amp: MixedPrecision,
        stream: TrainStream,
        progress: Progress,
        session: DistSession,
    ) -> None:
        self.strategy, self.optimizer, self.scheduler, self.amp = strategy, optimizer, scheduler, amp
        self.stream, self.progress, self.session = stream, progress, session
        self.model_file, self.optim_file = f"model{strategy.shard}.pt", f"optimizer{strategy.shard}.pt"
        self.rank_file = f"rank_{session.rank}.pt"

    def meta(self) -> dict[str, Any]:
        return {
            "world_size": self.session.world_size,
            "parallel": self.strategy.layout_id,
            "skipped_steps": self.progress.skipped_steps,
        }

    def files(self) -> dict[str, Any]:
        files: dict[str, Any] = {
            self.rank_file: {
                "rng": rng_state(self.session.device),
                "data": asdict(self.stream.position),
                "comm_hook": hook_state_dict(self.strategy.comm_hook),
            }
        }
        if self.strategy.writes_shared_state:
            files[self.model_file] = self.strategy.module.state_dict()
            files[self.optim_file] = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.amp.state_dict(),
            }
        return files

    def read(self, path: Path) -> dict[str, Any]:
        meta = read_meta(path)
        if meta.get("world_size") != self.session.world_size:
            raise CheckpointError(
                f"{path} was saved by {meta.get('world_size')} processes, this run has "
                f"{self.session.world_size}; resume with the same number of processes"
            )
        if meta.get("parallel", self.strategy.layout_id) != self.strategy.layout_id:
            raise CheckpointError(
                f"{path} was saved under '{meta['parallel']}', this run is '{self.strategy.layout_id}'; "
                "resume with the same parallel settings"
            )
        return {
            "meta": meta,
            **{
                name: load_file(path, name, meta)
                for name in (self.model_file, self.optim_file, self.rank_file)
            },
        }

    def apply(self, state: dict[str, Any]) -> None:
        self.strategy.module.load_state_dict(state[self.model_file])
        optim = state[self.optim_file]
        self.optimizer.load_state_dict(optim["optimizer"])
        self.scheduler.load_state_dict(optim["scheduler"])
        self.amp.load_state_dict(optim["scaler"])
        rank_state = state[self.rank_file]
        set_rng_state(rank_state["rng"], self.session.device)
        self.stream.restore(Position(**rank_state["data"]))
        load_hook_state(self.strategy.comm_hook, rank_state.get("comm_hook", {}), self.session.device)
        self.progress.step = state["meta"]["step"]
        self.progress.skipped_steps = state["meta"].get("skipped_steps", 0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every RNG the loop may draw from, as tensors and plain values (loadable with weights_only)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def write_config(cfg: Any, run_dir: Path) -> Path | None:
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
