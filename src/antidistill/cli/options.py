"""CLI options derived from the config classes: one ``--option`` per chosen field, typed and documented
by the field itself, so no setting is declared twice."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from typing import Any, Literal, Optional

import typer


def _field(cls, dotted: str) -> tuple[dataclasses.Field, object]:
    """The dataclass field at ``dotted`` (``"sampling.lam"``) below config class ``cls``, and its type."""
    *parents, leaf = dotted.split(".")
    for name in parents:
        cls = typing.get_type_hints(cls)[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return fields[leaf], typing.get_type_hints(cls)[leaf]


def _scalar(tp) -> type:
    """The type typer parses an option as: choices and optionals become their base type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return type(args[0])
    if origin is typing.Union or (origin is not None and type(None) in args):
        return _scalar(next(a for a in args if a is not type(None)))
    return tp


def _help(field: dataclasses.Field, tp) -> str:
    info = field.default if hasattr(field.default, "description") else None
    text = (getattr(info, "description", None) or "").strip()
    if typing.get_origin(tp) is Literal and "|" not in text:
        text = f"{text} ({' | '.join(map(str, typing.get_args(tp)))})".strip()
    return text


def config_options(cls, fields: list[str]):
    """Decorator: give a typer command one ``--option`` per dotted field of config class ``cls``.

    The command receives the given ones as ``values: dict[str, Any]`` (dotted key → value, ``None``
    left out), ready for ``config.load_config(cls, path, overrides, values)``.
    """

    def decorate(command):
        sig = inspect.signature(command)
        added = []
        for dotted in fields:
            field, tp = _field(cls, dotted)
            name = dotted.rsplit(".", 1)[-1]
            flag = name.replace("_", "-")
            decl = f"--{flag}/--no-{flag}" if _scalar(tp) is bool else f"--{flag}"  # booleans are flags
            option = typer.Option(None, decl, help=_help(field, tp))
            added.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                           annotation=Optional[_scalar(tp)]))

        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            values: dict[str, Any] = {}
            for dotted in fields:
                v = kwargs.pop(dotted.rsplit(".", 1)[-1])
                if v is not None:
                    values[dotted] = v
            return command(*args, values=values, **kwargs)

        hints = typing.get_type_hints(command)  # resolved where the command is defined
        params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()
                  if p.name != "values"] + added
        wrapper.__signature__ = sig.replace(parameters=params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__  # typer must read the new signature, not the command's
        return wrapper

    return decorate
