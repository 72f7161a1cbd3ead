"""train.micro_batch_size=auto / activation_checkpointing=auto against a pretended GPU size: the pick
is the largest choice the estimate says fits (checked against the estimator itself, at the pick and
one step above), the global batch is kept, and nothing-fits is a config error naming the field."""

from __future__ import annotations

import copy

import pytest

from launcher.config import cli
from launcher.errors import ConfigError
from launcher.memory.autobatch import resolve_batch
from launcher.memory.estimate import estimate
from launcher.memory.parts import GIB, HEADROOM
from tests.conftest import TINY_GPT

TINY = [o for o in TINY_GPT if not o.startswith(("train.log_every", "logger."))]
# Activations large enough to outweigh the allocator's 2 and 20 MiB pages in the reserved estimate.
BIGGER = [*TINY, "recipe.model.d_model=128", "recipe.model.n_layers=4", "recipe.model.seq_len=128"]


def compose(overrides: list[str], size: int | None, world_size: int = 1):
    request = cli.parse_argv(overrides)
    cli.register_all(request.overrides)
    return cli.compose_jobs(request, world_size, size_for=(lambda c: (size, "test")) if size else None)[0]


def needed(job, mb: int, accum: int = 1, ac: bool = False) -> int:
    """What pre-flight would count for this micro-batch: the estimate's reserved peak."""
    cfg = copy.deepcopy(job.cfg)
    cfg.train.micro_batch_size, cfg.train.grad_accum_steps, cfg.train.activation_checkpointing = mb, accum, ac
    return estimate(cfg, job.recipe_class, 1, "test", 10 * GIB).worst.peak_reserved


def test_picks_the_largest_micro_batch_that_fits():
    fixed = compose([*BIGGER, "train.micro_batch_size=8"], None)
    # A device where 32 fits with the headroom and 64 does not.
    size = int((needed(fixed, 32) + needed(fixed, 64)) / 2 / (1 - HEADROOM))
    job = compose([*BIGGER, "train.micro_batch_size=auto"], size)
    assert job.cfg.train.micro_batch_size == 32
    assert job.cfg.train.grad_accum_steps == 1  # as given: no global batch set
    assert job.cfg.train.activation_checkpointing is False


def test_global_batch_is_kept_by_accumulation():
    fixed = compose([*BIGGER, "train.micro_batch_size=8"], None)
    size = int((needed(fixed, 16, 4) + needed(fixed, 32, 2)) / 2 / (1 - HEADROOM))
    job = compose([*BIGGER, "train.micro_batch_size=auto", "train.global_batch_size=64"], size)
    t = job.cfg.train
    assert (t.micro_batch_size, t.grad_accum_steps) == (16, 4)
    assert t.micro_batch_size * t.grad_accum_steps == 64


def test_global_batch_with_a_given_micro_batch_sets_accumulation():
    job = compose([*TINY, "train.micro_batch_size=4", "train.global_batch_size=32"], None, world_size=2)
    assert job.cfg.train.grad_accum_steps == 4  # 32 = 4 x 4 x 2 ranks
    with pytest.raises(ConfigError, match="train.global_batch_size=30"):
        compose([*TINY, "train.micro_batch_size=4", "train.global_batch_size=30"], None, world_size=2)


def test_checkpointing_auto_turns_on_only_when_it_is_needed_to_fit():
    fixed = compose([*BIGGER, "train.micro_batch_size=8"], None)
    roomy = compose([*BIGGER, "train.micro_batch_size=64", "train.activation_checkpointing=auto"], 10 * GIB)
    assert roomy.cfg.train.activation_checkpointing is False
    # Only checkpointing fits micro-batch 64 here (without it, 64 needs more than the device).
    with_ac, without = needed(fixed, 64, ac=True), needed(fixed, 64, ac=False)
    assert with_ac < without
    size = int((with_ac + without) / 2 / (1 - HEADROOM))
    tight = compose([*BIGGER, "train.micro_batch_size=64", "train.activation_checkpointing=auto"], size)
    assert tight.cfg.train.activation_checkpointing is True


def test_nothing_fits_and_no_gpu_are_config_errors():
    with pytest.raises(ConfigError) as err:
        compose([*TINY, "train.micro_batch_size=auto"], 1024)
    assert err.value.field == "train.micro_batch_size" and "nothing fits" in str(err.value)
    job = compose([*TINY, "train.micro_batch_size=auto"], None)  # left for the machine that runs it
    assert job.cfg.train.micro_batch_size == "auto"
    with pytest.raises(ConfigError, match="no GPU here"):
        resolve_batch(job.cfg, job.recipe_class, 1, None)
    with pytest.raises(ConfigError, match="integer >= 1 or auto"):
        compose([*TINY, "train.micro_batch_size=big"], None)


def test_estimate_sweep_prints_one_line_per_value(capsys):
    from launcher.memory.estimate_cli import main

    code = main([*TINY, "estimate.gpu=0.725", "--sweep", "train.micro_batch_size=1,8,64"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "8", "64"]
    peaks = [float(r[1]) for r in rows]
    assert peaks == sorted(peaks) and peaks[0] < peaks[-1]
    assert rows[0][-1] == "yes" and rows[-1][-1] == "no"  # 64 does not fit 0.725 GiB (see test_memory_cli)
    assert code == 0
