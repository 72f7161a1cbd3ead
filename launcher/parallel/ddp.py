"""Data parallelism: a full replica per rank, gradients averaged by DDP's bucketed all-reduce."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from launcher.config.schema import Config, Precision
from launcher.launch.dist import DistSession
from launcher.parallel.comm_hooks import CommStats, build_comm_hook
from launcher.parallel.strategy import Batch
from launcher.parallel.with_loss import WithLoss
from launcher.recipe import block_layout, resolve_blocks
from launcher.train.activation_checkpointing import checkpoint_blocks
from launcher.train.fp8 import convert_to_fp8
from launcher.train.precision import MixedPrecision

log = logging.getLogger(__name__)


class DDPStrategy:
    def __init__(self, cfg: Config, recipe: Any, session: DistSession) -> None:
        self.session = session
        self.dp_rank, self.dp_size = session.rank, session.world_size
        self.shard, self.writes_shared_state = "", session.is_main
        self.model_parallel_size = 1
        self.layout_id = "parallel=ddp"
        self.sharded_checkpoint = self.eval_in_lockstep = False
        self.times_exposed_comm = True
        self.param_device = session.device
        torch.manual_seed(cfg.train.seed)  # the same init on every rank, and as in a 1-process run
        model = convert_to_fp8(
            recipe.build_model(), cfg.precision, head=getattr(block_layout(recipe), "post", None)
        )
        if cfg.train.activation_checkpointing:
            checkpoint_blocks(resolve_blocks(model, block_layout(recipe)))
        self.module = model.to(session.device)
        # Model and loss as one module: compiled together, and DDP's hooks armed by the same forward.
        self.model: torch.nn.Module = WithLoss(self.module, recipe.loss)
        if self.dp_size > 1:
            p = cfg.parallel
            # Pass broadcast_buffers only when turned off: torch 2.13 deprecates the argument (warning),
            # torch 2.11 lacks its replacement; leaving it out means "sync buffers" on both.
            extra = {} if p.broadcast_buffers else {"broadcast_buffers": False}
            self.model = DDP(
                self.model,
                device_ids=[session.device.index] if session.device.type == "cuda" else None,
                bucket_cap_mb=p.bucket_cap_mb,
                gradient_as_bucket_view=p.gradient_as_bucket_view,
                find_unused_parameters=p.find_unused_parameters,
                **extra,
            )
        fp16 = cfg.precision.dtype == Precision.fp16
        self.comm_hook = build_comm_hook(cfg.comm_hook, None, guard_overflow=fp16)
        if self.comm_hook is not None and self.dp_size == 1:
            log.warning("comm_hook has no effect with one data-parallel rank: nothing is all-reduced")
            self.comm_hook = None
        self.comm_stats = (
            CommStats(self.comm_hook, list(self.module.parameters())) if self.dp_size > 1 else None
        )
        self._buckets_pending = isinstance(self.model, DDP)
        if cfg.train.compile_on:
            # Compiling the DDP wrapper (not the inner module) lets Dynamo split graphs at bucket
            # boundaries so all-reduce still overlaps backward. In place: parameter names unchanged.
            self.model.compile()

    def forward_backward(self, micro_batches: list[Batch], amp: MixedPrecision) -> torch.Tensor:
        if self._buckets_pending:
            self._settle_buckets(micro_batches[0], amp)
        total = torch.zeros((), device=self.session.device)
        n = len(micro_batches)
        for i, (inputs, targets) in enumerate(micro_batches):
            # All micro-steps but the last skip DDP's all-reduce; the last one reduces the accumulated
            # gradient once. no_sync must cover forward *and* backward (DDP arms its hooks in forward).
            sync = i == n - 1 or not isinstance(self.model, DDP)
            with nullcontext() if sync else self.model.no_sync():
                with amp.autocast():
                    loss = self.model(inputs, targets) / n
                amp.scale(loss).backward()
            total += loss.detach()
        return total

    def _settle_buckets(self, batch: Batch, amp: MixedPrecision) -> None:
        """Give DDP its final gradient buckets before the first real step of every start.

        DDP puts all parameters in one bucket for its first backward, then rebuilds the buckets in the
        order gradients became ready. The bucket layout decides each gradient element's summation
        order across 3+ ranks, and PowerSGD keeps per-bucket state (error feedback, warm-start Q): so
        the layout must be the same in every step of every run, resumed or not. One throwaway
        forward/backward settles it, leaving nothing behind: RNG and buffers (BatchNorm statistics)
        restored, gradients dropped; the comm hook is registered only after it, so its state is
        untouched. Costs one extra step's compute and all-reduce at start.
        """
        cuda = self.session.device.type == "cuda"
        cpu_rng, cuda_rng = torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None
        buffers = [b.detach().clone() for b in self.module.buffers()]
        with amp.autocast():
            loss = self.model(batch[0], batch[1])
        loss.backward()
        self.model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, saved in zip(self.module.buffers(), buffers):
                buffer.copy_(saved)
        torch.set_rng_state(cpu_rng)
        if cuda:
            torch.cuda.set_rng_state(cuda_rng)
        if self.comm_hook is not None:
            self.model.register_comm_hook(self.comm_hook.state, self.comm_hook.hook)
        self._buckets_pending = False

    def eval_forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        # The unwrapped module: DDP's forward may broadcast buffers, a collective that would hang if
        # ranks run different numbers of eval batches.
        return self.module(inputs)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        params = [p for p in self.module.parameters() if p.grad is not None]
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return torch.nn.utils.get_total_norm([p.grad for p in params])

    def mean_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return self.session.all_reduce(loss.detach().clone(), "avg")
