"""GPT throughput through the real CLI: tokens/s, MFU and peak memory per configuration, as a table.

    python bench/bench_gpt.py --steps 60 [--cases ddp1,ddp2,...] [--out results.jsonl]

Each case runs `torchrun --standalone --nproc_per_node=<gpus> -m launcher experiment=gpt2_small ...`
and reads its metrics.jsonl. Throughput is the median over logged windows after the first two
(warmup, compilation). Ratios are per-GPU throughput over the 1-GPU eager case of the same run.
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
from pathlib import Path

import torch

# name -> (GPUs, extra overrides)
CASES = {
    "1gpu": (1, []),
    "1gpu_compile": (1, ["train.compile=true"]),
    "1gpu_ac": (1, ["train.activation_checkpointing=true"]),
    "1gpu_fp16": (1, ["precision=fp16"]),
    "ddp2": (2, []),
    "ddp2_compile": (2, ["train.compile=true"]),
}


def run_case(name: str, gpus: int, extra: list[str], steps: int, workdir: Path) -> dict:
    run_dir = workdir / name
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={gpus}",
        "-m",
        "launcher",
        "experiment=gpt2_small",
        f"train.steps={steps}",
        "train.log_every=10",
        "logger.progress_bar=false",
        f"run.dir={run_dir}",
        *extra,
    ]
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    start = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        return {"case": name, "gpus": gpus, "error": f"exit {proc.returncode}"}
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if "loss" in m][2:]
    return {
        "case": name,
        "gpus": gpus,
        "overrides": extra,
        "wall_s": round(time.time() - start, 1),
        "tokens_per_s": statistics.median(m["tokens_per_s"] for m in train),
        "mfu": statistics.median(m["mfu"] for m in train) if "mfu" in train[0] else None,
        "step_time_s": statistics.median(m["step_time_s"] for m in train),
        "max_mem_allocated_gib": max(m.get("max_mem_allocated_gib", 0) for m in train),
        "final_loss": train[-1]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    gpus_here = torch.cuda.device_count()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases.split(","):
            gpus, extra = CASES[name]
            if gpus > gpus_here:
                print(f"skip {name}: needs {gpus} GPUs, {gpus_here} here", file=sys.stderr)
                continue
            results.append(run_case(name, gpus, extra, args.steps, Path(tmp)))
            print(json.dumps(results[-1]), flush=True)
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in results))
    base = next((r["tokens_per_s"] for r in results if r["case"] == "1gpu" and "error" not in r), None)
    device = torch.cuda.get_device_name() if gpus_here else "cpu"
    print(
        f"\n{device} x{gpus_here}, torch {torch.__version__}, GPT-2-small shape (163M params, untied head), "
        f"bf16, micro-batch 16 x seq 1024 per GPU, {args.steps} steps"
    )
    header = ("case", "gpus", "tokens/s", "per GPU", "vs 1 GPU", "MFU", "step s", "mem GiB")
    print("".join(f"{h:<14}" if i == 0 else f"{h:>10}" for i, h in enumerate(header)))
    for r in results:
        if "error" in r:
            print(f"{r['case']:<14}{r['gpus']:>10}  {r['error']}")
            continue
        per_gpu = r["tokens_per_s"] / r["gpus"]
        ratio = f"{per_gpu / base:.2f}" if base else "-"
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "-"
        print(
            f"{r['case']:<14}{r['gpus']:>10}{r['tokens_per_s']:>10,.0f}{per_gpu:>10,.0f}{ratio:>10}{mfu:>10}"
            f"{r['step_time_s']:>10.4f}{r['max_mem_allocated_gib']:>10.2f}"
        )


if __name__ == "__main__":
    main()
