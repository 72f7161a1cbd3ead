"""What a recipe is, and how the launcher finds one.

A recipe is any class with the attributes of `Recipe` below; it need not inherit from anything or
import `torch.distributed`. Built-in recipes are listed in `recipes.BUILTIN`; any other is selected by
import path on the command line: `recipe=my_pkg.my_module:MyRecipe`.

The one module a recipe imports from the launcher: `BlockLayout` and `ConfigError` (re-exported from
launcher.errors) for its own checks.
"""

from __future__ import annotations

import importlib
import traceback
from dataclasses import dataclass, is_dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.data import Dataset

from launcher.config.schema import register_recipe_schema
from launcher.errors import ConfigError as ConfigError  # re-exported: recipes need import only this module


@dataclass(frozen=True)
class BlockLayout:
    """Names (module FQNs) of a model's three parts, so the launcher can wrap or split it.

    Contract: `model(x) == post(blocks[-1](... blocks[0](pre(x))))`. Activation checkpointing
    recomputes each block; pipeline parallelism puts `pre` on the first stage, `post` on the last,
    and splits `blocks` between stages.
    """

    pre: str
    blocks: str
    post: str


@runtime_checkable
class Recipe(Protocol):
    """The interface between the launcher and a model/data/loss definition.

    Batches are `(inputs, targets)`; `model(inputs)` gives outputs, `loss(outputs, targets)` their
    mean loss over the batch. Optional attributes:
      - `layout: BlockLayout` — enables activation checkpointing and pipeline splitting.
      - `tokens_per_sample: int` — throughput is then logged as tokens/s instead of samples/s.
      - `eval_metrics(outputs, targets) -> dict[str, Tensor]` — extra per-batch means for eval.
      - `generator(model) -> TextGenerator` — inference hook for text models, used by
        `launcher.serve`/`launcher.generate` (see launcher/after/serve/engine.py). Without it a recipe is
        served tensor in, tensor out: `model(inputs)` on a batch of inputs shaped like its eval samples.
    """

    Config: ClassVar[type]

    def __init__(self, cfg: Any) -> None: ...

    def build_model(self) -> nn.Module: ...

    def train_dataset(self) -> Dataset: ...

    def eval_dataset(self) -> Dataset | None: ...

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...


# Recipe classes by their config class: a composed config's type names its recipe.
_BY_CONFIG: dict[type, type] = {}


def load_recipe_class(path: str) -> type:
    """Import `pkg.module:Class` (or `pkg.module.Class`) and check it looks like a recipe.

    Raises:
        ConfigError: the module or class cannot be found, or the class lacks the Recipe attributes.
    """
    module_name, sep, class_name = path.partition(":")
    if not sep:
        module_name, _, class_name = path.rpartition(".")
    if not module_name or not class_name:
        raise ConfigError("recipe", path, "not an import path", "use recipe=my_pkg.my_module:MyRecipe")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ConfigError(
            "recipe",
            path,
            f"cannot import module {module_name!r} ({err})",
            "make the package importable (pip install -e, or PYTHONPATH) or pick a built-in recipe",
        ) from None
    except Exception as err:  # noqa: BLE001 - the user's module failed while importing: say where
        raise recipe_error(path, "importing its module", err) from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ConfigError("recipe", path, f"module {module_name!r} has no attribute {class_name!r}")
    missing = [
        name
        for name in ("Config", "build_model", "train_dataset", "eval_dataset", "loss")
        if not hasattr(cls, name)
    ]
    if missing:
        raise ConfigError(
            "recipe",
            path,
            f"is not a recipe: it lacks {', '.join(missing)}",
            "see launcher.recipe.Recipe for the interface",
        )
    if not is_dataclass(cls.Config):
        raise ConfigError("recipe", path, "its Config attribute must be a dataclass")
    return cls


def register_builtin_recipes() -> dict[str, type]:
    """Register the schema of each built-in recipe; returns name -> class."""
    from recipes import BUILTIN

    classes = {}
    for name, path in BUILTIN.items():
        cls = load_recipe_class(path)
        register_recipe_schema(name, cls.Config)
        _BY_CONFIG[cls.Config] = cls
        classes[name] = cls
    return classes


def register_recipe_by_path(path: str) -> type:
    """Make `recipe=<import path>` a valid option by registering that recipe's schema under it."""
    cls = load_recipe_class(path)
    register_recipe_schema(path, cls.Config, as_option=True)
    _BY_CONFIG[cls.Config] = cls
    return cls


def recipe_class_for(config: Any) -> type:
    """The recipe class whose `Config` built this config object."""
    try:
        return _BY_CONFIG[type(config)]
    except KeyError:
        raise ConfigError(
            "recipe", type(config).__name__, "no recipe registered for this config type"
        ) from None


def looks_like_import_path(value: str) -> bool:
    return ":" in value or "." in value


def block_layout(recipe: Any) -> BlockLayout | None:
    layout = getattr(recipe, "layout", None)
    return layout if isinstance(layout, BlockLayout) else None


def resolve_blocks(model: nn.Module, layout: BlockLayout) -> nn.ModuleList:
    blocks = model.get_submodule(layout.blocks)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise TypeError(f"layout.blocks={layout.blocks!r} must name an nn.ModuleList, got {type(blocks)}")
    return blocks


def recipe_error(recipe: str, during: str, err: BaseException) -> ConfigError:
    """A recipe's own exception as one ConfigError naming the recipe, what failed and the file:line."""
    return ConfigError(
        "recipe",
        recipe,
        f"{during} raised {type(err).__name__}: {_first_line(err)} (at {user_frame(err)})",
        "fix the recipe; the file and line above are where it failed",
    )


def user_frame(err: BaseException) -> str:
    """file:line of the innermost frame outside torch and the launcher (the recipe's own code)."""
    if isinstance(err, SyntaxError) and err.filename:
        return f"{err.filename}:{err.lineno}"
    frames = traceback.extract_tb(err.__traceback__)
    outside = [f for f in frames if not any(part in f.filename for part in _INTERNAL)]
    frame = (outside or frames or [None])[-1]
    return f"{frame.filename}:{frame.lineno}" if frame else "unknown location"


_INTERNAL = ("/torch/", "/launcher/", "/importlib/", "<frozen")


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0]
