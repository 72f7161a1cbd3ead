"""cuDNN RNN workspaces in the estimator against what an H100 allocated (probe and allocator history)."""

from __future__ import annotations

import pytest
import torch

from launcher.memory.cuda_kernels import _rnn_workspace_bytes


@pytest.mark.parametrize(
    ("mode", "layers", "directions", "proj", "batch", "hidden", "half", "measured_mib"),
    [
        # H100, cuDNN 9.19, 256 steps (bench/probe_memory.py rnn; the 16 x 1024 two-layer LSTM also in a
        # training run's allocator history): forward transient + returned weight buffer - input copy
        ("lstm", 2, 1, 0, 16, 1024, False, 177.25),
        ("lstm", 2, 1, 0, 32, 1024, False, 274.50),
        ("lstm", 2, 1, 0, 32, 512, False, 129.25),
        ("lstm", 1, 2, 0, 16, 1024, False, 322.00),
        ("gru", 1, 1, 0, 32, 512, False, 110.31),
        ("gru", 1, 1, 0, 16, 1024, True, 68.16),
        ("lstm", 1, 1, 512, 32, 1024, True, 125.57),
        ("rnn_tanh", 1, 1, 0, 32, 512, True, 129.19),
    ],
)
def test_rnn_workspace_matches_the_probe(mode, layers, directions, proj, batch, hidden, half, measured_mib):
    """cuDNN's workspace has a part that grows with the batch and one that does not: both are needed
    to match batch 16 and 32 alike (a flat per-element rate was 32% short at batch 16)."""
    geometry = (mode, layers, directions, hidden, proj or hidden, True)
    dtype = torch.bfloat16 if half else torch.float32
    predicted = _rnn_workspace_bytes(geometry, batch, 256, dtype) / 2**20
    assert abs(predicted / measured_mib - 1) < 0.07
