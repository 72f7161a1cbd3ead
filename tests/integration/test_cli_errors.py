"""Bad configurations exit with code 2 and one message naming the field (the real CLI)."""

from __future__ import annotations

import pytest

from tests.conftest import launch, run_cli_in_process

pytestmark = pytest.mark.integration

ODD = "tests.integration.odd_recipes"
# (overrides, field named in the message, a phrase of the explanation)
BAD_CONFIGS = [
    (["train.stepz=3"], "train.stepz", "did you mean train.steps"),
    (["+train.foo=1"], "train.foo", "unknown key"),
    (["precision=bf17"], "precision=bf17", "did you mean bf16"),
    (["recipe=nosuch"], "recipe=nosuch", "choose one of: digits, gpt"),
    (["train.steps=abc"], "train.steps=abc", "could not be converted to Integer"),
    (["precision.dtype=int8"], "precision.dtype=int8", "expected one of [fp32, bf16, fp16, fp8]"),
    (["train.steps=-1"], "train.steps=-1", "must be >= 1"),
    (["train.micro_batch_size=0"], "train.micro_batch_size=0", "must be >= 1"),
    (["optim.lr=0"], "optim.lr=0", "must be > 0"),
    (["optim.betas=[0.9]"], "optim.betas", "two numbers"),
    (["optim=sgd", "optim.momentum=0", "optim.nesterov=true"], "optim.nesterov", "needs optim.momentum > 0"),
    (["recipe.model.n_heads=3"], "recipe.model.n_heads=3", "must divide recipe.model.d_model"),
    (["resume=/does/not/exist"], "resume=/does/not/exist", "resume=auto"),
    (["dist.backend=nccl"], "dist.backend=nccl", "needs CUDA"),
    (["recipe=my_missing_pkg.mod:Recipe"], "recipe=my_missing_pkg.mod:Recipe", "cannot import"),
    (["recipe.data.path=/no/such/corpus.txt"], "recipe.data.path", "does not exist"),
    (
        ["train.stop_at_step=500", "train.steps=100"],
        "train.stop_at_step=500",
        "must be in [1, train.steps=100]",
    ),
    (["checkpoint.keep=0"], "checkpoint.keep=0", "must be >= 1"),
    (["metrics.peak_tflops=0"], "metrics.peak_tflops=0.0", "must be > 0"),
    (["dist.shutdown_grace_s=-1"], "dist.shutdown_grace_s=-1.0", "must be > 0"),
    (["train.nonfinite=ignore"], "train.nonfinite=ignore", "expected one of [stop, skip]"),
    (["recipe=digits", "train.micro_batch_size=100000"], "train.micro_batch_size=100000", "larger than"),
    (["optim.lr=0.1,0.2"], "optim.lr", "add -m"),
    (["comm_hook=powersgd", "comm_hook.rank=0"], "comm_hook.rank=0", "must be >= 1"),
    (
        ["comm_hook=powersgd", "comm_hook.start_iter=1"],
        "comm_hook.start_iter=1",
        "must be > 1 with error_feedback",
    ),
    # New-user findings (issue 10): hints that name the group option, checks before any process starts.
    (["parallel.pp=2"], "parallel.pp=2", "belongs to parallel=pipeline"),
    (["comm_hook.rank=2"], "comm_hook.rank=2", "belongs to comm_hook=powersgd"),
    (["trian.steps=3"], "trian.steps=3", "valid keys in the top level: checkpoint"),
    (["optim.warmup_steps=500", "train.steps=100"], "optim.warmup_steps=500", "longer than the run"),
    (["run.dir=/proc/1"], "run.dir=/proc/1", "cannot write in /proc/1"),
    (["--cfg", "job", "train.steps=-5"], "train.steps=-5", "must be >= 1"),
    (["--cfg", "job", "train.stepz=3"], "train.stepz=3", "did you mean train.steps"),
    (["--config-dir", "/no/such/dir"], "--config-dir=/no/such/dir", "is not a directory"),
    (["logger=wandb", "logger.mode=online"], "logger.mode=online", "no wandb API key"),
    ([f"recipe={ODD}:RaisingInit"], f"recipe={ODD}:RaisingInit", "its __init__ raised RuntimeError: boom"),
    ([f"recipe={ODD}:BadLayout"], f"recipe={ODD}:BadLayout", "its layout names 'layers'"),
    ([f"recipe={ODD}:Regression", "recipe.width=3"], f"recipe={ODD}:Regression", "width=3 must be even"),
    ([f"recipe={ODD}:EmptyTrain"], f"recipe={ODD}:EmptyTrain", "its train dataset is empty"),
    ([f"recipe={ODD}:EmptyEval"], "train.eval_every=50", "eval dataset (TensorDataset) is empty"),
    (
        ["comm_hook=batched_powersgd"],
        "comm_hook=batched_powersgd",
        "choose one of: bf16, fp16, none, powersgd",
    ),
]


@pytest.mark.parametrize("overrides,field,phrase", BAD_CONFIGS, ids=[" ".join(c[0]) for c in BAD_CONFIGS])
def test_bad_config_exits_2_naming_the_field(overrides, field, phrase, tmp_path):
    """In-process through the CLI's entry point (run_cli_in_process): the table is long, and a fresh
    interpreter per row costs seconds; the subprocess tests below cover the process boundary."""
    result = run_cli_in_process(
        overrides, tmp_path, env={"WANDB_API_KEY": "", "NETRC": str(tmp_path / "none")}
    )
    assert result.returncode == 2, result.output[-2000:]
    assert f"invalid config: {field}" in result.stderr
    assert phrase in result.stderr
    assert "Traceback" not in result.output
    assert "hydra" not in result.stderr  # no internal keys or Hydra's advice (e.g. `+key=`)
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_bad_config_under_torchrun_reported_once_by_rank_0(tmp_path):
    result = launch(["train.stepz=3"], tmp_path, nproc=2, timeout=120)
    assert result.returncode != 0
    assert result.output.count("invalid config: train.stepz=3") == 1
    assert "exitcode  : 2" in result.output  # every worker exited 2; torchrun itself reports failure


def test_bad_data_is_refused_before_training(tmp_path):
    """Token ids beyond the vocabulary and an empty corpus: exit 2 before any step, naming the file."""
    import numpy as np

    tokens = tmp_path / "tokens.bin"
    np.array([1, 2, 3, 70000 % 65536, 9] * 200, dtype=np.uint16).tofile(tokens)  # 4464 >= vocab 256
    result = launch(["recipe=gpt", f"recipe.data.path={tokens}"], tmp_path, timeout=120)
    assert result.returncode == 2
    assert f"recipe.data.path={tokens}: holds token id 4464 >= recipe.model.vocab_size=256" in result.stderr
    assert "set recipe.model.vocab_size=4465 or larger" in result.stderr

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = launch(["recipe=gpt", f"recipe.data.path={empty}"], tmp_path, timeout=120)
    assert result.returncode == 2
    assert "has too few tokens (0) for one training sample" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_recipe_errors_name_the_file_and_line_once_under_pipeline(tmp_path):
    result = launch([f"recipe={ODD}:RaisingInit", "parallel=pipeline"], tmp_path, nproc=2, timeout=120)
    assert result.output.count("invalid config: recipe=") == 1
    assert "odd_recipes.py:62" in result.stderr  # the raise in RaisingInit.__init__
    assert result.output.count("boom in __init__") == 1  # no rank's traceback (torchrun's own remains)

    broken = tmp_path / "broken_recipe.py"
    broken.write_text("class Recipe:\n    def oops(:\n        pass\n")
    result = launch(["recipe=broken_recipe:Recipe"], tmp_path, timeout=120, env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 2
    assert "importing its module raised SyntaxError" in result.stderr
    assert f"{broken}:2" in result.stderr
    assert "Traceback" not in result.output


def test_help_lists_groups_not_internals(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "launcher", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert "parallel    ddp, fsdp, pipeline" in result.stdout
    assert "schema" not in result.stdout


def test_bad_token_files_are_refused(tmp_path):
    for name, data in (("empty.bin", b""), ("odd.bin", b"\x01\x00\x02")):
        path = tmp_path / name
        path.write_bytes(data)
        result = launch(["recipe=gpt", f"recipe.data.path={path}"], tmp_path, timeout=120)
        assert result.returncode == 2
        assert f"recipe.data.path={path}: is " in result.stderr
        assert "uint16 token ids" in result.stderr and "Traceback" not in result.output
