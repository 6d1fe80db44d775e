"""Typed configs: pydantic dataclasses loaded from YAML, ``--set key=value`` overrides and CLI options.

One validator for every config of the project (pydantic). Unknown keys and wrong types are refused
with a ``ValueError`` that names the key and the value; the config classes themselves declare their
fields, types (``Literal`` for choices) and checks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import TypeAdapter, ValidationError

C = TypeVar("C")


def _where(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if not isinstance(p, int)) or "config"


def _message(err: dict) -> str:
    """One pydantic error as a sentence that names the key and the value."""
    where, value = _where(err["loc"]), err.get("input")
    name = where.rsplit(".", 1)[-1]
    kind = err["type"]
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return f"unknown config key {where!r}"
    if kind == "value_error":  # our own checks already name the field and the value
        return str(err["ctx"]["error"])
    if kind == "literal_error":
        return f"{where} must be one of {err['ctx']['expected']}, got {name}={value!r}"
    return f"{where}: {err['msg'][0].lower()}{err['msg'][1:]}, got {name}={value!r}"


def validation_error(e: ValidationError) -> ValueError:
    """A ``ValueError`` whose text lists every problem of ``e``, one per line."""
    return ValueError("; ".join(dict.fromkeys(_message(err) for err in e.errors())))


def from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Build config ``cls`` from a (nested) dict; every problem is a ``ValueError`` naming the key."""
    if not isinstance(data, dict):
        raise ValueError(f"a {cls.__name__} must be a mapping, got {data!r}")
    try:
        return TypeAdapter(cls).validate_python(data)
    except ValidationError as e:
        raise validation_error(e) from None


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.strip().split(".")
    for p in parts[:-1]:
        child = node.get(p)
        node[p] = dict(child) if isinstance(child, dict) else {}
        node = node[p]
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["sampling.lam=0.3", "seeds=[0,1]"]`` → nested dict updates (values parsed as YAML)."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        _set(data, key, yaml.safe_load(raw))
    return data


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None,
                values: dict[str, Any] | None = None) -> C:
    """YAML file, then ``key=value`` overrides (parsed as YAML), then typed ``values`` (CLI options).

    ``values`` maps dotted keys (``"sampling.lam"``) to values; ``None`` means "not given".
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {str(p)!r} does not exist")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {str(p)!r} must hold a mapping")
    data = apply_overrides(data, overrides or [])
    for key, v in (values or {}).items():
        if v is not None:
            _set(data, key, v)
    return from_dict(cls, data)


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
