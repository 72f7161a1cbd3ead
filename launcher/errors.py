"""Errors the launcher reports to users without a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """Invalid configuration: the CLI prints it on rank 0 and every rank exits with code 2.

    Args:
        field: dotted config key, e.g. `train.steps`.
        value: the offending value.
        problem: what is wrong with it.
        fix: the override to type, or what to change.
    """

    def __init__(self, field: str, value: Any, problem: str, fix: str = "") -> None:
        self.field, self.value, self.problem, self.fix = field, value, problem, fix
        message = f"{field}={_show(value)}: {problem}"
        if fix:
            message += f"\n  fix: {fix}"
        super().__init__(message)


def config_object(build: Callable[[], T], explain: Callable[[Exception], ConfigError]) -> T:
    """Run an OmegaConf conversion (merge, to_object) with any failure reported as a ConfigError.

    A recipe Config's own ConfigError (raised in its __post_init__, which OmegaConf wraps) comes through
    as it is; any other failure as `explain(err)` words it.
    """
    try:
        return build()
    except ConfigError:
        raise
    except (OmegaConfBaseException, ValueError, TypeError) as err:
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise explain(err) from None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest choice, or ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def one_of(choices: Iterable[str]) -> str:
    return ", ".join(sorted(choices))


def _show(value: Any) -> str:
    if hasattr(value, "value") and isinstance(value.value, str):  # str Enums
        return value.value
    return repr(value) if isinstance(value, str) and (not value or " " in value) else str(value)
