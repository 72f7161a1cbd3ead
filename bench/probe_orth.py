# ruff: noqa: B007, B023, E501
"""Probe: what each piece of PowerSGD's per-bucket work costs on one GPU (host and device time).

python3 bench/probe_orth.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from launcher.parallel.powersgd import orthonormalize_all_  # noqa: E402

BLOCK = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]  # one GPT-2-small block's matrices


def timed(fn, reps: int = 50) -> tuple[float, float]:
    """(host us per call, device us per call)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    host = (time.perf_counter() - t0) / reps * 1e6
    torch.cuda.synchronize()
    return host, start.elapsed_time(end) / reps * 1e3


def row(name: str, fn) -> None:
    host, dev = timed(fn)
    print(f"| {name} | {host:.0f} | {dev:.0f} |", flush=True)


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__)
    print("\n| op (one bucket = one block, 4 groups) | host us | device us |\n| --- | --- | --- |")
    for r in (1, 4, 8):
        layout, start = [], 0
        for n, m in BLOCK:
            layout.append((start, 1, n, r))
            start += n * r
        memory = torch.randn(start, device="cuda")
        row(f"r{r} orthonormalize_all_ (P side)", lambda: orthonormalize_all_(memory, layout))
        wide = memory.double()
        views = [wide[s : s + c * n * r].view(c, n, r) for s, c, n, _ in layout]
        grams = torch.empty(len(views), r, r, dtype=torch.float64, device="cuda")
        row(f"r{r} to(float64)", lambda: memory.to(torch.float64))
        row(
            f"r{r} 4 fp64 gram bmm",
            lambda: [torch.bmm(w.transpose(1, 2), w, out=grams[i : i + 1]) for i, w in enumerate(views)],
        )
        row(f"r{r} 4 fp64 gram mul-sum", lambda: [(w.unsqueeze(-1) * w.unsqueeze(-2)).sum(1) for w in views])
        row(
            f"r{r} cholesky_ex (4 matrices)",
            lambda: torch.linalg.cholesky_ex(grams + torch.eye(r, device="cuda", dtype=torch.float64)),
        )
        chol = torch.linalg.cholesky_ex(grams + r * torch.eye(r, device="cuda", dtype=torch.float64))[0]
        eye = torch.eye(r, dtype=torch.float64, device="cuda").expand_as(chol)
        row(f"r{r} solve_triangular", lambda: torch.linalg.solve_triangular(chol, eye, upper=False))
        row(f"r{r} torch.linalg.inv_ex", lambda: torch.linalg.inv_ex(chol))
        row(f"r{r} 4 fp64 apply bmm", lambda: [torch.bmm(w, chol[i : i + 1]) for i, w in enumerate(views)])
        f32 = [memory[s : s + c * n * r].view(c, n, r) for s, c, n, _ in layout]
        row(f"r{r} 4 fp32 QR (torch's)", lambda: [torch.linalg.qr(p) for p in f32])
        mats = [torch.randn(1, n, m, device="cuda") for n, m in BLOCK]
        qs = [torch.randn(1, m, r, device="cuda") for n, m in BLOCK]
        ps = [torch.randn(1, n, r, device="cuda") for n, m in BLOCK]
        row(f"r{r} 4 bmm P = M Q", lambda: [torch.bmm(a, q) for a, q in zip(mats, qs)])
        row(f"r{r} 4 bmm Q = M^T P", lambda: [torch.bmm(a.transpose(1, 2), p) for a, p in zip(mats, ps)])
        row(
            f"r{r} 4 baddbmm E = M - P Q^T",
            lambda: [torch.baddbmm(a, p, q.transpose(1, 2), alpha=-1) for a, p, q in zip(mats, ps, qs)],
        )
        err = [torch.randn_like(a) for a in mats]
        row(f"r{r} 4 add_ error feedback", lambda: [a.add_(e) for a, e in zip(mats, err)])
        row(
            f"r{r} 4 bmm P Q^T into M",
            lambda: [torch.bmm(p, q.transpose(1, 2), out=a) for a, p, q in zip(mats, ps, qs)],
        )
        row(f"r{r} 4 clone (one read + write)", lambda: [a.clone() for a in mats])
        torch.backends.cuda.matmul.allow_tf32 = True
        row(f"r{r} tf32 4 bmm P = M Q", lambda: [torch.bmm(a, q) for a, q in zip(mats, qs)])
        row(f"r{r} tf32 4 bmm Q = M^T P", lambda: [torch.bmm(a.transpose(1, 2), p) for a, p in zip(mats, ps)])
        row(
            f"r{r} tf32 4 baddbmm E = M - P Q^T",
            lambda: [torch.baddbmm(a, p, q.transpose(1, 2), alpha=-1) for a, p, q in zip(mats, ps, qs)],
        )
        torch.backends.cuda.matmul.allow_tf32 = False
        b12 = [torch.randn(12, n, m, device="cuda") for n, m in BLOCK]
        q12 = [torch.randn(12, m, r, device="cuda") for n, m in BLOCK]
        p12 = [torch.randn(12, n, r, device="cuda") for n, m in BLOCK]
        row(f"r{r} 12 blocks: 4 bmm P = M Q", lambda: [torch.bmm(a, q) for a, q in zip(b12, q12)])
        row(
            f"r{r} 12 blocks: 4 bmm Q = M^T P",
            lambda: [torch.bmm(a.transpose(1, 2), p) for a, p in zip(b12, p12)],
        )
        row(
            f"r{r} 12 blocks: 4 baddbmm E = M - P Q^T",
            lambda: [torch.baddbmm(a, p, q.transpose(1, 2), alpha=-1) for a, p, q in zip(b12, p12, q12)],
        )
        row(f"r{r} 12 blocks: 4 clone", lambda: [a.clone() for a in b12])
        row(
            f"r{r} 12 blocks: (M q) as mul-sum",
            lambda: [(a.unsqueeze(-1) * q.unsqueeze(1)).sum(2) for a, q in zip(b12[:1], q12[:1])],
        )
    emb = torch.randn(1, 50304, 768, device="cuda")
    q = torch.randn(1, 768, 4, device="cuda")
    p = torch.randn(1, 50304, 4, device="cuda")
    row("embedding r4 bmm P = M Q", lambda: torch.bmm(emb, q))
    row("embedding r4 bmm Q = M^T P", lambda: torch.bmm(emb.transpose(1, 2), p))
    row("embedding r4 orthonormalize P", lambda: orthonormalize_all_(p.view(-1), [(0, 1, 50304, 4)]))
    row("embedding r4 fp32 QR P", lambda: torch.linalg.qr(p))
    row("embedding fp32 copy (154 MB)", lambda: emb.clone())
    row("embedding r4 baddbmm E = M - P Q^T", lambda: torch.baddbmm(emb, p, q.transpose(1, 2), alpha=-1))
    torch.backends.cuda.matmul.allow_tf32 = True
    row("embedding tf32 r4 bmm P = M Q", lambda: torch.bmm(emb, q))
    row("embedding tf32 r4 bmm Q = M^T P", lambda: torch.bmm(emb.transpose(1, 2), p))


if __name__ == "__main__":
    main()
