"""Values against the sections' types: each YAML value checked against its field's annotation and converted where
YAML is loose (`1e-5` is a string in YAML 1.1, `4.0` an integer), mappings built into the section dataclasses. An
unknown key or a wrong type is one ConfigError naming the key and what is valid."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal

from fulltune.errors import ConfigError


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting where YAML is loose (1e-5 is a str in YAML 1.1)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        # true/false for a choice with auto and no: `mixed_precision: true` in a CLIP fine-tuning config.yaml is
        # torch.cuda.amp's fp16 + GradScaler (amp), false is no.
        if isinstance(value, bool) and "auto" in args and "no" in args:
            return ("amp" if "amp" in args else "auto") if value else "no"
        if value in args:
            return value
        raise ConfigError(f"config key '{key}': expected one of {', '.join(map(repr, args))}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping of {tp.__name__} fields, got {value!r}")
        return build(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            if origin is list and isinstance(value, str) and args and args[0] is str:
                value = [v for v in value.split(",") if v]
            else:
                raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"config key '{key}': expected {len(args)} values, got {value!r}")
            return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item = args[0] if args else Any
        out = [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    return _coerce_scalar(value, tp, key)


def _coerce_scalar(value: Any, tp: Any, key: str) -> Any:
    """bool, int, float or str from YAML's loose scalars ('1e-5', 'true', 3.0 for an int)."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
    if tp in (int, float):
        return _coerce_number(value, tp, key)
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    return value


def _coerce_number(value: Any, tp: type, key: str) -> int | float:
    """An int (4, 4.0, '4') or a float (1, 1e-5, '1e-5'); booleans are neither."""
    if not isinstance(value, bool):
        if isinstance(value, int) or (tp is float and isinstance(value, float)):
            return tp(value)
        if tp is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return tp(value)
            except ValueError:
                pass
    raise ConfigError(f"config key '{key}': expected {'an integer' if tp is int else 'a number'}, got {value!r}")


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """The dataclass `cls` (Config or one of its sections) from a mapping of its fields, each value coerced; `prefix`
    is the section's dotted key, for the errors."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            where = f"section '{prefix}'" if prefix else "the top level"
            raise ConfigError(f"unknown config key '{full}'{hint}; valid keys in {where}: {', '.join(names)}")
        kwargs[key] = coerce(value, hints[key], full)
    return cls(**kwargs)
