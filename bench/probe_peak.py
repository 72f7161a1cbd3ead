"""What is alive at a training step's memory peak on the GPU, by the Python line that allocated it.

    python3 bench/probe_peak.py gpt_compile_mb16 lstm_fp32_ac_mb32 ...   (names from bench_memory's suites)

For each case: the launcher's own model, loss (with train.compile as `WithLoss` compiled), activation
checkpointing, optimizer and autocast, 3 steps with the allocator's history recorded (Python stacks
only), then the live blocks at the highest `allocated` moment, grouped by size and allocating line.
This is what the estimator's trace is compared with when a case disagrees (bench/RESULTS.md).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_memory import ALL_CASES  # noqa: E402
from launcher.config import cli  # noqa: E402
from launcher.parallel.with_loss import WithLoss  # noqa: E402
from launcher.recipe import block_layout, resolve_blocks  # noqa: E402
from launcher.train.activation_checkpointing import checkpoint_blocks  # noqa: E402
from launcher.train.optim import build_optimizer  # noqa: E402
from launcher.train.precision import MixedPrecision  # noqa: E402

REPO = str(Path(__file__).resolve().parent.parent)


def where(frames: list[dict]) -> str:
    """The innermost frame in the repo (or torch's autograd/optim), as file:line name."""
    for f in frames:
        name = f.get("filename", "")
        if name.startswith(REPO) or "/torch/optim/" in name or "/torch/nn/functional" in name:
            return f"{name.replace(REPO + '/', '')}:{f.get('line')} {f.get('name')}"
    return "(no Python frame: backward or a kernel's workspace)"


def peak_live(snapshot: dict) -> tuple[int, list[tuple[int, list[dict]]]]:
    live: dict[int, tuple[int, list[dict]]] = {}
    total = best = 0
    best_live: list = []
    for event in snapshot["device_traces"][0]:
        action = event["action"]
        if action == "alloc":
            live[event["addr"]] = (event["size"], event.get("frames", []))
            total += event["size"]
            if total > best:
                best, best_live = total, list(live.values())
        elif action == "free_requested" and event["addr"] in live:
            total -= live.pop(event["addr"])[0]
    return best, best_live


def run(name: str, stacks: bool = True) -> None:
    overrides = ALL_CASES[name]
    request = cli.parse_argv(list(overrides))
    cli.register_all(request.overrides)
    job = cli.compose_jobs(request, 1, cuda=True)[0]
    cfg = job.cfg
    recipe = job.recipe_class(cfg.recipe)
    device = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    if stacks:
        torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")
    else:  # no Python stacks: the LSTM case failed under them (torch._VF.lstm returned NULL, 2026-12-06)
        torch.cuda.memory._record_memory_history(max_entries=200_000, context=None)
    model = recipe.build_model()
    if cfg.train.activation_checkpointing:
        checkpoint_blocks(resolve_blocks(model, block_layout(recipe)))
    model = model.to(device)
    step_model = WithLoss(model, recipe.loss)
    if cfg.train.compile_on:
        step_model.compile()
    optimizer = build_optimizer(model.named_parameters(), cfg.optim, device)
    amp = MixedPrecision(cfg.precision, device)
    sample = recipe.train_dataset()[0]
    batch = [torch.stack([sample[i]] * cfg.train.micro_batch_size).to(device) for i in (0, 1)]
    for _ in range(3):
        with amp.autocast():
            loss = step_model(*batch)
        amp.scale(loss).backward()
        amp.unscale_(optimizer)
        amp.step(optimizer, torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    best, blocks = peak_live(snapshot)
    print(
        f"\n## {name}: max allocated {torch.cuda.max_memory_allocated() / 2**30:.3f} GiB "
        f"(replayed peak {best / 2**30:.3f}), reserved {torch.cuda.max_memory_reserved() / 2**30:.3f}"
    )
    groups: Counter = Counter()
    counts: Counter = Counter()
    for size, frames in blocks:
        key = (size, where(frames))
        groups[key] += size
        counts[key] += 1
    for (size, at), total in groups.most_common(30):
        print(f"{total / 2**20:9.1f} MiB  {counts[(size, at)]:4d} x {size / 2**20:8.2f} MiB  {at}")
    segments = Counter()  # what the reserved bytes are made of: segment size -> (count, allocated now)
    for seg in snapshot["segments"]:
        n, used = segments.get(seg["total_size"], (0, 0))
        segments[seg["total_size"]] = (n + 1, used + seg["allocated_size"])
    print("segments (size MiB: count, allocated at the end MiB):")
    for size, (n, used) in sorted(segments.items(), reverse=True)[:15]:
        print(f"  {size / 2**20:9.2f}: {n:4d}, {used / 2**20:9.1f}")
    del step_model, model, optimizer, batch


def main() -> None:
    for name in sys.argv[1:]:
        try:
            run(name)
        except Exception as err:  # noqa: BLE001 - one case must not hide the others
            print(f"\n## {name}: failed: {err!r}"[:500])
            torch.cuda.memory._record_memory_history(enabled=None)
            try:
                run(name, stacks=False)
            except Exception as again:  # noqa: BLE001
                print(f"\n## {name} without stacks: failed: {again!r}"[:500])
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
