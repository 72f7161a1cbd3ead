"""What a checkpoint holds for one rank, and how to put it back.

Shared per shard (written by one rank per shard): the model (or this pipeline stage's part), the
optimizer, LR scheduler and GradScaler. Per rank: every RNG, the data position, the comm hook state.
Sharded strategies (FSDP) write model and optimizer with DCP instead, every rank its shards
(launcher/train/sharded_checkpoint.py), and rank 0 the scheduler and GradScaler in `train_state.pt`.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from launcher.errors import ConfigError
from launcher.launch.dist import DistSession
from launcher.parallel.comm_hooks import hook_state_dict, load_hook_state
from launcher.parallel.strategy import Strategy
from launcher.train.checkpoint import load_file, read_meta
from launcher.train.data import Position, TrainStream
from launcher.train.precision import MixedPrecision
from launcher.train.sharded_checkpoint import (
    FORMAT,
    load_sharded,
    saved_shapes,
    sharded_state,
    verify_sharded,
)

log = logging.getLogger(__name__)
TRAIN_STATE = "train_state.pt"
"""Sharded checkpoints: the LR scheduler and GradScaler (the same on every rank), written by rank 0."""


@dataclass
class Progress:
    step: int = 0
    """Optimizer steps completed."""
    skipped_steps: int = 0
    """fp16 steps the GradScaler skipped for inf/NaN gradients (they still count as steps)."""
    nonfinite_steps: int = 0
    """Steps dropped for a NaN/inf loss or gradient under train.nonfinite=skip."""


class CheckpointState:
    """What a checkpoint holds for this rank, and how to put it back.

    A checkpoint resumes on another number of data-parallel ranks (replicas hold the same model and
    optimizer state, and the data position is global); the per-rank RNGs are then reseeded and a
    PowerSGD state restarted, with a warning. It never resumes into another parallel layout, recipe or
    model shape: that is refused (ConfigError) with what differs, and the checkpoint is left alone.
    """

    def __init__(
        self,
        strategy: Strategy,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        amp: MixedPrecision,
        stream: TrainStream,
        progress: Progress,
        session: DistSession,
        identity: dict[str, Any],
    ) -> None:
        """`identity`: what must match to resume: {"recipe": name, "recipe_config": {...}}; also
        "micro_batch_size" and "seed" (recorded, for the resize message and reseeding)."""
        self.strategy, self.optimizer, self.scheduler, self.amp = strategy, optimizer, scheduler, amp
        self.stream, self.progress, self.session, self.identity = stream, progress, session, identity
        self.model_file, self.optim_file = f"model{strategy.shard}.pt", f"optimizer{strategy.shard}.pt"
        self.rank_file = f"rank_{session.rank}.pt"
        self.sharded = strategy.sharded_checkpoint
        self.format = FORMAT if self.sharded else "torch"

    def meta(self) -> dict[str, Any]:
        return {
            "world_size": self.session.world_size,
            "dp_size": self.strategy.dp_size,
            "model_layout": self.strategy.layout_id,
            "format": self.format,
            **self.identity,
            "skipped_steps": self.progress.skipped_steps,
            "nonfinite_steps": self.progress.nonfinite_steps,
        }

    def files(self) -> dict[str, Any]:
        files: dict[str, Any] = {
            self.rank_file: {
                "rng": rng_state(self.session.device),
                "data": asdict(self.stream.position),
                "comm_hook": hook_state_dict(self.strategy.comm_hook),
            }
        }
        if self.sharded:  # model and optimizer: sharded_state(), every rank through DCP
            if self.session.is_main:
                files[TRAIN_STATE] = {
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.amp.state_dict(),
                }
        elif self.strategy.writes_shared_state:
            files[self.model_file] = self.strategy.module.state_dict()
            files[self.optim_file] = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.amp.state_dict(),
            }
        return files

    def sharded_state(self) -> dict[str, Any] | None:
        """Model and optimizer shards for DCP (a collective to build), or None for unsharded strategies."""
        return sharded_state(self.strategy.module, self.optimizer) if self.sharded else None

    def read(self, path: Path) -> dict[str, Any]:
        """Load and check this rank's files. Raises CheckpointError (unusable) or ConfigError (intact,
        but saved under another layout, recipe or model)."""
        meta = read_meta(path)
        self._check_identity(path, meta)
        resized = meta.get("world_size") != self.session.world_size
        rank_file = self.rank_file if not resized else "rank_0.pt"  # the data position is global
        state = {"meta": meta, "resized": resized, "path": path}
        if self.sharded:
            verify_sharded(path, meta, self.session)  # this rank's share of the DCP files
            state[TRAIN_STATE] = load_file(path, TRAIN_STATE, meta)
            state["rank"] = load_file(path, rank_file, meta)
            self._check_shapes(path, meta, saved_shapes(path))
            return state
        for name in (self.model_file, self.optim_file, rank_file):
            state[name if name != rank_file else "rank"] = load_file(path, name, meta)
        self._check_shapes(path, meta, {k: tuple(v.shape) for k, v in state[self.model_file].items()})
        return state

    def _check_identity(self, path: Path, meta: dict[str, Any]) -> None:
        saved_layout = meta.get("model_layout")
        if saved_layout != self.strategy.layout_id:
            raise ConfigError(
                "parallel",
                self.strategy.layout_id,
                f"checkpoint {path} was saved with `{saved_layout}`; a checkpoint resumes only under the "
                "parallel layout it was saved with (the number of data-parallel ranks may change)",
                f"resume with `{saved_layout}`, or start a new run with resume=never or another run.dir",
            )
        saved_format = meta.get("format", "torch")
        if saved_format != self.format:
            kinds = {FORMAT: "sharded (DCP)", "torch": "unsharded (torch.save)"}
            raise ConfigError(
                "parallel",
                self.strategy.layout_id,
                f"checkpoint {path} holds {kinds.get(saved_format, saved_format)} model and optimizer "
                f"files; this run's layout writes and reads {kinds[self.format]} ones",
                "resume with the parallel settings it was saved with (parallel.dp_shard for pipelines), "
                "or start a new run with resume=never or another run.dir",
            )
        if meta.get("recipe") != self.identity["recipe"]:
            raise ConfigError(
                "recipe",
                self.identity["recipe"],
                f"checkpoint {path} was saved by recipe {meta.get('recipe')}",
                f"resume with recipe={meta.get('recipe')}, or start anew (resume=never or another run.dir)",
            )

    def _check_shapes(self, path: Path, meta: dict[str, Any], saved: dict[str, tuple[int, ...]]) -> None:
        current = {k: tuple(v.shape) for k, v in self.strategy.module.state_dict().items()}
        problems = [f"{k} is missing" for k in current if k not in saved]
        problems += [f"{k} is not in this model" for k in saved if k not in current]
        problems += [f"{k}: saved {saved[k]}, now {v}" for k, v in current.items() if saved.get(k, v) != v]
        if problems:
            changed = config_diff(meta.get("recipe_config") or {}, self.identity["recipe_config"], "recipe")
            raise ConfigError(
                "recipe",
                self.identity["recipe"],
                f"checkpoint {path} holds a different model ({'; '.join(problems[:3])}"
                f"{'; ...' if len(problems) > 3 else ''}); changed since it was saved: "
                f"{', '.join(changed) or 'nothing in the recipe config'}",
                "resume with the saved values, or start a new run with resume=never or another run.dir",
            )

    def apply(self, state: dict[str, Any]) -> None:
        if self.sharded:  # collective; DCP reshards to this run's world size and layout
            load_sharded(state["path"], self.strategy.module, self.optimizer)
            optim = state[TRAIN_STATE]
        else:
            self.strategy.module.load_state_dict(state[self.model_file])
            optim = state[self.optim_file]
            self.optimizer.load_state_dict(optim["optimizer"])
        self.scheduler.load_state_dict(optim["scheduler"])
        self.amp.load_state_dict(optim["scaler"])
        rank_state, meta = state["rank"], state["meta"]
        self.stream.restore(Position(**rank_state["data"]))
        if state["resized"]:
            seed_everything(self.identity["seed"] + 7919 * meta["step"] + self.session.rank)
            if self.session.is_main:
                log.warning(
                    "resuming on %d data-parallel ranks a checkpoint saved on %s: model, optimizer and data "
                    "position carry over exactly; per-rank random streams (dropout) are reseeded%s",
                    self.strategy.dp_size,
                    meta.get("dp_size"),
                    "; PowerSGD restarts its low-rank state (error feedback and warm start)"
                    if hook_state_dict(self.strategy.comm_hook)
                    else "",
                )
        else:
            set_rng_state(rank_state["rng"], self.session.device)
            load_hook_state(self.strategy.comm_hook, rank_state.get("comm_hook", {}), self.session.device)
        self.progress.step = meta["step"]
        self.progress.skipped_steps = meta.get("skipped_steps", 0)
        self.progress.nonfinite_steps = meta.get("nonfinite_steps", 0)


def config_diff(saved: Any, now: Any, prefix: str) -> list[str]:
    """'key: saved -> now' for every leaf that differs."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [
            line
            for key in sorted(set(saved) | set(now))
            for line in config_diff(saved.get(key), now.get(key), f"{prefix}.{key}")
        ]
    return [] if saved == now else [f"{prefix}: {saved} -> {now}"]


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
