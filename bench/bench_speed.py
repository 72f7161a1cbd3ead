"""Issue 12 on one GPU, in one run: the launcher against a hand-written loop, fp8, and comm-hook cost.

    python bench/bench_speed.py --hook-cost     # every case, ~7 min on one H100/H200
    python bench/bench_speed.py --quick --hook-cost   # fewer steps, ~5 min
    python bench/bench_speed.py --cases hand_eager,launcher_eager --hook-cost   # pick cases

Model math everywhere: GPT-2-small shape (vocab 50304, d 768, 12 layers, 12 heads, seq 1024, untied
head; recipes/gpt.py's GPT), micro-batch 16, bf16 autocast, fused AdamW (lr 6e-4, wd 0.1, clip 1.0).

- `hand_*`: a minimal loop as a user writes it from the PyTorch docs (random tokens already on the GPU,
  `F.cross_entropy` on the logits), eager and `model.compile()`; the baselines for the ratios.
- `launcher_*`: the real CLI (`python -m launcher experiment=gpt2_small ...`, one process), tokens/s as
  the median of its logged windows after the first two (warm-up and compilation not counted in them;
  the wall time column counts everything). `launcher_same_loss` turns the chunked loss off: the
  hand-written loop's exact settings, for the <= 1% overhead target.
- `fp8_compiled` against `launcher_compiled` (bf16): tokens/s and eval loss after the same steps on the
  stdlib corpus (20 eval batches at the last step).
- `--hook-cost`: DDP over a one-rank NCCL group (the all-reduce is free, what remains is the hook's
  own work): no DDP, DDP without hook, fp16, bf16, torch's PowerSGD r4, ours r4 (QR, Gram-Schmidt).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from recipes.gpt import GPT, GPTModelConfig  # noqa: E402

SHAPE = GPTModelConfig(vocab_size=50304, seq_len=1024, d_model=768, n_layers=12, n_heads=12)
MICRO_BATCH = 16
TOKENS_PER_STEP = MICRO_BATCH * SHAPE.seq_len

# name -> (overrides of `python -m launcher experiment=gpt2_small`, evaluate at the end)
LAUNCHER_CASES = {
    "launcher_same_loss": (["recipe.loss_chunk_tokens=0"], False),
    "launcher_eager": ([], False),
    "launcher_compiled": (["train.compile=true"], True),  # also the bf16 reference for fp8
    "fp8_compiled": (["train.compile=true", "precision=fp8"], True),
}
HAND_CASES = ("hand_eager", "hand_compiled")
ALL_CASES = (*HAND_CASES, *LAUNCHER_CASES)


# --- the hand-written loop -----------------------------------------------------------------------


def build_hand(compile_model: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = GPT(SHAPE).cuda()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), fused=True)
    if compile_model:
        model.compile()
    return model, optimizer


def hand_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(x)
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.view(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def time_steps(step, warmup: int, steps: int) -> float:
    """Seconds per step, after `warmup` steps (compilation, allocator, PowerSGD start)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def batches() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randint(0, SHAPE.vocab_size, (MICRO_BATCH, SHAPE.seq_len), device="cuda", generator=g)
    return x, torch.roll(x, -1, dims=1)


def run_hand(name: str, steps: int) -> dict:
    start = time.time()
    torch.cuda.reset_peak_memory_stats()
    model, optimizer = build_hand(compile_model=name == "hand_compiled")
    x, y = batches()
    step_s = time_steps(partial(hand_step, model, optimizer, x, y), warmup=5, steps=steps)
    result = {
        "case": name,
        "tokens_per_s": TOKENS_PER_STEP / step_s,
        "step_time_s": step_s,
        "max_mem_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "wall_s": time.time() - start,
    }
    model = optimizer = None  # free before the next case
    torch.cuda.empty_cache()
    return result


# --- the launcher, through its CLI ---------------------------------------------------------------


def run_launcher(name: str, steps: int, workdir: Path) -> dict:
    extra, with_eval = LAUNCHER_CASES[name]
    if with_eval:
        extra = [*extra, f"train.eval_every={steps}", "train.eval_batches=20"]
    cmd = [
        sys.executable,
        "-m",
        "launcher",
        "experiment=gpt2_small",
        f"train.steps={steps}",
        "train.log_every=10",
        "logger.progress_bar=false",
        f"run.dir={workdir / name}",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=900)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
        return {"case": name, "error": f"exit {proc.returncode}"}
    lines = [json.loads(x) for x in (workdir / name / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if "loss" in m][2:] or [m for m in lines if "loss" in m]
    evals = [m["eval_loss"] for m in lines if "eval_loss" in m]
    return {
        "case": name,
        "tokens_per_s": statistics.median(m["tokens_per_s"] for m in train),
        "step_time_s": statistics.median(m["step_time_s"] for m in train),
        "mfu": statistics.median(m["mfu"] for m in train) if "mfu" in train[0] else None,
        "max_mem_allocated_gib": max(m.get("max_mem_allocated_gib", 0) for m in train),
        "eval_loss": evals[-1] if evals else None,
        "wall_s": time.time() - start,
    }


# --- comm-hook cost on a one-rank NCCL group -------------------------------------------------------


def run_hook_cost(steps: int) -> list[dict]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from launcher.config import BF16CommHookConfig, FP16CommHookConfig, PowerSGDConfig, PowerSGDImpl
    from launcher.parallel.comm_hooks import build_comm_hook
    from launcher.parallel.powersgd import BatchedPowerSGDState, powersgd_hook

    dist.init_process_group(
        "nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda:0")
    )
    psgd = dict(rank=4, start_iter=2)
    hooks = {
        "ddp_no_hook": None,
        "fp16": lambda: build_comm_hook(FP16CommHookConfig(), None, False),
        "bf16": lambda: build_comm_hook(BF16CommHookConfig(), None, False),
        "powersgd_r4_torch": lambda: build_comm_hook(
            PowerSGDConfig(**psgd, impl=PowerSGDImpl.torch), None, False
        ),
        "powersgd_r4_ours_qr": lambda: build_comm_hook(PowerSGDConfig(**psgd), None, False),
        "powersgd_r4_ours_gram_schmidt": lambda: (
            powersgd_hook,
            BatchedPowerSGDState(None, 4, 2, 2.0, True, True, 0.0, 0, orthogonalization="gram_schmidt"),
        ),
        "powersgd_r1_ours": lambda: build_comm_hook(PowerSGDConfig(rank=1, start_iter=2), None, False),
    }
    x, y = batches()
    results = []
    model, optimizer = build_hand(compile_model=False)
    plain = time_steps(partial(hand_step, model, optimizer, x, y), warmup=5, steps=steps)
    results.append({"case": "no_ddp", "step_time_s": plain, "overhead": 0.0})
    model = optimizer = None
    for name, make in hooks.items():
        torch.cuda.empty_cache()
        model, optimizer = build_hand(compile_model=False)
        ddp = DDP(model, device_ids=[0])
        hand_step(ddp, optimizer, x, y)  # settles DDP's buckets before a stateful hook exists
        if make is not None:
            made = make()
            hook, state = (made.hook, made.state) if hasattr(made, "hook") else made
            ddp.register_comm_hook(state, hook)
        step_s = time_steps(partial(hand_step, ddp, optimizer, x, y), warmup=5, steps=steps)
        results.append({"case": name, "step_time_s": step_s, "overhead": step_s / plain - 1})
        ddp = model = optimizer = None
    dist.destroy_process_group()
    return results


# --- the table -----------------------------------------------------------------------------------


def print_tables(results: list[dict], hook_results: list[dict], steps: int) -> None:
    by = {r["case"]: r for r in results if "error" not in r}
    print(
        f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, "
        f"GPT-2-small shape, micro-batch {MICRO_BATCH}, bf16, {steps} steps per case"
    )
    if results:
        print(
            "\n| case | tokens/s | vs hand eager | vs hand compiled | MFU | peak GiB | vs hand eager mem "
            "| eval loss | wall s |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        )
    for r in results:
        if "error" in r:
            print(f"| {r['case']} | {r['error']} | | | | | | | |")
            continue

        def ratio(base: str, key: str = "tokens_per_s", r=r) -> str:
            return f"{r[key] / by[base][key]:.3f}" if base in by else "-"

        mfu = f"{r['mfu']:.3f}" if r.get("mfu") else "-"
        ev = f"{r['eval_loss']:.4f}" if r.get("eval_loss") is not None else "-"
        print(
            f"| {r['case']} | {r['tokens_per_s']:,.0f} | {ratio('hand_eager')} | {ratio('hand_compiled')} "
            f"| {mfu} | {r['max_mem_allocated_gib']:.2f} | {ratio('hand_eager', 'max_mem_allocated_gib')} "
            f"| {ev} | {r['wall_s']:.0f} |"
        )
    if "fp8_compiled" in by and "launcher_compiled" in by:
        fp8, bf16 = by["fp8_compiled"], by["launcher_compiled"]
        if fp8["eval_loss"] and bf16["eval_loss"]:
            print(
                f"\nfp8 / bf16 compiled: tokens/s x{fp8['tokens_per_s'] / bf16['tokens_per_s']:.3f}, "
                f"eval loss {fp8['eval_loss'] / bf16['eval_loss'] - 1:+.2%}"
            )
    if hook_results:
        print("\n| hook (one-rank NCCL DDP) | step ms | vs no DDP |\n| --- | --- | --- |")
        for r in hook_results:
            print(f"| {r['case']} | {r['step_time_s'] * 1e3:.1f} | {r['overhead']:+.1%} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", default=",".join(ALL_CASES), help=f"comma-separated, from {ALL_CASES}")
    parser.add_argument("--steps", type=int, default=60, help="launcher steps per case (logged every 10)")
    parser.add_argument("--hand-steps", type=int, default=30, help="timed steps of the hand-written loop")
    parser.add_argument("--quick", action="store_true", help="40 launcher / 15 timed steps")
    parser.add_argument("--hook-cost", action="store_true", help="also the one-rank DDP hook-cost table")
    parser.add_argument("--only-hook-cost", action="store_true", help="just the hook-cost table")
    parser.add_argument("--out", type=Path, help="write every result as JSON lines here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_speed.py needs a CUDA GPU")
    if args.quick:
        args.steps, args.hand_steps = 40, 15
    cases = [] if args.only_hook_cost else args.cases.split(",")
    unknown = set(cases) - set(ALL_CASES)
    if unknown:
        sys.exit(f"unknown cases {sorted(unknown)}; choose from {ALL_CASES}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in cases:
            if name in HAND_CASES:
                results.append(run_hand(name, args.hand_steps))
            else:
                results.append(run_launcher(name, args.steps, Path(tmp)))
            print(json.dumps(results[-1]), flush=True)
    hook_results = run_hook_cost(args.hand_steps) if args.hook_cost or args.only_hook_cost else []
    for r in hook_results:
        print(json.dumps(r), flush=True)
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in results + hook_results))
    print_tables(results, hook_results, args.steps)


if __name__ == "__main__":
    main()
