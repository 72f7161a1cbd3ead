"""PowerSGD learns as well as plain all-reduce on real data (2 gloo ranks, same step count)."""

from __future__ import annotations

import pytest

from tests.conftest import DIGITS_150, GPT_150, assert_ok, launch

pytestmark = pytest.mark.integration

DIGITS, GPT = DIGITS_150, GPT_150


def final_eval(args, tmp_path, name):
    result = launch(args, tmp_path, nproc=2, run_dir=tmp_path / name)
    assert_ok(result)
    return result.eval_lines()[-1], result.train_lines()[-1]


def test_digits_powersgd_rank2_within_one_point_of_plain_ddp(tmp_path):
    plain, _ = final_eval(DIGITS, tmp_path, "plain")
    compressed, train = final_eval([*DIGITS, "comm_hook=powersgd", "comm_hook.rank=2"], tmp_path, "powersgd")
    assert abs(compressed["eval_accuracy"] - plain["eval_accuracy"]) <= 0.01
    assert train["compression_ratio"] > 10


def test_gpt_powersgd_eval_loss_within_2_percent_of_plain_ddp(tmp_path):
    """Measured (d_model=64, 150 steps): rank 2 -> +5.2%, rank 4 -> +2.4%, rank 8 -> +0.9% (6.4x fewer
    bytes), rank 16 -> +0.2% (2.8x). Rank 8 is the smallest that meets 2% at this model size."""
    plain, _ = final_eval(GPT, tmp_path, "plain")
    compressed, train = final_eval([*GPT, "comm_hook=powersgd", "comm_hook.rank=8"], tmp_path, "powersgd")
    assert compressed["eval_loss"] <= plain["eval_loss"] * 1.02
    assert train["compression_ratio"] > 5
