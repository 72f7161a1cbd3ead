"""What a checkpoint holds for one rank, and how to put it back.

Shared per shard (written by one rank per shard): the model (or this pipeline stage's part), the
optimizer, LR scheduler and GradScaler. Per rank: every RNG, the data position, the comm hook state.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from launcher.checkpoint import CheckpointError, load_file, read_meta
from launcher.data import Position, TrainStream
from launcher.dist import DistSession
from launcher.parallel import Strategy
from launcher.parallel.comm_hooks import hook_state_dict, load_hook_state
from launcher.precision import MixedPrecision


@dataclass
class Progress:
    step: int = 0
    """Optimizer steps completed."""
    skipped_steps: int = 0
    """fp16 steps the GradScaler skipped for inf/NaN gradients (they still count as steps)."""
    nonfinite_steps: int = 0
    """Steps dropped for a NaN/inf loss or gradient under train.nonfinite=skip."""


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
        self.progress.nonfinite_steps = state["meta"].get("nonfinite_steps", 0)


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
