"""Pipeline parallelism (torch.distributed.pipelining), composable with data parallelism.

Ranks form a (pp, dp) mesh. Each rank builds the whole model with the shared seed (so the init equals
a one-process run), keeps the blocks of its stage(s) and drops the rest. One optimizer step runs the
schedule once per gradient-accumulation micro-step; then gradients are averaged over the stage's
data-parallel group by GradReducer (not DDP: see grad_reduce.py), and clipped by the global norm of
all stages.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

from launcher.config.schema import Config, FSDPDtype, PipelineConfig, Precision
from launcher.errors import ConfigError
from launcher.launch.dist import DistSession
from launcher.observe.profile import phase
from launcher.parallel.comm_hooks import CommStats, build_comm_hook
from launcher.parallel.dims import ParallelDims
from launcher.parallel.eval_chain import EvalChain
from launcher.parallel.fsdp import (
    FSDPCommStats,
    ShardDims,
    check_no_comm_hook,
    full_tensor,
    mp_policy,
    unit_numels,
)
from launcher.parallel.grad_reduce import GradReducer
from launcher.parallel.split import ModelPart, StageModule, plan_stages, stage_ids_for_rank
from launcher.parallel.strategy import Batch, LossFn
from launcher.recipe import block_layout
from launcher.train.activation_checkpointing import checkpoint_blocks
from launcher.train.fp8 import convert_to_fp8
from launcher.train.precision import MixedPrecision

log = logging.getLogger(__name__)

# Our names -> torch's schedule class names (get_schedule_class is case-insensitive).
SCHEDULES = {
    "gpipe": "GPipe",
    "1f1b": "1F1B",
    "interleaved_1f1b": "Interleaved1F1B",
    "looped_bfs": "LoopedBFS",
    "interleaved_zero_bubble": "InterleavedZeroBubble",
    "zbv_zero_bubble": "ZBVZeroBubble",
}
ZERO_BUBBLE = {"interleaved_zero_bubble", "zbv_zero_bubble"}


def schedule_class(name: str) -> type:
    return get_schedule_class(SCHEDULES[name])


def is_multi_stage(name: str) -> bool:
    return not issubclass(schedule_class(name), PipelineScheduleSingle)


def stages_per_rank(cfg: PipelineConfig) -> int:
    if cfg.stages_per_rank is not None:
        return cfg.stages_per_rank
    return 2 if is_multi_stage(cfg.schedule.value) else 1


def check_pipeline(cfg: Config, recipe_class: type, world_size: int) -> None:
    """Pipeline-specific config checks, before any process group exists. Raises ConfigError."""
    p, name = cfg.parallel, cfg.parallel.schedule.value
    dims = ParallelDims.resolve(p.pp, p.dp, world_size)
    per_rank = stages_per_rank(p)
    num_stages = dims.pp * per_rank
    if p.dp_shard < 1 or dims.dp % p.dp_shard:
        divisors = [d for d in range(1, dims.dp + 1) if dims.dp % d == 0]
        raise ConfigError(
            "parallel.dp_shard",
            p.dp_shard,
            f"does not divide parallel.dp={dims.dp} (each stage's data-parallel ranks)",
            f"use one of {divisors}",
        )
    if p.dp_shard > 1:
        check_no_comm_hook(cfg, f"parallel.dp_shard={p.dp_shard} (stages sharded with FSDP)")
    if is_multi_stage(name) and per_rank < 2:
        raise ConfigError(
            "parallel.stages_per_rank",
            per_rank,
            f"schedule {name} runs several stages per rank",
            "use parallel.stages_per_rank=2 (or leave it unset)",
        )
    if not is_multi_stage(name) and per_rank != 1:
        raise ConfigError(
            "parallel.stages_per_rank",
            per_rank,
            f"schedule {name} runs one stage per rank",
            "use parallel.schedule=interleaved_1f1b for several stages per rank",
        )
    if name == "zbv_zero_bubble" and per_rank != 2:
        raise ConfigError(
            "parallel.stages_per_rank",
            per_rank,
            "zbv_zero_bubble needs exactly 2 stages per rank",
            "use parallel.stages_per_rank=2",
        )
    nmb = p.num_microbatches
    if nmb < 1:
        raise ConfigError("parallel.num_microbatches", nmb, "must be >= 1")
    if isinstance(cfg.train.micro_batch_size, int) and cfg.train.micro_batch_size % nmb:
        divisors = [
            d for d in range(1, cfg.train.micro_batch_size + 1) if cfg.train.micro_batch_size % d == 0
        ]
        raise ConfigError(
            "parallel.num_microbatches",
            nmb,
            f"does not divide train.micro_batch_size={cfg.train.micro_batch_size}, the per-rank "
            "batch each pipeline step splits into microbatches",
            f"use one of {divisors}, or change train.micro_batch_size",
        )
    if name in ("1f1b", "zbv_zero_bubble") and nmb < num_stages:
        raise ConfigError(
            "parallel.num_microbatches",
            nmb,
            f"{name} needs at least as many microbatches as stages ({num_stages})",
            f"use parallel.num_microbatches>={num_stages}",
        )
    rounds = max(1, nmb // dims.pp)
    if name in ("interleaved_1f1b", "interleaved_zero_bubble") and nmb % rounds:
        raise ConfigError(
            "parallel.num_microbatches",
            nmb,
            f"{name} needs a multiple of parallel.pp={dims.pp} (or fewer microbatches than pp)",
            f"use a multiple of {dims.pp} that divides train.micro_batch_size",
        )
    if name in ZERO_BUBBLE and cfg.train.compile_on:
        raise ConfigError(
            "train.compile",
            "true",
            f"zero-bubble schedules ({name}) do not support torch.compile",
            "use train.compile=false, or parallel.schedule=1f1b / interleaved_1f1b",
        )
    if block_layout(recipe_class) is None:
        raise ConfigError(
            "parallel",
            "pipeline",
            f"recipe {recipe_class.__name__} declares no blocks to split",
            "give the recipe a `layout = BlockLayout(pre=..., blocks=..., post=...)`",
        )
    with torch.device("meta"):  # counts blocks and checks split points without allocating anything
        model = recipe_class(cfg.recipe).build_model()
    plan_stages(model, block_layout(recipe_class), num_stages, p.split_points)


class PipelineStrategy:
    def __init__(self, cfg: Config, recipe: Any, session: DistSession) -> None:
        p = cfg.parallel
        self.session = session
        dims = ParallelDims.resolve(p.pp, p.dp, session.world_size)
        sharded = p.dp_shard > 1
        if sharded:  # torchtitan's PP x FSDP: each stage's dp ranks as (replicate, shard) mesh axes
            shard_dims = ShardDims(dims.dp // p.dp_shard, p.dp_shard)
            mesh = init_device_mesh(
                session.device.type,
                (dims.pp, shard_dims.replicate, shard_dims.shard),
                mesh_dim_names=("pp", "dp_replicate", "dp_shard"),
            )
            fsdp_mesh = mesh["dp_replicate", "dp_shard"] if shard_dims.replicate > 1 else mesh["dp_shard"]
            self.pp_group, self.dp_group = mesh["pp"].get_group(), None
            dp_rank = mesh["dp_replicate"].get_local_rank() * p.dp_shard + mesh["dp_shard"].get_local_rank()
        else:
            mesh = dims.build_mesh(session.device.type)
            self.pp_group, self.dp_group = mesh["pp"].get_group(), mesh["dp"].get_group()
            dp_rank = mesh["dp"].get_local_rank()
        self.pp_rank, self.dp_rank, self.dp_size = mesh["pp"].get_local_rank(), dp_rank, dims.dp
        self.model_parallel_size = dims.pp
        # Sharded stages: DCP checkpoints, and eval forwards that all-gather (so ranks run in lockstep).
        self.sharded_checkpoint = self.eval_in_lockstep = sharded
        self.times_exposed_comm = not sharded
        self.param_device = session.device
        self.shard, self.writes_shared_state = f"_pp{self.pp_rank}", self.dp_rank == 0
        # What the checkpoint shards depend on (not dp: replicas hold the same state), as overrides.
        self.layout_id = (
            f"parallel=pipeline parallel.pp={dims.pp} parallel.schedule={p.schedule.value} "
            f"parallel.stages_per_rank={stages_per_rank(p)}"
        )
        if p.split_points:
            self.layout_id += f" parallel.split_points=[{','.join(p.split_points)}]"

        name = p.schedule.value
        per_rank = stages_per_rank(p)
        num_stages = dims.pp * per_rank
        layout = block_layout(recipe)
        torch.manual_seed(cfg.train.seed)  # the whole model, initialised exactly as in a 1-process run
        model = convert_to_fp8(recipe.build_model(), cfg.precision, head=layout.post if layout else None)
        plan = plan_stages(model, layout, num_stages, p.split_points)
        stage_ids = stage_ids_for_rank(self.pp_rank, dims.pp, per_rank, v_shape=name == "zbv_zero_bubble")
        specs = [plan[s] for s in stage_ids]
        self.module = ModelPart(model, layout, specs).to(session.device)
        del model  # the other stages' parameters go with it
        blocks = list(self.module.get_submodule(layout.blocks).values())
        if cfg.train.activation_checkpointing:
            checkpoint_blocks(blocks)
        if cfg.train.compile_on:
            for block in blocks:  # per block: graphs never span the pipeline's send/recv
                block.compile()
        self.has_first, self.has_last = plan[0].index in stage_ids, plan[-1].index in stage_ids
        stage_modules = {spec.index: StageModule(self.module, layout, spec) for spec in specs}
        if sharded:
            numels = unit_numels(self.module, None)  # one unit's worth of bytes: the stages' total
            policy = mp_policy(cfg.precision, FSDPDtype.auto, FSDPDtype.auto)
            self._shard_stages(stage_modules, fsdp_mesh, policy)
        stages = [
            PipelineStage(
                stage_modules[spec.index], spec.index, num_stages, session.device, group=self.pp_group
            )
            for spec in specs
        ]
        owners = [0] * num_stages
        for r in range(dims.pp):
            for s in stage_ids_for_rank(r, dims.pp, per_rank, v_shape=name == "zbv_zero_bubble"):
                owners[s] = r
        self.eval_chain = EvalChain(stage_modules, owners, self.pp_group, session.device)
        # scale_grads=False: the loss function divides by microbatches x accumulation steps itself, so
        # gradients accumulated over several schedule steps stay a mean (scale_grads would rescale the sum).
        self.schedule = schedule_class(name)(
            stages if is_multi_stage(name) else stages[0],
            n_microbatches=p.num_microbatches,
            loss_fn=self._loss,
            scale_grads=False,
        )
        self.num_microbatches = p.num_microbatches
        params = list(self.module.parameters())
        self.reducer = (
            GradReducer(params, self.dp_group, p.bucket_cap_mb) if dims.dp > 1 and not sharded else None
        )
        fp16 = cfg.precision.dtype == Precision.fp16
        self.comm_hook = build_comm_hook(cfg.comm_hook, self.dp_group, guard_overflow=fp16)
        if self.comm_hook is not None and self.reducer is None:
            log.warning("comm_hook has no effect with parallel.dp=1: stages have no data-parallel peers")
            self.comm_hook = None
        if self.comm_hook is not None:
            # Our buckets are fixed from the first step (DDP's are not: DDPStrategy._settle_buckets).
            self.reducer.register_comm_hook(self.comm_hook.state, self.comm_hook.hook)
        self.comm_stats = CommStats(self.comm_hook, params) if self.reducer is not None else None
        if sharded:  # unsharded through each schedule step: one all-gather and one reduce-scatter per step
            self.comm_stats = FSDPCommStats(
                numels, set(), shard_dims, policy, cfg.train.grad_accum_steps, True
            )
        self._step_losses: list[torch.Tensor] = []
        # The last stage's loss compiled on its own: the fp32 upcast and log-softmax fuse into the kernels
        # that read the logits (see with_loss.py); stages end at send/recv, so it cannot join the head.
        self._recipe_loss: LossFn = torch.compile(recipe.loss) if cfg.train.compile_on else recipe.loss
        self._amp: MixedPrecision | None = None
        self._divisor = 1

    @staticmethod
    def _shard_stages(stage_modules: dict[int, StageModule], mesh: Any, policy: Any) -> None:
        """fully_shard each held pre, block and post, then each stage as its root. Parameters stay
        unsharded through a schedule step (reshard_after_forward=False, as torchtitan under PP): each
        micro-batch would otherwise all-gather them again. torch's PipelineStage sees an FSDP module and
        reduce-scatters once per step, after the last micro-batch's backward."""
        for stage in stage_modules.values():
            for part in (stage.pre, *stage.blocks, stage.post):
                if part is not None:
                    fully_shard(part, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
            fully_shard(stage, mesh=mesh, mp_policy=policy, reshard_after_forward=False)

    def _loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = self._recipe_loss(outputs, targets)
        self._step_losses.append(loss.detach())
        scaled = loss / self._divisor
        return self._amp.scale(scaled) if self._amp is not None else scaled

    def forward_backward(self, micro_batches: list[Batch], amp: MixedPrecision) -> torch.Tensor:
        self._amp = amp
        self._divisor = self.num_microbatches * len(micro_batches)
        losses: list[torch.Tensor] = []
        for inputs, targets in micro_batches:
            self._step_losses = []
            # Autocast around the whole schedule step, as torchtitan does: the schedule runs the forwards.
            with amp.autocast():
                self.schedule.step(
                    *((inputs,) if self.has_first else ()), target=targets if self.has_last else None
                )
            # The first step's shape inference also calls the loss, on placeholder data: keep the real ones.
            losses += self._step_losses[-self.num_microbatches :]
        if self.reducer is not None:
            with phase("grad_reduce"):
                self.reducer.reduce()
        if not losses:
            return torch.zeros((), device=self.session.device)
        return torch.stack(losses).mean()

    def eval_forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        # Not schedule.eval: it crashes under ZBV and needs equal microbatches (see eval_chain.py).
        return self.eval_chain(inputs)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        params = [p for p in self.module.parameters() if p.grad is not None]
        # Norm over the whole model: sum the squares over the pipeline's stages (data-parallel replicas
        # hold identical, already-averaged gradients; sharded stages' DTensor norms cover their shards).
        squares = full_tensor(torch.nn.utils.get_total_norm([p.grad for p in params])).float() ** 2
        dist.all_reduce(squares, group=self.pp_group)
        total = squares.sqrt()
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    def mean_loss(self, loss: torch.Tensor) -> torch.Tensor:
        # Only last-stage ranks hold a loss; the others add zero. Collective over all ranks.
        total = loss.detach().clone() if self.has_last else torch.zeros((), device=self.session.device)
        return self.session.all_reduce(total, "sum") / self.dp_size
