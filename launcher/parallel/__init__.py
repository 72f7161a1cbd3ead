"""Parallelism strategies, one per `parallel=` option, chosen by the type of `cfg.parallel`.

A strategy owns the model on this rank: it builds it from the recipe, wraps it, and runs one
optimizer step's forward and backward. The training loop calls the same methods whatever the
strategy is (strategy.py: the interface); the recipe never sees a process group.

ddp.py, fsdp.py, pipeline.py  the strategies (this module's registry imports the one chosen)
dims.py, split.py             the pp x dp mesh; a model split into pipeline stages
grad_reduce.py                bucketed data-parallel all-reduce that runs DDP comm hooks (pipelines)
comm_hooks.py, powersgd.py    gradient compression (`comm_hook=`); bucket_graphs.py: CUDA graphs of it
with_loss.py                  model + loss as one module (one graph under torch.compile)
lockstep.py, eval_chain.py    evaluation when forwards are collectives; pipeline evaluation
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from launcher.config.schema import Config, DDPConfig, FSDPConfig, PipelineConfig
from launcher.launch.dist import DistSession
from launcher.parallel.strategy import Strategy


def build_strategy(cfg: Config, recipe: Any, session: DistSession) -> Strategy:
    from launcher.parallel.ddp import DDPStrategy
    from launcher.parallel.fsdp import FSDPStrategy
    from launcher.parallel.pipeline import PipelineStrategy

    strategies: dict[type, Callable[..., Strategy]] = {
        DDPConfig: DDPStrategy,
        FSDPConfig: FSDPStrategy,
        PipelineConfig: PipelineStrategy,
    }
    return strategies[type(cfg.parallel)](cfg, recipe, session)


def check_parallel(cfg: Config, recipe_class: type, world_size: int) -> None:
    """The chosen strategy's own config checks (before any process group). Raises ConfigError."""
    if isinstance(cfg.parallel, PipelineConfig):
        from launcher.parallel.pipeline import check_pipeline

        check_pipeline(cfg, recipe_class, world_size)
    if isinstance(cfg.parallel, FSDPConfig):
        from launcher.parallel.fsdp import check_fsdp

        check_fsdp(cfg, recipe_class, world_size)


def needs_process_group(cfg: Config) -> bool:
    """FSDP runs over a device mesh even on one rank (a one-rank group: its collectives are copies)."""
    return isinstance(cfg.parallel, FSDPConfig)
