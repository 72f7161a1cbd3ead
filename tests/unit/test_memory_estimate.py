"""The memory estimator on CPU: every recipe x layout x precision x comm hook, parts that add up,
states equal to the bytes of real tensors, and the effects each knob must have."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from launcher.config import cli
from launcher.config.schema import GROUP_SCHEMAS, PipelineSchedule, Precision
from launcher.memory import parts as closed
from launcher.memory.estimate import estimate
from launcher.train.optim import build_optimizer

TINY = [
    "recipe=gpt",
    "recipe.model.d_model=16",
    "recipe.model.n_layers=4",
    "recipe.model.n_heads=2",
    "recipe.model.seq_len=16",
    "recipe.data.max_bytes=50000",
    "train.micro_batch_size=4",
]
SCHEDULES = ["gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "interleaved_zero_bubble", "zbv_zero_bubble"]
PIPE = ["parallel=pipeline", "parallel.num_microbatches=4"]
LAYOUTS = {
    "one process": ([], 1),
    "ddp": ([], 2),
    **{f"pipeline {s}": ([*PIPE, f"parallel.schedule={s}"], 2) for s in SCHEDULES},
    "pp x dp": (PIPE, 4),
}
HOOKS = ["none", "fp16", "bf16", "powersgd"]
PRECISIONS = ["fp32", "bf16", "fp16"]


def compose(overrides: list[str], world_size: int = 1):
    request = cli.parse_argv(overrides)
    cli.register_all(request.overrides)
    return cli.compose_jobs(request, world_size)[0]


def round512(n: int) -> int:
    return math.ceil(n / 512) * 512


@pytest.mark.parametrize(
    "recipe, layout",
    [("gpt", name) for name in LAYOUTS] + [("digits", "one process"), ("digits", "ddp")],
)
def test_every_layout_precision_and_hook_adds_up(recipe, layout):
    base = TINY if recipe == "gpt" else ["recipe=digits", "train.micro_batch_size=16"]
    extra, world_size = LAYOUTS[layout]
    job = compose([*base, *extra], world_size)  # composing is slow: vary the composed config instead
    for precision in PRECISIONS:
        for hook in HOOKS:
            job.cfg.precision.dtype = Precision(precision)
            job.cfg.comm_hook = GROUP_SCHEMAS["comm_hook"][hook]()
            est = estimate(job.cfg, job.recipe_class, world_size, "H100")
            pp = job.cfg.parallel.pp if layout.startswith("p") else 1
            assert len(est.ranks) == pp
            for rank in est.ranks:
                assert sum(rank.parts.values()) == rank.peak_allocated
                assert all(v >= 0 for v in rank.parts.values()), rank.parts
                assert rank.parts["parameters"] > 0 and rank.parts["optimizer state"] > 0
                assert rank.peak_allocated < rank.peak_reserved < rank.device_needed
                dp = world_size // pp
                hook_parts = {k for k in rank.parts if "PowerSGD" in k or "comm hook" in k}
                if dp == 1 or hook == "none":
                    assert not hook_parts
                elif hook == "powersgd":
                    # error feedback: one fp32 copy of every gradient this rank reduces (parameters are
                    # rounded to 512 bytes each, the error-feedback buffer once)
                    assert 0 <= rank.parts["parameters"] - rank.parts["PowerSGD error feedback"] < 512 * 64
                    assert rank.parts["PowerSGD P"] > 0 and rank.parts["PowerSGD Q"] > 0
                else:
                    assert rank.parts["comm hook half-precision bucket"] > 0
            if layout == "ddp":  # every gradient byte in exactly one bucket, rounded per bucket
                with torch.device("meta"):
                    grad_bytes = sum(
                        p.numel() * 4 for p in job.recipe_class(job.cfg.recipe).build_model().parameters()
                    )
                assert grad_bytes <= est.ranks[0].parts["DDP gradient buckets"] < grad_bytes + 512 * 4


@pytest.mark.parametrize("optim", ["adamw", "sgd"])
def test_states_equal_the_bytes_of_real_tensors(optim):
    job = compose([*TINY, f"optim={optim}"])
    est = estimate(job.cfg, job.recipe_class, 1, "H100")
    torch.manual_seed(0)
    recipe = job.recipe_class(job.cfg.recipe)
    model = recipe.build_model()
    optimizer = build_optimizer(model.named_parameters(), job.cfg.optim, torch.device("cpu"))
    inputs, targets = (torch.stack(t) for t in zip(*[recipe.train_dataset()[i] for i in range(4)]))
    recipe.loss(model(inputs), targets).backward()
    grads = sum(round512(p.grad.nbytes) for p in model.parameters())
    optimizer.step()
    params = sum(round512(p.nbytes) for p in model.parameters())
    state = sum(
        round512(v.nbytes) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)
    )
    parts = est.ranks[0].parts
    assert parts["parameters"] == params
    # on CUDA, fused AdamW keeps its `step` counters on the device: one 512-byte block each
    cuda_steps = 512 * len(optimizer.state) if optim == "adamw" else 0
    cpu_steps = sum(round512(s["step"].nbytes) for s in optimizer.state.values()) if optim == "adamw" else 0
    assert parts["optimizer state"] == state - cpu_steps + cuda_steps
    assert est.ranks[0].notes["gradient bytes"] == grads
    assert est.ranks[0].notes["optimizer state bytes"] == parts["optimizer state"]


def test_pipeline_ranks_hold_their_stages_parameters():
    from launcher.parallel.split import ModelPart, plan_stages

    job = compose([*TINY, *PIPE, "parallel.schedule=interleaved_1f1b"], 2)
    est = estimate(job.cfg, job.recipe_class, 2, "H100")
    recipe = job.recipe_class(job.cfg.recipe)
    model = recipe.build_model()
    specs = plan_stages(model, recipe.layout, 4, [])
    for pp_rank, rank in enumerate(est.ranks):
        part = ModelPart(model, recipe.layout, [specs[pp_rank], specs[pp_rank + 2]])
        assert rank.parts["parameters"] == sum(round512(p.nbytes) for p in part.parameters())
    assert est.ranks[0].notes["stages"] == [0, 2] and est.ranks[1].notes["holds pre/post"] == "post"


def test_knobs_move_the_estimate_the_right_way():
    job = compose([*TINY, "train.micro_batch_size=16"])
    pipe = compose([*TINY, "train.micro_batch_size=16", *PIPE], 2)

    def peak(job=job, world_size=1, **changes):
        cfg = copy.deepcopy(job.cfg)  # composing is slow: change the composed config instead
        for dotted, value in changes.items():
            section, key = dotted.split("__")
            setattr(getattr(cfg, section), key, value)
        return estimate(cfg, job.recipe_class, world_size, "H100").ranks[0]

    plain = peak()
    acts = plain.notes
    assert acts["activations with checkpointing GiB"] < acts["activations without checkpointing GiB"]
    checkpointed = peak(train__activation_checkpointing=True)
    assert checkpointed.parts["activations"] < plain.parts["activations"] / 2
    half = peak(train__micro_batch_size=8, train__grad_accum_steps=2)
    assert half.parts["activations"] == pytest.approx(plain.parts["activations"] / 2, rel=0.02)
    bf16 = peak(precision__dtype=Precision.bf16)
    assert bf16.parts["activations"] < plain.parts["activations"]
    assert bf16.parts["autocast weight copies"] > 0 == plain.parts["autocast weight copies"]
    gpipe = peak(pipe, 2, parallel__schedule=PipelineSchedule["gpipe"])
    one_f_one_b = peak(pipe, 2, parallel__schedule=PipelineSchedule["1f1b"])
    assert gpipe.notes["in-flight stage-microbatches"] == 4
    assert one_f_one_b.notes["in-flight stage-microbatches"] == 2
    assert gpipe.peak_allocated > one_f_one_b.peak_allocated
    assert peak(train__compile=True).peak_allocated <= plain.peak_allocated


def test_closed_forms():
    # 1F1B: rank r of p holds p - r microbatches; GPipe all of them; interleaved warms up longer
    assert [closed.in_flight_microbatches("1f1b", 4, r, 8, 1) for r in range(4)] == [4, 3, 2, 1]
    assert closed.in_flight_microbatches("gpipe", 4, 3, 8, 1) == 8
    assert closed.in_flight_microbatches("interleaved_1f1b", 2, 0, 8, 2) == 5
    # PowerSGD: a 64 x 32 matrix at rank 4 sends P (64x4) and Q (32x4); a bias is left alone
    buffers = closed.powersgd_bytes([(64, 32), (64,)], rank=4, min_compression_rate=2.0, error_feedback=True)
    assert buffers == {
        "P": round512(64 * 4 * 4),
        "Q": round512(32 * 4 * 4),
        "error feedback": round512((2048 + 64) * 4),
    }
    assert closed.device_bytes("A100-80GB")[1] > closed.device_bytes("A100-40GB")[1]
    assert closed.device_bytes("24")[1] == 24 * 2**30
    assert Precision.bf16.value == "bf16"
