"""A checkpoint resumes on another number of data-parallel ranks, exactly.

With the global batch held constant (micro-batch x ranks = 8), 3 steps on 2 ranks then 3 on 4 (and 4
then 2) give the losses and final parameters of one uninterrupted process with micro-batch 8, within
1e-5: model and optimizer state are replicated and the data position is global (launcher/train/data.py).
"""

from __future__ import annotations

import pytest

from tests.conftest import TINY_GPT, assert_ok, launch, relative_diff

pytestmark = pytest.mark.dist

ARGS = [*TINY_GPT, "train.steps=6", "optim.warmup_steps=2", "optim.lr=3e-3"]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    result = launch([*ARGS, "train.micro_batch_size=8"], tmp)
    assert_ok(result)
    return result


@pytest.mark.parametrize("before,after", [(2, 4), (4, 2)], ids=["2to4", "4to2"])
def test_resume_on_another_world_size_equals_one_run(before, after, reference, tmp_path):
    first = launch(
        [*ARGS, f"train.micro_batch_size={8 // before}", "train.stop_at_step=3"], tmp_path, nproc=before
    )
    assert_ok(first)
    second = launch([*ARGS, f"train.micro_batch_size={8 // after}"], tmp_path, nproc=after)
    assert_ok(second)
    assert "resumed from step 3" in second.output
    assert f"resuming on {after} data-parallel ranks a checkpoint saved on {before}" in second.output
    lines = {m["step"]: m for m in second.train_lines()}
    assert sorted(lines) == [1, 2, 3, 4, 5, 6]  # each step once
    for ref in reference.train_lines():
        assert lines[ref["step"]]["loss"] == pytest.approx(ref["loss"], rel=TOLERANCE), ref["step"]
    assert relative_diff(second.model(6), reference.model(6)) < TOLERANCE
    assert lines[6]["global_batch_size"] == 8
