"""python -m launcher.export RUN_DIR: prune, quantize and measure a trained model for inference.

    python -m launcher.export runs/digits/<id> export.prune_amount=0.3 export.quantize=int8_dynamic
    python -m launcher.export runs/gpt/<id> checkpoint=step_200 export.quantize=none export.out=/tmp/gpt

Loads the checkpoint (newest, or `checkpoint=step_N` / a path) with the run's recipe and saved config,
from any parallel layout. Then, on CPU:
  1. L1 magnitude pruning of every Linear weight (`export.prune_scope=global` ranks all of them
     together, `layer` prunes each by the same fraction), made permanent (`prune.remove`);
  2. int8 dynamic quantization of Linear layers with torchao's `quantize_` (int8 weights per output
     row, activations quantized per token at run time). Without torchao installed, torch's
     deprecated `torch.ao.quantization.quantize_dynamic` is the fallback (recorded in export.json);
  3. writes `<out>/model.pt` (state dict, loads with weights_only=True), `export.json` (how to
     rebuild it), `config.yaml`, and `export_report.json`/`.md`: parameters and bytes before/after,
     sparsity, eval loss and the recipe's eval metrics before/after on its eval split, and CPU latency
     per batch before/after.
An earlier export in `<out>` is kept as `<out>.<k>`. Exit codes: 0 done; 2 bad input (config,
checkpoint or recipe), with one line naming it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, Subset

from launcher.after.quantize import quantize_backend, quantize_int8
from launcher.after.trained import EXPORT_META, EXPORT_MODEL, Trained, load_trained, parse_overrides
from launcher.config.schema import ExportConfig, Quantize
from launcher.errors import ConfigError
from launcher.train.checkpoint import CheckpointError, sha256

log = logging.getLogger("launcher.export")
EXIT_BAD_INPUT = 2
REPORT_JSON, REPORT_MD = "export_report.json", "export_report.md"


def check_export_config(cfg: ExportConfig) -> None:
    """Raise ConfigError for the first out-of-range export.* value."""
    if not 0.0 <= cfg.prune_amount < 1.0:
        raise ConfigError(
            "export.prune_amount",
            cfg.prune_amount,
            "must be in [0, 1): the fraction of Linear weights set to zero",
            "e.g. export.prune_amount=0.3, or 0 for no pruning",
        )
    if cfg.prune_scope not in ("global", "layer"):
        raise ConfigError("export.prune_scope", cfg.prune_scope, "must be global or layer")
    if cfg.eval_batches < 0:
        raise ConfigError("export.eval_batches", cfg.eval_batches, "must be >= 0", "0 = the whole eval split")
    for name in ("batch_size", "latency_repeats"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"export.{name}", getattr(cfg, name), "must be >= 1")
    if not cfg.latency_batch_sizes or min(cfg.latency_batch_sizes) < 1:
        raise ConfigError(
            "export.latency_batch_sizes", cfg.latency_batch_sizes, "must be a non-empty list of sizes >= 1"
        )


# --- the transformations --------------------------------------------------------------------------


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def prune_linear(model: nn.Module, amount: float, scope: str) -> None:
    """Zero the `amount` fraction of smallest-magnitude Linear weights, permanently."""
    if amount == 0.0:
        return
    targets = [(m, "weight") for _, m in linear_layers(model)]
    if scope == "global":
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
    else:
        for module, name in targets:
            prune.l1_unstructured(module, name, amount=amount)
    for module, name in targets:
        prune.remove(module, name)  # bake the mask into the weight; no mask buffers in the artifact


# --- measurements ---------------------------------------------------------------------------------


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every Linear weight by name (torchao keeps Linear modules; the fallback replaces them)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            out[name] = module.weight
        elif _is_fallback_linear(module):
            out[name] = module.weight()  # torch.ao's dynamic quantized Linear (the fallback)
    return out


def dense(weight: torch.Tensor) -> torch.Tensor:
    """A weight as a plain float tensor (dequantized if quantized)."""
    if weight.is_quantized or hasattr(weight, "qdata"):  # torch.ao qint8, or torchao's Int8Tensor
        return weight.dequantize().float()
    return weight.detach().float()


def serialized_bytes(tensors: dict[str, Any]) -> int:
    """Bytes that torch.save writes for these tensors: their size on disk."""
    buffer = io.BytesIO()
    torch.save({k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in tensors.items()}, buffer)
    return buffer.getbuffer().nbytes


def parameter_count(model: nn.Module) -> int:
    """Logical parameter count: a quantized weight counts its elements, not its bytes."""
    count = 0
    for module in model.modules():
        count += sum(p.numel() for p in module.parameters(recurse=False))
        if _is_fallback_linear(module):  # its weight and bias live in packed params, not parameters
            bias = module.bias()
            count += module.weight().numel() + (bias.numel() if bias is not None else 0)
    return count


def _is_fallback_linear(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear" and callable(getattr(module, "weight", None))


def sparsity(model: nn.Module) -> float:
    weights = [dense(w) for w in linear_weights(model).values()]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / max(total, 1)


def eval_loader(recipe: Any, batch_size: int, batches: int) -> DataLoader | None:
    dataset = recipe.eval_dataset()
    if dataset is None or len(dataset) == 0:
        return None
    if batches:
        dataset = Subset(dataset, range(min(len(dataset), batches * batch_size)))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


@torch.no_grad()
def evaluate(model: nn.Module, recipe: Any, loader: DataLoader | None) -> dict[str, float]:
    """Sample-weighted means of the recipe's loss and eval_metrics over `loader` (in order)."""
    if loader is None:
        return {}
    metrics_fn = getattr(recipe, "eval_metrics", None)
    sums: dict[str, float] = {}
    count = 0
    for inputs, targets in loader:
        outputs = model(inputs)
        values = {"eval_loss": recipe.loss(outputs, targets)}
        if metrics_fn:
            values.update(metrics_fn(outputs, targets))
        n = len(targets)
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + float(value) * n
        count += n
    return {k: v / count for k, v in sums.items()}


@torch.no_grad()
def latency_ms(
    model: nn.Module, sample: torch.Tensor, batch_sizes: list[int], repeats: int
) -> dict[str, float]:
    """Median CPU milliseconds of one forward pass per batch size (after one warm-up pass)."""
    out = {}
    for size in batch_sizes:
        batch = sample.unsqueeze(0).expand(size, *sample.shape).contiguous()
        model(batch)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(batch)
            times.append((time.perf_counter() - start) * 1e3)
        out[str(size)] = statistics.median(times)
    return out


def measure(model: nn.Module, recipe: Any, loader: DataLoader | None, cfg: ExportConfig) -> dict[str, Any]:
    sample = loader.dataset[0][0] if loader is not None else None
    sizes, repeats = cfg.latency_batch_sizes, cfg.latency_repeats
    return {
        "parameters": parameter_count(model),
        "linear_weight_bytes": serialized_bytes(linear_weights(model)),
        "state_dict_bytes": serialized_bytes(model.state_dict()),
        "sparsity": sparsity(model),
        "eval": evaluate(model, recipe, loader),
        "latency_ms_per_batch": (latency_ms(model, sample, sizes, repeats) if sample is not None else {}),
    }


# --- the command ----------------------------------------------------------------------------------


def export(trained: Trained, cfg: ExportConfig, out: Path) -> dict[str, Any]:
    """Prune and quantize `trained.model` in place, save it to `out`; returns the report."""
    torch.manual_seed(0)
    model, recipe = trained.model.cpu().eval(), trained.recipe
    loader = eval_loader(recipe, cfg.batch_size, cfg.eval_batches)
    before = measure(model, recipe, loader, cfg)
    model_files = [name for name in os.listdir(trained.source) if name.startswith("model")]
    before["bytes_on_disk"] = sum((trained.source / name).stat().st_size for name in model_files)
    prune_linear(model, cfg.prune_amount, cfg.prune_scope)
    backend = quantize_backend()
    if cfg.quantize == Quantize.int8_dynamic:
        if backend != "torchao":
            log.warning("torchao is not installed: falling back to torch.ao.quantization.quantize_dynamic")
        quantize_int8(model, backend)
    after = measure(model, recipe, loader, cfg)

    tmp = out.parent / f".tmp_{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(model.state_dict(), tmp / EXPORT_MODEL)
    after["bytes_on_disk"] = (tmp / EXPORT_MODEL).stat().st_size
    run_config = OmegaConf.to_container(trained.run_cfg)
    meta = {
        "recipe": trained.recipe_path,
        "recipe_config": run_config.get("recipe", {}),
        "run_config": run_config,
        "source": str(trained.source),
        "step": trained.step,
        "quantize": cfg.quantize.value,
        "quantize_backend": backend if cfg.quantize == Quantize.int8_dynamic else None,
        "prune_amount": cfg.prune_amount,
        "prune_scope": cfg.prune_scope,
        "sha256": sha256(tmp / EXPORT_MODEL),
        "torch": torch.__version__,
    }
    (tmp / EXPORT_META).write_text(json.dumps(meta, indent=1))
    (tmp / "config.yaml").write_text(OmegaConf.to_yaml(trained.run_cfg))
    report = {
        "source": str(trained.source),
        "step": trained.step,
        "recipe": trained.recipe_path,
        "settings": {
            "prune_amount": cfg.prune_amount,
            "prune_scope": cfg.prune_scope,
            "quantize": cfg.quantize.value,
            "quantize_backend": meta["quantize_backend"],
            "eval_samples": len(loader.dataset) if loader is not None else 0,
            "latency_repeats": cfg.latency_repeats,
            "torch_threads": torch.get_num_threads(),
        },
        "before": before,
        "after": after,
    }
    (tmp / REPORT_JSON).write_text(json.dumps(report, indent=1))
    (tmp / REPORT_MD).write_text(report_markdown(report))
    _replace_dir(tmp, out)
    return report


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move `tmp` to `out`; an existing `out` is kept as `out.<k>`, never overwritten."""
    if out.exists():
        k = 1
        while out.with_name(f"{out.name}.{k}").exists():
            k += 1
        out.rename(out.with_name(f"{out.name}.{k}"))
        log.info("kept the previous export as %s", out.with_name(f"{out.name}.{k}"))
    tmp.rename(out)


def report_markdown(report: dict[str, Any]) -> str:
    before, after, s = report["before"], report["after"], report["settings"]
    lines = [
        f"# Export of {report['source']} (step {report['step']}, {report['recipe']})",
        "",
        f"prune {s['prune_amount']} ({s['prune_scope']}), quantize {s['quantize']}"
        + (f" ({s['quantize_backend']})" if s["quantize_backend"] else "")
        + f"; eval on {s['eval_samples']} samples; latency: median of {s['latency_repeats']} CPU runs, "
        f"{s['torch_threads']} threads",
        "",
        "| | before | after | after / before |",
        "| --- | ---: | ---: | ---: |",
    ]

    def row(name: str, a: float, b: float, fmt: str) -> None:
        ratio = f"{b / a:.3f}" if a else "-"
        lines.append(f"| {name} | {a:{fmt}} | {b:{fmt}} | {ratio} |")

    row("parameters", before["parameters"], after["parameters"], ",d")
    row("model bytes on disk", before["bytes_on_disk"], after["bytes_on_disk"], ",d")
    row("Linear weight bytes", before["linear_weight_bytes"], after["linear_weight_bytes"], ",d")
    row("sparsity of Linear weights", before["sparsity"], after["sparsity"], ".4f")
    for key in sorted(before["eval"]):
        row(key, before["eval"][key], after["eval"].get(key, float("nan")), ".5f")
    for size in before["latency_ms_per_batch"]:
        row(
            f"latency ms, batch {size}",
            before["latency_ms_per_batch"][size],
            after["latency_ms_per_batch"][size],
            ".3f",
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    positional = [a for a in argv if "=" not in a]
    try:
        if len(positional) != 1:
            raise ConfigError(
                "RUN_DIR",
                " ".join(positional),
                "expected exactly one run directory",
                "python -m launcher.export RUN_DIR [checkpoint=step_N] [export.prune_amount=0.3] ...",
            )
        sections, plain = parse_overrides([a for a in argv if "=" in a], {"export": ExportConfig})
        unknown = set(plain) - {"checkpoint", "recipe"}
        if unknown:
            key = sorted(unknown)[0]
            raise ConfigError(key, plain[key], "unknown option", "use checkpoint=, recipe= or export.<key>=")
        cfg: ExportConfig = sections["export"]
        check_export_config(cfg)
        trained = load_trained(positional[0], plain.get("checkpoint"), plain.get("recipe"))
        if trained.export_meta is not None:
            raise ConfigError("RUN_DIR", positional[0], "is an export already", "pass the run directory")
    except (ConfigError, CheckpointError) as err:
        print(f"launcher.export: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = Path(cfg.out) if cfg.out else Path(positional[0]) / "export"
    report = export(trained, cfg, out)
    print(report_markdown(report))
    log.info("exported to %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
