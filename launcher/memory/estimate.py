"""The memory estimate of a launcher config, per rank, without a GPU.

The traced part (launcher/memory/step_trace.py) is the recipe's real step under fake tensors: states,
activations (with the chosen activation checkpointing), logits and loss, autocast copies, backward
and optimizer temporaries. The closed-form part (launcher/memory/parts.py) adds what one process's
trace cannot see: DDP buckets, comm-hook buffers, pipeline micro-batches in flight and receive
buffers, cuBLAS workspace, the allocator's caching and the CUDA context.

`parts` of each rank add up to `peak_allocated`, the number to compare with
`torch.cuda.max_memory_allocated`; `peak_reserved` adds the allocator's overhead
(`max_memory_reserved`); `device_needed` adds what lives outside the allocator.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from launcher.config.schema import Config, DDPConfig, FSDPConfig, PipelineConfig, PowerSGDConfig
from launcher.memory import fsdp
from launcher.memory import parts as closed
from launcher.memory.compiled import fused_loss
from launcher.memory.step_trace import (
    build_meta_model,
    fake_batch,
    fake_mode,
    materialize,
    model_forward,
    trace_forward_activations,
    trace_step,
)
from launcher.recipe import block_layout
from launcher.train.precision import DTYPES

GIB = 2**30


@dataclass
class RankEstimate:
    ranks: str
    """Which ranks this column describes, e.g. 'every rank' or 'pp rank 1'."""
    parts: dict[str, int]
    """Bytes alive at the predicted peak, by part; they add up to peak_allocated."""
    peak_allocated: int
    peak_reserved: int
    device_needed: int
    notes: dict[str, Any] = field(default_factory=dict)
    """Facts that are not parts of the peak: activations with/without checkpointing, stage share..."""
    reserved_extra: dict[bool, int] = field(default_factory=dict)
    """Reserved less allocated by memory.expandable_segments, from the caching allocator model."""


@dataclass
class Estimate:
    layout: str
    gpu: str
    device_bytes: int
    ranks: list[RankEstimate]

    @property
    def worst(self) -> RankEstimate:
        return max(self.ranks, key=lambda r: r.device_needed)

    @property
    def fits(self) -> bool:
        return self.worst.device_needed <= self.device_bytes * (1 - closed.HEADROOM)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "fits": self.fits, "worst_rank": self.worst.ranks}


def estimate(
    cfg: Config,
    recipe_class: type,
    world_size: int,
    gpu: str = "H100",
    device_total: int | None = None,
    expandable_segments: bool | None = None,
) -> Estimate:
    """Estimate every rank's peak memory for `cfg` run by `world_size` processes.

    Args:
        gpu: a GPU name or size in GiB (estimate.gpu), used when device_total is None.
        device_total: bytes to compare with (pre-flight passes the device's own).
        expandable_segments: allocator setting for the reserved-memory overhead; default cfg's.
    """
    name, total = closed.device_bytes(gpu) if device_total is None else (gpu, device_total)
    expandable = cfg.memory.expandable_segments if expandable_segments is None else expandable_segments
    recipe = recipe_class(cfg.recipe)
    sample = _first_sample(recipe, cfg)
    if isinstance(cfg.parallel, PipelineConfig):
        ranks, layout = _pipeline(cfg, recipe, sample, world_size)
        fsdp.shard_pipeline_ranks(cfg, ranks)  # parallel.dp_shard > 1: stages sharded
    elif isinstance(cfg.parallel, FSDPConfig):
        ranks, layout = _fsdp(cfg, recipe, sample, world_size)
    else:
        ranks, layout = [_data_parallel(cfg, recipe, sample, world_size)], f"ddp dp={world_size}"
    for rank in ranks:
        rank.peak_allocated = sum(rank.parts.values())
        extra = rank.reserved_extra.get(expandable)
        if extra is None:  # no trace of this rank's step
            extra = int(rank.peak_allocated * closed.RESERVED_OVERHEAD[expandable])
        rank.peak_reserved = rank.peak_allocated + extra
        rank.device_needed = (
            rank.peak_reserved + closed.CUDA_CONTEXT_BYTES + (closed.NCCL_BYTES if world_size > 1 else 0)
        )
    return Estimate(layout, name, total, ranks)


# A step's trace depends only on what _trace_key names; fixes and layouts that share it reuse it.
_TRACES: dict[str, Any] = {}
_SAMPLES: dict[str, Any] = {}
_CACHE_SIZE = 64


def _first_sample(recipe: Any, cfg: Config) -> Any:
    """One training sample (its shapes and dtypes); loading a dataset can take seconds, so once."""
    key = f"{type(recipe).__qualname__}:{cfg.recipe!r}"
    if key not in _SAMPLES:
        if len(_SAMPLES) > _CACHE_SIZE:
            _SAMPLES.clear()
        _SAMPLES[key] = recipe.train_dataset()[0]
    return _SAMPLES[key]


def _cached(key: str, make: Any) -> Any:
    if key not in _TRACES:
        if len(_TRACES) > _CACHE_SIZE:
            _TRACES.clear()
        _TRACES[key] = make()
    return _TRACES[key]


def _trace_key(cfg: Config, *extra: Any) -> str:
    t = cfg.train
    return repr(
        (
            cfg.recipe,
            cfg.optim,
            cfg.precision.dtype,
            t.micro_batch_size,
            min(t.grad_accum_steps, 2),
            t.activation_checkpointing,
            t.compile_on,
            *extra,
        )
    )


def _data_parallel(cfg: Config, recipe: Any, sample: Any, world_size: int) -> RankEstimate:
    train, amp = cfg.train, DTYPES[cfg.precision.dtype]

    def make() -> tuple[Any, dict[str, Any]]:
        with fake_mode():
            model = materialize(build_meta_model(recipe, train.activation_checkpointing))
            batch = fake_batch(sample, train.micro_batch_size)
            forward = model_forward(recipe.loss, compiled=train.compile_on)
            trace = trace_step(
                model, forward, batch, cfg.optim, amp, min(train.grad_accum_steps, 2), train.compile_on
            )
            return trace, _checkpointing_notes(cfg, recipe, batch, forward, trace.activations, amp)

    trace, notes = _cached(_trace_key(cfg, "whole model"), make)
    notes = dict(notes)
    parts = _ordered(trace.at_peak)
    if world_size > 1 and isinstance(cfg.parallel, DDPConfig):
        grad_numels = [_numel(s) for s in reversed(trace.grad_shapes)]  # DDP buckets in reverse order
        buckets = closed.bucket_bytes(grad_numels, cfg.parallel.bucket_cap_mb)
        if cfg.parallel.gradient_as_bucket_view:  # gradients live in the buckets, from step 1 on
            parts = _ordered(trace.at_peak_without_grads)
        parts["DDP gradient buckets"] = buckets
        parts.update(_comm_hook_parts(cfg, trace.grad_shapes, cfg.parallel.bucket_cap_mb))
    _common_parts(cfg, parts)
    notes.update(peak_phase=trace.peak_phase, **_state_notes(trace))
    return RankEstimate("every rank", parts, 0, 0, 0, notes, trace.reserved_extra)


def _pipeline(cfg: Config, recipe: Any, sample: Any, world_size: int) -> tuple[list[RankEstimate], str]:
    from launcher.parallel.dims import ParallelDims
    from launcher.parallel.pipeline import stages_per_rank
    from launcher.parallel.split import ModelPart, StageModule, plan_stages, stage_ids_for_rank

    p, train, amp = cfg.parallel, cfg.train, DTYPES[cfg.precision.dtype]
    schedule = p.schedule.value
    dims = ParallelDims.resolve(p.pp, p.dp, world_size)
    per_rank = stages_per_rank(p)
    num_stages = dims.pp * per_rank
    layout = block_layout(recipe)
    micro = train.micro_batch_size // p.num_microbatches
    meta_model = build_meta_model(recipe, False)
    specs = plan_stages(meta_model, layout, num_stages, p.split_points)
    # Each stage's input (shape, dtype): run the stages on the meta device, nothing allocated.
    whole = ModelPart(meta_model, layout, specs)
    x = torch.empty((micro, *sample[0].shape), dtype=sample[0].dtype, device="meta")
    boundary: list[tuple[tuple[int, ...], torch.dtype]] = []
    with torch.no_grad():
        for spec in specs:
            boundary.append((tuple(x.shape), x.dtype))
            x = StageModule(whole, layout, spec)(x)
    boundary.append((tuple(x.shape), x.dtype))
    ranks = []
    for pp_rank in range(dims.pp):
        ids = sorted(stage_ids_for_rank(pp_rank, dims.pp, per_rank, schedule == "zbv_zero_bubble"))
        held = [specs[i] for i in ids]

        def make(held=held) -> Any:
            with fake_mode():
                model = build_meta_model(recipe, train.activation_checkpointing)
                part = materialize(ModelPart(model, layout, held))
                stages = [StageModule(part, layout, spec) for spec in held]
                batch, inputs = _stage_inputs(sample, micro, held, boundary)
                forward = _stages_forward(stages, inputs, recipe.loss, train.compile_on)
                return trace_step(
                    part, forward, batch, cfg.optim, amp, min(train.grad_accum_steps, 2), train.compile_on
                )

        trace = _cached(_trace_key(cfg, "stages", held, micro), make)
        parts = _ordered(trace.at_peak)
        in_flight = closed.in_flight_microbatches(schedule, dims.pp, pp_rank, p.num_microbatches, per_rank)
        parts["in-flight micro-batches"] = max(0, in_flight - per_rank) * trace.forward_saved // per_rank
        recv = 0
        for spec in held:
            if not spec.pre:
                recv += p.num_microbatches * _nbytes(*boundary[spec.index])
            if not spec.post:
                recv += p.num_microbatches * _nbytes(*boundary[spec.index + 1])
        parts["pipeline receive buffers"] = recv
        if dims.dp > 1:
            parts.update(_comm_hook_parts(cfg, trace.grad_shapes, p.bucket_cap_mb))
        _common_parts(cfg, parts)
        blocks = [b for spec in held for b in spec.blocks]
        notes = {
            "stages": ids,
            "blocks": f"{min(blocks)}..{max(blocks)}" if blocks else "none",
            "holds pre/post": "/".join(n for n, on in (("pre", held[0].pre), ("post", held[-1].post)) if on)
            or "-",
            "parameter share": round(trace.parameters / max(1, _bytes_of(meta_model)), 3),
            "in-flight stage-microbatches": in_flight,
            "activations per micro-batch GiB": _gib(trace.forward_saved),
            "peak_phase": trace.peak_phase,
            **_state_notes(trace),
        }
        ranks.append(RankEstimate(f"pp rank {pp_rank}", parts, 0, 0, 0, notes, trace.reserved_extra))
    return ranks, f"pipeline {schedule} pp={dims.pp} dp={dims.dp} stages/rank={per_rank}"


def _fsdp(cfg: Config, recipe: Any, sample: Any, world_size: int) -> tuple[list[RankEstimate], str]:
    """Every rank of a parallel=fsdp run holds the same: one column."""
    s = fsdp.sharding_of(cfg, world_size)
    traced = _cached(_trace_key(cfg, "fsdp", s), lambda: fsdp.trace_sharded_step(cfg, recipe, sample, s))
    parts = {name: traced["at_peak"].get(name, 0) for name in fsdp.ORDER if name in traced["at_peak"]}
    parts.update(traced["at_peak"])
    _common_parts(cfg, parts)
    per_rank = -(-traced["parameters"] // s.shard)
    notes: dict[str, Any] = {
        "sharding": f"dp_shard={s.shard} x dp_replicate={s.replicate}",
        "FSDP units (all-gathered one by one)": traced["units"],
        "largest unit GiB (param_dtype)": round(traced["largest_unit"] * s.param_bytes / GIB, 3),
        "activations per micro-batch GiB": round(traced["activations"] / GIB, 3),
        "peak_phase": traced["peak_phase"],
        "parameter bytes": per_rank * 4,
        "gradient bytes": per_rank * 4,
        "optimizer state bytes": -(-traced["optimizer_state"] // s.shard),
    }
    if s.offload:
        notes["host bytes per rank (offloaded states)"] = per_rank * 8 + -(
            -traced["optimizer_state"] // s.shard
        )
    layout = f"fsdp dp_shard={s.shard} dp_replicate={s.replicate}" + (" offload" if s.offload else "")
    return [RankEstimate("every rank", parts, 0, 0, 0, notes, traced["reserved_extra"])], layout


def _state_notes(trace: Any) -> dict[str, int]:
    """Exact bytes of the states (parameters, full gradients, optimizer state) of this rank."""
    return {
        "parameter bytes": trace.parameters,
        "gradient bytes": trace.gradients,
        "optimizer state bytes": trace.optimizer_state,
    }


def _stage_inputs(sample, micro, held, boundary):
    """Fake inputs: tokens for the first stage, a received activation (requires grad) for others."""
    targets = torch.empty((micro, *sample[1].shape), dtype=sample[1].dtype)
    inputs = []
    for spec in held:
        if spec.pre:
            inputs.append(torch.empty((micro, *sample[0].shape), dtype=sample[0].dtype))
        else:
            shape, dtype = boundary[spec.index]
            inputs.append(torch.empty(shape, dtype=dtype, requires_grad=True))
    return [*inputs, targets], inputs


def _stages_forward(stages, inputs, loss_fn, compiled: bool):
    """Forward of each held stage on its own input; the last stage's loss (fused with the stage when
    compiled), the others' outputs summed (whose gradient, ones, stands in for the gradient a stage
    receives)."""

    def forward(module, batch, tracker):
        total = None
        for stage, x in zip(stages, inputs):
            out = stage(x)
            if stage.post is not None:
                tracker.register(out, "logits")
                tracker.phase = "loss"
                out = fused_loss(loss_fn, out, batch[-1], tracker) if compiled else loss_fn(out, batch[-1])
                tracker.phase = "forward"
            else:
                out = out.float().sum()
            total = out if total is None else total + out
        return total

    return forward


def _checkpointing_notes(cfg, recipe, batch, forward, traced, amp) -> dict[str, Any]:
    """Activations of one micro-batch with and without activation checkpointing."""
    on = cfg.train.activation_checkpointing
    notes: dict[str, Any] = {"activations per micro-batch GiB": _gib(traced)}
    if block_layout(recipe) is None:
        return notes
    other = trace_forward_activations(
        materialize(build_meta_model(recipe, not on)), forward, batch, amp, cfg.train.compile_on
    )
    with_ac, without_ac = (traced, other) if on else (other, traced)
    notes.update(
        {
            "activations with checkpointing GiB": _gib(with_ac),
            "activations without checkpointing GiB": _gib(without_ac),
        }
    )
    return notes


def _comm_hook_parts(cfg: Config, grad_shapes: list[tuple[int, ...]], bucket_cap_mb: float) -> dict[str, int]:
    hook = cfg.comm_hook
    grad_bytes = sum(_numel(s) * 4 for s in grad_shapes)
    if isinstance(hook, PowerSGDConfig):
        buffers = closed.powersgd_bytes(
            grad_shapes, hook.rank, hook.min_compression_rate, hook.error_feedback
        )
        return {f"PowerSGD {k}": v for k, v in buffers.items()}
    if type(hook).__name__ in ("FP16CommHookConfig", "BF16CommHookConfig"):
        return {"comm hook half-precision bucket": closed.half_bucket_bytes(grad_bytes, bucket_cap_mb)}
    return {}


def _common_parts(cfg: Config, parts: dict[str, int]) -> None:
    parts["cuBLAS workspace"] = closed.TRAINING_CUBLAS_BYTES


ORDER = (
    "parameters",
    "gradients",
    "optimizer state",
    "autocast weight copies",
    "activations",
    "loss temporaries (logits, loss)",
    "backward temporaries",
    "optimizer step temporaries",
    "inputs",
    "kernel workspace (cuDNN)",
)


def _ordered(by_category: dict[str, int]) -> dict[str, int]:
    out = {k: by_category.get(k, 0) for k in ORDER}
    out.update({k: v for k, v in by_category.items() if k not in out})
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return closed._round512(_numel(shape) * dtype.itemsize)


def _bytes_of(model: torch.nn.Module) -> int:
    return sum(closed._round512(p.numel() * p.element_size()) for p in model.parameters())


def _gib(n: int) -> float:
    return round(n / GIB, 3)
