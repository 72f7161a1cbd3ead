"""From argv to validated configs: Hydra composition plus the checks Hydra does not make.

Hydra alone would exit 1 with its own wording on a typo, and would let `+key=value` graft unknown
keys onto the schema. Here every sweep point is composed and checked before anything runs, and
each problem becomes a ConfigError naming the field, the value and the valid choices.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser  # the parser hydra.main itself uses
from hydra.core.global_hydra import GlobalHydra
from hydra.core.object_type import ObjectType
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from launcher.config.auto import resolve_compile
from launcher.config.schema import GROUP_SCHEMAS, GROUPS, Config, register_schemas
from launcher.config.validate import check_config, check_recipe, check_warmup
from launcher.errors import ConfigError, config_object, did_you_mean, one_of
from launcher.memory.autobatch import device_bytes_here, needs_resolving, normalize, resolve_batch
from launcher.recipe import (
    looks_like_import_path,
    recipe_class_for,
    register_builtin_recipes,
    register_recipe_by_path,
)

SizeFor = Callable[[Config], "tuple[int, str] | None"]

log = logging.getLogger(__name__)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
CONFIG_NAME = "config"
# Groups selectable with `group=option`; `experiment` overlays pin combinations.
SELECTABLE = (*GROUPS, "experiment")


@dataclass
class Job:
    """One validated configuration to run."""

    cfg: Config
    recipe_class: type
    recipe_name: str
    """Short recipe name for the default run directory (runs/<recipe_name>/<run id>)."""
    output_dir: str | None = None
    """Set in a multirun sweep: Hydra's per-job directory, used as the default run.dir."""
    overrides: list[str] = field(default_factory=list)
    """The command-line overrides of this job (this sweep point's, in a sweep)."""
    recipe: Any = None
    """The recipe instance validation built (the Trainer reuses it)."""


@dataclass
class Request:
    overrides: list[str]
    multirun: bool
    config_dir: str | None
    config_name: str
    hydra_only: bool
    """--cfg, --info and friends: Hydra answers them, nothing trains."""
    help: bool = False
    """--help: the launcher's own usage text."""
    show_config: bool = False
    """--cfg: validated first, so what it prints would run."""


def parse_argv(argv: list[str]) -> Request:
    args = get_args_parser().parse_args(argv)
    hydra_only = bool(
        args.help
        or args.hydra_help
        or args.cfg
        or args.info
        or args.shell_completion
        or args.experimental_rerun
    )
    if args.config_path:
        raise ConfigError(
            "--config-path",
            args.config_path,
            "replaces the launcher's own config tree",
            "use --config-dir <dir> to add your configs (e.g. <dir>/experiment/mine.yaml)",
        )
    if args.config_dir and not Path(args.config_dir).is_dir():
        raise ConfigError(
            "--config-dir",
            args.config_dir,
            "is not a directory",
            "point it at a folder holding your group folders, e.g. <dir>/experiment/mine.yaml",
        )
    return Request(
        overrides=list(args.overrides),
        multirun=bool(args.multirun),
        config_dir=args.config_dir,
        config_name=args.config_name or CONFIG_NAME,
        hydra_only=hydra_only,
        help=bool(args.help),
        show_config=bool(args.cfg),
    )


def help_text(config_dir: str | None = None) -> str:
    """Usage, the config groups and their options (not Hydra's internal schema groups)."""
    GlobalHydra.instance().clear()
    lines = [
        "usage: python -m launcher [group=option ...] [key=value ...] [-m] [--cfg job] [--config-dir DIR]",
        "       torchrun --standalone --nproc_per_node=N -m launcher ...",
        "",
        "Config groups (group=option):",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="launcher"):
        loader = GlobalHydra.instance().config_loader()
        for group in SELECTABLE:
            options = set(loader.get_group_options(group, results_filter=ObjectType.CONFIG))
            if config_dir:
                options |= {p.stem for p in (Path(config_dir) / group).glob("*.yaml")}
            extra = ", or my_pkg.my_module:MyRecipe" if group == "recipe" else ""
            lines.append(f"  {group:<11} {one_of(options)}{extra}")
    lines += [
        "",
        "Every key can be overridden as key=value, e.g. train.steps=200 optim.lr=3e-4.",
        "  python -m launcher --cfg job [overrides]   prints the composed, validated config (every key)",
        "  launcher/config/ (its dataclasses)          documents every key",
        "  -m key=a,b,c                                a sweep: one job per value",
        "Exit codes: 0 done, 2 invalid config, 3 non-finite loss, 128+N stopped by signal N (saved)",
    ]
    return "\n".join(lines)


def register_all(overrides: list[str]) -> None:
    """Register schemas: the launcher's, the built-in recipes', and any recipe named by import path."""
    register_schemas()
    builtin = register_builtin_recipes()
    for override in _parse(overrides):
        if override.key_or_group == "recipe":
            for value in _values(override):
                if value not in builtin and looks_like_import_path(value):
                    register_recipe_by_path(value)


def compose_jobs(
    request: Request,
    world_size: int | Callable[[Config], int],
    allow_multirun_world: bool = False,
    cuda: bool | Callable[[Config], bool] | None = None,
    size_for: SizeFor | None = device_bytes_here,
) -> list[Job]:
    """Compose and check every job the request describes (one, or one per sweep point).

    Args:
        world_size: processes that will run each job, or a function of the job's config giving it
            (a Slurm submission: nodes x processes per node).
        allow_multirun_world: sweep points become separate jobs (Slurm), not one process's loop.
        cuda: whether the job will run on GPUs (or a function of its config saying so), for the
            `auto` settings (launcher/config/auto.py); default: whether this machine has one.
        size_for: (bytes, name) of the GPU that micro_batch_size=auto sizes for, from the config;
            default: this machine's; None leaves auto for the machine that runs the job.

    Raises:
        ConfigError: the first invalid override, value or combination.
    """
    if request.multirun and isinstance(world_size, int) and world_size > 1 and not allow_multirun_world:
        raise ConfigError(
            "--multirun",
            "",
            f"sweeps run one job at a time in one process, not under {world_size} ranks",
            "run the sweep with plain `python -m launcher -m ...`, "
            "or submit each point as its own job with launcher.slurm",
        )
    parsed = _parse(request.overrides)
    if request.multirun:
        points = _sweep_points(parsed)
    else:
        for override in parsed:
            if override.is_sweep_override():
                raise ConfigError(
                    override.key_or_group,
                    _text(override),
                    "is a sweep (several values)",
                    "add -m to run one job per value",
                )
        points = [request.overrides]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="launcher"):
        return [_compose_job(point, request, world_size, cuda, size_for) for point in points]


def job_from_hydra(
    cfg: DictConfig,
    choices: dict[str, Any],
    output_dir: str | None,
    world_size: int | Callable[[Config], int],
) -> Job:
    """Build a Job from the config hydra.main passes to a multirun task."""
    return _to_job(cfg, choices, output_dir, world_size)


def hydra_main(task: Callable[[DictConfig], None]) -> None:
    """Run Hydra's own main (sweeps, --help, --cfg) over our config tree, calling `task` per job."""
    import hydra

    hydra.main(config_path=str(CONF_DIR), config_name=CONFIG_NAME, version_base="1.3")(task)()


# --- composition ------------------------------------------------------------------------------


def _compose_job(
    overrides: list[str],
    request: Request,
    world_size: int | Callable[[Config], int],
    cuda: bool | Callable[[Config], bool] | None,
    size_for: SizeFor | None,
) -> Job:
    search = [f"hydra.searchpath=[file://{Path(request.config_dir).resolve()}]"] if request.config_dir else []
    parsed = _parse(overrides)
    group_overrides, key_overrides = [], []
    for override in parsed:
        key = override.key_or_group
        if key.startswith("hydra"):
            group_overrides.append(override.input_line)
        elif override.is_delete():
            raise ConfigError(
                key, _text(override), "deleting keys (~) is not supported", "set the value you want instead"
            )
        elif key in SELECTABLE:
            _check_group_option(override, request.config_dir)
            group_overrides.append(override.input_line.lstrip("+"))
        else:
            key_overrides.append(override)
    base = _compose(request.config_name, search + group_overrides)
    for override in key_overrides:
        _check_key(base, override)
    cfg = _compose(request.config_name, search + group_overrides + [o.input_line for o in key_overrides])
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    job = _to_job(cfg, choices, None, world_size, cuda, size_for)
    job.overrides = list(overrides)
    check_warmup(job.cfg, any(o.key_or_group == "optim.warmup_steps" for o in key_overrides))
    return job


def _to_job(
    cfg: DictConfig,
    choices: dict[str, Any],
    output_dir: str | None,
    world_size: int | Callable[[Config], int],
    cuda: bool | Callable[[Config], bool] | None = None,
    size_for: SizeFor | None = device_bytes_here,
) -> Job:
    _reject_extra_keys(cfg, "")

    def explain(err: Exception) -> ConfigError:
        key = getattr(err, "full_key", None) or ("recipe" if _fails(cfg.recipe) else "config")
        if key != "recipe":
            return ConfigError(key, "", _first_line(err))
        fix = "the recipe's Config checks this in __post_init__; fix the recipe.* value"
        return ConfigError(key, choices.get("recipe", ""), _first_line(err), fix)

    config = config_object(lambda: OmegaConf.to_object(cfg), explain)
    assert isinstance(config, Config), type(config)
    if cuda is None:
        cuda = torch.cuda.is_available()
    chose = resolve_compile(config, cuda(config) if callable(cuda) else cuda)
    if chose:
        log.info("%s", chose)
    recipe_class = recipe_class_for(config.recipe)
    ranks = world_size if isinstance(world_size, int) else world_size(config)
    if size_for is None and needs_resolving(config):
        normalize(config)  # auto stays: resolved where the job runs and its GPU is known
    else:
        picked = resolve_batch(config, recipe_class, ranks, size_for)
        if picked:
            log.info("%s", picked)
    recipe = check_recipe(config, recipe_class)  # first: the checks below build the recipe's model too
    check_config(config, recipe_class, ranks)
    recipe_choice = str(choices.get("recipe") or recipe_class.__name__)
    recipe_name = recipe_choice.rsplit(":", 1)[-1].rsplit(".", 1)[-1]
    return Job(config, recipe_class, recipe_name, output_dir, recipe=recipe)


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    try:
        return compose(config_name, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise _explain(err, overrides) from None


def _explain(err: Exception, overrides: list[str]) -> ConfigError:
    """Turn a Hydra/OmegaConf composition error into a ConfigError naming the field."""
    cause = err.__cause__ or err
    key = getattr(cause, "full_key", None)
    if key:
        value = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+") == key), "")
        return ConfigError(
            key,
            value,
            f"wrong type or value: {_first_line(cause)}",
            f"see the docstring of {key} in launcher/config/schema.py or the recipe's Config",
        )
    return ConfigError("config", "", _first_line(err), "check the overrides and conf/ YAML files")


def _check_group_option(override: Override, config_dir: str | None) -> None:
    group = override.key_or_group
    loader = GlobalHydra.instance().config_loader()
    options = set(loader.get_group_options(group, results_filter=ObjectType.CONFIG))
    if config_dir:  # --config-dir joins the search path only when composing: list its options here
        options |= {p.stem for p in (Path(config_dir) / group).glob("*.yaml")}
    for value in _values(override):
        if value not in options:
            raise ConfigError(
                group,
                value,
                f"is not an option of group '{group}'{did_you_mean(value, options)}",
                f"choose one of: {one_of(options)}"
                + ("; a recipe of your own: recipe=my_pkg.my_module:MyRecipe" if group == "recipe" else ""),
            )


def _check_key(base: DictConfig, override: Override) -> None:
    """Reject unknown keys (with suggestions) and `+`/`++` additions to the fixed schema."""
    key = override.key_or_group
    node: Any = base
    path: list[str] = []
    for part in key.split("."):
        if isinstance(node, DictConfig):
            if part not in node and not is_dataclass(OmegaConf.get_type(node)):
                # A free-form mapping (e.g. slurm.env): new entries are fine, added with '+' as Hydra wants.
                if override.is_add() or override.is_force_add():
                    return
                raise ConfigError(
                    key,
                    _text(override),
                    f"{'.'.join(path)} has no entry {part!r} yet",
                    f"add it with a '+': +{key}={_text(override)}",
                )
            if part not in node:
                raise _unknown_key(node, path, part, override)
            node = node[part]
        elif isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise ConfigError(
                key,
                _text(override),
                f"{'.'.join(path)} is a value, not a section",
                f"set {'.'.join(path)}=<value>",
            )
        path.append(part)
    if override.is_add() or override.is_force_add():
        raise ConfigError(
            key,
            _text(override),
            "the schema is fixed; '+' adds nothing here",
            f"drop the '+': {key}={_text(override)}",
        )


def _unknown_key(node: DictConfig, path: list[str], part: str, override: Override) -> ConfigError:
    """An unknown key, with the hint that helps: the group option that has it, or close spellings."""
    key, keys = override.key_or_group, [str(k) for k in node if k != "hydra"]
    if len(path) == 1 and path[0] in GROUP_SCHEMAS:
        owners = [
            o for o, schema in GROUP_SCHEMAS[path[0]].items() if part in {f.name for f in fields(schema)}
        ]
        if owners:
            choices = " or ".join(f"{path[0]}={o}" for o in owners)
            return ConfigError(
                key,
                _text(override),
                f"{key} belongs to {choices}, which is not selected",
                f"add {path[0]}={owners[0]} to the command",
            )
    section = ".".join(path) or "the top level"
    valid = f"valid keys in {section}: {one_of(keys)}" if keys else f"{section} has no keys with this option"
    return ConfigError(
        key,
        _text(override),
        f"unknown key{did_you_mean(_join(path, part), [_join(path, k) for k in keys])}",
        valid,
    )


def _reject_extra_keys(node: Any, prefix: str) -> None:
    """Keys a YAML file or `+` override grafted onto a structured node (OmegaConf allows it)."""
    if not isinstance(node, DictConfig):
        return
    schema = OmegaConf.get_type(node)
    if is_dataclass(schema):
        known = {f.name for f in fields(schema)}
        for key in node:
            if key not in known:
                raise ConfigError(
                    _join(prefix.split(".") if prefix else [], str(key)),
                    node[key],
                    f"unknown key{did_you_mean(str(key), known)}",
                    f"valid keys: {one_of(known)}",
                )
    for key in node:
        _reject_extra_keys(node._get_node(key), _join(prefix.split(".") if prefix else [], str(key)))


def _sweep_points(parsed: list[Override]) -> list[list[str]]:
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [list(point) for batch in batches for point in batch]


def _parse(overrides: list[str]) -> list[Override]:
    try:
        return OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise ConfigError(
            "override",
            " ".join(overrides),
            f"cannot parse: {_first_line(err)}",
            "write overrides as key=value, e.g. train.steps=100",
        ) from None


def _values(override: Override) -> list[str]:
    if override.is_sweep_override():
        return [str(v) for v in override.sweep_iterator()]
    return [str(override.value())]


def _text(override: Override) -> str:
    """The value as typed (also for sweeps, which Hydra will not stringify)."""
    return override.input_line.split("=", 1)[1] if "=" in override.input_line else ""


def _join(path: list[str], key: str) -> str:
    return ".".join([*path, key]) if path else key


def _fails(node: Any) -> bool:
    try:
        OmegaConf.to_object(node)
    except Exception:  # noqa: BLE001 - only whether it fails matters
        return True
    return False


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
