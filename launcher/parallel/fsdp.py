"""Fully sharded data parallelism: PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`).

Every rank builds the whole model with the shared seed (so the initialisation equals a one-process
run), then `fully_shard` is applied bottom-up, as torchtitan does: to `pre`, to the recipe's blocks
(`parallel.blocks_per_unit` consecutive ones together) and to `post` (each its own all-gather /
reduce-scatter unit), then to the root, which takes whatever parameters are left. Each rank keeps
1/dp_shard of every parameter (a DTensor), of its gradient and of its optimizer state. Before a unit
computes, its parameters are all-gathered (in `param_dtype`); after its backward, its gradients are
reduce-scattered (in `reduce_dtype`) and, with hybrid sharding, all-reduced across the replica groups.

Activation checkpointing and torch.compile apply per block before sharding (torchtitan's order), the
compile to each block's `forward` alone: FSDP's hooks run in the module's call, outside the graph, so
Dynamo never breaks a graph at them. `post` and the recipe's loss are compiled together
(with_loss.BodyThenCompiledTail), so the logits' fp32 upcast and log-softmax fuse into the kernels
that read them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from launcher.config.schema import (
    AdamWConfig,
    Config,
    FSDPConfig,
    FSDPDtype,
    NoCommHookConfig,
    PrecisionConfig,
    SGDConfig,
)
from launcher.errors import ConfigError
from launcher.launch.dist import DistSession
from launcher.parallel.strategy import Batch
from launcher.parallel.with_loss import BodyThenCompiledTail, WithLoss
from launcher.recipe import BlockLayout, block_layout, resolve_blocks
from launcher.train.activation_checkpointing import checkpoint_blocks
from launcher.train.fp8 import convert_to_fp8
from launcher.train.optim import local_shard
from launcher.train.precision import DTYPES, MixedPrecision

log = logging.getLogger(__name__)

GIB = 2**30
HOST_MEMORY_HEADROOM = 0.9
"""Offload is refused when the sharded states would need more than this fraction of free host memory."""
_NAMED = {FSDPDtype.fp32: torch.float32, FSDPDtype.bf16: torch.bfloat16, FSDPDtype.fp16: torch.float16}


@dataclass(frozen=True)
class ShardDims:
    """dp_replicate x dp_shard = the ranks that share the data (the world, or a pipeline stage's dp)."""

    replicate: int
    shard: int

    @classmethod
    def resolve(cls, replicate: int, shard: int, ranks: int, prefix: str = "parallel") -> ShardDims:
        """Degrees with shard=-1 filled in. Raises ConfigError naming the fields when they don't fit."""
        divisors = [d for d in range(1, ranks + 1) if ranks % d == 0]
        if replicate < 1 or ranks % replicate:
            raise ConfigError(
                f"{prefix}.dp_replicate",
                replicate,
                f"does not divide the {ranks} data-parallel ranks",
                f"use one of {divisors}",
            )
        if shard == -1:
            shard = ranks // replicate
        if shard < 1 or shard * replicate != ranks:
            raise ConfigError(
                f"{prefix}.dp_shard",
                shard,
                f"dp_replicate x dp_shard = {replicate} x {shard} != {ranks} data-parallel ranks",
                f"set {prefix}.dp_shard={ranks // replicate} or -1 (automatic), "
                f"with dp_replicate one of {divisors}",
            )
        return cls(replicate, shard)

    def mesh_shape(self) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """Hybrid sharding is a 2-D mesh (replicate outer, shard inner: a group's ranks adjacent)."""
        if self.replicate > 1:
            return (self.replicate, self.shard), ("dp_replicate", "dp_shard")
        return (self.shard,), ("dp_shard",)


def reshards_after_forward(requested: bool, dims: ShardDims) -> bool:
    """Whether units free their gathered parameters after forward (`parallel.reshard_after_forward`).

    Not on a one-rank shard group (dp_shard=1: one GPU, or hybrid replicas of whole copies): each rank
    holds every parameter whole, so resharding frees only the param_dtype copies and costs every unit
    a second gather in backward, host time the GPU waits through. One H100, compiled GPT-2-small on a
    one-rank mesh (bench/RESULTS.md): 269,822 tokens/s with it, 348,845 without.
    """
    return requested and dims.shard > 1


def mp_policy(precision: PrecisionConfig, param: FSDPDtype, reduce: FSDPDtype) -> MixedPrecisionPolicy:
    """Parameter (compute) and reduction dtypes: auto follows `precision=`; reductions default to fp32."""
    param_dtype = DTYPES[precision.dtype] if param == FSDPDtype.auto else _NAMED[param]
    reduce_dtype = torch.float32 if reduce == FSDPDtype.auto else _NAMED[reduce]
    if param_dtype in (None, torch.float32) and reduce_dtype == torch.float32:
        return MixedPrecisionPolicy()  # everything fp32: no casts at all
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)


@dataclass(frozen=True)
class Unit:
    """One all-gather / reduce-scatter unit: a module, or consecutive blocks sharded together."""

    name: str
    modules: tuple[nn.Module, ...]
    reshards: bool  # frees its gathered parameters after forward
    numel: int  # parameters it owns (before sharding): the root owns only what no other unit does


UNIT_PARAMS = 25_000_000
"""blocks_per_unit=auto groups blocks until a unit holds this many parameters (see FSDPConfig)."""


def group_blocks(blocks: list[nn.Module], blocks_per_unit: int | str) -> list[list[int]]:
    """Indices of the blocks in each unit: `blocks_per_unit` at a time, or for auto, consecutive blocks
    until a unit holds UNIT_PARAMS parameters (blocks of different sizes get units of different lengths)."""
    if not (isinstance(blocks_per_unit, str) and blocks_per_unit.strip().lower() == "auto"):
        k = int(blocks_per_unit)
        return [list(range(start, min(start + k, len(blocks)))) for start in range(0, len(blocks), k)]
    groups: list[list[int]] = [[]]
    held = 0
    for i, block in enumerate(blocks):
        if held >= UNIT_PARAMS:
            groups.append([])
            held = 0
        groups[-1].append(i)
        held += sum(p.numel() for p in block.parameters())
    return [g for g in groups if g]


def plan_units(
    model: nn.Module, layout: BlockLayout | None, reshard_after_forward: bool, blocks_per_unit: int | str = 1
) -> list[Unit]:
    """The root, then pre, the blocks (`blocks_per_unit` consecutive ones per unit), post: forward order
    after the root. The last block unit and `post` never reshard after forward: backward needs them first
    (torchtitan). The one plan that sharding (`shard_units`) and the memory estimator both follow."""
    parts: list[tuple[str, tuple[nn.Module, ...], bool]] = []
    if layout is not None:
        blocks = list(resolve_blocks(model, layout))
        parts.append((layout.pre, (model.get_submodule(layout.pre),), reshard_after_forward))
        for group in group_blocks(blocks, blocks_per_unit):
            start, stop = group[0], group[-1]
            name = f"{layout.blocks}.{start}" if start == stop else f"{layout.blocks}.{start}-{stop}"
            parts.append(
                (name, tuple(blocks[i] for i in group), reshard_after_forward and stop < len(blocks) - 1)
            )
        parts.append((layout.post, (model.get_submodule(layout.post),), False))
    parts.insert(0, ("root", (model,), False))
    seen: set[int] = set()
    numels: dict[str, int] = {}
    for name, modules, _ in reversed(parts):  # innermost first: the root takes only what is left
        fresh = {id(p): p for m in modules for p in m.parameters() if id(p) not in seen}
        seen.update(fresh)
        numels[name] = sum(p.numel() for p in fresh.values())
    return [Unit(name, modules, reshards, numels[name]) for name, modules, reshards in parts]


def shard_units(units: list[Unit], mesh: DeviceMesh, policy: MixedPrecisionPolicy, offload: bool) -> None:
    """fully_shard each planned unit bottom-up, the root last (it takes whatever is left)."""
    kwargs: dict[str, Any] = dict(
        mesh=mesh, mp_policy=policy, offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy()
    )
    for unit in [*units[1:], units[0]]:
        target = unit.modules[0] if len(unit.modules) == 1 else list(unit.modules)
        fully_shard(target, reshard_after_forward=unit.reshards, **kwargs)


def unit_numels(model: nn.Module, layout: BlockLayout | None) -> dict[str, int]:
    """Parameters per all-gather unit (before sharding), keyed by unit name."""
    return {u.name: u.numel for u in plan_units(model, layout, False)}


class FSDPCommStats:
    """Payload bytes this rank's collectives carry per optimizer step (all-gather output, reduce-scatter
    input: the unsharded size; all-reduce across replicas: the shard), in closed form from the units."""

    def __init__(
        self,
        numels: dict[str, int],
        resharded: set[str],
        dims: ShardDims,
        policy: MixedPrecisionPolicy,
        micro_steps: int,
        reduce_every_micro_step: bool,
    ) -> None:
        param_bytes = (policy.param_dtype or torch.float32).itemsize
        reduce_bytes = (policy.reduce_dtype or policy.param_dtype or torch.float32).itemsize
        total = sum(numels.values())
        regathered = sum(n for name, n in numels.items() if name in resharded)
        syncs = micro_steps if reduce_every_micro_step else 1
        sharded = dims.shard > 1
        self.record = {
            # Every unit is gathered for each micro-step's forward, resharded ones again for its backward.
            "allgather_bytes": micro_steps * (total + regathered) * param_bytes if sharded else 0,
            "reduce_scatter_bytes": syncs * total * reduce_bytes if sharded else 0,
        }
        if dims.replicate > 1:  # hybrid: each group's reduced shard is then averaged across the groups
            self.record["allreduce_bytes"] = syncs * -(-total // dims.shard) * reduce_bytes

    def step(self, steps: int = 1) -> dict[str, float]:
        return dict(self.record)


def check_fsdp(cfg: Config, recipe_class: type, world_size: int) -> None:
    """FSDP-specific config checks, before any process group exists. Raises ConfigError."""
    p = cfg.parallel
    ShardDims.resolve(p.dp_replicate, p.dp_shard, world_size)
    value = p.blocks_per_unit
    is_auto = isinstance(value, str) and value.strip().lower() == "auto"
    if not is_auto and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(
            "parallel.blocks_per_unit", value, "must be a whole number >= 1 or auto", "use auto, 1, 2, ..."
        )
    check_no_comm_hook(cfg, "parallel=fsdp")
    if p.offload:
        check_offload_memory(cfg, recipe_class, ShardDims.resolve(p.dp_replicate, p.dp_shard, world_size))


def check_no_comm_hook(cfg: Config, where: str) -> None:
    if not isinstance(cfg.comm_hook, NoCommHookConfig):
        name = type(cfg.comm_hook).__name__.removesuffix("CommHookConfig").removesuffix("Config").lower()
        raise ConfigError(
            "comm_hook",
            name,
            f"is not supported with {where}: comm hooks compress DDP's all-reduce buckets, and FSDP "
            "reduce-scatters sharded gradients instead",
            "use comm_hook=none; for half the reduce-scatter bytes, parallel.reduce_dtype=bf16 "
            "(parallel=fsdp)",
        )


def optimizer_state_bytes_per_param(optim: Any) -> int:
    if isinstance(optim, AdamWConfig):
        return 8  # exp_avg + exp_avg_sq, fp32
    if isinstance(optim, SGDConfig) and optim.momentum > 0:
        return 4
    return 0


def host_memory_available() -> int:
    """MemAvailable from /proc/meminfo (what the kernel can give without swapping), in bytes."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_offload_memory(cfg: Config, recipe_class: type, dims: ShardDims) -> None:
    """Offloaded shards (fp32 parameters, gradients, optimizer state) of every rank on this node must fit
    in its free host memory."""
    with torch.device("meta"):
        model = recipe_class(cfg.recipe).build_model()
    numel = sum(p.numel() for p in model.parameters())
    per_param = 4 + 4 + optimizer_state_bytes_per_param(cfg.optim)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    needed = local_ranks * -(-numel // dims.shard) * per_param
    available = host_memory_available()
    if needed > available * HOST_MEMORY_HEADROOM:
        raise ConfigError(
            "parallel.offload",
            True,
            f"the {local_ranks} rank(s) on this node would keep {needed / GIB:.1f} GiB of sharded "
            f"parameters, gradients and optimizer state in host memory ({numel / 1e9:.2f}B parameters x "
            f"{per_param} bytes / dp_shard={dims.shard}); {available / GIB:.1f} GiB is available",
            "shard over more ranks (more nodes, parallel.dp_shard), or parallel.offload=false",
        )


class FSDPStrategy:
    def __init__(self, cfg: Config, recipe: Any, session: DistSession) -> None:
        p: FSDPConfig = cfg.parallel
        self.session = session
        self.dims = ShardDims.resolve(p.dp_replicate, p.dp_shard, session.world_size)
        shape, names = self.dims.mesh_shape()
        self.mesh = init_device_mesh(session.device.type, shape, mesh_dim_names=names)
        self.dp_rank, self.dp_size = session.rank, session.world_size
        self.shard, self.writes_shared_state = "", False  # DCP: every rank writes its own shards
        self.sharded_checkpoint = True
        self.eval_in_lockstep = True  # eval forwards all-gather: every rank must run as many
        self.times_exposed_comm = False  # hooks on sharded gradients fire after the reduce-scatter
        self.model_parallel_size = 1
        self.layout_id = "parallel=fsdp"  # not the degrees: DCP reshards on load
        self.param_device = torch.device("cpu") if p.offload else session.device
        layout = block_layout(recipe)
        if layout is None:
            log.warning(
                "recipe %s declares no blocks (`layout`): the whole model is one FSDP unit, gathered "
                "at once (no memory saved while it computes)",
                type(recipe).__name__,
            )
        torch.manual_seed(cfg.train.seed)  # the same init on every rank, and as in a 1-process run
        model = convert_to_fp8(recipe.build_model(), cfg.precision, head=layout.post if layout else None)
        reshard = reshards_after_forward(p.reshard_after_forward, self.dims)
        self.units = plan_units(model, layout, reshard, p.blocks_per_unit)
        numels = {u.name: u.numel for u in self.units}
        compiled = cfg.train.compile_on
        if layout is not None:
            blocks = list(resolve_blocks(model, layout))
            if cfg.train.activation_checkpointing:
                checkpoint_blocks(blocks)
            if compiled:  # each `forward` alone: FSDP's hooks, run by the module's call, stay outside
                for module in (model.get_submodule(layout.pre), *blocks):
                    module.forward = torch.compile(module.forward)
        self.policy = mp_policy(cfg.precision, p.param_dtype, p.reduce_dtype)
        shard_units(self.units, self.mesh, self.policy, p.offload)
        log.info(
            "FSDP units (parallel.blocks_per_unit=%s): %s",
            p.blocks_per_unit,
            ", ".join(u.name for u in self.units if u.numel),
        )
        self.module = model
        self.reduce_every_micro_step = p.reduce_every_micro_step
        # Compiled: `post` and the loss as one graph, so the logits' upcast and log-softmax fuse into
        # the head's consumers (see with_loss.py). Without a layout, the loss compiled on its own.
        if compiled and layout is not None:
            self.model = BodyThenCompiledTail(model, model.get_submodule(layout.post), recipe.loss)
        else:
            self.model = WithLoss(model, torch.compile(recipe.loss) if compiled else recipe.loss)
        self.comm_hook = None
        self.comm_stats = (
            FSDPCommStats(
                numels,
                {u.name for u in self.units if u.reshards},
                self.dims,
                self.policy,
                cfg.train.grad_accum_steps,
                p.reduce_every_micro_step,
            )
            if session.world_size > 1
            else None
        )

    def forward_backward(self, micro_batches: list[Batch], amp: MixedPrecision) -> torch.Tensor:
        total = torch.zeros((), device=self.session.device)
        n = len(micro_batches)
        for i, (inputs, targets) in enumerate(micro_batches):
            # All micro-steps but the last keep unsharded gradients and skip the reduce-scatter (and the
            # replicas' all-reduce), as DDP's no_sync; the last reduces the accumulated sum once.
            self.module.set_requires_gradient_sync(i == n - 1 or self.reduce_every_micro_step)
            with amp.autocast():
                loss = self.model(inputs, targets) / n
            amp.scale(loss).backward()
            total += loss.detach()
        return total

    def eval_forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        return self.model.outputs(inputs)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        shard_group = self.mesh["dp_shard"].get_group()
        return clip_sharded(self.module.parameters(), max_norm, self.session.device, shard_group)

    def mean_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return self.session.all_reduce(loss.detach().clone(), "avg")


def clip_sharded(parameters: Any, max_norm: float, device: torch.device, shard_group: Any) -> torch.Tensor:
    """The global gradient norm over sharded (DTensor) gradients, clipped if max_norm > 0; a plain tensor.

    Computed on the local shards: the sum of their squares, all-reduced over `shard_group` (the mesh's
    shard dimension: replicas of a hybrid mesh hold equal, already-reduced shards and are not counted
    twice). The same sum DTensor makes, without its dispatch: on the CPU (1 rank, a 12-block GPT too
    small to compute much, fused AdamW) the optimizer phase went from 5.8-6.1 to 4.7-4.9 ms a step,
    host time a GPU would wait through; the gradient norm was equal to every printed digit.
    """
    local = [local_shard(p.grad) for p in parameters if p.grad is not None]
    squares = (torch.nn.utils.get_total_norm(local).float() ** 2).to(device)  # offloaded grads: on the CPU
    if dist.get_world_size(shard_group) > 1:
        dist.all_reduce(squares, group=shard_group)
    norm = squares.sqrt()
    if max_norm > 0 and local:  # as torch.nn.utils.clip_grad_norm_ scales
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(local, coef.to(local[0].device))
    return norm


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t
