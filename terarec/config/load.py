"""Generic config loading: YAML (with YAML 1.2 numbers), ``--set`` overrides, typed
conversion of plain data into the config dataclasses with errors naming the key."""

from __future__ import annotations

import dataclasses
import enum
import re
import types
import typing
from typing import Any, TypeVar, Union

import yaml

from terarec.config.base import ConfigError, StrEnum

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Converts a YAML value to ``tp``; raises ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: must not be null")
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key)
    if value is None:
        raise ConfigError(f"{key}: must not be null (expected {_type_name(tp)})")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, (str, dict)) or not isinstance(value, (list, tuple)):
            if inner is str and isinstance(value, str):
                value = [value]  # a single path or feature name is a one-element list
            else:
                raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if isinstance(tp, type) and issubclass(tp, StrEnum):
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__}")
        try:
            return tp.from_str(value)
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)  # 1e6 in YAML
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {tp}")  # pragma: no cover


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    where = prefix or "top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{prefix + '.' if prefix else ''}{unknown[0]}: unknown key "
            f"(allowed: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required key is missing")
    try:
        return cls(**kwargs)
    except ValueError as e:
        msg = str(e)
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{prefix + '.' if prefix else ''}{msg}") from None


_INDEXED = re.compile(r"^([^\[\]]+)\[(\d+)\]$")  # tables[0]


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Sets ``dotted`` (``train.steps``, ``tables[0].device_rows``) in YAML data."""
    node: Any = data
    parts = dotted.split(".")
    for i, p in enumerate(parts):
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {parts[i - 1]} is not a mapping")
        last = i == len(parts) - 1
        m = _INDEXED.match(p)
        if m is None:
            if last:
                node[p] = value
            else:
                node = node.setdefault(p, {})
            continue
        name, idx = m.group(1), int(m.group(2))
        items = node.get(name)
        if not isinstance(items, list) or idx >= len(items):
            n = len(items) if isinstance(items, list) else 0
            raise ConfigError(f"--set {dotted}: {name} has no item {idx} (it has {n})")
        if last:
            items[idx] = value
        else:
            node = items[idx]


class Loader(yaml.SafeLoader):
    """YAML's safe loader reading ``1e-3`` and ``1e6`` as numbers (YAML 1.2 does; 1.1,
    PyYAML's default, wants ``1.0e-3`` and reads ``1e-3`` as a string)."""


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def config_to_dict(cfg: Any) -> Any:
    """Plain-data (YAML/JSON-able) view of a config, enums as strings."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, list):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, enum.Enum):
        return cfg.value
    return cfg
