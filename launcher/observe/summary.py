"""What a user wants to read at the start and the end of a run, in one line each."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from torch import nn


def model_line(model: nn.Module, model_parallel_size: int = 1) -> str:
    """'GPT: 163.0M parameters (163.0M trainable), 12 x Block, fp32 weights' for this rank's model."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    repeated = ""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module):
            repeated = f", {len(module)} x {type(module[0]).__name__}"
            break
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
    where = " on this pipeline stage" if model_parallel_size > 1 else ""
    return (
        f"{type(model).__name__}: {_count(total)} parameters{where} ({_count(trainable)} trainable)"
        f"{repeated}, {'/'.join(dtypes) or 'no'} weights"
    )


def run_summary(metrics_path: Path, wall_s: float, first_step_s: float | None = None) -> str:
    """Steps, final and best eval loss, median throughput, peak memory and wall time, from metrics.jsonl.

    The median throughput leaves out nothing but the steps' own spread; the first step of this start
    (compilation, allocator warm-up) is shown beside the wall time it is part of.
    """
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    parts = [
        f"{train[-1]['step'] if train else 0} steps",
        f"final loss {train[-1]['loss']:.4g}" if train else "",
    ]
    if evals:
        best = min(evals, key=lambda r: r["eval_loss"])
        last = evals[-1]["eval_loss"]
        parts.append(f"final eval_loss {last:.4g} (best {best['eval_loss']:.4g} at step {best['step']})")
    for unit in ("tokens_per_s", "samples_per_s"):
        values = [r[unit] for r in train if unit in r]
        if values:
            parts.append(f"median {statistics.median(values):,.0f} {unit.replace('_per_s', '/s')}")
    peaks = [r["max_mem_allocated_gib"] for r in train if "max_mem_allocated_gib" in r]
    if peaks:
        parts.append(f"peak memory {max(peaks):.2f} GiB")
    first = f" (first step {first_step_s:.1f} s of it)" if first_step_s is not None else ""
    parts.append(f"wall time {_duration(wall_s)}{first}")
    return "run summary: " + ", ".join(p for p in parts if p)


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return (
        f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
    )


def sweep_table(rows: list[tuple[list[str], int, Path | None]]) -> str:
    """A markdown table of a sweep: the overrides that vary between points, exit code, final losses."""
    varying = [k for k in dict.fromkeys(o.split("=", 1)[0] for overrides, _, _ in rows for o in overrides)]
    varying = [k for k in varying if len({_value(o, k) for o, _, _ in rows}) > 1]
    lines = ["| " + " | ".join([*varying, "exit", "loss", "eval_loss", "run dir"]) + " |"]
    lines.append("|" + " --- |" * (len(varying) + 4))
    for overrides, code, run_dir in rows:
        last = _last(run_dir)
        cells = [_value(overrides, k) for k in varying] + [
            str(code),
            last("loss"),
            last("eval_loss"),
            str(run_dir),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _value(overrides: list[str], key: str) -> str:
    return next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == key), "")


def _last(run_dir: Path | None):
    records = []
    path = run_dir / "metrics.jsonl" if run_dir else None
    if path and path.exists():
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def last(key: str) -> str:
        values = [r[key] for r in records if key in r]
        return f"{values[-1]:.4g}" if values else "-"

    return last
