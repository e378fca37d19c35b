"""Typed config machinery: plain dataclasses built from YAML-like mappings, fail-fast.

The leaf of the config stack, importing nothing from must_ray, so that both :mod:`must_ray.config`
(the sections of a run) and every task module (its own knobs, see :mod:`must_ray.task_registry`)
build and check their dataclasses the same way. Every problem raises :class:`ConfigError` naming
the dotted key (``tasks.detection.topk: unknown key; valid keys here: ...``).

A type that is not a dataclass can take part by defining a classmethod
``coerce_config(value, key)`` that returns the built value (the ``tasks`` section does, to build
each task's own config class from the task registry).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Optional, Union


class ConfigError(ValueError):
    """A configuration problem; the message always names the offending dotted key."""


def type_name(tp: Any) -> str:
    """A readable name of a type hint, for messages."""
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce_value(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against type ``tp`` (recursively), converting ints to floats where a float
    is expected and mappings to dataclasses. Raises ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if isinstance(tp, type) and hasattr(tp, "coerce_config"):
        return tp.coerce_config(value, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce_value(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [coerce_value(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return {str(k): coerce_value(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {type(value).__name__} {value!r}")
        return build_dataclass(tp, value, key)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {type_name(tp)}")


def build_dataclass(cls: type, data: dict, prefix: str) -> Any:
    """Dataclass ``cls`` from the mapping ``data`` (keys under the dotted ``prefix``); unknown keys
    and wrong types raise ConfigError. Values are not validated here (see :func:`validate_tree`)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            moved = _nested_field(hints, str(k))
            hint = f" (did you mean {prefix + '.' if prefix else ''}{moved}?)" if moved else ""
            raise ConfigError(f"{key}: unknown key{hint}; valid keys here: {', '.join(sorted(names))}")
        kwargs[k] = coerce_value(v, hints[k], key)
    return cls(**kwargs)


def _nested_field(hints: dict[str, Any], name: str) -> Optional[str]:
    """``group.name`` when a nested dataclass section of these fields has a field ``name`` (a key
    written at the wrong level, e.g. a flat ``lr`` that lives in ``optimizer``)."""
    for group, tp in hints.items():
        if dataclasses.is_dataclass(tp) and name in {f.name for f in dataclasses.fields(tp)}:
            return f"{group}.{name}"
    return None


def validate_tree(obj: Any, key: str) -> None:
    """Run ``validate(dotted_key)`` of every dataclass in ``obj`` (nested in dataclasses, dicts and
    lists), outermost first."""
    if dataclasses.is_dataclass(obj):
        if hasattr(obj, "validate"):
            obj.validate(key)
        for f in dataclasses.fields(obj):
            validate_tree(getattr(obj, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            validate_tree(v, f"{key}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            validate_tree(v, f"{key}[{i}]")


def config_to_dict(cfg: Any) -> Any:
    """A plain (YAML/JSON-ready) copy of a config, e.g. for checkpoints and provenance."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, list):
        return [config_to_dict(v) for v in cfg]
    return cfg


def deep_merge(base: dict, update: dict) -> dict:
    """``base`` updated with ``update``, mappings merged key by key (the other values replaced)."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


__all__ = ["ConfigError", "build_dataclass", "coerce_value", "config_to_dict", "deep_merge", "type_name",
           "validate_tree"]
