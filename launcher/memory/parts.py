"""Closed-form memory parts that tracing one step cannot see, and the CUDA constants behind them.

Every constant that depends on the GPU, the driver or torch's allocator is here, named, with where
it came from, so a measurement on new hardware corrects it in one place (bench/bench_memory.py
prints measured against predicted for exactly this purpose).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from launcher.errors import ConfigError

GIB = 2**30

# --- CUDA constants (calibrate with bench/bench_memory.py) ---------------------------------------
CUBLAS_WORKSPACE_BYTES = 32 * 2**20
"""cuBLAS workspace per handle/stream, taken from the caching allocator (so it counts in
max_memory_allocated); 32 MiB on Hopper in torch >= 2.3 (4 MiB + 8 x 16 KiB before Hopper)."""
CUBLASLT_WORKSPACE_BYTES = 2**20
"""cuBLASLt's workspace, beside the step thread's cuBLAS one (1 MiB by default)."""
TRAINING_CUBLAS_BYTES = 2 * CUBLAS_WORKSPACE_BYTES + CUBLASLT_WORKSPACE_BYTES
"""A training step's cuBLAS workspaces: each thread has its own handle, and backward runs on autograd's
device thread, so the step's thread (with cuBLASLt's) and that thread each keep one. An H100's allocator
history of a training run: 32 + 1 MiB at the first forward matmul, 32 MiB at the first backward one,
none freed."""
CUDA_CONTEXT_BYTES = int(0.6 * GIB)
"""CUDA context + cuBLAS/cuDNN handles + kernels loaded lazily: outside the caching allocator, visible
only as less free memory. ~0.5-0.7 GiB on H100/H200 with torch 2.x (CUDA_MODULE_LOADING=LAZY)."""
NCCL_BYTES = int(0.5 * GIB)
"""NCCL communicator buffers per process group with peers (outside the caching allocator)."""
RESERVED_OVERHEAD = {True: 0.03, False: 0.12}
"""Reserved / allocated - 1 (caching and fragmentation), by memory.expandable_segments."""
HEADROOM = 0.05
"""Fraction of the device an estimate leaves free before it says "fits": room for its own error."""
# torch.cuda.get_device_properties(...).total_memory, in GiB, by name.
DEVICE_GIB = {
    "H200": 139.8,
    "H100": 79.2,
    "H800": 79.2,
    "B200": 178.4,
    "A100-80GB": 79.3,
    "A100-40GB": 39.4,
    "A100": 79.3,
    "L40S": 44.4,
    "A10G": 22.1,
    "L4": 22.0,
    "V100-32GB": 31.7,
    "V100": 15.8,
}


def device_bytes(gpu: str) -> tuple[str, int]:
    """(name, total bytes) for `estimate.gpu`: a device name or a number of GiB.

    Raises:
        ConfigError: neither a known name nor a number.
    """
    text = str(gpu).strip()
    number = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(?:gib|gb|g)?", text, flags=re.IGNORECASE)
    if number:
        return f"{number.group(1)} GiB", int(float(number.group(1)) * GIB)
    upper = text.upper().replace(" ", "-")
    for name in sorted(DEVICE_GIB, key=len, reverse=True):  # A100-80GB before A100
        if name in upper:
            return name, int(DEVICE_GIB[name] * GIB)
    raise ConfigError(
        "estimate.gpu",
        gpu,
        "is neither a known GPU nor a memory size",
        f"use one of {', '.join(DEVICE_GIB)}, or a size in GiB like estimate.gpu=80",
    )


# --- data-parallel communication ---------------------------------------------------------------


def bucket_bytes(grad_numels: Iterable[int], bucket_cap_mb: float, element_size: int = 4) -> int:
    """Bytes of DDP-style gradient buckets: gradients packed into buckets of about bucket_cap_mb.

    DDP's first bucket is capped at 1 MiB; the sum is what matters here, and every byte of gradient
    is in exactly one bucket, so the total is the gradient bytes rounded up per bucket.
    """
    cap = bucket_cap_mb * 2**20
    total = current = 0
    for numel in grad_numels:
        current += numel * element_size
        if current >= cap:
            total += _round512(current)
            current = 0
    return total + _round512(current)


def powersgd_bytes(
    shapes: Iterable[tuple[int, ...]], rank: int, min_compression_rate: float, error_feedback: bool
) -> dict[str, int]:
    """PowerSGD's persistent buffers (torch's powerSGD_hook), fp32.

    Each gradient of 2+ dims is seen as a matrix n x m (first dim x the rest) and compressed when
    n * m >= (n + m) * rank * min_compression_rate: P is n x rank, Q is m x rank (kept between steps
    for warm start). Error feedback holds a copy of every bucket, i.e. of every gradient.
    """
    p = q = grads = 0
    for shape in shapes:
        numel = math.prod(shape)
        grads += numel * 4
        if len(shape) < 2:
            continue
        n, m = shape[0], numel // shape[0]
        r = min(n, m, rank)
        if n * m >= (n + m) * r * min_compression_rate:
            p += n * r * 4
            q += m * r * 4
    return {"P": _round512(p), "Q": _round512(q), "error feedback": _round512(grads) if error_feedback else 0}


def half_bucket_bytes(grad_bytes: int, bucket_cap_mb: float) -> int:
    """fp16/bf16 compression: one bucket at a time is cast to half precision for its all-reduce."""
    return _round512(min(grad_bytes, int(bucket_cap_mb * 2**20)) // 2)


# --- pipelines ---------------------------------------------------------------------------------


def in_flight_microbatches(schedule: str, pp: int, pp_rank: int, num_microbatches: int, per_rank: int) -> int:
    """Stage-microbatches whose activations rank `pp_rank` holds at once under `schedule`.

    GPipe and LoopedBFS run every forward before any backward. 1F1B warms up with pp - rank forwards.
    The interleaved and zero-bubble schedules (torch.distributed.pipelining) warm up with
    (stages_per_rank - 1) * pp + 2 * (pp - 1 - rank) forwards, plus the one in flight.
    """
    m, v = num_microbatches, per_rank
    if schedule == "gpipe":
        return m
    if schedule == "looped_bfs":
        return m * v
    if schedule == "1f1b":
        return min(m, pp - pp_rank)
    return min(m * v, (v - 1) * pp + 2 * (pp - 1 - pp_rank) + 1)


def _round512(n: int) -> int:
    return math.ceil(n / 512) * 512
