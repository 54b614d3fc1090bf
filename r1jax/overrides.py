"""``--set key=value`` overrides of frozen config dataclasses, shared by every command that takes a config.

A key is a dotted path of dataclass fields (``grpo.group_size``, ``sampling.temperature``); its value is parsed with
the field's annotated type (bool, int, float, str, enums by value, ``X | None`` with ``none``, tuples as
comma-separated items). An unknown key names the closest known one; a value that does not parse names the field and,
for enums, the choices. All overrides of one call are applied together, so fields that must agree can change at once,
and the config's own ``__post_init__`` checks run on the result.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

from r1jax.errors import ConfigError

C = TypeVar("C")


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def config_keys(cfg, prefix: str = "") -> list[str]:
    """Every dotted key that ``--set`` accepts for ``cfg``."""
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(value):
            keys += config_keys(value, prefix + f.name + ".")
    return keys


def _parse(text: str, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _parse(text, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot parse {text!r}")
    if origin is tuple:
        inner = args[0] if args else str
        return tuple(_parse(t.strip(), inner, key) for t in text.split(",") if t.strip())
    try:
        if tp is bool:
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return tp(text)
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if tp is str:
            return text
    except ValueError:
        choices = (
            f" (one of {', '.join(m.value for m in tp)})" if isinstance(tp, type) and issubclass(tp, enum.Enum) else ""
        )
        raise ConfigError(f"{key}: {text!r} is not a valid {getattr(tp, '__name__', tp)}{choices}") from None
    raise ConfigError(f"{key}: cannot be set from the command line (type {tp})")


def _split(item: str | tuple[str, str]) -> tuple[str, str]:
    if isinstance(item, tuple):
        return item
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value")
    key, text = (x.strip() for x in item.split("=", 1))
    return key, text


def apply_overrides(cfg: C, sets: Sequence[str | tuple[str, str]]) -> C:
    """``["grpo.group_size=16", ...]`` -> a new config. Each value is parsed with its field's type; all overrides are
    applied together, so fields that must agree (e.g. reward functions and weights) can change at once. A ``(key,
    text)`` pair is taken as it is (a flag's value: no splitting at ``=``, no stripping of spaces)."""
    changes: dict = {}
    pairs = [_split(item) for item in sets]
    for key, text in pairs:
        node, obj = changes, cfg
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
                close = difflib.get_close_matches(key, config_keys(cfg), n=1)
                raise ConfigError(f"unknown config key {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
            value = getattr(obj, part)
            if i < len(parts) - 1:
                if value is None:
                    raise ConfigError(f"{key}: {'.'.join(parts[: i + 1])} is None in this config")
                node, obj = node.setdefault(part, {}), value
            elif dataclasses.is_dataclass(value):
                raise ConfigError(
                    f"{key} is a group; set one of its fields, e.g. {key}.{dataclasses.fields(value)[0].name}"
                )
            else:
                node[part] = _parse(text, _field_types(type(obj))[part], key)
    try:
        return _rebuild(cfg, changes)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid overrides {' '.join(f'{k}={t}' for k, t in pairs)}: {e}") from None


def _rebuild(obj, changes: dict):
    return dataclasses.replace(
        obj, **{k: _rebuild(getattr(obj, k), v) if isinstance(v, dict) else v for k, v in changes.items()}
    )
