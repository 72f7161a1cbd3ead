"""The config schema: dataclasses registered in Hydra's ConfigStore.

YAML files in `conf/` only choose and tweak; these classes define what keys exist, their types and
defaults. Code receives `OmegaConf.to_object(cfg)`, i.e. instances of these classes, never raw dicts.
Groups with several shapes (`parallel`, `comm_hook`, `optim`, `logger`, `recipe`) are typed `Any` here;
each option's YAML pulls in its own schema (`/schema/<group>/<option>@_here_`), and code dispatches
on the schema's type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


# Enum member names equal their values so OmegaConf's error lists the spellings users type.
class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"
    fp8 = "fp8"


class Fp8Recipe(str, Enum):
    tensorwise = "tensorwise"
    rowwise = "rowwise"
    rowwise_with_gw_hp = "rowwise_with_gw_hp"


class LRSchedule(str, Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class NonFinite(str, Enum):
    stop = "stop"
    skip = "skip"


class Backend(str, Enum):
    auto = "auto"
    nccl = "nccl"
    gloo = "gloo"


# Names like "1f1b" are not identifiers, hence the functional form.
PipelineSchedule = Enum(
    "PipelineSchedule",
    [
        (name, name)
        for name in (
            "gpipe",
            "1f1b",
            "interleaved_1f1b",
            "looped_bfs",
            "interleaved_zero_bubble",
            "zbv_zero_bubble",
        )
    ],
    type=str,
)


class CompressDtype(str, Enum):
    none = "none"
    fp16 = "fp16"
    bf16 = "bf16"


class PowerSGDImpl(str, Enum):
    ours = "ours"
    torch = "torch"


class WandbMode(str, Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass
class RunConfig:
    root: str = "runs"
    """Parent of default run directories: `<root>/<recipe>/<run id>`."""
    id: str | None = None
    """Run id. Default: SLURM_JOB_ID, else torchrun's run id, else a timestamp chosen by rank 0."""
    dir: str | None = None
    """The run directory itself (overrides root/id). Must be the same path on every rank."""
    name: str | None = None
    """Free text describing the run; kept in config.yaml (and as the wandb run name)."""


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimizer steps to train for (not micro-steps)."""
    micro_batch_size: Any = 8
    """Samples per rank per forward/backward: an integer, or auto = the fastest that fits this GPU by
    the memory estimate (launcher/memory/autobatch.py; what it picked is logged and in config.yaml)."""
    grad_accum_steps: int = 1
    """Micro-steps per optimizer step. Global batch = micro_batch_size * grad_accum_steps * dp size."""
    global_batch_size: int | None = None
    """Samples per optimizer step over all data-parallel ranks. Set, it fixes the global batch and
    grad_accum_steps is derived from it (global / (micro_batch_size * dp size)); with
    micro_batch_size=auto it is what auto keeps. Unset: micro_batch_size * grad_accum_steps * dp size."""
    eval_every: int = 50
    """Evaluate on the held-out split every N steps and at the end; 0 turns evaluation off."""
    eval_batches: int = 10
    """Eval batches per rank (the same ones every time); 0 = the whole eval split."""
    log_every: int = 10
    """Write a metrics line every N steps (and at the last step)."""
    stop_at_step: int | None = None
    """Stop after this step with a checkpoint, as if preempted; the LR schedule still spans `steps`.
    A later run with resume=auto continues. For time-boxed jobs and for testing resume."""
    seed: int = 0
    """Seeds model init (same on every rank), data order, and per-rank RNG (seed + rank)."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms(True): bit-reproducible kernels where torch has them."""
    activation_checkpointing: Any = False
    """Recompute each of the recipe's blocks in backward instead of storing activations: true, false,
    or auto = on only if that is the fastest choice that fits (with micro_batch_size, see above)."""
    compile: str = "auto"
    """torch.compile the model together with the recipe's loss (after the parallel wrapper, so DDP's
    bucketing is graph-aware): true, false, or auto = on for CUDA runs of at least 1200 steps, where it
    repays its compile time (launcher/config/auto.py); config.yaml records what auto chose."""
    nonfinite: NonFinite = NonFinite.stop
    """A NaN/inf loss (or gradient, outside fp16 loss scaling) on any rank: `stop` saves the last good
    state and exits with code 3; `skip` drops that step's update and counts it (`nonfinite_steps`).
    fp16 overflow steps that the GradScaler skips are normal and not counted here."""

    @property
    def compile_on(self) -> bool:
        """Whether to compile; only after launcher.config.auto resolved `compile` (it is never auto here)."""
        value = str(self.compile).lower()  # True/False set by code count too
        if value not in ("true", "false"):
            raise RuntimeError(
                f"train.compile={self.compile!r} was not resolved (launcher.config.auto.resolve_compile)"
            )
        return value == "true"


@dataclass
class LoaderConfig:
    num_workers: int = 0
    """DataLoader worker processes per rank (0 = load in the training process)."""
    prefetch_factor: int = 2
    """Batches each worker loads ahead; only used when num_workers > 0."""
    pin_memory: bool = True
    """Page-locked host batches for async copies; only takes effect on CUDA."""


@dataclass
class CheckpointConfig:
    every: int = 100
    """Save every N steps; 0 = only the final checkpoint."""
    keep: int = 2
    """Complete checkpoints to keep (oldest deleted first)."""
    async_save: bool = False
    """Sharded checkpoints (parallel=fsdp, pipeline dp_shard > 1) only: copy the shards to host memory and
    write them in a background thread (DCP's async_save) while training goes on. The checkpoint is
    committed (renamed into place) when the next save begins; the final and signal-stop saves wait."""


@dataclass
class DistConfig:
    timeout_s: float = 600.0
    """Collective timeout: a stuck rank ends the job after this long instead of hanging."""
    backend: Backend = Backend.auto
    """auto = nccl when CUDA is available, else gloo."""
    shutdown_grace_s: float = 25.0
    """After SIGTERM/SIGINT/SIGUSR1, how long a rank may take to finish its step and checkpoint before
    it exits anyway; also how long a rank of a multi-process job may take to exit once it leaves
    training, whatever blocks (launcher/launch/exits.py). Keep it below torchrun's wait before SIGKILL (30 s)
    unless you raise that too."""


@dataclass
class MetricsConfig:
    peak_tflops: float | None = None
    """Per-device peak TFLOP/s for MFU; default from the GPU name (bf16 dense). No MFU on CPU."""
    step_timing: bool = True
    """On log steps, split the step into time_data_s, time_forward_backward_s, time_optimizer_s and
    (with data-parallel peers) time_comm_s, the exposed gradient communication
    (launcher/observe/timing.py)."""
    gpu_telemetry: bool = True
    """On log steps, each rank's GPU utilisation, memory, power and temperature from NVML
    (launcher/observe/telemetry.py); nothing without a GPU or without nvidia-ml-py."""


@dataclass
class ProfileConfig:
    """torch.profiler over a window of steps (launcher/observe/profile.py); off by default."""

    enabled: bool = False
    """Profile: per-rank Chrome/Perfetto traces and a key_averages table under <run dir>/profile/."""
    wait: int = 1
    """Steps skipped at the start of each cycle (from this run's first step)."""
    warmup: int = 1
    """Steps traced but discarded (the profiler's own start-up cost lands here)."""
    active: int = 3
    """Steps recorded in each cycle's trace."""
    repeat: int = 1
    """Cycles of wait + warmup + active; each writes its own trace per rank."""
    record_shapes: bool = False
    """Record input shapes of each op (torch.profiler record_shapes)."""
    memory: bool = False
    """Record tensor allocations (torch.profiler profile_memory)."""
    with_stack: bool = False
    """Record Python stacks of ops (torch.profiler with_stack); large traces."""
    row_limit: int = 25
    """Rows of the key_averages table (top ops by device time, or CPU time on CPU)."""
    nvtx: bool = False
    """Also emit the loop's named ranges as NVTX ranges, for Nsight Systems (`nsys profile ...`);
    works with profile.enabled=false. Needs CUDA."""


class Preflight(str, Enum):
    warn = "warn"
    refuse = "refuse"
    off = "off"


@dataclass
class MemoryConfig:
    preflight: Preflight = Preflight.warn
    """On CUDA, before the model is built: estimate this rank's peak memory and compare it with the
    device's free memory. `warn` logs the fixes, `refuse` exits with code 2, `off` skips the check."""
    limit_gib: float | None = None
    """Use at most this much of each GPU (torch.cuda.set_per_process_memory_fraction); pre-flight
    compares with it. E.g. 80 on a 141 GB H200 to check a config for an 80 GB card honestly."""
    expandable_segments: bool = True
    """CUDA caching allocator's expandable_segments (less fragmentation when shapes change); set in
    PYTORCH_CUDA_ALLOC_CONF before CUDA starts, merged with a value you set yourself."""
    record_history: bool = False
    """Record allocator history (CUDA) for snapshots: memory_snapshot_rank<r>.pickle in the run dir."""
    snapshot_steps: list[int] = field(default_factory=lambda: [3])
    """Steps after which a snapshot is written when record_history is on (and on an out-of-memory)."""


@dataclass
class EstimateConfig:
    """Read by `python -m launcher.estimate` only; training ignores it."""

    world_size: int = 1
    """Processes the estimated run would have (torchrun's nproc_per_node x nodes)."""
    gpu: str = "H100"
    """The device to compare with: a name (H100, H200, A100-80GB, A100-40GB, L4, ...) or memory in GiB."""


@dataclass
class PrecisionConfig:
    dtype: Precision = Precision.fp32
    """fp32, bf16 (autocast), fp16 (autocast + dynamic loss scaling with GradScaler), or fp8 (torchao
    float8 Linear layers + bf16 autocast; GPUs with compute capability >= 8.9 only)."""
    init_scale: float = 65536.0
    """fp16 only: the GradScaler's initial loss scale."""
    growth_interval: int = 2000
    """fp16 only: steps without inf/NaN before the loss scale doubles."""
    fp8_recipe: Fp8Recipe = Fp8Recipe.tensorwise
    """fp8 only: torchao's float8 scaling recipe. tensorwise (one scale per tensor: fastest), rowwise
    (one per row: more accurate, slower casts) or rowwise_with_gw_hp (rowwise, weight gradients in bf16)."""
    fp8_head: bool = False
    """fp8 only: also run the recipe's output head (its layout's `post`) in fp8. Off: the head stays bf16,
    as torchtitan keeps its output layer: its logits feed the softmax, the most precision-sensitive GEMM."""


# --- groups with one schema per option -------------------------------------------------------


@dataclass
class DDPConfig:
    bucket_cap_mb: float = 25.0
    """Gradient bucket size (MB) for DDP's overlapped all-reduce."""
    gradient_as_bucket_view: bool = True
    """Gradients alias the all-reduce buckets: saves one gradient-sized copy."""
    find_unused_parameters: bool = False
    """Needed only if some parameters get no gradient in a step; costs a graph walk per step."""
    broadcast_buffers: bool = True
    """Broadcast rank 0's buffers (e.g. BatchNorm stats) at each forward."""


@dataclass
class PipelineConfig:
    pp: int = 2
    """Pipeline stages' ranks: each rank holds 1/pp of the model's blocks."""
    dp: int = -1
    """Data-parallel replicas of the whole pipeline; -1 = world_size // pp. Ranks = dp * pp."""
    schedule: PipelineSchedule = PipelineSchedule["1f1b"]
    """gpipe, 1f1b (one stage per rank); interleaved_1f1b, looped_bfs, interleaved_zero_bubble,
    zbv_zero_bubble (several stages per rank; zero-bubble ones exclude train.compile)."""
    num_microbatches: int = 4
    """Microbatches each per-rank batch (train.micro_batch_size samples) is split into; must divide it."""
    stages_per_rank: int | None = None
    """Virtual stages per rank; default 1 for gpipe/1f1b, 2 for the multi-stage schedules."""
    split_points: list[str] = field(default_factory=list)
    """Explicit stage boundaries as the first block of each stage after the first, e.g.
    [blocks.4, blocks.8]; empty = balance blocks by parameter count (embeddings count zero)."""
    bucket_cap_mb: float = 25.0
    """Bucket size (MB) of the gradient all-reduce over each stage's data-parallel group."""
    dp_shard: int = 1
    """Shard each stage's parameters, gradients and optimizer state (FSDP2) over groups of this many of
    its data-parallel ranks (torchtitan's PP x FSDP); must divide parallel.dp. 1 = every replica holds
    its whole stage and gradients are all-reduced (GradReducer, comm hooks apply); dp_shard = dp fully
    shards each stage; in between, hybrid: sharded within groups, all-reduced across them."""


class FSDPDtype(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


@dataclass
class FSDPConfig:
    """Fully sharded data parallelism (PyTorch's FSDP2, `fully_shard`): parameters, gradients and
    optimizer state are split over the data-parallel ranks, each of the recipe's blocks (and `pre`,
    `post`, the rest of the model) all-gathered just before it computes."""

    dp_shard: int = -1
    """Ranks each parameter is sharded over; -1 = world_size // dp_replicate. dp_replicate x dp_shard
    must equal the world size."""
    dp_replicate: int = 1
    """Hybrid sharding (HSDP) for several nodes: dp_replicate groups of dp_shard ranks each hold one
    sharded copy; gradients are reduce-scattered within a group and all-reduced across groups. Keep a
    group inside one node (dp_shard = GPUs per node) so all-gathers stay on NVLink."""
    reshard_after_forward: bool = True
    """true (ZeRO-3): free each block's gathered parameters after its forward and all-gather them again
    in backward (least memory). false (ZeRO-2 behaviour): keep them from forward to backward, one
    all-gather fewer per block per micro-step, the whole model's gathered parameters in memory at the
    end of forward. The last block and `post` are kept either way (backward needs them first), and a
    one-rank shard group (dp_shard=1) never reshards: its ranks hold whole parameters already."""
    blocks_per_unit: Any = "auto"
    """Consecutive blocks of the recipe's layout sharded as one unit: one all-gather and one
    reduce-scatter for all of them. 1 = a unit per block (torchtitan). auto = the fewest blocks that hold
    25M parameters (1 for blocks that large: 4 for GPT-2-small's 7M): each unit costs FSDP about a
    millisecond of host work (Python hooks, collective launches) however small it is, which a small
    block's compute cannot hide (one H100, GPT-2-small, bench/RESULTS.md). Larger units keep more
    gathered parameters in flight under reshard_after_forward."""
    param_dtype: FSDPDtype = FSDPDtype.auto
    """Dtype of the all-gathered parameters the forward and backward compute with (the shards stay
    fp32 for the optimizer). auto = the precision's: bf16 for precision=bf16/fp8, fp16 for fp16, fp32
    for fp32. Halves the all-gather bytes and removes autocast's weight copies."""
    reduce_dtype: FSDPDtype = FSDPDtype.auto
    """Dtype of the gradient reduce-scatter (and the all-reduce across replicas). auto = fp32: exact
    accumulation across ranks; bf16 halves the bytes at some precision."""
    offload: bool = False
    """Keep the sharded parameters, gradients and optimizer state in (pinned) CPU memory, copied to the
    GPU per block; the optimizer steps on the CPU. Frees ~16 bytes a parameter of GPU memory (AdamW)
    at a large cost in speed. Refused when this node's memory cannot hold them."""
    reduce_every_micro_step: bool = False
    """With train.grad_accum_steps > 1: false (default) accumulates unsharded gradients and
    reduce-scatters once, on the last micro-step (as DDP's no_sync): full-size gradients between
    micro-steps. true reduce-scatters after every micro-step: only sharded gradients, more traffic."""


@dataclass
class NoCommHookConfig:
    """Plain all-reduce of fp32 gradients, no compression."""


@dataclass
class FP16CommHookConfig:
    """Gradients cast to fp16 for the all-reduce (half the bytes) and back to fp32 after."""


@dataclass
class BF16CommHookConfig:
    """Gradients cast to bf16 for the all-reduce (half the bytes, fp32's range) and back after."""


@dataclass
class PowerSGDConfig:
    rank: int = 4
    """Matrix approximation rank: each gradient matrix n x m is sent as (n + m) * rank numbers."""
    start_iter: int = 10
    """Optimizer steps of plain all-reduce before compression starts. It counts synchronising backward
    passes, i.e. optimizer steps (micro-steps under no_sync accumulation do not count), and steps that
    fp16 loss scaling skipped do not count either. Must be > 1 with error_feedback or warm_start."""
    min_compression_rate: float = 2.0
    """Compress a matrix only if this saves at least this factor; others go uncompressed."""
    error_feedback: bool = True
    """Add each step's compression error to the next step's gradient (per rank, saved in checkpoints)."""
    warm_start: bool = True
    """Reuse the previous step's Q factors instead of fresh random ones."""
    orthogonalization_epsilon: float = 0.0
    """Added to norms in Gram-Schmidt; > 0 guards against division by zero (e.g. fp16 compress_dtype)."""
    impl: PowerSGDImpl = PowerSGDImpl.ours
    """`ours` (launcher/parallel/powersgd.py: the same algorithm, batched per shape, one all-reduce each
    for P and Q, no host synchronisation) or `torch` (torch's stock powerSGD_hook, for comparison)."""
    batch_same_shape: bool = False
    """impl=torch only (ours always batches): batch same-shaped matrices into one bmm."""
    compress_dtype: CompressDtype = CompressDtype.none
    """Additionally cast to fp16/bf16 around PowerSGD (the fp16/bf16 compress wrappers)."""
    seed: int = 0
    """Seed of the random Q initialisation (the same on every rank)."""
    cuda_graphs: bool = True
    """impl=ours on CUDA: replay each bucket's arithmetic as CUDA graphs once its tensors stay put (one
    launch instead of dozens: launcher/parallel/bucket_graphs.py); false launches the kernels one by one."""
    triton_kernels: bool = True
    """impl=ours on CUDA with Triton: P = M Q, Q = M^T P and the error feedback as kernels that stream
    each gradient matrix once (launcher/parallel/powersgd_kernels.py), where cuBLAS's skinny GEMMs run
    far below memory bandwidth; false uses torch.bmm. Ranks above 16 always use bmm."""


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate (reached after warmup)."""
    weight_decay: float = 0.0
    """Decoupled weight decay; not applied to biases and norm weights (tensors with ndim < 2)."""
    warmup_steps: int = 0
    """Linear warmup from lr/warmup_steps to lr over this many optimizer steps."""
    schedule: LRSchedule = LRSchedule.cosine
    """Decay after warmup: cosine or linear down to lr * min_lr_ratio, or constant."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 = no clipping (the norm is still logged)."""


@dataclass
class AdamWConfig(OptimConfig):
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam's (beta1, beta2)."""
    eps: float = 1e-8
    """Adam's epsilon."""
    fused: bool | None = None
    """Fused kernel; default: on for CUDA, off on CPU."""


@dataclass
class SGDConfig(OptimConfig):
    momentum: float = 0.9
    """Momentum factor (0 = plain SGD)."""
    nesterov: bool = False
    """Nesterov momentum (needs momentum > 0)."""


@dataclass
class ConsoleLoggerConfig:
    progress_bar: bool = True
    """Rank-0 progress bar when stderr is a terminal; otherwise a plain line per logged step."""


@dataclass
class WandbLoggerConfig(ConsoleLoggerConfig):
    project: str = "launcher"
    """wandb project."""
    entity: str | None = None
    """wandb entity (team or user)."""
    mode: WandbMode = WandbMode.offline
    """offline by default: nothing leaves the machine; `wandb sync <run.dir>/wandb` uploads later."""
    group: str | None = None
    """wandb group, e.g. a sweep name."""
    tags: list[str] = field(default_factory=list)
    """wandb tags."""


@dataclass
class TensorBoardLoggerConfig(ConsoleLoggerConfig):
    flush_s: float = 30.0
    """Seconds between flushes of the event file to disk (also flushed at the end)."""


@dataclass
class SlurmConfig:
    """Read by `python -m launcher.slurm submit` only; training ignores it."""

    nodes: int = 1
    """Nodes; one task per node starts torchrun for that node's processes."""
    gpus_per_node: int = 8
    """GPUs requested per node (--gpus-per-node); 0 for CPU jobs."""
    nproc_per_node: int | None = None
    """Training processes per node; default gpus_per_node (1 without GPUs)."""
    cpus_per_task: int = 16
    """CPU cores per node task (data loading workers come out of these)."""
    mem: str | None = None
    """Memory per node, e.g. 200G (--mem); default: the partition's."""
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "04:00:00"
    """Wall-clock limit per job (each requeue gets a fresh one)."""
    job_name: str | None = None
    """Default launcher-<recipe>."""
    signal_lead_s: int = 120
    """Seconds before the time limit (or on preemption) that USR1 asks training to checkpoint and stop."""
    max_requeues: int = -1
    """Requeues after a signal stop (preemption, time limit); -1: no limit. A failure is never requeued."""
    rdzv_port: int | None = None
    """torchrun's c10d rendezvous port on the first node; default one per job (20000 + id % 20000, free)."""
    extra_sbatch: list[str] = field(default_factory=list)
    """More #SBATCH options, e.g. [--constraint=h100, --exclusive]."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before training, e.g. [module load cuda, source .venv/bin/activate]."""
    env: dict[str, str] = field(default_factory=dict)
    """Exported to training, e.g. +slurm.env.NCCL_DEBUG=WARN (NCCL_*, TORCH_* ...)."""


@dataclass
class Config:
    recipe: Any = MISSING
    """The recipe's own config (its `Config` dataclass)."""
    parallel: Any = MISSING
    """Parallelism strategy: `ddp`, `fsdp` or `pipeline` (and its fields)."""
    comm_hook: Any = MISSING
    """Gradient communication over the data-parallel group: `none`, `fp16`, `bf16`, `powersgd`."""
    optim: Any = MISSING
    """Optimizer and learning-rate schedule: `adamw` or `sgd`."""
    logger: Any = MISSING
    """`console`, `wandb` or `tensorboard` (rank 0 only)."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    estimate: EstimateConfig = field(default_factory=EstimateConfig)
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in run.dir (none: start fresh);
    never: start fresh; or a path to a checkpoint directory."""


# Group name -> {option schema name -> dataclass}. YAML option files pull these in by name.
GROUP_SCHEMAS: dict[str, dict[str, type]] = {
    "parallel": {"ddp": DDPConfig, "pipeline": PipelineConfig, "fsdp": FSDPConfig},
    "comm_hook": {
        "none": NoCommHookConfig,
        "fp16": FP16CommHookConfig,
        "bf16": BF16CommHookConfig,
        "powersgd": PowerSGDConfig,
    },
    "optim": {"adamw": AdamWConfig, "sgd": SGDConfig},
    "logger": {
        "console": ConsoleLoggerConfig,
        "wandb": WandbLoggerConfig,
        "tensorboard": TensorBoardLoggerConfig,
    },
}

# Groups the user picks with `group=option` on the command line.
GROUPS = ("recipe", "parallel", "comm_hook", "precision", "optim", "logger", "slurm")


def register_schemas() -> None:
    """Put the top-level schema and every option schema into Hydra's ConfigStore."""
    store = ConfigStore.instance()
    store.store(name="config_schema", node=Config)
    for group, options in GROUP_SCHEMAS.items():
        for name, schema in options.items():
            store.store(group=f"schema/{group}", name=name, node=schema)


def register_recipe_schema(name: str, config_class: type, *, as_option: bool = False) -> None:
    """Register a recipe's config dataclass.

    Built-in recipes are stored as `schema/recipe/<name>` and selected through `conf/recipe/<name>.yaml`;
    a user's recipe given by import path is stored directly as the option `recipe/<import path>`.
    """
    group = "recipe" if as_option else "schema/recipe"
    ConfigStore.instance().store(group=group, name=name, node=config_class)


# --- after training: `python -m launcher.export` / `launcher.serve` / `launcher.generate` -------------
# Not part of `Config`: these tools read a finished run directory and take their own `export.*` /
# `serve.*` overrides on their command line (launcher/after/trained.py parses them).


class Quantize(str, Enum):
    int8_dynamic = "int8_dynamic"
    none = "none"


@dataclass
class ExportConfig:
    prune_amount: float = 0.0
    """Fraction of Linear weights set to zero by L1 magnitude, in [0, 1); 0 = no pruning."""
    prune_scope: str = "global"
    """`global`: the smallest weights over all Linear layers together; `layer`: that fraction per layer."""
    quantize: Quantize = Quantize.int8_dynamic
    """`int8_dynamic`: int8 Linear weights, activations quantized per batch (torchao); `none`: fp32."""
    out: str | None = None
    """Directory of the exported model and its report; default `<run dir>/export`."""
    eval_batches: int = 0
    """Eval batches for the before/after comparison; 0 = the whole eval split."""
    batch_size: int = 64
    """Batch size of that evaluation."""
    latency_batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    """CPU latency per batch is measured at these batch sizes, before and after."""
    latency_repeats: int = 5
    """Timed repeats per batch size (the median is reported)."""


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0 for every interface)."""
    port: int = 8000
    """TCP port; 0 picks a free one (printed at start-up and written to `port_file`)."""
    port_file: str | None = None
    """Write the bound port to this file once the server accepts requests."""
    max_batch_size: int = 8
    """Requests answered by one forward pass (one generation loop for text models)."""
    max_wait_ms: float = 5.0
    """How long the first queued request waits for others to fill its batch."""
    max_new_tokens: int = 32
    """Text models: default and upper bound of a request's `max_new_tokens`."""
    max_request_bytes: int = 1_000_000
    """Larger request bodies are refused with HTTP 413."""
    device: str = "auto"
    """auto = cuda when available, else cpu."""
