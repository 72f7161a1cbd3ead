"""launcher.export: pruning + int8 keep the model's quality, shrink its weights, and report true numbers.

Every number in export_report.json is checked against a value recomputed here from the files on disk.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from launcher.after import export
from launcher.after.trained import load_trained
from tests.after_training.conftest import cli_env

pytestmark = pytest.mark.integration

pytest.importorskip("torchao", reason="int8 export uses torchao")

# GPT: one latency batch size, few eval batches (int8 matmuls are slow on CPU without torchao kernels).
GPT_FAST = ["export.latency_repeats=2", "export.latency_batch_sizes=[1]", "export.batch_size=16"]


def run_export(args: list[str]) -> int:
    return export.main([str(a) for a in args])


def test_digits_prune_int8_keeps_accuracy_and_shrinks_linear_weights(digits_run, digits_export):
    out, report = digits_export
    before, after = report["before"], report["after"]
    # Acceptance: accuracy within 2 points, Linear weights at least 3x smaller on disk.
    assert after["eval"]["eval_accuracy"] >= before["eval"]["eval_accuracy"] - 0.02
    assert before["linear_weight_bytes"] / after["linear_weight_bytes"] >= 3.0
    assert after["sparsity"] == pytest.approx(0.3, abs=0.01)
    assert before["sparsity"] < 0.01

    # "before" recomputed from the checkpoint; it also matches training's own final evaluation.
    trained = load_trained(digits_run)
    loader = export.eval_loader(trained.recipe, 64, 0)
    recomputed = export.evaluate(trained.model, trained.recipe, loader)
    assert before["eval"] == pytest.approx(recomputed, rel=1e-6)
    final_eval = [json.loads(line) for line in (digits_run / "metrics.jsonl").read_text().splitlines()][-1]
    assert before["eval"]["eval_accuracy"] == pytest.approx(final_eval["eval_accuracy"], abs=1e-6)
    assert before["eval"]["eval_loss"] == pytest.approx(final_eval["eval_loss"], rel=1e-4)
    assert before["parameters"] == sum(p.numel() for p in trained.model.parameters())
    assert before["linear_weight_bytes"] == export.serialized_bytes(export.linear_weights(trained.model))
    ckpt = trained.source
    assert before["bytes_on_disk"] == (ckpt / "model.pt").stat().st_size

    # "after" recomputed from the exported artifact, loaded on its own.
    exported = load_trained(out)
    assert exported.export_meta["quantize"] == "int8_dynamic"
    weights = export.linear_weights(exported.model)
    assert all(hasattr(w, "qdata") and w.qdata.dtype == torch.int8 for w in weights.values())
    assert after["eval"] == pytest.approx(export.evaluate(exported.model, exported.recipe, loader), rel=1e-5)
    assert after["sparsity"] == pytest.approx(export.sparsity(exported.model), abs=1e-9)
    assert after["linear_weight_bytes"] == export.serialized_bytes(weights)
    assert after["bytes_on_disk"] == (out / "model.pt").stat().st_size
    assert after["parameters"] == before["parameters"]
    assert set(after["latency_ms_per_batch"]) == {"1", "8"}  # FAST_EXPORT's batch sizes
    assert all(ms > 0 for ms in after["latency_ms_per_batch"].values())
    md = (out / "export_report.md").read_text()
    assert "eval_accuracy" in md and f"{after['bytes_on_disk']:,d}" in md


def test_gpt_int8_keeps_eval_loss_within_2_percent(gpt_run, tmp_path):
    out = tmp_path / "gpt_int8"
    assert run_export([gpt_run, "export.eval_batches=2", f"export.out={out}", *GPT_FAST]) == 0
    report = json.loads((out / "export_report.json").read_text())
    loss_before, loss_after = report["before"]["eval"]["eval_loss"], report["after"]["eval"]["eval_loss"]
    assert abs(loss_after - loss_before) <= 0.02 * loss_before
    exported = load_trained(out)
    loader = export.eval_loader(exported.recipe, 16, 2)
    assert loss_after == pytest.approx(
        export.evaluate(exported.model, exported.recipe, loader)["eval_loss"], rel=1e-5
    )
    assert report["before"]["linear_weight_bytes"] / report["after"]["linear_weight_bytes"] >= 3.0

    # Exporting again keeps the earlier export (as gpt_int8.1) instead of overwriting it.
    first_sha = json.loads((out / "export.json").read_text())["sha256"]
    again = [gpt_run, "export.quantize=none", "export.eval_batches=1", f"export.out={out}", *GPT_FAST]
    again += ["export.batch_size=2"]
    assert run_export(again) == 0
    assert json.loads((tmp_path / "gpt_int8.1" / "export.json").read_text())["sha256"] == first_sha
    assert json.loads((out / "export.json").read_text())["quantize"] == "none"


def test_layer_scope_prunes_each_layer_by_the_amount(digits_run, tmp_path):
    trained = load_trained(digits_run)
    export.prune_linear(trained.model, 0.5, "layer")
    for name, weight in export.linear_weights(trained.model).items():
        assert (weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01), name
    assert not any(name.endswith("_mask") for name, _ in trained.model.named_buffers())  # made permanent


def test_bad_input_exits_2_with_a_message(digits_run, tmp_path, capsys):
    def refused(args: list[str], *words: str) -> None:
        assert run_export(args) == 2, args
        err = capsys.readouterr().err
        for word in words:
            assert word in err, (word, err)

    refused([digits_run, "export.prune_amount=1.0"], "export.prune_amount=1.0", "[0, 1)")
    refused([digits_run, "export.prune_amount=-0.1"], "export.prune_amount")
    refused([digits_run, "export.prune_amont=0.3"], "did you mean prune_amount")
    refused([digits_run, "export.quantize=int4"], "export.quantize")
    refused([tmp_path / "missing"], "no config.yaml")
    refused([digits_run, "recipe=gpt"], "recipe=gpt", "does not match")
    refused([digits_run, "checkpoint=step_7"], "no such checkpoint", "step_150")

    corrupt = tmp_path / "corrupt"
    shutil.copytree(digits_run, corrupt)
    model_file = next((corrupt / "checkpoints").glob("step_*")) / "model.pt"
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model_file.write_bytes(bytes(data))
    refused([corrupt], "checksum mismatch")
    assert not (corrupt / "export").exists()  # nothing written

    # The real command line, once: exit code 2 and one message, no traceback.
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.export", str(digits_run), "export.prune_amount=1.5"],
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(),
    )
    assert proc.returncode == 2, proc.stderr
    assert "export.prune_amount=1.5" in proc.stderr and "Traceback" not in proc.stderr


def test_pipeline_shards_are_merged_and_old_runs_guess_their_recipe(digits_run, tmp_path):
    """A checkpoint in the pipeline layout (model_pp0.pt + model_pp1.pt, whole-model names) loads as one
    model; one without a recorded recipe (older runs) is matched to the built-in recipe by its config."""
    run = tmp_path / "pp_run"
    shutil.copytree(digits_run, run)
    ckpt = next((run / "checkpoints").glob("step_*"))
    state = torch.load(ckpt / "model.pt", weights_only=True)
    first = {k: v for k, v in state.items() if k.startswith(("stem.", "blocks.0."))}
    shards = {"model_pp0.pt": first, "model_pp1.pt": {k: v for k, v in state.items() if k not in first}}
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "model.pt").unlink()
    del meta["files"]["model.pt"]
    meta.pop("recipe", None)  # main records it (train_state identity); older runs do not
    for name, part in shards.items():
        torch.save(part, ckpt / name)
        meta["files"][name] = export.sha256(ckpt / name)
    (ckpt / "meta.json").write_text(json.dumps(meta))
    trained = load_trained(run)
    assert trained.recipe_path == "digits"
    loaded = trained.model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_fallback_without_torchao_is_loadable(digits_run, tmp_path, monkeypatch):
    """torch's deprecated quantize_dynamic, used when torchao is missing: the export loads and agrees."""
    monkeypatch.setattr(export, "quantize_backend", lambda: "torch.ao")
    out = tmp_path / "fallback"
    args = [digits_run, f"export.out={out}", "export.latency_batch_sizes=[1]", "export.latency_repeats=1"]
    assert run_export(args) == 0
    report = json.loads((out / "export_report.json").read_text())
    assert report["settings"]["quantize_backend"] == "torch.ao"
    exported = load_trained(out)
    assert exported.export_meta["quantize_backend"] == "torch.ao"
    loader = export.eval_loader(exported.recipe, 64, 0)
    assert report["after"]["eval"] == pytest.approx(export.evaluate(exported.model, exported.recipe, loader))
    assert report["after"]["eval"]["eval_accuracy"] >= report["before"]["eval"]["eval_accuracy"] - 0.02
    assert report["after"]["parameters"] == report["before"]["parameters"]
    assert report["before"]["linear_weight_bytes"] / report["after"]["linear_weight_bytes"] >= 3.0
