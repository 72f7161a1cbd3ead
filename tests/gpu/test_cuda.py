"""On a CUDA machine: NCCL process groups, bf16, fused AdamW, MFU and memory in metrics."""

from __future__ import annotations

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


def test_measured_convolution_workspace_is_what_the_allocator_gives_it():
    """gpu_workspaces measures a convolution's workspace as the allocator's requested peak beyond its
    input and output; running the same call again, the allocator's peak is input + output + that."""
    from launcher.memory.gpu_workspaces import GpuWorkspaces

    device = torch.device("cuda", torch.cuda.current_device())
    x = torch.empty(64, 64, 64, 64, device="meta")
    w = torch.empty(64, 64, 3, 3, device="meta")
    args = (x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    workspace = GpuWorkspaces(device)(torch.ops.aten.convolution.default, args)
    real_x, real_w = torch.empty_like(x, device=device), torch.empty_like(w, device=device)
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["requested_bytes.all.current"]
    torch.cuda.reset_peak_memory_stats()
    out = torch.ops.aten.convolution.default(real_x, real_w, *args[2:])
    torch.cuda.synchronize()
    peak = torch.cuda.memory_stats()["requested_bytes.all.peak"]
    assert peak - before == out.untyped_storage().nbytes() + workspace


def test_measured_lstm_workspace_is_what_a_real_lstm_takes():
    """gpu_workspaces measures cuDNN's LSTM forward workspace; a real nn.LSTM's forward peaks at what
    it keeps (output, states, reserve) plus exactly that."""
    from launcher.memory.gpu_workspaces import GpuWorkspaces, LstmShape

    device = torch.device("cuda", torch.cuda.current_device())
    batch, steps, width, hidden, layers = 16, 64, 256, 512, 2
    shape = LstmShape(width, hidden, layers, 1, batch, steps, True, True, torch.float32)
    measured = GpuWorkspaces(device).lstm(shape)
    assert measured is not None and measured[0] > 0 and measured[1] > 0
    lstm = torch.nn.LSTM(width, hidden, num_layers=layers, batch_first=True).to(device)
    x = torch.randn(batch, steps, width, device=device, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out, _ = lstm(x)
    torch.cuda.synchronize()
    stats = torch.cuda.memory_stats()
    # The workspace is freed when the kernel returns: the peak is what stays plus the workspace.
    assert stats["requested_bytes.all.peak"] - stats["requested_bytes.all.current"] == measured[0]
