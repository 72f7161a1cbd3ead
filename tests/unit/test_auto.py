"""train.compile=auto resolves while the config is composed (launcher/config/auto.py), as documented."""

from __future__ import annotations

import pytest
import yaml

from launcher.config import cli
from launcher.config.auto import COMPILE_BREAK_EVEN_STEPS
from launcher.errors import ConfigError
from tests.conftest import TINY_GPT, assert_ok, launch


def compose(*overrides: str, cuda: bool):
    request = cli.parse_argv(list(overrides))
    cli.register_all(request.overrides)
    return cli.compose_jobs(request, 2, cuda=cuda)[0].cfg  # 2 ranks: room for pp=2


@pytest.mark.parametrize(
    ("overrides", "cuda", "expected"),
    [
        ((f"train.steps={COMPILE_BREAK_EVEN_STEPS}",), True, "true"),  # a GPU, long enough to pay
        ((f"train.steps={COMPILE_BREAK_EVEN_STEPS - 1}",), True, "false"),  # too short to repay compiling
        ((f"train.steps={10 * COMPILE_BREAK_EVEN_STEPS}",), False, "false"),  # no GPU
        (("parallel=pipeline", "parallel.schedule=zbv_zero_bubble", "train.steps=5000"), True, "false"),
        (("train.compile=True", "train.steps=10"), False, "true"),  # the user's choice stands
        (("train.compile=FALSE", "train.steps=5000"), True, "false"),
    ],
)
def test_compile_auto_resolves(overrides, cuda, expected):
    cfg = compose("recipe=gpt", *overrides, cuda=cuda)
    assert cfg.train.compile == expected
    assert cfg.train.compile_on is (expected == "true")


def test_compile_rejects_other_values():
    with pytest.raises(ConfigError) as err:
        compose("recipe=gpt", "train.compile=sometimes", cuda=True)
    assert "train.compile=sometimes" in str(err.value) and "auto, true or false" in str(err.value)


@pytest.mark.integration
def test_config_yaml_records_what_auto_chose(tmp_path):
    result = launch([*TINY_GPT, "train.steps=1", "train.micro_batch_size=2"], tmp_path)
    assert_ok(result)
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["train"]["compile"] == "false"  # no GPU here
    assert "train.compile=auto -> false" in result.output
