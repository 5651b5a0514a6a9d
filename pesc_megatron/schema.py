"""Typed settings from plain dicts (YAML, JSON): `from_dict` builds a settings dataclass and
rejects unknown keys and wrong types with one line that names the key. The dataclasses check
their own values in `__post_init__` and raise `ConfigError` naming `SECTION.key=value`."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any


class UserError(ValueError):
    """An error a user can cause (a setting, a file, a record): its message is one line, and the
    CLI prints it and exits with code 2."""


class ConfigError(UserError):
    """A user-caused configuration error; its message is one line naming the key and value."""


def _check_type(where: str, name: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{where}{name}: expected {hint.__name__}, got {value!r}")
    return value


def from_dict(cls, values: dict, where: str = ""):
    """Builds dataclass `cls` from `values`; unknown keys, wrong types and values its
    `__post_init__` rejects are a ConfigError. `where` prefixes the key in messages (e.g.
    "job.yaml: pesc."); the dataclass's own messages already name `SECTION.`."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"{where}{unknown[0]}: unknown option (known: {', '.join(sorted(names))})")
    checked = {k: _check_type(where, k, v, hints[k]) for k, v in values.items()}
    try:
        return cls(**checked)
    except ConfigError as e:
        section = getattr(cls, "SECTION", "")
        prefix = where[:-len(section) - 1] if section and where.endswith(f"{section}.") else where
        raise ConfigError(f"{prefix}{e}") from None


def invalid(section: str, obj, key: str, msg: str) -> ConfigError:
    """The error for `obj.key` of settings section `section`: 'section.key=value: msg'."""
    return ConfigError(f"{section}.{key}={getattr(obj, key)!r}: {msg}")
