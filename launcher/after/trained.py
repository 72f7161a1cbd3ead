"""A trained model back from disk: a run directory (saved config + checkpoint) or an export of one.

Shared by `launcher.export`, `launcher.serve` and `launcher.generate`. A run directory holds
`config.yaml` and `checkpoints/step_<N>/`; the model is rebuilt by its recipe and loaded from any
parallel layout it was trained with (`model.pt`, or pipeline shards `model_pp<k>.pt` keyed by the
whole model's parameter names, merged back, or FSDP's DCP shards in `sharded/`, gathered whole). An
export directory (`export.json`, see launcher/after/export.py) is rebuilt the same way, quantized first
when it was quantized (launcher/after/quantize.py).

Which recipe trained a run: the checkpoint's `meta.json` records it (`recipe`); older runs are
matched against the built-in recipes by the keys of their saved config; `recipe=` on the command
line overrides both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from launcher.after.quantize import prepare_for_weights
from launcher.errors import ConfigError, config_object, did_you_mean, one_of
from launcher.recipe import load_recipe_class
from launcher.train.checkpoint import CheckpointError, complete_checkpoints, load_file, read_meta, sha256

EXPORT_META = "export.json"
EXPORT_MODEL = "model.pt"


def recipe_import_path(cls: type) -> str:
    """`pkg.module:Class`, what `recipe=` accepts and `meta.json` records."""
    return f"{cls.__module__}:{cls.__qualname__}"


@dataclass
class Trained:
    """A model ready for inference, and where it came from."""

    model: nn.Module
    recipe: Any
    recipe_path: str
    run_cfg: DictConfig
    """The run's saved config.yaml (train.*, precision.* ...), as loaded."""
    source: Path
    """The checkpoint directory, or the export directory."""
    step: int
    export_meta: dict[str, Any] | None = None
    """export.json when loaded from an export, else None."""


def parse_overrides(args: list[str], sections: dict[str, type]) -> tuple[dict[str, Any], dict[str, str]]:
    """`section.key=value` overrides onto each section's dataclass; other `key=value` pass through.

    Returns:
        ({section: dataclass instance}, {plain key: value}) — plain keys are e.g. `checkpoint`, `recipe`.

    Raises:
        ConfigError: malformed override, unknown key, or a value of the wrong type.
    """
    dotlists: dict[str, list[str]] = {name: [] for name in sections}
    plain: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ConfigError("override", arg, "not key=value", "e.g. export.prune_amount=0.3")
        section, dot, rest = key.partition(".")
        if dot and section in sections:
            known = [f.name for f in fields(sections[section])]
            if rest not in known:
                raise ConfigError(
                    key,
                    value,
                    f"unknown key{did_you_mean(rest, known)}",
                    f"valid keys in {section}: {one_of(known)}",
                )
            dotlists[section].append(f"{rest}={value}")
        else:
            plain[key] = value
    out = {}
    for name, schema in sections.items():
        try:
            merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(dotlists[name]))
            out[name] = OmegaConf.to_object(merged)
        except OmegaConfBaseException as err:
            field = f"{name}.{getattr(err, 'full_key', '') or '?'}"
            raise ConfigError(field, "", f"wrong type or value: {str(err).splitlines()[0]}") from None
    return out, plain


def load_trained(path: str | Path, checkpoint: str | None = None, recipe: str | None = None) -> Trained:
    """Rebuild the model of a run directory (newest checkpoint, or `checkpoint`) or of an export.

    Raises:
        ConfigError: not a run/export directory, unknown recipe, or a recipe that does not match.
        CheckpointError: a missing, corrupt or unloadable checkpoint or export file.
    """
    path = Path(path)
    if (path / EXPORT_META).is_file():
        return _load_export(path)
    if not (path / "config.yaml").is_file():
        raise ConfigError(
            "RUN_DIR",
            str(path),
            "is neither a run directory (no config.yaml) nor an export (no export.json)",
            "pass the run.dir of a finished training run, or the export.out of `python -m launcher.export`",
        )
    run_cfg = _read_yaml(path / "config.yaml")
    ckpt = _choose_checkpoint(path, checkpoint)
    meta = read_meta(ckpt)
    recipe_path = recipe or meta.get("recipe") or _guess_recipe(run_cfg)
    recipe_obj = build_recipe(recipe_path, run_cfg.get("recipe", {}))
    model = recipe_obj.build_model()
    state = _sharded_model(ckpt, meta, model) if meta.get("format") == "dcp" else _model_files(ckpt, meta)
    load_matching(model, state, recipe_path, ckpt)
    model.eval()
    return Trained(model, recipe_obj, recipe_path, run_cfg, ckpt, int(meta["step"]))


def _model_files(ckpt: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    model_files = sorted(name for name in meta["files"] if name.startswith("model"))
    if not model_files:
        raise CheckpointError(f"{ckpt}: holds no model file (model.pt or model_pp<k>.pt)")
    for name in model_files:  # pipeline shards hold disjoint parts of one model: their union is the model
        state.update(load_file(ckpt, name, meta))
    return state


def _sharded_model(ckpt: Path, meta: dict[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """A sharded (DCP) checkpoint's model, gathered whole in this process, after every file is verified."""
    from launcher.train.sharded_checkpoint import SHARDED_DIR, load_full_model, saved_shapes

    names = [name for name in meta["files"] if name.startswith(f"{SHARDED_DIR}/")]
    if not names:
        raise CheckpointError(f"{ckpt}: holds no {SHARDED_DIR}/ files")
    for name in names:
        path = ckpt / name
        if not path.is_file() or sha256(path) != meta["files"][name]:
            raise CheckpointError(f"{path}: missing, or checksum mismatch (corrupt or truncated)")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if saved_shapes(ckpt) != shapes:  # the recipe's model differs: say so as load_state_dict would
        raise ConfigError(
            "recipe",
            meta.get("recipe", ""),
            f"its model does not match the weights in {ckpt} (parameter names or shapes differ)",
            "pass the recipe (and recipe.* settings) this run was trained with",
        )
    try:
        return load_full_model(ckpt, model)
    except Exception as err:  # noqa: BLE001 - any failure to load is reported the same way
        raise CheckpointError(
            f"{ckpt / SHARDED_DIR}: refused to load ({type(err).__name__}: {err})"
        ) from None


def build_recipe(recipe_path: str, recipe_section: Any) -> Any:
    """The recipe object for a saved `recipe:` config section; a mismatch is a ConfigError."""
    from recipes import BUILTIN

    cls = load_recipe_class(BUILTIN.get(recipe_path, recipe_path))

    def mismatch(err: Exception) -> ConfigError:
        return ConfigError(
            "recipe",
            recipe_path,
            f"does not match the saved config ({str(err).splitlines()[0]})",
            "pass the recipe this run was trained with: recipe=<name or pkg.module:Class>",
        )

    schema = OmegaConf.structured(cls.Config)
    return cls(config_object(lambda: OmegaConf.to_object(OmegaConf.merge(schema, recipe_section)), mismatch))


def load_matching(model: nn.Module, state: dict[str, torch.Tensor], recipe_path: str, source: Path) -> None:
    """load_state_dict, turning missing/unexpected keys or shape mismatches into a ConfigError."""
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise ConfigError(
            "recipe",
            recipe_path,
            f"its model does not match the weights in {source}: {detail}",
            "pass the recipe (and recipe.* settings) this run was trained with",
        ) from None


def _choose_checkpoint(run_dir: Path, checkpoint: str | None) -> Path:
    root = run_dir / "checkpoints"
    if checkpoint:
        ckpt = Path(checkpoint) if "/" in checkpoint else root / checkpoint
        if not ckpt.is_dir():
            found = [p.name for p in complete_checkpoints(root)]
            raise CheckpointError(
                f"checkpoint={checkpoint}: no such checkpoint ({ckpt}); complete ones: {found or 'none'}"
            )
        return ckpt
    found = complete_checkpoints(root)
    if not found:
        raise CheckpointError(f"{root}: no complete checkpoint; train first, or pass checkpoint=<path>")
    return found[0]


def _guess_recipe(run_cfg: DictConfig) -> str:
    """The built-in recipe whose config has exactly the keys of the saved `recipe:` section."""
    from recipes import BUILTIN

    saved = _key_tree(OmegaConf.to_container(run_cfg.get("recipe", {})))
    matches = []
    for name, path in BUILTIN.items():
        if _key_tree(OmegaConf.to_container(OmegaConf.structured(load_recipe_class(path).Config))) == saved:
            matches.append(name)
    if len(matches) != 1:
        raise ConfigError(
            "recipe",
            "",
            "cannot tell which recipe trained this run (its checkpoint does not record it)",
            "pass it: recipe=<name or pkg.module:Class>",
        )
    return matches[0]


def _key_tree(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _key_tree(v) for k, v in node.items()}
    return None


def _read_yaml(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except (OSError, OmegaConfBaseException, ValueError) as err:
        raise ConfigError(str(path), "", f"unreadable ({str(err).splitlines()[0]})") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(str(path), "", "is not a mapping")
    return cfg


def _load_export(path: Path) -> Trained:
    try:
        meta = json.loads((path / EXPORT_META).read_text())
        recipe_path, recipe_section = meta["recipe"], meta["recipe_config"]
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path / EXPORT_META}: unreadable ({err})") from None
    model_file = path / EXPORT_MODEL
    if not model_file.is_file():
        raise CheckpointError(f"{model_file}: missing")
    if sha256(model_file) != meta.get("sha256"):
        raise CheckpointError(f"{model_file}: checksum mismatch, the file is corrupt or truncated")
    recipe_obj = build_recipe(recipe_path, recipe_section)
    model = recipe_obj.build_model()
    # The module structure the weights were saved from (quantized Linear layers hold int8 tensors).
    prepare_for_weights(model, meta["quantize"], meta.get("quantize_backend") or "torchao")
    try:
        state = torch.load(model_file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to load is reported the same way
        raise CheckpointError(f"{model_file}: refused to load ({type(err).__name__}: {err})") from None
    load_matching(model, state, recipe_path, path)
    model.eval()
    run_cfg = OmegaConf.create(meta.get("run_config", {}))
    return Trained(model, recipe_obj, recipe_path, run_cfg, path, int(meta.get("step", 0)), meta)
