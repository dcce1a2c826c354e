"""The machinery every config section shares: coercion of each field to its annotated
type, range and choice checks whose errors name the field and what is allowed, and how a
section labels a trial in MLflow (its run name fragment and tags)."""

from __future__ import annotations

import math
import typing
from dataclasses import fields
from typing import Any, ClassVar, Iterable, Mapping

__all__ = ["ConfigError", "INF", "Section", "fail"]


class ConfigError(ValueError):
    """A config field has an unknown name, a wrong type or an out-of-range value."""


def fail(name: str, value: Any, allowed: str) -> typing.NoReturn:
    raise ConfigError(f"{name}={value!r} is invalid: allowed {allowed}")


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Return ``value`` as ``annotation`` (bool, int, float, str, tuple[int, ...], or one of
    them | None, where None means "not set")."""
    options = typing.get_args(annotation)
    if type(None) in options:
        if value is None:
            return None
        (annotation,) = [a for a in options if a is not type(None)]
    if annotation in (int, float) and isinstance(value, str):
        # YAML 1.1 reads "5e-4" (no dot) as a string; a number is what was meant.
        try:
            value = float(value)
        except ValueError:
            pass
    if annotation is bool:
        if isinstance(value, bool):
            return value
        fail(name, value, "true or false")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        fail(name, value, "an integer")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        fail(name, value, "a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        fail(name, value, "a string")
    if typing.get_origin(annotation) is tuple:
        if isinstance(value, (list, tuple)):
            (item_type, _) = typing.get_args(annotation)
            return tuple(_coerce(f"{name}[{i}]", v, item_type) for i, v in enumerate(value))
        fail(name, value, "a list")
    raise TypeError(f"unsupported annotation {annotation!r} for {name}")


class Section:
    """Mixin of every config section: coerce each field to its annotated type, refuse a
    field set where the section's other fields say it is not read (``read_only_when``),
    then run the section's own ``_validate``. A section also says how it labels a trial
    run (``label``, ``label_fields``, ``tags``): tracking asks every section, so a new
    section labels its trials without a change there."""

    section: ClassVar[str] = ""
    # field -> {other field: the values under which the field is read}. Setting the field
    # away from its default where one condition fails is an error naming both.
    read_only_when: ClassVar[Mapping[str, Mapping[str, tuple[Any, ...]]]] = {}
    # The fields label() shows: a run name does not repeat them as key=value.
    label_fields: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            value = _coerce(self._name(f.name), getattr(self, f.name), hints[f.name])
            object.__setattr__(self, f.name, value)
        self._validate()
        self._check_read()

    @classmethod
    def label(cls, flat: Mapping[str, Any]) -> str:
        """This section's fragment of a trial's run name ("" for none), read from the
        trial's flat config (``{"quant.bits": 4, ...}``; keys may be missing)."""
        return ""

    @classmethod
    def tags(cls, flat: Mapping[str, Any]) -> dict[str, str]:
        """Tags this section puts on every trial run, for filtering in the MLflow UI."""
        return {}

    @classmethod
    def get(cls, flat: Mapping[str, Any], field_name: str) -> Any:
        """A field of this section from a flat config, its default where missing."""
        default = {f.name: f.default for f in fields(cls)}[field_name]  # type: ignore
        return flat.get(f"{cls.section}.{field_name}", default)

    def _check_read(self) -> None:
        defaults = {f.name: f.default for f in fields(self)}  # type: ignore[arg-type]
        for name, conditions in self.read_only_when.items():
            value = getattr(self, name)
            unmet = [k for k, allowed in conditions.items() if getattr(self, k) not in allowed]
            if value == defaults[name] or not unmet:
                continue
            now = ", ".join(f"{self._name(k)}={_text(getattr(self, k))}" for k in unmet)
            need = ", ".join(f"{self._name(k)} " + " or ".join(_text(v) for v in allowed)
                             for k, allowed in conditions.items())
            shown = list(value) if isinstance(value, tuple) else value
            fail(self._name(name), shown, f"{_text(defaults[name])} with {now} "
                                          f"({self._name(name)} is read with {need})")

    def _name(self, field_name: str) -> str:
        return f"{self.section}.{field_name}"

    def _choice(self, field_name: str, allowed: Iterable[str]) -> None:
        value = getattr(self, field_name)
        allowed = tuple(allowed)
        if value not in allowed:
            fail(self._name(field_name), value, "one of " + ", ".join(allowed))

    def _range(self, field_name: str, lo: float, hi: float, lo_open: bool = False,
               hi_open: bool = False) -> None:
        value = getattr(self, field_name)
        below = value <= lo if lo_open else value < lo
        above = value >= hi if hi_open else value > hi
        if math.isnan(value) or below or above:
            lower = f"> {lo}" if lo_open else f">= {lo}"
            upper = "" if hi == INF else (f" and < {hi}" if hi_open else f" and <= {hi}")
            fail(self._name(field_name), value, f"a value {lower}{upper}")

    def _validate(self) -> None:  # overridden by sections with rules
        pass


INF = math.inf


def _text(value: Any) -> str:
    """A value as a config file writes it (true, [4, 8])."""
    if isinstance(value, bool):
        return str(value).lower()
    return str(list(value)) if isinstance(value, tuple) else str(value)
