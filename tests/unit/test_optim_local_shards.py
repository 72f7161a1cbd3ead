"""The optimizer step on DTensor parameters' local shards (train/optim.step_on_local_shards) gives the
numbers of the step through DTensor, and leaves DTensor state that saves and loads as before."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from launcher.config.schema import AdamWConfig, SGDConfig
from launcher.train.optim import build_optimizer, step_on_local_shards


@pytest.fixture(scope="module")
def mesh():
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def params(mesh, seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 8), (8,), (5, 3), (7,)]  # matrices decay, vectors don't: two param groups
    local = [torch.randn(s, generator=g) for s in shapes]
    return [torch.nn.Parameter(DTensor.from_local(t, mesh, [Shard(0)])) for t in local]


def train(mesh, cfg, local: bool, steps: int, ps=None, opt=None, g=None):
    ps = ps or params(mesh, 0)
    g = g or torch.Generator().manual_seed(1)
    if opt is None:
        opt = build_optimizer([(str(i), p) for i, p in enumerate(ps)], cfg, torch.device("cpu"))
        if local:
            step_on_local_shards(opt)
        torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)  # wraps opt.step, as the loop's does
    for _ in range(steps):
        for p in ps:
            p.grad = DTensor.from_local(torch.randn(p.shape, generator=g), mesh, [Shard(0)])
        opt.step()
    return ps, opt


@pytest.mark.parametrize(
    "cfg",
    [AdamWConfig(lr=1e-2, fused=True), AdamWConfig(lr=1e-2, fused=False), SGDConfig(lr=0.1, momentum=0.9)],
    ids=["adamw_fused", "adamw_foreach", "sgd_momentum"],
)
def test_local_step_equals_dtensor_step_and_keeps_dtensor_state(mesh, cfg):
    ref, ref_opt = train(mesh, cfg, local=False, steps=4)
    out, opt = train(mesh, cfg, local=True, steps=4)
    for a, b in zip(ref, out):
        assert isinstance(b, DTensor)
        torch.testing.assert_close(b.full_tensor(), a.full_tensor(), rtol=0, atol=0)
    for p, r in zip(out, ref):
        state = opt.state[p]
        assert state.keys() == ref_opt.state[r].keys()
        for key, value in state.items():
            if key != "step":
                assert isinstance(value, DTensor), key  # what DCP saves (and reshards on load)
    assert all(p._local_tensor.grad is None for p in out)  # the step leaves no alias behind


def test_state_saved_and_loaded_continues_like_an_uninterrupted_run(mesh):
    cfg = AdamWConfig(lr=1e-2, fused=False)
    straight, _ = train(mesh, cfg, local=True, steps=6)
    g = torch.Generator().manual_seed(1)
    ps, opt = train(mesh, cfg, local=True, steps=3, g=g)
    saved = opt.state_dict()
    fresh = build_optimizer([(str(i), p) for i, p in enumerate(ps)], cfg, torch.device("cpu"))
    step_on_local_shards(fresh)
    fresh.load_state_dict(saved)  # replaces the state tensors: the next step must use the loaded ones
    resumed, _ = train(mesh, cfg, local=True, steps=3, ps=ps, opt=fresh, g=g)
    for a, b in zip(straight, resumed):
        torch.testing.assert_close(b.full_tensor(), a.full_tensor(), rtol=0, atol=0)


def test_plain_parameters_are_left_alone():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    step = opt.step
    step_on_local_shards(opt)
    assert opt.step == step


class Replacing(torch.optim.Optimizer):
    """Replaces its state each step (new objects, not in-place updates), as some optimizers do."""

    def __init__(self, params):
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state["count"] = state.get("count", 0) + 1
                state["last_grad"] = p.grad.clone()
                p.sub_(p.grad)


def test_state_the_step_replaces_is_kept(mesh):
    ps = params(mesh, 0)
    opt = Replacing(ps)
    step_on_local_shards(opt)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in ps]
        for p, grad in zip(ps, grads):
            p.grad = DTensor.from_local(grad, mesh, [Shard(0)])
        opt.step()
    for p, grad in zip(ps, grads):
        state = opt.state[p]
        assert state["count"] == 3
        assert isinstance(state["last_grad"], DTensor)
        torch.testing.assert_close(state["last_grad"].full_tensor(), grad, rtol=0, atol=0)
