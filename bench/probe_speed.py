"""Probe (issue 20, before changing anything): where a comm hook's time goes, and what compiling the
loss with the model buys, on one GPU. Prints tables; full profiler tables go to $OUT.

    python3 bench/probe_speed.py            # ~5 min on one H200

- SDPA: which backend CUDA picks for the attention shapes the memory estimator must follow.
- Hooks on DDP over a one-rank NCCL group: step time, CUDA kernels per step, host syncs per step,
  the top kernels by device time; each hook also run on a side stream (its kernels off the backward's).
- Hand loop: `model.compile()` vs one compiled function of autocast forward + loss (compile time too).
"""

from __future__ import annotations

import os
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_speed import SHAPE, TOKENS_PER_STEP, batches, build_hand, hand_step, time_steps  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp/probe_out"))
OUT.mkdir(parents=True, exist_ok=True)


def sdpa_choices() -> None:
    names = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable", -1: "error"}
    print("\n| dtype | head dim | causal | mask | dropout | backend |\n| --- | --- | --- | --- | --- | --- |")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for hd in (64, 128):
            for causal, mask in ((True, False), (False, True), (False, False)):
                for dropout in (0.0, 0.1):
                    q = torch.randn(4, 12, 1024, hd, device="cuda", dtype=dtype, requires_grad=True)
                    m = torch.ones(1024, 1024, device="cuda", dtype=torch.bool).tril() if mask else None
                    c = torch._fused_sdp_choice(q, q, q, m, dropout, causal)
                    print(f"| {dtype} | {hd} | {causal} | {mask} | {dropout} | {names.get(c, c)} |")


def side_stream(hook):
    streams: dict = {}

    def wrapped(state, bucket):
        buf = bucket.buffer()
        side = streams.setdefault(buf.device, torch.cuda.Stream(buf.device))
        side.wait_stream(torch.cuda.current_stream(buf.device))
        with torch.cuda.stream(side):
            return hook(state, bucket)

    return wrapped


def profile_steps(step, name: str) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    syncs = [
        e
        for e in events
        if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
    ]
    memcpy = [e for e in events if e.name.startswith("cudaMemcpy") and "Async" not in e.name]
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=70)
    (OUT / f"hook_{name}.txt").write_text(table)
    return {
        "kernels_per_step": len(kernels) / 2,
        "syncs_per_step": (len(syncs) + len(memcpy)) / 2,
        "table": table,
    }


def hooks(steps: int) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from launcher.config.schema import FP16CommHookConfig, PowerSGDConfig
    from launcher.parallel.comm_hooks import build_comm_hook

    dist.init_process_group(
        "nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda:0")
    )
    x, y = batches()
    model, optimizer = build_hand(False)
    step = partial(hand_step, model, optimizer, x, y)
    plain = time_steps(step, 5, steps)
    base = profile_steps(step, "no_ddp")
    rows = [("no_ddp", plain, base)]
    model = optimizer = None
    cases = {
        "ddp": None,
        "fp16": lambda: build_comm_hook(FP16CommHookConfig(), None, False),
        "psgd_r4": lambda: build_comm_hook(PowerSGDConfig(rank=4, start_iter=2), None, False),
        "psgd_r1": lambda: build_comm_hook(PowerSGDConfig(rank=1, start_iter=2), None, False),
    }
    for name, make in cases.items():
        for on_side in (False, True) if make else (False,):
            torch.cuda.empty_cache()
            model, optimizer = build_hand(False)
            ddp = DDP(model, device_ids=[0])
            hand_step(ddp, optimizer, x, y)
            if make:
                made = make()
                ddp.register_comm_hook(made.state, side_stream(made.hook) if on_side else made.hook)
            step = partial(hand_step, ddp, optimizer, x, y)
            s = time_steps(step, 5, steps)
            label = name + ("_side" if on_side else "")
            rows.append((label, s, profile_steps(step, label)))
            ddp = model = optimizer = None
    dist.destroy_process_group()
    print(
        "\n| hook | step ms | vs no DDP | kernels/step | host syncs/step |\n| --- | --- | --- | --- | --- |"
    )
    for label, s, p in rows:
        print(
            f"| {label} | {s * 1e3:.2f} | {s / plain - 1:+.1%} | {p['kernels_per_step']:.0f} "
            f"| {p['syncs_per_step']:.0f} |"
        )
    for label, _, p in rows:
        if label.startswith("psgd_r4") or label == "fp16":
            print(f"\n### {label}\n" + "\n".join(p["table"].splitlines()[:19]))


def compiled_loss(steps: int) -> None:
    x, y = batches()
    print("\n| hand loop | first step s | tokens/s | peak GiB |\n| --- | --- | --- | --- |")
    for name in ("model_compile", "fwd_loss_compile"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch._dynamo.reset()
        model, optimizer = build_hand(name == "model_compile")
        if name == "fwd_loss_compile":

            def fwd_loss(inputs, targets, model=model):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = model(inputs)
                return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))

            compiled = torch.compile(fwd_loss)

            def step(model=model, optimizer=optimizer, compiled=compiled):
                loss = compiled(x, y)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        else:
            step = partial(hand_step, model, optimizer, x, y)
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        s = time_steps(step, 3, steps)
        print(
            f"| {name} | {first:.1f} | {TOKENS_PER_STEP / s:,.0f} "
            f"| {torch.cuda.max_memory_allocated() / 2**30:.2f} |"
        )
        model = optimizer = compiled = None


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), torch.__version__, SHAPE)
    sdpa_choices()
    hooks(20)
    compiled_loss(20)
