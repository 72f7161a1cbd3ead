"""PowerSGD's deferred error (launcher/parallel/powersgd.py): the error buffer keeps the compensated
input and the next step forms E = M - P Q^T. Off CUDA the ops are the eager path's, so the two must
agree bit for bit, across a checkpoint (which settles the errors back into E) too."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from launcher.parallel.comm_hooks import CommHook, hook_state_dict, load_hook_state
from launcher.parallel.powersgd import BatchedPowerSGDState, powersgd_hook

SHAPES = [(48, 144), (48,), (48, 48), (192, 48), (48, 192), (48, 48)]


class Bucket:
    """What powersgd_hook reads of DDP's GradBucket."""

    def __init__(self, buffer: torch.Tensor) -> None:
        self._buffer, self._params = buffer, [torch.empty(s, device="meta") for s in SHAPES]

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def index(self) -> int:
        return 0

    def parameters(self) -> list[torch.Tensor]:
        return self._params

    def is_last(self) -> bool:
        return True


@pytest.fixture
def one_rank():
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if started:
        dist.destroy_process_group()


def state(defer: bool) -> BatchedPowerSGDState:
    return BatchedPowerSGDState(None, 4, 2, 2.0, True, True, 0.0, 7, defer_error=defer)


def saved(s: BatchedPowerSGDState) -> dict:
    """hook_state_dict, deep-copied as torch.save would (the live buffers keep changing)."""
    out = hook_state_dict(CommHook(powersgd_hook, s, 4, powersgd=s))
    return {k: {i: t.clone() for i, t in v.items()} if isinstance(v, dict) else v for k, v in out.items()}


def test_deferred_error_equals_written_error_bit_for_bit(one_rank):
    numel = sum(torch.Size(s).numel() for s in SHAPES)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(numel, generator=gen) + 0.5 for _ in range(9)]
    deferred, written = state(True), state(False)
    checkpoint = None
    for step, grad in enumerate(grads):
        if step == 5:
            checkpoint = saved(deferred)
            assert not deferred.error_holds_input[0], "saving settles the error into E"
            torch.testing.assert_close(checkpoint["error_dict"], saved(written)["error_dict"], rtol=0, atol=0)
        outs = [powersgd_hook(s, Bucket(grad.clone())).wait() for s in (deferred, written)]
        assert torch.equal(outs[0], outs[1]), f"step {step}"
        if step >= 2:  # compressing (start_iter 2): the deferred state keeps the input, the other E
            assert deferred.error_holds_input[0] and not written.error_holds_input.get(0, False)
            assert not torch.equal(deferred.error_dict[0], written.error_dict[0])
    resumed = state(True)
    load_hook_state(CommHook(powersgd_hook, resumed, 4, powersgd=resumed), checkpoint, torch.device("cpu"))
    replay = [powersgd_hook(resumed, Bucket(g.clone())).wait() for g in grads[5:]]
    again = state(False)
    for g in grads:
        last = powersgd_hook(again, Bucket(g.clone())).wait()
    assert torch.equal(replay[-1], last), "resumed from the settled checkpoint, the run continues exactly"
