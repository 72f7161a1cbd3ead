"""Looking inside a run on one GPU: what the profiler shows, and what the always-on parts cost.

    python bench/bench_observe.py [--steps 120] [--pairs 2] [--quick] [--out results.json]

(a) A profiled `experiment=gpt2_small` run: the CUDA kernels of each named range (data,
    forward_backward, optimizer, log_sync, ...), counted from the rank-0 Chrome trace. A kernel belongs
    to the innermost named range whose CPU interval holds the launch that queued it (backward runs on
    autograd's thread, inside the main thread's forward_backward interval).
(b) Overhead: case A = step timing, GPU telemetry and metrics at their defaults (log every 10 steps),
    profiler off; case B = all of it off (no timing, no telemetry, one log line per half run). Run as
    interleaved pairs A B A B ... in this one invocation; throughput = tokens over the mean step time of
    the second half of each run (the same steps in both cases); medians and the ratio A/B are printed.

Each case is a real `torchrun --nproc_per_node=1 -m launcher experiment=gpt2_small` process. Expected
duration on one H100/H200: about 2.5 minutes with the defaults, 1.5 with --quick.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

BASE = [
    "experiment=gpt2_small",
    "recipe.data.max_bytes=8000000",  # the corpus only needs to outlast the steps: faster start-up
    "logger.progress_bar=false",
    "checkpoint.every=0",
]
CASE_A = ["train.log_every=10"]  # the defaults: metrics.step_timing=true, metrics.gpu_telemetry=true
CASE_B = ["metrics.step_timing=false", "metrics.gpu_telemetry=false"]  # log_every set to steps/2 below


def launch(run_dir: Path, overrides: list[str], timeout_s: float) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    cmd += ["-m", "launcher", *BASE, *overrides, f"run.dir={run_dir}"]
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    return proc.returncode, proc.stdout[-3000:] + proc.stderr[-3000:]


def train_lines(run_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [m for m in lines if "loss" in m]


# --- (a) kernels per named range ----------------------------------------------------------------


def kernels_per_range(trace_path: Path) -> tuple[Counter, int]:
    """Kernel count per innermost enclosing named range (by the CPU launch's timestamp)."""
    trace = json.loads(trace_path.read_text())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    ranges = [
        (e["ts"], e["ts"] + e.get("dur", 0), e["name"])
        for e in events
        if e.get("cat") == "user_annotation" and not e["name"].startswith("ProfilerStep")
    ]
    launches = {
        e["args"]["correlation"]: e["ts"]
        for e in events
        if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})
    }
    counts: Counter = Counter()
    kernels = [e for e in events if e.get("cat") == "kernel"]
    for kernel in kernels:
        ts = launches.get(kernel.get("args", {}).get("correlation"))
        holders = [r for r in ranges if ts is not None and r[0] <= ts <= r[1]]
        name = min(holders, key=lambda r: r[1] - r[0])[2] if holders else "(outside named ranges)"
        counts[name] += 1
    return counts, len(kernels)


def profiled_run(workdir: Path, timeout_s: float) -> dict:
    run_dir = workdir / "profiled"
    overrides = [
        "train.steps=12",
        "train.log_every=5",
        "profile.enabled=true",
        "profile.wait=3",
        "profile.warmup=2",
        "profile.active=2",
    ]
    code, output = launch(run_dir, overrides, timeout_s)
    if code != 0:
        return {"error": f"exit {code}", "output": output}
    trace = next((run_dir / "profile").glob("rank0_step*.json"))
    counts, total = kernels_per_range(trace)
    return {"trace": trace.name, "total_kernels": total, "kernels_per_range": dict(counts.most_common())}


# --- (b) overhead -------------------------------------------------------------------------------


def second_half_tokens_per_s(lines: list[dict], steps: int) -> float:
    """Tokens/s over steps (steps/2, steps]: windows are step_time_s means, weighted by their length."""
    half, prev, total_time, total_steps = steps // 2, 0, 0.0, 0
    per_step_tokens = None
    for m in lines:
        window = m["step"] - prev
        if m["step"] > half:
            total_time += m["step_time_s"] * window
            total_steps += window
            per_step_tokens = m["tokens_per_s"] * m["step_time_s"]
        prev = m["step"]
    return per_step_tokens * total_steps / total_time


def overhead(workdir: Path, steps: int, pairs: int, timeout_s: float) -> dict:
    results: dict[str, list[float]] = {"A": [], "B": []}
    telemetry_seen, timing_seen = False, False
    for i in range(pairs):
        for case, extra in (("A", CASE_A), ("B", [*CASE_B, f"train.log_every={steps // 2}"])):
            run_dir = workdir / f"{case}{i}"
            code, output = launch(run_dir, [f"train.steps={steps}", *extra], timeout_s)
            if code != 0:
                return {"error": f"case {case} pair {i}: exit {code}", "output": output}
            lines = train_lines(run_dir)
            results[case].append(second_half_tokens_per_s(lines, steps))
            if case == "A":
                telemetry_seen |= any("gpus" in m for m in lines)
                timing_seen |= any("time_forward_backward_s" in m for m in lines)
            print(f"pair {i} case {case}: {results[case][-1]:,.0f} tokens/s", flush=True)
    a, b = statistics.median(results["A"]), statistics.median(results["B"])
    return {
        "tokens_per_s": results,
        "median_A": a,
        "median_B": b,
        "ratio_A_over_B": a / b,
        "pair_ratios": [x / y for x, y in zip(results["A"], results["B"])],
        "telemetry_in_A": telemetry_seen,
        "timing_in_A": timing_seen,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=120, help="steps per overhead run (even)")
    parser.add_argument("--pairs", type=int, default=2, help="A B pairs, interleaved")
    parser.add_argument("--quick", action="store_true", help="--steps 60 --pairs 1")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="per launched run")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.pairs = 60, 1
    if not torch.cuda.is_available():
        sys.exit("bench_observe.py needs a GPU")
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        profile = profiled_run(Path(tmp), args.timeout_s)
        cost = overhead(Path(tmp), args.steps, args.pairs, args.timeout_s)
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "wall_s": round(time.time() - start, 1),
        "profile": profile,
        "overhead": cost,
    }
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    print(f"\n{results['device']}, torch {results['torch']}, {results['date']}, {results['wall_s']} s")
    print("\n(a) profiled gpt2_small (steps 6-7 recorded): CUDA kernels per named range\n")
    if "error" in profile:
        print(f"failed: {profile['error']}\n{profile['output']}")
    else:
        print(f"trace {profile['trace']}, {profile['total_kernels']} kernels\n")
        print("| range | kernels |\n| --- | --- |")
        for name, count in profile["kernels_per_range"].items():
            print(f"| {name} | {count} |")
    print(f"\n(b) overhead, {args.pairs} interleaved pairs of {args.steps} steps (second half measured)\n")
    if "error" in cost:
        print(f"failed: {cost['error']}\n{cost['output']}")
        return
    print("| case | tokens/s (each run) | median |\n| --- | --- | --- |")
    for case, label in (("A", "A: timing + telemetry + metrics (defaults)"), ("B", "B: all off")):
        runs = ", ".join(f"{x:,.0f}" for x in cost["tokens_per_s"][case])
        print(f"| {label} | {runs} | {cost[f'median_{case}']:,.0f} |")
    ratios = ", ".join(f"{r:.4f}" for r in cost["pair_ratios"])
    print(
        f"\nA/B = {cost['ratio_A_over_B']:.4f} (pairs: {ratios}); telemetry present in A: "
        f"{cost['telemetry_in_A']}; step timing present in A: {cost['timing_in_A']}"
    )


if __name__ == "__main__":
    main()
