"""Memory at run time on CPU: pre-flight warn/off (pretending a GPU size; refuse runs through the CLI
in tests/integration/test_memory_cli.py), the OOM phase from
real tracebacks, allocator settings, and leaks: RSS flat over steps, nothing left after teardown."""

from __future__ import annotations

import gc
import logging
import os
import warnings
import weakref

import pytest
import torch

from launcher.config import cli
from launcher.config.schema import Preflight
from launcher.launch.dist import DistEnv, DistSession
from launcher.memory.allocator import merged_alloc_conf
from launcher.memory.oom import oom_phase
from launcher.memory.parts import HEADROOM
from launcher.memory.preflight import PRETEND_FREE_GIB, preflight
from tests.conftest import TINY_GPT

CPU_SESSION = DistSession(DistEnv(), torch.device("cpu"), None)


def compose(overrides: list[str]):
    request = cli.parse_argv(overrides)
    cli.register_all(request.overrides)
    return cli.compose_jobs(request, 1)[0]


@pytest.fixture(scope="module")
def big_job():
    # ~0.0898 GiB reserved at its peak (mostly cuBLAS workspaces, in 20 MiB pages); checkpointing
    # alone brings it under 95% of 0.0935.
    return compose([*TINY_GPT, "train.micro_batch_size=64"])


def test_preflight_warn_off_and_no_gpu(big_job, monkeypatch, caplog):
    monkeypatch.setenv(PRETEND_FREE_GIB, "0.0935")
    cfg = big_job.cfg
    cfg.memory.preflight = Preflight.warn
    with caplog.at_level(logging.WARNING, logger="launcher.memory.preflight"):
        verdict = preflight(cfg, big_job.recipe_class, CPU_SESSION, None)
    assert verdict.available == int(0.0935 * 2**30)
    assert not verdict.fits and verdict.needed > verdict.available * (1 - HEADROOM)
    assert "this may run out of memory" in caplog.text
    assert verdict.fixes[0].saving >= verdict.fixes[-1].saving > 0  # ranked by saving
    assert "train.activation_checkpointing=true    ->" in verdict.message() and "(fits)" in verdict.message()

    monkeypatch.setenv(PRETEND_FREE_GIB, "1.0")
    assert preflight(cfg, big_job.recipe_class, CPU_SESSION, None).fits
    cfg.memory.preflight = Preflight.off
    monkeypatch.setenv(PRETEND_FREE_GIB, "0.001")
    assert preflight(cfg, big_job.recipe_class, CPU_SESSION, None) is None
    monkeypatch.delenv(PRETEND_FREE_GIB)
    cfg.memory.preflight = Preflight.refuse
    assert preflight(cfg, big_job.recipe_class, CPU_SESSION, None) is None  # no GPU here: nothing to check


def _raise_in(where: str) -> BaseException:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    class Boom(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            if where == "forward":
                raise torch.cuda.OutOfMemoryError("simulated")
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise torch.cuda.OutOfMemoryError("simulated")

    def hook(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("simulated")

    try:
        if where == "optimizer":
            optimizer.register_step_pre_hook(hook)
            model(torch.ones(2)).sum().backward()
            optimizer.step()
        Boom.apply(model(torch.ones(2))).sum().backward()
    except torch.cuda.OutOfMemoryError as err:
        return err
    raise AssertionError("no error")


def test_oom_phase_from_real_tracebacks():
    step = {"phase": "train step", "step": 7}
    assert oom_phase(_raise_in("forward"), step) == "forward"
    assert oom_phase(_raise_in("backward"), step) == "backward"
    assert oom_phase(_raise_in("optimizer"), step) == "optimizer step"
    assert oom_phase(_raise_in("forward"), {"phase": "evaluation", "step": 7}) == "evaluation"


def test_expandable_segments_merge_with_the_users_value():
    assert merged_alloc_conf("", True) == "expandable_segments:True"
    assert (
        merged_alloc_conf("max_split_size_mb:128", False) == "max_split_size_mb:128,expandable_segments:False"
    )
    assert merged_alloc_conf("expandable_segments:False", True) == "expandable_segments:False"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on torch's deprecated module attributes warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_no_leak_over_steps_and_nothing_left_after_teardown(tmp_path):
    from launcher.train.loop import Trainer
    from launcher.train.shutdown import StopFlag

    job = compose([*TINY_GPT, "train.steps=25", "checkpoint.every=0", f"run.dir={tmp_path}"])
    baseline = _live_tensors()
    stop = StopFlag(grace_s=5.0)
    try:
        trainer = Trainer(job, CPU_SESSION, tmp_path, stop)
        rss: dict[int, int] = {}
        trainer.fit(after_step=lambda step: rss.__setitem__(step, _rss_bytes()))
        refs = [weakref.ref(trainer.strategy.module), weakref.ref(trainer.optimizer)]
        trainer.logger.close()
        del trainer
    finally:
        stop.restore()
    # A leak of even one small tensor per step grows RSS steadily; allow allocator noise only.
    growth = rss[25] - rss[5]
    assert growth < 4 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB from step 5 to 25"
    gc.collect()
    assert all(ref() is None for ref in refs), "the model or optimizer outlived its Trainer"
    assert _live_tensors() <= baseline + 2
