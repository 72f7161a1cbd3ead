"""What the console shows: one formatted line per record, the run summary, the sweep table."""

from __future__ import annotations

import json

from launcher.observe.loggers import format_record
from launcher.observe.summary import run_summary, sweep_table


def test_format_record_is_consistent_and_hides_noise():
    line = format_record(
        {
            "step": 12000,
            "loss": 2.345678,
            "lr": 3e-4,
            "tokens_per_s": 9988.04,
            "allreduce_bytes": 67332,
            "compression_ratio": 1.0,
            "gpus": [{"rank": 0}],
        }
    )
    assert line == "step 12,000 | loss 2.346 | lr 3.000e-04 | tokens_per_s 9,988"


def test_run_summary_and_sweep_table_read_metrics(tmp_path):
    for name, losses in (("a", [3.0, 2.0]), ("b", [3.0, 2.5])):
        (tmp_path / name).mkdir()
        lines = [{"step": i + 1, "loss": v, "tokens_per_s": 1000.0 * (i + 1)} for i, v in enumerate(losses)]
        lines.append({"step": 2, "eval_loss": losses[-1] + 0.1})
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    summary = run_summary(tmp_path / "a" / "metrics.jsonl", 75)
    assert summary == (
        "run summary: 2 steps, final loss 2, final eval_loss 2.1 (best 2.1 at step 2), "
        "median 1,500 tokens/s, wall time 1m15s"
    )
    table = sweep_table(
        [
            (["optim.lr=1e-3", "train.steps=2"], 0, tmp_path / "a"),
            (["optim.lr=3e-3", "train.steps=2"], 1, tmp_path / "b"),
        ]
    ).splitlines()
    assert table[0] == "| optim.lr | exit | loss | eval_loss | run dir |"  # only what varies
    assert table[2] == f"| 1e-3 | 0 | 2 | 2.1 | {tmp_path / 'a'} |"
    assert table[3] == f"| 3e-3 | 1 | 2.5 | 2.6 | {tmp_path / 'b'} |"
