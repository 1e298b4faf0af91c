"""Typed configs: dataclasses filled from YAML files and dotted ``key=value`` overrides.

Every job of the toolkit takes a dataclass config. ``load_config(BuildConfig, "cfg.yaml",
["render.resolution=128"])`` reads the YAML with ``yaml.safe_load``, applies the overrides in
order and converts each value to the field's declared type, so a typo in a key or a wrong type
fails at start-up with the key's full dotted name instead of deep inside a run.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 booleans and floats.

    PyYAML follows YAML 1.1: ``eval_strategy: no`` becomes ``False`` (transformers' and TRL's
    string options such as ``"no"`` must survive as strings) and ``learning_rate: 1e-3`` becomes a
    string (1.1 floats need a dot). Here only true/false are booleans and ``1e-3`` is a float.
    """


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2 booleans (see :class:`_Loader`)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader subclass


class ConfigError(ValueError):
    """A config file or override that does not fit the config's dataclass, or settings that do not
    fit what they are applied to (a training key TRL does not know, a split the dataset lacks)."""


def override(key: str, value: str) -> str:
    """``key=value`` with ``value`` as a YAML double-quoted string, so that :func:`parse_overrides`
    reads back exactly ``value``: a prompt with ':' or '#' stays a string, and one with characters
    outside the BMP (emoji) keeps them, where JSON's \\u escapes would come back as lone surrogates."""
    quoted = yaml.safe_dump(value, default_style='"', allow_unicode=True, width=float("inf")).strip()
    return f"{key}={quoted}"


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[1, 2]"]`` into a nested dict; values are parsed as YAML scalars/lists."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from err
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} sets a key below a non-mapping value")
        node[parts[-1]] = value
    return nested


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins. Neither input is modified."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"config file {path}: cannot be read ({err.strerror or err})") from err
    try:
        data = safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path}: not valid YAML ({err})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build ``cls`` from its defaults, then the YAML file at ``path``, then ``overrides``."""
    data = read_yaml(path) if path is not None else {}
    data = merge(data, parse_overrides(overrides or []))
    return from_dict(cls, data)


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Instantiate dataclass ``cls`` from a (possibly partial) nested dict, with type checks."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(f"{prefix}{k}" for k in unknown)
        raise ConfigError(f"unknown config key(s): {names} (known: {', '.join(sorted(fields))})")
    kwargs = {name: _convert(hints[name], value, f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from err


def to_dict(config: Any) -> Any:
    """Plain-data view of a config (for YAML/JSON dumps of the resolved config)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    if isinstance(config, Path):
        return str(config)
    return config


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


# Written here rather than through pydantic's TypeAdapter: its strict mode refuses a YAML string
# for a Path field, and its lax mode turns "8" into 8 and "yes" into True, the very coercions the
# YAML 1.2 loader above exists to avoid; this keeps the exact checks and the full dotted key in
# every error ("render.resolution: expected an integer, got '8'").
def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {tp}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, tuple, typing.Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *rest) = get_args(tp) or (Any,)
        if origin is tuple and rest and rest[0] is not Ellipsis:
            if len(value) != len(get_args(tp)):
                raise ConfigError(f"{key}: expected {len(get_args(tp))} items, got {len(value)}")
            return tuple(_convert(t, v, f"{key}[{i}]") for i, (t, v) in enumerate(zip(get_args(tp), value)))
        items = [_convert(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {_convert(key_tp, k, key): _convert(val_tp, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            # YAML turns `name=123` into an int; a string field accepts its text form.
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{key}: expected a path, got {value!r}")
        return Path(value)
    return value
