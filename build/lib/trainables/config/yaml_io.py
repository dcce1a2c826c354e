"""Dotted keys and YAML files: how overrides reach a config."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import yaml

from trainables.config.base import ConfigError

__all__ = ["dotted_keys", "yaml_problem", "read_yaml"]


def dotted_keys(values: Mapping[str, Any]) -> dict[str, Any]:
    """Flatten one level of nesting: ``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise ConfigError(f"config key {key!r} is invalid: allowed strings such as optim.lr")
        if isinstance(value, Mapping):
            for sub, sub_value in value.items():
                flat[f"{key}.{sub}"] = sub_value
        else:
            flat[key] = value
    return flat


def yaml_problem(exc: Exception) -> tuple[str, str]:
    """(``"line L, column C"`` or "", the problem) of a YAML parse error."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return where, str(getattr(exc, "problem", None) or exc)


def read_yaml(path: str | Path, sections: tuple[str, ...]) -> Mapping[str, Any]:
    try:
        with open(path) as fh:
            loaded = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: "
                          f"{exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        where, problem = yaml_problem(exc)
        at = f" at {where}" if where else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{at}: "
                          f"{problem}") from None
    if not isinstance(loaded, Mapping):
        raise ConfigError(f"config file {str(path)!r} is invalid: allowed a YAML mapping of "
                          f"sections ({', '.join(sections)}) or dotted keys")
    return loaded
