"""The on-device non-finite check: a bad step's update is never applied, and is counted when read."""

from __future__ import annotations

import torch

from launcher.train.nonfinite_guard import NonFiniteGuard


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)  # fused runs on CPU too
    guard = NonFiniteGuard(optimizer, torch.device("cpu"), loss_scaling=False)
    assert not guard.on_device  # CPU keeps the per-step host check in the loop ...
    guard.on_device = True  # ... but the device path's arithmetic is the same on CPU: test it here
    return model, optimizer, guard


def _step(model, optimizer, guard, step, poison=False):
    loss = model(torch.ones(2, 8)).pow(2).mean() * (float("nan") if poison else 1.0)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    guard.step(guard.flag(loss, grad_norm, step))
    optimizer.zero_grad(set_to_none=True)


def test_nonfinite_step_is_dropped_on_the_device_and_counted_at_drain():
    model, optimizer, guard = _setup()
    _step(model, optimizer, guard, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [optimizer.state[p]["exp_avg"].clone() for p in model.parameters()]
    steps = [optimizer.state[p]["step"].clone() for p in model.parameters()]
    _step(model, optimizer, guard, 2, poison=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights untouched
    assert all(torch.equal(m, optimizer.state[p]["exp_avg"]) for m, p in zip(moments, model.parameters()))
    assert all(torch.equal(s, optimizer.state[p]["step"]) for s, p in zip(steps, model.parameters()))
    _step(model, optimizer, guard, 3)
    _step(model, optimizer, guard, 4, poison=True)
    assert guard.drain() == (2, 2)  # two dropped steps, the first was step 2
    assert guard.drain() == (0, 0)  # read once
    after = model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert not torch.equal(after["weight"], before["weight"])  # the good step 3 was applied
    assert not hasattr(optimizer, "found_inf")  # the flag does not leak into later plain steps
