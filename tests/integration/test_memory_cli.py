"""Memory through the real CLI on CPU: the estimate command, the pre-flight refusal (with a pretended
GPU size), and an out-of-memory error raised inside a step."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, TINY_GPT, launch

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
OOM_RECIPE = "recipe=tests.integration.oom_recipe:OOMRecipe"


def estimate_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launcher.estimate", *args],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_estimate_gpt2_small_json_in_seconds():
    import torch

    from recipes.gpt import GPT, GPTModelConfig

    start = time.time()
    proc = estimate_cli("experiment=gpt2_small", "estimate.gpu=H100", "--json")
    elapsed = time.time() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    rank = out["ranks"][0]
    assert sum(rank["parts"].values()) == rank["peak_allocated"]
    with torch.device("meta"):
        model = GPT(GPTModelConfig(vocab_size=50304, seq_len=1024, d_model=768, n_layers=12, n_heads=12))
    assert rank["notes"]["parameter bytes"] == sum(-(-p.numel() * 4 // 512) * 512 for p in model.parameters())
    assert out["fits"] is True and out["gpu"] == "H100"
    assert elapsed < 60, f"gpt2_small estimate took {elapsed:.0f} s (issue: < 30 s on an idle machine)"


def test_estimate_bad_gpu_exits_2():
    bad = estimate_cli("recipe=gpt", "estimate.gpu=TPUv9")
    assert bad.returncode == 2
    assert "estimate.gpu=TPUv9" in bad.stderr and "known GPU" in bad.stderr


def test_preflight_refuse_exits_2_before_training_with_fixes(tmp_path):
    # The tiny GPT at micro-batch 64 needs ~0.047 GiB (mostly cuBLAS workspace); checkpointing or
    # halving the micro-batch brings it under the 0.042 GiB this pretends the GPU has free.
    args = [*TINY_GPT, "train.steps=2", "train.micro_batch_size=64", "memory.preflight=refuse"]
    result = launch(args, tmp_path, env={"LAUNCHER_PREFLIGHT_FREE_GIB": "0.042"}, timeout=180)
    assert result.returncode == 2, result.output[-3000:]
    assert "memory.preflight=refuse: the estimated peak memory does not fit" in result.stderr
    assert "train.activation_checkpointing=true    ->" in result.stderr  # a fix, as an override to type
    assert "train.micro_batch_size=32 train.grad_accum_steps=2    ->" in result.stderr
    assert "Traceback" not in result.output
    assert not (result.run_dir / "metrics.jsonl").exists()  # refused before training


@pytest.fixture(scope="module")
def oom_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("oom")
    tiny = [o for o in TINY_GPT[1:] if not o.startswith("checkpoint.every")]
    args = [OOM_RECIPE, *tiny, "train.steps=5", "recipe.oom_at_step=4", "checkpoint.every=2"]
    return launch(args, tmp, timeout=180)


def test_oom_in_a_step_is_explained_with_exit_4(oom_run):
    assert oom_run.returncode == 4, oom_run.output[-3000:]
    assert "rank 0 ran out of GPU memory in the forward of step 4" in oom_run.output
    assert "memory estimate:" in oom_run.output and "peak allocated" in oom_run.output
    summary = (oom_run.run_dir / "memory_summary.txt").read_text()
    assert "ran out of GPU memory" in summary and "Tried to allocate 2.00 GiB" in summary
    assert "Traceback" not in oom_run.output
    assert [m["step"] for m in oom_run.train_lines()] == [1, 2, 3]


def test_oom_leaves_checkpoints_alone(oom_run):
    ckpts = oom_run.run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_2"]
    meta = json.loads((ckpts / "step_2" / "meta.json").read_text())
    for name, digest in meta["files"].items():
        assert hashlib.sha256((ckpts / "step_2" / name).read_bytes()).hexdigest() == digest
