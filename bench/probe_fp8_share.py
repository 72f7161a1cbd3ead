# ruff: noqa: B023, E501
"""Probe: how much of a step fp8 can speed up (issue 20 target 4), from profiles of real steps.

fp8 makes only the Linear GEMMs faster; attention, norms, the optimizer and fp8's own casts are not.
Given a bf16 step and an fp8 step of the same model, the kernels are split into GEMMs, attention and
the rest. The ceiling of fp8 with free casts is bf16_step / (bf16_step - bf16_gemm + fp8_gemm): if it
is under a target, no cast fusion can reach that target.

  python3 bench/probe_fp8_share.py traces LABEL=RUN_DIR ...   # kernel time per step by class
  python3 bench/probe_fp8_share.py gemms                      # the Linear GEMMs alone, bf16 vs fp8
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GEMM_WORDS = ("gemm", "nvjet", "xmma", "cutlass", "cublas", "splitk", "scaled_mm", "triton_tem")
ATTENTION_WORDS = ("flash", "fmha", "sdpa", "attention", "attn")


def kernel_class(name: str) -> str:
    lower = name.lower()
    if lower.startswith("triton_") and not lower.startswith("triton_tem"):
        return "other"  # Inductor's fused pointwise/reduction kernels (their names list the ops they fuse)
    if any(w in lower for w in ATTENTION_WORDS):
        return "attention"
    if any(w in lower for w in GEMM_WORDS):
        return "gemm"
    return "other"


def step_table(run_dir: Path) -> dict:
    """Kernel ms per step by class (the trace's active steps), and the loop's median step time."""
    trace = sorted((run_dir / "profile").glob("rank0_step*.json"))[-1]
    events = json.loads(trace.read_text())["traceEvents"]
    # Each step appears twice: on the CPU and as a GPU annotation; count the CPU's.
    steps = [
        e
        for e in events
        if e.get("name", "").startswith("ProfilerStep#") and e.get("cat") != "gpu_user_annotation"
    ]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    by_class, by_name = Counter(), Counter()
    for k in kernels:
        by_class[kernel_class(k["name"])] += k["dur"]
        by_name[k["name"][:150]] += k["dur"]
    n = max(len(steps), 1)
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if '"step_time_s"' in line]
    step_ms = statistics.median(m["step_time_s"] for m in metrics[3:]) * 1e3
    top = {
        c: [(name, us / n / 1e3) for name, us in by_name.most_common() if kernel_class(name) == c][:8]
        for c in ("gemm", "other")
    }
    return {
        "step_ms": step_ms,
        **{c: by_class[c] / n / 1e3 for c in ("gemm", "attention", "other")},
        "top": top,
    }


def traces(pairs: list[str]) -> None:
    rows = {label: step_table(Path(path)) for label, path in (p.split("=", 1) for p in pairs)}
    print(
        "| run | step ms (loop) | GEMM ms | attention ms | other ms | kernels ms |\n| --- | ---: | ---: | ---: | ---: | ---: |"
    )
    for label, r in rows.items():
        total = r["gemm"] + r["attention"] + r["other"]
        print(
            f"| {label} | {r['step_ms']:.1f} | {r['gemm']:.1f} | {r['attention']:.1f} | {r['other']:.1f} | {total:.1f} |"
        )
    for label, r in rows.items():
        for c in ("gemm", "other"):
            print(f"\n{label}: largest {c} kernels, ms a step")
            for name, ms in r["top"][c]:
                print(f"  {ms:7.2f}  {name}")
    for label, r in rows.items():
        if not label.endswith("_bf16") or label.replace("_bf16", "_fp8") not in rows:
            continue
        f = rows[label.replace("_bf16", "_fp8")]
        if not f["gemm"]:
            continue
        free_casts = r["step_ms"] / (r["step_ms"] - r["gemm"] + f["gemm"])
        measured = r["step_ms"] / f["step_ms"]
        print(
            f"\n{label[:-5]}: measured fp8 {measured:.3f}x; ceiling with free casts {free_casts:.3f}x "
            f"(GEMMs {r['gemm']:.1f} -> {f['gemm']:.1f} ms, {r['gemm'] / f['gemm']:.2f}x; "
            f"non-GEMM kernels {r['attention'] + r['other']:.1f} -> {f['attention'] + f['other']:.1f} ms)"
        )


def gemms() -> None:
    """Forward and both backward GEMMs of each block Linear, bf16 against tensorwise fp8 (_scaled_mm)."""
    import torch

    from bench.cuda_timing import device_ms as timed

    print(torch.cuda.get_device_name(), torch.__version__)
    print(
        "\n| d_model | tokens | bf16 ms | fp8 ms | fp8 fast-accum ms | bf16 / fp8 | bf16 / fp8 fast |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    one = torch.ones((), device="cuda")
    for d in (768, 2048, 4096):
        tokens = 8192
        totals = [0.0, 0.0, 0.0]
        for k, n in ((d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)):
            # forward (tokens x k)(k x n); grad input (tokens x n)(n x k); grad weight (n x tokens)(tokens x k)
            for m, kk, nn in ((tokens, k, n), (tokens, n, k), (n, tokens, k)):
                a = torch.randn(m, kk, device="cuda", dtype=torch.bfloat16)
                b = torch.randn(nn, kk, device="cuda", dtype=torch.bfloat16).t()
                a8 = a.to(torch.float8_e4m3fn)
                b8 = b.t().contiguous().to(torch.float8_e4m3fn).t()
                totals[0] += timed(lambda: torch.mm(a, b))
                totals[1] += timed(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16))
                totals[2] += timed(
                    lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16, use_fast_accum=True)
                )
        print(
            f"| {d} | {tokens} | {totals[0]:.2f} | {totals[1]:.2f} | {totals[2]:.2f} | {totals[0] / totals[1]:.2f} | {totals[0] / totals[2]:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    if sys.argv[1] == "traces":
        traces(sys.argv[2:])
    else:
        gemms()
