# ruff: noqa: B023, E501
"""Probe: PowerSGD's Triton products against torch.bmm, and their tile sizes, on GPT-2-small's matrices.

python3 bench/probe_powersgd_kernels.py
Prints device us per product over one block's four matrices and the embedding, at rank 4, and the
bandwidth each reaches (bytes the product must move / time).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.cuda_timing import device_ms  # noqa: E402
from launcher.parallel import powersgd_kernels as k  # noqa: E402

SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072), (50304, 768)]
R = 4


def timed(fn) -> float:
    """Device us per call."""
    return device_ms(fn, reps=40) * 1e3


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    print(torch.cuda.get_device_name(), torch.__version__)
    mats = [torch.randn(1, n, m, device="cuda") for n, m in SHAPES]
    qs = [torch.randn(1, m, R, device="cuda") for _, m in SHAPES]
    ps = [torch.randn(1, n, R, device="cuda") for n, _ in SHAPES]
    errs = [torch.empty_like(a) for a in mats]
    nbytes = sum(a.numel() * 4 for a in mats)
    bmm = {
        "p": timed(lambda: [torch.bmm(a, q, out=p) for a, q, p in zip(mats, qs, ps)]),
        "q": timed(lambda: [torch.bmm(a.transpose(1, 2), p, out=q) for a, q, p in zip(mats, qs, ps)]),
        "decompress": timed(
            lambda: [
                (
                    torch.baddbmm(a, p, q.transpose(1, 2), alpha=-1, out=e),
                    torch.bmm(p, q.transpose(1, 2), out=a),
                )
                for a, q, p, e in zip(mats, qs, ps, errs)
            ]
        ),
    }
    passes = {"p": 1, "q": 1, "decompress": 3}  # decompress reads M, writes E and M
    run = {
        "p": lambda: [k.m_times_q(a, q, p) for a, q, p in zip(mats, qs, ps)],
        "q": lambda: [k.mt_times_p(a, p, q) for a, q, p in zip(mats, qs, ps)],
        "decompress": lambda: [k.decompress(a, p, q, e) for a, q, p, e in zip(mats, qs, ps, errs)],
    }
    candidates = {
        "p": [(16, 64, 4), (16, 128, 4), (32, 64, 4), (32, 128, 4), (64, 64, 4), (16, 256, 4), (32, 128, 8)],
        "q": [(32, 64, 4), (64, 64, 4), (32, 128, 4), (64, 128, 4), (128, 64, 4), (64, 128, 8)],
        "decompress": [(32, 64, 4), (64, 64, 4), (32, 128, 4), (64, 128, 4), (128, 128, 8), (16, 256, 4)],
    }
    print(f"\nrank {R}, one block's 4 matrices + the embedding, {nbytes / 2**20:.0f} MiB of fp32 gradients\n")
    print("| product | tiles (rows, cols, warps) | us | GB/s | vs bmm |\n| --- | --- | ---: | ---: | ---: |")
    default = dict(k.TILES)
    for name, tiles in candidates.items():
        print(
            f"| {name} | torch.bmm | {bmm[name]:.0f} | {passes[name] * nbytes / bmm[name] / 1e3:.0f} | 1.00 |"
        )
        for tile in tiles:
            k.TILES[name] = tile
            us = timed(run[name])
            mark = " (default)" if tile == default[name] else ""
            print(
                f"| {name} | {tile}{mark} | {us:.0f} | {passes[name] * nbytes / us / 1e3:.0f} | {bmm[name] / us:.2f} |",
                flush=True,
            )
        k.TILES[name] = default[name]


if __name__ == "__main__":
    main()
