"""What a new user runs into: rerunning a stopped command continues it, config.yaml describes the
attempt that trained, a changed model is refused with what differs, streaming dict data trains."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY_GPT, assert_ok, launch

pytestmark = pytest.mark.integration

ARGS = [*TINY_GPT, "train.steps=4", "train.micro_batch_size=4"]


def test_rerunning_the_stopped_command_continues_the_same_run(tmp_path):
    first = launch([*ARGS, "train.stop_at_step=2"], tmp_path, pass_run_dir=False)
    assert_ok(first)
    [run_dir] = (tmp_path / "runs" / "gpt").glob("20*")
    assert (tmp_path / "runs" / "gpt" / "latest").resolve() == run_dir.resolve()

    again = launch(ARGS, tmp_path, pass_run_dir=False)  # the same command (stop_at_step does not count)
    assert_ok(again)
    assert "continuing the unfinished run of the same config" in again.output
    assert "resumed from step 2" in again.output
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert (run_dir / "FINISHED").exists()

    fresh = launch(ARGS, tmp_path, pass_run_dir=False)  # finished: a new run
    assert_ok(fresh)
    assert len(list((tmp_path / "runs" / "gpt").glob("20*"))) == 2
    other = launch([*ARGS, "optim.lr=1e-4", "train.stop_at_step=2"], tmp_path, pass_run_dir=False)
    assert_ok(other)  # another config: never picks up someone else's run
    assert "continuing" not in other.output
    assert len(list((tmp_path / "runs" / "gpt").glob("20*"))) == 3


def test_config_yaml_describes_the_attempt_that_trained(tmp_path):
    assert_ok(launch([*ARGS, "train.stop_at_step=2"], tmp_path))
    failed = launch([*ARGS, "train.micro_batch_size=100000"], tmp_path)  # refused before training
    assert failed.returncode == 2
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in run_dir.glob("config*.yaml")) == ["config.yaml"]
    assert_ok(launch([*ARGS, "optim.lr=1e-4"], tmp_path))
    assert "lr: 0.0001" in (run_dir / "config.yaml").read_text()
    assert "lr: 0.0003" in (run_dir / "config.step_2.yaml").read_text()  # the config before step 2


def test_resuming_into_another_model_is_refused_with_what_differs(tmp_path):
    assert_ok(launch([*ARGS, "train.stop_at_step=2"], tmp_path))
    result = launch([*ARGS, "recipe.model.d_model=64"], tmp_path)
    assert result.returncode == 2
    assert "holds a different model" in result.stderr
    assert "recipe.model.d_model: 32 -> 64" in result.stderr
    assert "remove" not in result.output and "Traceback" not in result.output
    assert (tmp_path / "run" / "checkpoints" / "step_2" / "model.pt").exists()  # left alone


def test_streaming_dict_samples_train_and_evaluate(tmp_path):
    recipe = "recipe=tests.integration.odd_recipes:Streaming"
    result = launch(
        [
            recipe,
            "train.steps=6",
            "train.micro_batch_size=4",
            "train.eval_every=3",
            "train.log_every=1",
            "checkpoint.every=3",
            "train.stop_at_step=3",
            "logger.progress_bar=false",
        ],
        tmp_path,
        nproc=2,
    )
    assert_ok(result)
    resumed = launch(
        [
            recipe,
            "train.steps=6",
            "train.micro_batch_size=4",
            "train.eval_every=3",
            "train.log_every=1",
            "checkpoint.every=3",
            "logger.progress_bar=false",
        ],
        tmp_path,
        nproc=2,
    )
    assert_ok(resumed)
    assert [m["step"] for m in resumed.eval_lines()] == [3, 6]
    assert [m["step"] for m in resumed.train_lines()] == [1, 2, 3, 4, 5, 6]
    assert all(set(m) > {"step"} for m in resumed.metrics())  # no bare {"step": N} records


def test_pipeline_evaluates_an_eval_set_smaller_than_a_micro_batch(tmp_path):
    result = launch(
        [
            "recipe=tests.integration.odd_recipes:SmallEval",
            "parallel=pipeline",
            "parallel.schedule=zbv_zero_bubble",
            "parallel.num_microbatches=4",
            "train.micro_batch_size=4",
            "train.steps=2",
            "train.eval_every=2",
            "logger.progress_bar=false",
        ],
        tmp_path,
        nproc=2,
    )
    assert_ok(result)
    [evaluated] = result.eval_lines()
    assert evaluated["step"] == 2 and evaluated["eval_loss"] > 0
