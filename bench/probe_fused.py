"""Where the compiled GPT-2-small step can still go faster: the hand-fused loop under variants.

    python3 bench/probe_fused.py [--variants base,cudnn,...] [--mb 16] [--steps 30]

Each variant is `bench_speed.py`'s `hand_fused` (one `torch.compile` of autocast forward + loss, fused
AdamW, clipping) with one thing changed; all in one process, `base` first and again last, so the
spread of two identical runs is on the table. Prints tokens/s and peak memory per variant.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_speed import SHAPE, build_hand, fused_step, time_steps  # noqa: E402


def sdpa_only(backend: str) -> None:
    cuda = torch.backends.cuda
    cuda.enable_flash_sdp(backend in ("flash", "all"))
    cuda.enable_mem_efficient_sdp(backend in ("efficient", "all"))
    cuda.enable_cudnn_sdp(backend in ("cudnn", "all"))
    cuda.enable_math_sdp(True)


VARIANTS = {
    "base": {},
    "cudnn": {"sdpa": "cudnn"},
    "flash": {"sdpa": "flash"},
    "coord": {"inductor": {"coordinate_descent_tuning": True}},
    "autotune": {"mode": "max-autotune-no-cudagraphs"},
    "base_again": {},
}


def run(name: str, mb: int, steps: int) -> dict:
    spec = VARIANTS[name]
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    sdpa_only(spec.get("sdpa", "all"))
    saved = {k: getattr(torch._inductor.config, k) for k in spec.get("inductor", {})}
    for k, v in spec.get("inductor", {}).items():
        setattr(torch._inductor.config, k, v)
    model, optimizer = build_hand(compile_model=False)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randint(0, SHAPE.vocab_size, (mb, SHAPE.seq_len), device="cuda", generator=g)
    y = torch.roll(x, -1, dims=1)

    def forward_and_loss(inputs, targets):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(inputs)
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))

    compiled = torch.compile(forward_and_loss, mode=spec.get("mode"))
    step = partial(fused_step, compiled, model, optimizer, x, y)
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    step_s = time_steps(step, warmup=5, steps=steps)
    for k, v in saved.items():
        setattr(torch._inductor.config, k, v)
    return {
        "variant": name,
        "mb": mb,
        "tokens_per_s": mb * SHAPE.seq_len / step_s,
        "step_ms": step_s * 1e3,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "first_step_s": first,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--mb", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    rows = []
    for name in args.variants.split(","):
        try:
            rows.append(run(name, args.mb, args.steps))
        except Exception as err:  # noqa: BLE001 - one failing variant must not end the table
            rows.append({"variant": name, "error": repr(err)[:300]})
        print(json.dumps(rows[-1]), flush=True)
    base = next((r["tokens_per_s"] for r in rows if r.get("variant") == "base" and "error" not in r), None)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, mb {args.mb}")
    print("| variant | tokens/s | vs base | step ms | peak GiB | first step s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | {r['error']} | | | | |")
            continue
        rel = f"{r['tokens_per_s'] / base:.3f}" if base else "-"
        print(
            f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {rel} | {r['step_ms']:.2f} | {r['peak_gib']:.2f} "
            f"| {r['first_step_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
