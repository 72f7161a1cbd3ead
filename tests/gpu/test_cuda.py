"""On a CUDA machine: NCCL process groups, bf16, fused AdamW, MFU and memory in metrics."""

from __future__ import annotations

import pickle

import pytest
import torch

from tests.conftest import TINY_GPT, assert_ok, launch, relative_diff

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def test_bf16_on_one_gpu_logs_mfu_and_memory(tmp_path):
    result = launch([*TINY_GPT, "train.steps=5", "precision=bf16"], tmp_path, nproc=1, env=ENV)
    assert_ok(result)
    last = result.train_lines()[-1]
    assert 0 < last["mfu"] < 1 and last["max_mem_allocated_gib"] > 0
    optimizer = torch.load(result.run_dir / "checkpoints" / "step_5" / "optimizer.pt", weights_only=True)
    assert optimizer["optimizer"]["param_groups"][0]["fused"] is True


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_ddp_matches_one_gpu_fp32(tmp_path):
    args = [*TINY_GPT, "train.steps=5", "optim.lr=3e-3", "optim.warmup_steps=2"]
    ddp = launch([*args, "train.micro_batch_size=4"], tmp_path, nproc=2, env=ENV, run_dir=tmp_path / "ddp")
    single = launch([*args, "train.micro_batch_size=8"], tmp_path, nproc=1, env=ENV, run_dir=tmp_path / "one")
    assert_ok(ddp)
    assert_ok(single)
    assert "backend=nccl" in ddp.output
    assert relative_diff(ddp.model(), single.model()) < 1e-5


def test_fsdp_one_rank_mesh_matches_one_process(tmp_path):
    """parallel=fsdp on one GPU (a one-rank NCCL mesh: all-gathers and reduce-scatters are copies)
    trains exactly as the plain model in fp32, and runs bf16 + compile + activation checkpointing."""
    args = [*TINY_GPT, "train.steps=5", "optim.lr=3e-3", "optim.warmup_steps=2", "train.micro_batch_size=8"]
    plain = launch(args, tmp_path, nproc=1, env=ENV, run_dir=tmp_path / "plain")
    sharded = launch([*args, "parallel=fsdp"], tmp_path, nproc=1, env=ENV, run_dir=tmp_path / "fsdp")
    assert_ok(plain)
    assert_ok(sharded)
    assert "backend=nccl" in sharded.output
    for a, b in zip(sharded.train_lines(), plain.train_lines(), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert relative_diff(sharded.model(), plain.model()) < 1e-5
    fast = [
        *args,
        "parallel=fsdp",
        "precision=bf16",
        "train.compile=true",
        "train.activation_checkpointing=true",
    ]
    compiled = launch(fast, tmp_path, nproc=1, env=ENV, run_dir=tmp_path / "compiled")
    assert_ok(compiled)
    assert compiled.train_lines()[-1]["loss"] == pytest.approx(plain.train_lines()[-1]["loss"], rel=3e-2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_fsdp_matches_one_gpu_fp32_and_offloads(tmp_path):
    args = [*TINY_GPT, "train.steps=5", "optim.lr=3e-3", "optim.warmup_steps=2", "parallel=fsdp"]
    sharded = launch(
        [*args, "train.micro_batch_size=4"], tmp_path, nproc=2, env=ENV, run_dir=tmp_path / "fsdp"
    )
    single = launch([*args, "train.micro_batch_size=8"], tmp_path, nproc=1, env=ENV, run_dir=tmp_path / "one")
    offload = launch(
        [*args, "train.micro_batch_size=4", "parallel.offload=true"],
        tmp_path,
        nproc=2,
        env=ENV,
        run_dir=tmp_path / "cpu",
    )
    for result in (sharded, single, offload):
        assert_ok(result)
    assert relative_diff(sharded.model(), single.model()) < 1e-5
    assert relative_diff(offload.model(), single.model()) < 1e-5


def test_history_recording_survives_a_checkpointed_cudnn_lstm(tmp_path):
    """memory.record_history on: a checkpointed cuDNN LSTM trains, and the snapshot holds its
    allocations (recording the stacks of frees made `lstm` fail inside cuDNN on torch 2.11)."""
    from torch.utils.checkpoint import checkpoint

    from launcher.config.schema import MemoryConfig
    from launcher.memory.snapshot import MemoryRecorder

    recorder = MemoryRecorder(MemoryConfig(record_history=True), tmp_path, 0, torch.device("cuda"))
    try:
        lstm = torch.nn.LSTM(256, 256, batch_first=True).cuda()
        x = torch.randn(4, 32, 256, device="cuda", requires_grad=True)
        checkpoint(lambda t: lstm(t)[0], x, use_reentrant=False).sum().backward()
        path = recorder.dump()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    snapshot = pickle.loads(path.read_bytes())
    allocs = [e for e in snapshot["device_traces"][0] if e["action"] == "alloc"]
    assert len(allocs) > 10 and all(e["frames"] for e in allocs[:5])
