"""Process groups: who we are (from torchrun's or Slurm's environment), init, and teardown.

`dist_session` is the only place that calls `init_process_group`. One device per local rank; NCCL
when CUDA is available, gloo otherwise; a timeout on every collective. A rank of a multi-process job
normally exits inside the session without tearing the group down (launcher/launch/exits.py says why); when
the process goes on (a sweep's next job), the group is destroyed under the exit deadline.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from launcher.config.schema import Backend, DistConfig
from launcher.errors import ConfigError
from launcher.launch import exits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, read from the environment before any process group exists."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None
    launched_by: str = "python"
    """torchrun, slurm (srun without torchrun) or python (a single process)."""
    run_id: str | None = None
    """torchrun's rendezvous run id (stable across its restarts), if it set a real one."""
    restart_count: int = 0
    """Which torchrun attempt this is (--max-restarts): 0 for the first."""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> DistEnv:
        """torchrun sets RANK & co.; srun alone sets SLURM_PROCID & co.; neither means one process."""
        if "RANK" in environ and "WORLD_SIZE" in environ:
            run_id = environ.get("TORCHELASTIC_RUN_ID")
            return cls(
                rank=int(environ["RANK"]),
                local_rank=int(environ.get("LOCAL_RANK", 0)),
                world_size=int(environ["WORLD_SIZE"]),
                local_world_size=int(environ.get("LOCAL_WORLD_SIZE", 1)),
                master_addr=environ.get("MASTER_ADDR"),
                master_port=int(environ["MASTER_PORT"]) if "MASTER_PORT" in environ else None,
                launched_by="torchrun",
                run_id=run_id if run_id and run_id != "none" else None,
                restart_count=int(environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
            )
        if "SLURM_PROCID" in environ and int(environ.get("SLURM_NTASKS", 1)) > 1:
            return cls(
                rank=int(environ["SLURM_PROCID"]),
                local_rank=int(environ.get("SLURM_LOCALID", 0)),
                world_size=int(environ["SLURM_NTASKS"]),
                local_world_size=int(environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]),
                master_addr=environ.get("MASTER_ADDR"),
                master_port=int(environ["MASTER_PORT"]) if "MASTER_PORT" in environ else None,
                launched_by="slurm",
            )
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class DistSession:
    """The live process group (or none, for one process) and the collectives the launcher uses.

    Every helper works unchanged with one process, so callers never branch on world size.
    """

    def __init__(
        self, env: DistEnv, device: torch.device, backend: str | None, control_group: Any = None
    ) -> None:
        self.env, self.device, self.backend = env, device, backend
        self.control_group = control_group

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    @property
    def initialized(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.initialized:
            # gloo's barrier is a collective with the timeout; NCCL needs the device named.
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", group: Any = None) -> torch.Tensor:
        """In-place all-reduce (sum, max, min or avg); identity with one process."""
        if self.initialized:
            ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
            if op == "avg":
                dist.all_reduce(tensor, dist.ReduceOp.SUM, group=group)
                tensor /= dist.get_world_size(group)
            else:
                dist.all_reduce(tensor, ops[op], group=group)
        return tensor

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.initialized:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.initialized:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def any_rank(self, *flags: bool) -> list[bool]:
        """Collective: for each flag, whether it is true on any rank. Runs on CPU (over gloo, a side
        group under NCCL), so asking every step does not synchronise the GPU."""
        if not self.initialized:
            return list(flags)
        t = torch.tensor([1.0 if f else 0.0 for f in flags])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control_group)
        return [bool(v) for v in t.tolist()]

    def all_agree(self, flag: bool) -> bool:
        """True only if `flag` is true on every rank."""
        t = torch.tensor([1 if flag else 0], device=self.device)
        return bool(self.all_reduce(t, "min").item())


def pick_device(env: DistEnv, backend: Backend) -> torch.device:
    if backend == Backend.gloo or not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if env.local_rank >= count:
        raise ConfigError(
            "nproc_per_node",
            env.local_world_size,
            f"local rank {env.local_rank} has no GPU: only {count} visible",
            f"start at most {count} processes per node (torchrun --nproc_per_node={count})",
        )
    return torch.device("cuda", env.local_rank)


def rendezvous_store(env: DistEnv, timeout: timedelta) -> dist.Store:
    """The key-value store the process group forms over, namespaced by torchrun attempt.

    torchrun restarts workers against the same agent store; without a per-attempt namespace the next
    attempt can read the failed one's keys (gloo peer addresses, pointing at dead ports) and fail with
    "connectFullMesh ... Connection refused" (seen with torch 2.13, about one restart in three).
    """
    if env.launched_by == "slurm":
        if not env.master_addr or not env.master_port:
            raise ConfigError(
                "MASTER_ADDR/MASTER_PORT",
                "unset",
                "srun without torchrun needs a rendezvous address",
                "export MASTER_ADDR=<first node> MASTER_PORT=<free port> in the sbatch script",
            )
        url = f"tcp://{env.master_addr}:{env.master_port}"
    else:
        url = "env://"
    store, _, _ = next(dist.rendezvous(url, rank=env.rank, world_size=env.world_size, timeout=timeout))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        # A store of this attempt's own (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, srun): nothing stale in it,
        # and restart counts differ between nodes when a lost node's agent comes back fresh.
        return store
    return dist.PrefixStore(f"launcher/attempt_{env.restart_count}", store)


@contextmanager
def dist_session(env: DistEnv, cfg: DistConfig, one_rank_group: bool = False) -> Iterator[DistSession]:
    """Initialise the process group (if more than one process, or `one_rank_group`: a group of one over
    an in-process store, for strategies built on a device mesh); destroy it if the process goes on."""
    device = pick_device(env, cfg.backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = None
    if env.world_size > 1 or one_rank_group:
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=cfg.timeout_s)
        kwargs: dict[str, Any] = dict(
            backend=backend,
            store=rendezvous_store(env, timeout) if env.world_size > 1 else dist.HashStore(),
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
        )
        if backend == "nccl":
            kwargs["device_id"] = device  # eager NCCL init: errors surface here, not at the first collective
        dist.init_process_group(**kwargs)
        log.info("process group up: backend=%s world_size=%d device=%s", backend, env.world_size, device)
    control = None
    if backend == "nccl":  # small control messages (stop? NaN?) stay on CPU
        control = dist.new_group(backend="gloo", timeout=timedelta(seconds=cfg.timeout_s))
    try:
        yield DistSession(env, device, backend, control)
    finally:
        if dist.is_available() and dist.is_initialized():
            exits.start_deadline(cfg.shutdown_grace_s)  # the teardown can block with the GIL held
            dist.destroy_process_group()
