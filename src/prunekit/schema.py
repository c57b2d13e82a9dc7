"""Plain data (parsed YAML or JSON) checked against a dataclass's type hints, with clear messages.

Every message names the key path (``prune.sparsity``) and what was expected.

:func:`build_section` turns a mapping into the dataclass, converting what is safe to convert (an
integer where a number is expected, a single string where a list is), and raises the caller's error
class (a ``ValueError``) for an unknown key (with a "did you mean") or a value of the wrong type.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, Union

from .registry import did_you_mean

__all__ = ["build_section", "coerce", "describe", "type_name", "unknown_key"]


def describe(hint: Any) -> str:
    """A type hint in words: ``int | None -> "an integer or null"``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is list:
        return f"a list of {describe(args[0])[2:]}s" if args else "a list"
    if origin is dict or hint is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "null", Any: "anything"}.get(hint, str(hint))


def type_name(value: Any) -> str:
    """What a value is, in words: ``3 -> "an integer"``."""
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping", type(None): "null"}.get(type(value), type(value).__name__)


def coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    """(ok, value converted to ``hint``): ints are numbers, a single string is a one-item list."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True, value
    if origin in (Union, types.UnionType):
        for arg in args:
            ok, converted = coerce(value, arg)
            if ok:
                return True, converted
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            return False, value
        items = [coerce(v, args[0]) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            return False, value
        items = {k: coerce(v, args[1]) for k, v in value.items()}
        return all(ok for ok, _ in items.values()), {k: v for k, (_, v) in items.items()}
    raise TypeError(f"unsupported schema type {hint!r}")


def unknown_key(path: str, key: Any, known: Iterable[str], error: type[ValueError] = ValueError) -> ValueError:
    """The error for ``key`` at ``path`` that is not one of ``known`` (with the closest as a hint)."""
    known = list(known)
    hint = did_you_mean(key, known)
    where = f"{path}.{key}" if path else str(key)
    return error(f"unknown key {where!r}{hint} (known keys{' of ' + path if path else ''}: {', '.join(known)})")


def build_section(raw: Any, path: str, cls: type, error: type[ValueError] = ValueError,
                  advice: Callable[[str, Any], str] | None = None) -> Any:
    """Build the dataclass ``cls`` from the mapping ``raw`` (``None``: every default), checking keys and
    types; ``error`` is raised, its message extended by ``advice(key, value)`` for a wrong type."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise error(f"{path}: expected a mapping of keys, got {type_name(raw)} {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in names:
            raise unknown_key(path, key, names, error)
        ok, converted = coerce(value, hints[key])
        if not ok:
            hint = advice(key, value) if advice is not None else ""
            raise error(f"{path}.{key}: expected {describe(hints[key])}, got {type_name(value)} {value!r}{hint}")
        values[key] = converted
    return cls(**values)
