"""Correctness at 4 and 8 ranks on CPU (gloo): the layouts of the 4/8-GPU issue, compared with one process.

    python bench/cpu_world_sizes.py [--steps 50]

Every case trains the same 4-block GPT (fp32) on the same global batch of 16 sequences; the table gives
the largest relative difference of the per-step loss from the one-process run, and of the final
parameters. Exact layouts should sit near 1e-6; PowerSGD (a lossy compression) is expected to drift.
Not a speed measurement: 8 processes share 2 cores here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODEL = [
    "recipe=gpt",
    "recipe.model.d_model=32",
    "recipe.model.n_layers=4",
    "recipe.model.n_heads=2",
    "recipe.model.seq_len=32",
    "recipe.data.max_bytes=400000",
    "train.eval_every=0",
    "checkpoint.every=0",
    "train.log_every=1",
    "logger.progress_bar=false",
    "optim.lr=3e-3",
    "optim.warmup_steps=5",
]
POWERSGD = ["comm_hook=powersgd", "comm_hook.rank=4", "comm_hook.start_iter=10"]
GLOBAL_BATCH = 16

# name -> (processes, overrides); per-rank batch = GLOBAL_BATCH / data-parallel ranks
CASES = {
    "1 process": (1, ["train.micro_batch_size=16"]),
    "ddp x2": (2, ["train.micro_batch_size=8"]),
    "ddp x4": (4, ["train.micro_batch_size=4"]),
    "ddp x8": (8, ["train.micro_batch_size=2"]),
    "ddp x8 + powersgd r4": (8, ["train.micro_batch_size=2", *POWERSGD]),
    "pp2 x dp2 1f1b": (4, ["parallel=pipeline", "parallel.num_microbatches=4", "train.micro_batch_size=8"]),
    "pp2 x dp2 interleaved_1f1b": (
        4,
        [
            "parallel=pipeline",
            "parallel.schedule=interleaved_1f1b",
            "parallel.num_microbatches=4",
            "train.micro_batch_size=8",
        ],
    ),
    "pp2 x dp2 1f1b + powersgd r4": (
        4,
        ["parallel=pipeline", "parallel.num_microbatches=4", "train.micro_batch_size=8", *POWERSGD],
    ),
    "pp2 x dp2 interleaved + powersgd r4": (
        4,
        [
            "parallel=pipeline",
            "parallel.schedule=interleaved_1f1b",
            "parallel.num_microbatches=4",
            "train.micro_batch_size=8",
            *POWERSGD,
        ],
    ),
    "pp2 x dp4 1f1b": (8, ["parallel=pipeline", "parallel.num_microbatches=2", "train.micro_batch_size=4"]),
}


def run(name: str, nproc: int, overrides: list[str], steps: int, root: Path) -> dict:
    run_dir = root / name.replace(" ", "_")
    launcher = ["-m", "launcher", *MODEL, f"train.steps={steps}", *overrides, f"run.dir={run_dir}"]
    cmd = [
        sys.executable,
        *(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []),
        *launcher,
    ]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = run_dir / "checkpoints" / f"step_{steps}"
    params: dict[str, torch.Tensor] = {}
    for shard in sorted(final.glob("model*.pt")):
        params.update(torch.load(shard, weights_only=True))
    return {"losses": losses, "params": params, "wall_s": time.time() - start}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: run(name, n, o, args.steps, Path(tmp)) for name, (n, o) in CASES.items()}
    ref = results["1 process"]
    print(
        f"\nCPU/gloo, torch {torch.__version__}, {args.steps} steps, global batch {GLOBAL_BATCH}, fp32; "
        "differences relative to 1 process"
    )
    print(
        f"{'case':<38}{'ranks':>6}{'max loss diff':>15}{'final loss diff':>17}{'param diff':>12}{'wall s':>8}"
    )
    for name, (nproc, _) in CASES.items():
        r = results[name]
        loss_diffs = [abs(a - b) / abs(b) for a, b in zip(r["losses"], ref["losses"], strict=True)]
        param_diff = max(((r["params"][k] - v).norm() / v.norm()).item() for k, v in ref["params"].items())
        print(
            f"{name:<38}{nproc:>6}{max(loss_diffs):>15.2e}{loss_diffs[-1]:>17.2e}{param_diff:>12.2e}"
            f"{r['wall_s']:>8.1f}"
        )


if __name__ == "__main__":
    main()
