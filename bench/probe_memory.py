"""What each CUDA op allocates, for comparing with the estimator's fake-tensor trace on the CPU.

    python3 bench/probe_memory.py > probe_memory.txt
    python3 bench/probe_memory.py rnn      # GRU, tanh RNN and LSTM variants only

For a few layers of the held-out recipes (bench/memory_recipes.py) and attention variants, one
forward and backward on the GPU under a dispatch mode that records, per op: its outputs (shape,
dtype, bytes) and its transient memory (the allocator's peak during the op above what was allocated
before it plus its outputs: workspaces). Prints one line per distinct (op, outputs, transient).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.memory_recipes import ConvNetConfig, ConvNetRecipe, LSTMLayer  # noqa: E402


class OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.rows: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = func(*args, **(kwargs or {}))
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        out_bytes = sum(t.untyped_storage().nbytes() for t in outs if t.device.type == "cuda")
        transient = max(0, peak - before - out_bytes)
        desc = ",".join(f"{tuple(t.shape)}:{str(t.dtype)[6:]}" for t in outs)
        self.rows[(str(func), desc, out_bytes, transient)] += 1
        return out

    def report(self, title: str) -> None:
        print(f"\n## {title}")
        for (name, desc, nbytes, transient), n in sorted(self.rows.items(), key=lambda kv: -kv[0][3]):
            if nbytes >= 2**20 or transient >= 2**20:
                print(
                    f"{n:3d}x {name:60s} out {nbytes / 2**20:9.2f} MiB  "
                    f"transient {transient / 2**20:9.2f} MiB  {desc[:160]}"
                )


def probe(title: str, module: nn.Module, x: torch.Tensor, amp: torch.dtype | None) -> None:
    log = OpLog()
    with log:
        with torch.autocast("cuda", dtype=amp, enabled=amp is not None):
            y = module(x)
        y.float().sum().backward()
    log.report(title)
    del y


class RNNBlock(nn.Module):
    """A cuDNN recurrent module as a block, its output summed back (the shape of LSTMLayer)."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


def probe_rnns(dev: torch.device) -> None:
    """GRU, tanh RNN and LSTM variants (bidirectional, 2 layers, proj_size): cuDNN's reserve and
    workspaces per mode, at sizes that separate batch, steps and hidden."""
    kinds = {
        "gru": lambda h: nn.GRU(h, h, batch_first=True),
        "rnn_tanh": lambda h: nn.RNN(h, h, batch_first=True),
        "lstm_bidir": lambda h: nn.LSTM(h, h, batch_first=True, bidirectional=True),
        "lstm_2layers": lambda h: nn.LSTM(h, h, num_layers=2, batch_first=True),
        "lstm_proj": lambda h: nn.LSTM(h, h, batch_first=True, proj_size=h // 2),
    }
    for name, make in kinds.items():
        for amp in (torch.bfloat16, None):
            for b, t, h in ((32, 256, 1024), (16, 256, 1024), (32, 256, 512)):
                block = RNNBlock(make(h)).to(dev)
                x = torch.randn(b, t, h, device=dev, requires_grad=True)
                probe(f"{name} b {b} t {t} h {h} {amp}", block, x, amp)
                del block, x


def main() -> None:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "cudnn", torch.backends.cudnn.version())
    print("cudnn.benchmark", torch.backends.cudnn.benchmark)
    if sys.argv[1:] == ["rnn"]:
        probe_rnns(dev)
        return
    conv = ConvNetRecipe(ConvNetConfig()).build_model().to(dev)
    for amp, mb in ((torch.bfloat16, 128), (None, 64)):
        x = torch.randn(mb, 3, 64, 64, device=dev, requires_grad=True)
        probe(f"convnet mb {mb} {amp}", conv, x, amp)
    lstm = LSTMLayer(1024).to(dev)
    for amp in (torch.bfloat16, None):
        for b, t, h in ((32, 256, 1024), (16, 256, 1024), (32, 128, 1024), (32, 256, 512)):
            layer = lstm if h == 1024 else LSTMLayer(h).to(dev)
            x = torch.randn(b, t, h, device=dev, requires_grad=True)
            probe(f"lstm b {b} t {t} h {h} {amp}", layer, x, amp)
    for dtype in (torch.bfloat16, torch.float32):
        for mask, drop, causal in (
            (False, 0.0, True),
            (False, 0.1, True),
            (True, 0.0, False),
            (True, 0.1, False),
            (False, 0.1, False),
        ):
            b, h, t, d = 8, 12, 1024, 64
            q, k, v = (torch.randn(b, h, t, d, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
            m = (
                (torch.arange(t, device=dev) < t - t // 8).view(1, 1, 1, t).expand(b, 1, t, t)
                if mask
                else None
            )
            log = OpLog()
            with log:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=drop, is_causal=causal)
                y.sum().backward()
            log.report(f"sdpa {dtype} mask={mask} dropout={drop} causal={causal} (b {b} h {h} t {t} d {d})")


if __name__ == "__main__":
    main()
