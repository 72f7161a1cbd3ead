"""Composition: every option of every group composes and validates; overrides reach typed fields."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.config import cli
from launcher.config.schema import AdamWConfig, Config, DDPConfig, Precision, SGDConfig, WandbLoggerConfig
from launcher.errors import ConfigError
from launcher.train.fp8 import fp8_gpu_visible
from recipes.digits import DigitsConfig
from recipes.gpt import GPTConfig

CONF = Path(cli.CONF_DIR)


def compose(*overrides: str, world_size: int = 1, multirun: bool = False) -> list[cli.Job]:
    request = cli.Request(
        list(overrides), multirun=multirun, config_dir=None, config_name="config", hydra_only=False
    )
    cli.register_all(request.overrides)
    return cli.compose_jobs(request, world_size)


def all_options() -> list[tuple[str, str]]:
    return [(group, path.stem) for group in cli.SELECTABLE for path in sorted((CONF / group).glob("*.yaml"))]


def test_every_group_has_options():
    groups = {group for group, _ in all_options()}
    assert groups == set(cli.SELECTABLE)


@pytest.mark.parametrize("group,option", all_options(), ids=lambda v: str(v))
def test_every_option_composes_and_validates(group, option):
    if (group, option) == ("precision", "fp8") and not fp8_gpu_visible():
        with pytest.raises(ConfigError, match="compute capability >= 8.9"):
            compose("precision=fp8", world_size=2)  # refused here by design (tests/unit/test_fp8.py)
        return
    (job,) = compose(f"{group}={option}", world_size=2)  # 2 ranks: a pipeline needs at least two
    assert isinstance(job.cfg, Config)
    if group == "recipe":
        assert job.recipe_name == option
        assert job.recipe_class.Config is type(job.cfg.recipe)
    if group == "precision":
        assert job.cfg.precision.dtype == Precision(option)


def test_defaults_and_typed_overrides():
    (job,) = compose("train.steps=7", "optim=sgd", "optim.momentum=0.5", "recipe.model.n_layers=3")
    cfg = job.cfg
    assert cfg.train.steps == 7
    assert isinstance(cfg.optim, SGDConfig) and cfg.optim.momentum == 0.5
    assert isinstance(cfg.recipe, GPTConfig) and cfg.recipe.model.n_layers == 3
    assert isinstance(cfg.parallel, DDPConfig)


def test_experiment_overlay_sets_fields():
    (job,) = compose("experiment=gpt2_small")
    m = job.cfg.recipe.model
    assert (m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.seq_len) == (50304, 768, 12, 12, 1024)
    assert job.cfg.precision.dtype == Precision.bf16


def test_sweep_expands_to_validated_jobs():
    jobs = compose("optim.lr=0.1,0.2", "recipe=gpt,digits", multirun=True)
    assert sorted((j.recipe_name, j.cfg.optim.lr) for j in jobs) == [
        ("digits", 0.1),
        ("digits", 0.2),
        ("gpt", 0.1),
        ("gpt", 0.2),
    ]
    assert isinstance(jobs[0].cfg.optim, AdamWConfig)


def test_sweep_checks_every_point():
    with pytest.raises(ConfigError) as err:
        compose("train.steps=10,-1", multirun=True)
    assert err.value.field == "train.steps" and err.value.value == -1


def test_sweep_without_multirun_flag_is_refused():
    with pytest.raises(ConfigError, match="add -m"):
        compose("optim.lr=0.1,0.2")


def test_sweep_under_torchrun_is_refused():
    with pytest.raises(ConfigError, match="one job at a time"):
        compose("optim.lr=0.1,0.2", world_size=2, multirun=True)


def test_recipe_by_import_path_gets_its_schema():
    (job,) = compose("recipe=recipes.digits:DigitsRecipe", "recipe.model.hidden=16")
    assert isinstance(job.cfg.recipe, DigitsConfig) and job.cfg.recipe.model.hidden == 16
    assert job.recipe_name == "DigitsRecipe"


def test_logger_wandb_defaults_offline():
    (job,) = compose("logger=wandb")
    assert isinstance(job.cfg.logger, WandbLoggerConfig) and job.cfg.logger.mode.value == "offline"


@pytest.mark.parametrize(
    "override,field,needle",
    [
        ("train.stepz=3", "train.stepz", "did you mean train.steps"),
        ("+train.extra=1", "train.extra", "unknown key"),
        ("+train.steps=5", "train.steps", "drop the '+'"),
        ("precision=bf17", "precision", "did you mean bf16"),
        ("train.steps=abc", "train.steps", "Integer"),
        ("precision.dtype=int8", "precision.dtype", "fp32"),
        ("train.steps.x=1", "train.steps.x", "is a value"),
    ],
)
def test_override_errors_name_the_field(override, field, needle):
    with pytest.raises(ConfigError) as err:
        compose(override)
    assert err.value.field == field
    assert needle in str(err.value)


def test_config_dir_adds_user_overlays(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ntrain:\n  steps: 7\noptim:\n  lr: 0.02\n"
    )
    request = cli.Request(
        ["experiment=mine"], multirun=False, config_dir=str(tmp_path), config_name="config", hydra_only=False
    )
    cli.register_all(request.overrides)
    (job,) = cli.compose_jobs(request, 1)
    assert (job.cfg.train.steps, job.cfg.optim.lr) == (7, 0.02)
    with pytest.raises(ConfigError, match="use --config-dir"):
        cli.parse_argv(["--config-path", str(tmp_path)])


def test_powersgd_triton_kernels_reaches_the_hook_state_and_rejects_non_booleans():
    from launcher.parallel.comm_hooks import build_comm_hook

    (job,) = compose("comm_hook=powersgd", "comm_hook.triton_kernels=false")
    assert job.cfg.comm_hook.triton_kernels is False
    assert build_comm_hook(job.cfg.comm_hook, None, False).powersgd.triton_kernels is False
    (job,) = compose("comm_hook=powersgd")
    assert build_comm_hook(job.cfg.comm_hook, None, False).powersgd.triton_kernels is True
    with pytest.raises(ConfigError) as err:
        compose("comm_hook=powersgd", "comm_hook.triton_kernels=maybe")
    assert err.value.field == "comm_hook.triton_kernels"
