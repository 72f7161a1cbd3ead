"""Issues 12 and 20 on one GPU: the launcher against a hand-written loop, fp8 by width, comm-hook cost.

    python bench/bench_speed.py --hook-cost     # the main cases and the hook table, ~6 min on one H200
    python bench/bench_speed.py --suite fp8     # fp8 against bf16 at d_model 768, 2048, 4096, ~8 min
    python bench/bench_speed.py --cases hand_eager,launcher_eager --hook-cost   # pick cases

Model math everywhere: GPT-2-small shape (vocab 50304, d 768, 12 layers, 12 heads, seq 1024, untied
head; recipes/gpt.py's GPT), micro-batch 16, bf16 autocast, fused AdamW (lr 6e-4, wd 0.1, clip 1.0).

- `hand_*`: a minimal loop as a user writes it from the PyTorch docs (random tokens already on the GPU,
  `F.cross_entropy` on the logits), eager and `model.compile()`; the baselines for the ratios.
  `hand_fused` compiles one function of autocast forward + loss: what the hardware allows.
- `launcher_*`: the real CLI (`python -m launcher experiment=gpt2_small ...`, one process), tokens/s as
  the median of its logged windows after the first two (warm-up and compilation not counted in them;
  the wall time column counts everything). `launcher_eager` is the default (plain loss since issue 20),
  `launcher_chunked` the chunked loss (`recipe.loss_chunk_tokens=4096`), `launcher_compiled` the
  compiled model + loss (`train.compile=true`). `launcher_fsdp_*`: the same with `parallel=fsdp` on a
  one-rank mesh (each block compiled, and the loss; the plain cases compile model + loss as one graph).
- `--suite fp8`: at each width, bf16 compiled against fp8 (tensorwise, rowwise) compiled: tokens/s
  and eval loss after the same steps on the stdlib corpus (20 eval batches at the last step).
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

# name -> (overrides of `python -m launcher experiment=gpt2_small ...`, evaluate at the end)
LAUNCHER_CASES = {
    "launcher_eager": (["train.compile=false"], False),
    "launcher_chunked": (["train.compile=false", "recipe.loss_chunk_tokens=4096"], False),
    "launcher_compiled": (["train.compile=true"], False),
    "launcher_compiled_mb32": (["train.compile=true", "train.micro_batch_size=32"], False),
    # The launcher picks the micro-batch (train.micro_batch_size=auto: the fastest that fits the GPU).
    "launcher_auto": (["train.compile=true", "train.micro_batch_size=auto"], False),
    # Issue 24: parallel=fsdp on a one-rank mesh (all-gathers and reduce-scatters are copies) against the
    # one-rank runs above (a one-rank DDP run is the plain model: no peers, no wrapper).
    "launcher_fsdp_eager": (["train.compile=false", "parallel=fsdp"], False),
    "launcher_fsdp_compiled": (["train.compile=true", "parallel=fsdp"], False),
    # fewer, larger units: FSDP's per-unit host work paid 12/k times (parallel.blocks_per_unit=k)
    **{
        f"launcher_fsdp_{mode}_bpu{k}": (
            [
                f"train.compile={str(mode == 'compiled').lower()}",
                "parallel=fsdp",
                f"parallel.blocks_per_unit={k}",
            ],
            False,
        )
        for mode in ("eager", "compiled")
        for k in (1, 2, 3, 4, 6)
    },
}
HAND_CASES = ("hand_eager", "hand_compiled", "hand_fused")
ALL_CASES = (*HAND_CASES, *LAUNCHER_CASES)


def _width(d: int, layers: int, heads: int, mb: int) -> list[str]:
    return [
        f"recipe.model.d_model={d}",
        f"recipe.model.n_layers={layers}",
        f"recipe.model.n_heads={heads}",
        f"train.micro_batch_size={mb}",
        "train.compile=true",
    ]


FP8 = ["precision=fp8"]
ROWWISE = [*FP8, "precision.fp8_recipe=rowwise"]
# name -> (overrides, evaluate at the end): the bf16 reference first at each width, then fp8 variants.
FP8_CASES = {
    "d768_bf16": (_width(768, 12, 12, 16), True),
    "d768_fp8_tensorwise": (_width(768, 12, 12, 16) + FP8, True),
    "d768_fp8_rowwise": (_width(768, 12, 12, 16) + ROWWISE, True),
    "d2048_bf16": (_width(2048, 8, 16, 8), True),
    "d2048_fp8_tensorwise": (_width(2048, 8, 16, 8) + FP8, True),
    "d2048_fp8_tensorwise_head": (_width(2048, 8, 16, 8) + [*FP8, "precision.fp8_head=true"], True),
    "d2048_fp8_rowwise": (_width(2048, 8, 16, 8) + ROWWISE, True),
    "d4096_bf16": (_width(4096, 4, 32, 8), True),
    "d4096_fp8_tensorwise": (_width(4096, 4, 32, 8) + FP8, True),
    "d4096_fp8_rowwise": (_width(4096, 4, 32, 8) + ROWWISE, True),
    "d4096_fp8_tensorwise_head": (_width(4096, 4, 32, 8) + [*FP8, "precision.fp8_head=true"], True),
    # twice the blocks: the bf16 head (206M parameters, a quarter of the 4-block model's GEMM FLOPs)
    # weighs half as much, as it does in deeper models
    "d4096x8_bf16": (_width(4096, 8, 32, 8), True),
    "d4096x8_fp8_tensorwise": (_width(4096, 8, 32, 8) + FP8, True),
    "d4096x8_fp8_tensorwise_head": (_width(4096, 8, 32, 8) + [*FP8, "precision.fp8_head=true"], True),
    # larger micro-batches: the optimizer step (the same ~31 ms in bf16 and fp8 at 4096 x 8) and the
    # weights' casts are paid once per more tokens
    "d4096x8_mb16_bf16": (_width(4096, 8, 32, 16), True),
    "d4096x8_mb16_fp8_tensorwise": (_width(4096, 8, 32, 16) + FP8, True),
    "d4096x8_mb16_fp8_tensorwise_head": (_width(4096, 8, 32, 16) + [*FP8, "precision.fp8_head=true"], True),
    "d2048_mb32_bf16": (_width(2048, 8, 16, 32), True),
    "d2048_mb32_fp8_tensorwise": (_width(2048, 8, 16, 32) + FP8, True),
    # GPT-3 XL's shape (d 2048, 24 blocks): the head and the per-step costs weigh as in a real model
    "d2048x24_mb16_bf16": (_width(2048, 24, 16, 16), True),
    "d2048x24_mb16_fp8_tensorwise": (_width(2048, 24, 16, 16) + FP8, True),
}

# Throughput by micro-batch and activation checkpointing (what train.micro_batch_size=auto weighs).
MB_CASES = {
    f"mb{mb}{'_ac' if ac else ''}{'' if comp else '_eager'}": (
        [
            f"train.micro_batch_size={mb}",
            f"train.activation_checkpointing={str(ac).lower()}",
            f"train.compile={str(comp).lower()}",
        ],
        False,
    )
    for mb, ac, comp in (
        (8, False, True),
        (16, False, True),
        (32, False, True),
        (64, False, True),
        (128, False, True),
        (32, True, True),
        (128, True, True),
        (16, False, False),
        (32, False, False),
        (64, True, False),
    )
}
SUITES = {"main": ALL_CASES, "fp8": tuple(FP8_CASES), "microbatch": tuple(MB_CASES)}


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


def fused_step(compiled, model: torch.nn.Module, optimizer: torch.optim.Optimizer, x, y):
    loss = compiled(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def run_hand(name: str, steps: int) -> dict:
    start = time.time()
    torch.cuda.reset_peak_memory_stats()
    torch._dynamo.reset()
    model, optimizer = build_hand(compile_model=name == "hand_compiled")
    x, y = batches()
    step = partial(hand_step, model, optimizer, x, y)
    if name == "hand_fused":

        def forward_and_loss(inputs, targets):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(inputs)
            return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))

        step = partial(fused_step, torch.compile(forward_and_loss), model, optimizer, x, y)
    first = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - first
    step_s = time_steps(step, warmup=5, steps=steps)
    result = {
        "case": name,
        "tokens_per_s": TOKENS_PER_STEP / step_s,
        "step_time_s": step_s,
        "max_mem_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "first_step_s": first_s,
        "wall_s": time.time() - start,
    }
    model = optimizer = step = None  # free before the next case
    torch.cuda.empty_cache()
    return result


# --- the launcher, through its CLI ---------------------------------------------------------------


def run_launcher(name: str, steps: int, workdir: Path, cases: dict = LAUNCHER_CASES) -> dict:
    extra, with_eval = cases[name]
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
    # The repo first, and whatever the caller had (wheels installed with pip --target, say) after it.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    start = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=900)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
        return {"case": name, "error": f"exit {proc.returncode}"}
    lines = [json.loads(x) for x in (workdir / name / "metrics.jsonl").read_text().splitlines()]
    logged = [m for m in lines if "loss" in m]
    if len(logged) < 3:
        raise SystemExit(f"{name}: {len(logged)} logged windows; use --steps >= 30 (two are warm-up)")
    train = logged[2:]
    evals = [m["eval_loss"] for m in lines if "eval_loss" in m]
    return {
        "case": name,
        "tokens_per_s": statistics.median(m["tokens_per_s"] for m in train),
        "step_time_s": statistics.median(m["step_time_s"] for m in train),
        "mfu": statistics.median(m["mfu"] for m in train) if "mfu" in train[0] else None,
        "max_mem_allocated_gib": max(m.get("max_mem_allocated_gib", 0) for m in train),
        "eval_loss": evals[-1] if evals else None,
        "first_step_s": _first_step_s(proc.stderr + proc.stdout),
        "wall_s": time.time() - start,
    }


def _first_step_s(log: str) -> float | None:
    """The launcher's own line: 'first step took 14.6 s: torch.compile compiled the model and loss'."""
    for line in log.splitlines():
        if "first step took" in line:
            return float(line.split("first step took", 1)[1].split()[0])
    return None


# --- comm-hook cost on a one-rank NCCL group -------------------------------------------------------


def check_grads_match_plain(ddp, optimizer, x, y, name: str) -> None:
    """One backward under no_sync (no hook) against one through the hook: the largest relative difference."""

    def grads() -> list[torch.Tensor]:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = ddp(x)
        F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.view(-1)).backward()
        return [p.grad.detach().clone() for p in ddp.parameters()]

    with ddp.no_sync():
        plain = grads()
    hooked = grads()
    optimizer.zero_grad(set_to_none=True)
    worst = max(((h - p).norm() / p.norm().clamp_min(1e-30)).item() for h, p in zip(hooked, plain))
    print(f"{name}: hooked grads vs plain, largest relative norm difference {worst:.2e}", file=sys.stderr)


def profile_hook(name: str, step, steps: int) -> None:
    """Kernels per step and GPU time per step by kernel (stderr): where a hook's cost goes."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in events) / steps / 1e3
    print(
        f"\n## profile {name}: {len(events) / steps:.0f} kernels/step, {busy:.1f} ms GPU/step",
        file=sys.stderr,
    )
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60)
    print(table, file=sys.stderr)
    cpu = prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60)
    print(cpu, file=sys.stderr)
    trace_dir = os.environ.get("HOOK_TRACE_DIR")
    if trace_dir:  # the timeline (streams, gaps), gzipped: bench/RESULTS.md reads it
        Path(trace_dir).mkdir(parents=True, exist_ok=True)
        plain = Path(trace_dir) / f"{name}.json"
        prof.export_chrome_trace(str(plain))
        subprocess.run(["gzip", "-f", str(plain)], check=True)


def run_hook_cost(
    steps: int, only: list[str] | None = None, profile_steps: int = 0, rounds: int = 1
) -> list[dict]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from launcher.config.schema import (
        BF16CommHookConfig,
        DDPConfig,
        FP16CommHookConfig,
        PowerSGDConfig,
        PowerSGDImpl,
    )
    from launcher.parallel.comm_hooks import build_comm_hook
    from launcher.parallel.powersgd import BatchedPowerSGDState, powersgd_hook

    dist.init_process_group(
        "nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda:0")
    )
    psgd = dict(rank=4, start_iter=2)

    def ours(
        rank: int,
        orthogonalization: str = "auto",
        graphs: bool = True,
        kernels: bool = True,
        fuse: bool = True,
    ):
        return lambda: (
            powersgd_hook,
            BatchedPowerSGDState(
                None,
                rank,
                2,
                2.0,
                True,
                True,
                0.0,
                0,
                orthogonalization=orthogonalization,
                cuda_graphs=graphs,
                triton_kernels=kernels,
                fuse_error_add=fuse,
            ),
        )

    hooks = {
        "ddp_no_hook": None,
        "fp16": lambda: build_comm_hook(FP16CommHookConfig(), None, False),
        # DDP's C++ fp16 hook: no Python callback per bucket (is the host side what costs?)
        "fp16_builtin": "builtin",
        "bf16": lambda: build_comm_hook(BF16CommHookConfig(), None, False),
        "powersgd_r4_torch": lambda: build_comm_hook(
            PowerSGDConfig(**psgd, impl=PowerSGDImpl.torch), None, False
        ),
        "powersgd_r4_ours": lambda: build_comm_hook(PowerSGDConfig(**psgd), None, False),
        "powersgd_r4_ours_no_graphs": ours(4, graphs=False),
        # the products by torch.bmm (cuBLAS skinny GEMMs) instead of the one-pass Triton kernels
        "powersgd_r4_ours_bmm": ours(4, kernels=False),
        # the error added to the input in a pass of its own, not inside P's kernel (8 passes a step, not 7)
        "powersgd_r4_ours_add_apart": ours(4, fuse=False),
        "powersgd_r4_ours_qr_no_graphs": ours(4, "qr", graphs=False),
        # fewer, larger buckets: each bucket orthonormalises its P and Q once (~0.34 ms of small kernels)
        "ddp_no_hook_b100": None,
        "powersgd_r4_ours_b100": lambda: build_comm_hook(PowerSGDConfig(**psgd), None, False),
        "powersgd_r1_ours": ours(1),
        "powersgd_r8_ours": ours(8),
    }
    x, y = batches()
    rounds_ms: dict[str, list[float]] = {}
    failed: set[str] = set()
    for _ in range(rounds):  # interleaved: drift on the machine hits every case alike
        model, optimizer = build_hand(compile_model=False)
        plain = time_steps(partial(hand_step, model, optimizer, x, y), warmup=5, steps=steps)
        rounds_ms.setdefault("no_ddp", []).append(plain)
        model = optimizer = None
        for name, make in hooks.items():
            if (only is not None and name not in only) or name in failed:
                continue
            try:
                torch.cuda.empty_cache()
                model, optimizer = build_hand(compile_model=False)
                # DDP as the launcher builds it (launcher/parallel/ddp.py): gradients are views into the
                # buckets, so DDP copies nothing in or out of them. torch's default (no views) adds two
                # passes over the gradients to every case here, with or without a hook.
                ddp_cfg = DDPConfig()
                ddp = DDP(
                    model,
                    device_ids=[0],
                    bucket_cap_mb=100.0 if name.endswith("_b100") else ddp_cfg.bucket_cap_mb,
                    gradient_as_bucket_view=ddp_cfg.gradient_as_bucket_view,
                )
                hand_step(ddp, optimizer, x, y)  # settles DDP's buckets before a stateful hook exists
                if make == "builtin":
                    ddp._register_builtin_comm_hook(dist.BuiltinCommHookType.FP16_COMPRESS)
                elif make is not None:
                    made = make()
                    hook, state = (made.hook, made.state) if hasattr(made, "hook") else made
                    ddp.register_comm_hook(state, hook)
                check_grads_match_plain(ddp, optimizer, x, y, name)
                step_s = time_steps(partial(hand_step, ddp, optimizer, x, y), warmup=5, steps=steps)
                rounds_ms.setdefault(name, []).append(step_s)
                if profile_steps:
                    profile_hook(name, partial(hand_step, ddp, optimizer, x, y), profile_steps)
                ddp = model = optimizer = None
            except Exception as err:  # noqa: BLE001 - one failing case must not cost the others
                print(f"{name}: failed: {err!r}", file=sys.stderr)
                failed.add(name)
                ddp = model = optimizer = None
    plain = statistics.median(rounds_ms["no_ddp"])
    results = []
    for name, times in rounds_ms.items():  # each case's median round against the plain loop's median
        step_s = statistics.median(times)
        result = {"case": name, "step_time_s": step_s, "overhead": step_s / plain - 1}
        if rounds > 1:
            result["rounds_overhead"] = [round(t / p - 1, 4) for t, p in zip(times, rounds_ms["no_ddp"])]
        results.append(result)
    agreement = (
        (True, False, "graphs_vs_eager"),
        (False, False, "eager_vs_eager"),
        (True, True, "graphs_vs_graphs"),
    )
    for a, b, label in agreement if only is None else ():  # --hooks picks cases: these take a minute
        diff = graphs_agree_with_eager(x, y, ours(4, graphs=a), ours(4, graphs=b))
        results.append({**diff, "case": f"{label}_max_rel_param_diff"})
    dist.destroy_process_group()
    return results


def graphs_agree_with_eager(x, y, graphed, eager, steps: int = 6) -> dict:
    """The same 6 training steps with the hook's CUDA graphs and without: largest parameter difference."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    params = []
    for make in (graphed, eager):
        model, optimizer = build_hand(compile_model=False)
        ddp = DDP(model, device_ids=[0])
        hand_step(ddp, optimizer, x, y)
        ddp.register_comm_hook(*reversed(make()))
        for _ in range(steps):
            hand_step(ddp, optimizer, x, y)
        params.append([p.detach().clone() for p in model.parameters()])
        ddp = model = optimizer = None
    diff = max(((a - b).norm() / b.norm().clamp_min(1e-12)).item() for a, b in zip(*params))
    return {"case": "graphs_vs_eager_max_rel_param_diff", "value": diff, "step_time_s": 0.0, "overhead": 0.0}


# --- the table -----------------------------------------------------------------------------------


def print_tables(results: list[dict], hook_results: list[dict], steps: int) -> None:
    by = {r["case"]: r for r in results if "error" not in r}
    print(
        f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, "
        f"bf16 autocast, {steps} launcher steps per case"
    )
    for r in results:
        if "runs_tokens_per_s" in r:
            print(f"{r['case']}: median of runs {r['runs_tokens_per_s']} tokens/s")
    main = [r for r in results if r["case"] in ALL_CASES]
    if main:
        print(
            f"\nGPT-2-small shape, micro-batch {MICRO_BATCH} unless named\n\n"
            "| case | tokens/s | vs hand eager "
            "| vs hand compiled | vs hand fused | peak GiB | mem vs hand compiled | first step s | wall s |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        )
    for r in main:
        if "error" in r:
            print(f"| {r['case']} | {r['error']} | | | | | | | |")
            continue

        def ratio(base: str, key: str = "tokens_per_s", r=r) -> str:
            return f"{r[key] / by[base][key]:.3f}" if base in by else "-"

        first = f"{r['first_step_s']:.1f}" if r.get("first_step_s") else "-"
        print(
            f"| {r['case']} | {r['tokens_per_s']:,.0f} | {ratio('hand_eager')} | {ratio('hand_compiled')} "
            f"| {ratio('hand_fused')} | {r['max_mem_allocated_gib']:.2f} "
            f"| {ratio('hand_compiled', 'max_mem_allocated_gib')} | {first} | {r['wall_s']:.0f} |"
        )
    mb = [r for r in results if r["case"] in MB_CASES and "error" not in r]
    if mb:
        best = max(r["tokens_per_s"] for r in mb)
        print("\n| micro-batch case | tokens/s | vs best | peak GiB |\n| --- | --- | --- | --- |")
        for r in mb:
            print(
                f"| {r['case']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / best:.3f} "
                f"| {r['max_mem_allocated_gib']:.2f} |"
            )
    fp8 = [r for r in results if r["case"] in FP8_CASES]
    if fp8:
        print(
            "\n| width case | tokens/s | vs bf16 | peak GiB | eval loss | vs bf16 loss | first step s |\n"
            "| --- | --- | --- | --- | --- | --- | --- |"
        )
    for r in fp8:
        if "error" in r:
            print(f"| {r['case']} | {r['error']} | | | | | |")
            continue
        ref = by.get(r["case"].split("_fp8")[0].removesuffix("_bf16") + "_bf16")  # same shape, bf16
        speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.3f}" if ref else "-"
        loss = f"{r['eval_loss'] / ref['eval_loss'] - 1:+.2%}" if ref and r.get("eval_loss") else "-"
        ev = f"{r['eval_loss']:.4f}" if r.get("eval_loss") is not None else "-"
        first = f"{r['first_step_s']:.1f}" if r.get("first_step_s") else "-"
        print(
            f"| {r['case']} | {r['tokens_per_s']:,.0f} | {speed} | {r['max_mem_allocated_gib']:.2f} | {ev} "
            f"| {loss} | {first} |"
        )
    if hook_results:
        print("\n| hook (one-rank NCCL DDP) | step ms | vs no DDP | each round |\n| --- | --- | --- | --- |")
        for r in hook_results:
            if "value" in r:
                print(f"\n{r['case']}: {r['value']:.2e}")
            else:
                each = " ".join(f"{o:+.1%}" for o in r.get("rounds_overhead", []))
                print(f"| {r['case']} | {r['step_time_s'] * 1e3:.1f} | {r['overhead']:+.1%} | {each} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--suite", choices=SUITES, default="main", help="main cases, fp8 by width, or micro-batch sizes"
    )
    parser.add_argument("--cases", help=f"comma-separated, from {ALL_CASES} or {tuple(FP8_CASES)}")
    parser.add_argument("--steps", type=int, default=60, help="launcher steps per case (logged every 10)")
    parser.add_argument("--hand-steps", type=int, default=30, help="timed steps of the hand-written loop")
    parser.add_argument("--quick", action="store_true", help="40 launcher / 15 timed steps")
    parser.add_argument("--hook-cost", action="store_true", help="also the one-rank DDP hook-cost table")
    parser.add_argument("--only-hook-cost", action="store_true", help="just the hook-cost table")
    parser.add_argument("--hooks", help="comma-separated subset of the hook-cost cases")
    parser.add_argument(
        "--profile-hooks", type=int, default=0, help="profile N steps of each hook case (stderr)"
    )
    parser.add_argument("--out", type=Path, help="write every result as JSON lines here")
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds over the cases; the tables show each case's median run"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_speed.py needs a CUDA GPU")
    if args.quick:
        args.steps, args.hand_steps = 40, 15
    default = SUITES[args.suite]
    cases = [] if args.only_hook_cost else (args.cases.split(",") if args.cases else list(default))
    known = {c for suite in SUITES.values() for c in suite}
    if set(cases) - known:
        sys.exit(f"unknown cases {sorted(set(cases) - known)}; choose from {SUITES}")
    runs: dict[str, list[dict]] = {name: [] for name in cases}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeat):  # rounds over all cases: drift between calls hits each case alike
            workdir = Path(tmp) / f"round{r}"
            for name in cases:
                if name in HAND_CASES:
                    result = run_hand(name, args.hand_steps)
                else:
                    table = next((t for t in (FP8_CASES, MB_CASES) if name in t), LAUNCHER_CASES)
                    result = run_launcher(name, args.steps, workdir, table)
                runs[name].append(result)
                print(json.dumps(result), flush=True)
    results = [_median_run(rs) for rs in runs.values()]
    only = args.hooks.split(",") if args.hooks else None
    hook_results = (
        run_hook_cost(args.hand_steps, only, args.profile_hooks, args.repeat)
        if args.hook_cost or args.only_hook_cost
        else []
    )
    for r in hook_results:
        print(json.dumps(r), flush=True)
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in results + hook_results))
    print_tables(results, hook_results, args.steps)


def _median_run(rs: list[dict]) -> dict:
    """The run with the median tokens/s (the lower middle of an even count), with every run's listed."""
    ok = sorted((r for r in rs if "tokens_per_s" in r), key=lambda r: r["tokens_per_s"])
    if not ok:
        return rs[-1]
    median = dict(ok[(len(ok) - 1) // 2])
    if len(rs) > 1:
        median["runs_tokens_per_s"] = [round(r["tokens_per_s"]) for r in ok]
    return median


if __name__ == "__main__":
    main()
