"""One config mechanism for the whole project: frozen dataclasses, named presets, ``key=value`` overrides.

Every configurable thing (a model, a training run, an experiment) is a frozen dataclass. A registry maps
preset names to instances; the command line passes overrides as ``--set key=value`` strings, which are
parsed against the field's declared type, so a typo or a bad value fails loudly before any work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Iterable, TypeVar

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse_value(text: str, annotation: Any, key: str) -> Any:
    """Parse ``text`` as a value of ``annotation`` (int, float, bool, str, None-able, tuples of those)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _parse_value(text, arg, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"override {key}={text!r}: not a valid {annotation} ({'; '.join(errors)})")
    if origin is tuple:
        items = [t for t in text.replace("(", "").replace(")", "").split(",") if t.strip()]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_parse_value(t.strip(), args[0], key) for t in items)
        if len(items) != len(args):
            raise ValueError(f"override {key}={text!r}: expected {len(args)} comma-separated values")
        return tuple(_parse_value(t.strip(), a, key) for t, a in zip(items, args))
    if origin is typing.Literal:
        for a in args:
            if str(a) == text:
                return a
        raise ValueError(f"override {key}={text!r}: expected one of {list(args)}")
    if annotation is bool:
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"override {key}={text!r}: expected a boolean (true/false)")
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"override {key}={text!r}: expected an integer") from None
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"override {key}={text!r}: expected a number") from None
    if annotation is str:
        return text
    raise ValueError(f"override {key}: fields of type {annotation} cannot be set from the command line")


def apply_overrides(config: T, overrides: Iterable[str] | dict[str, Any]) -> T:
    """Return a copy of the frozen dataclass ``config`` with ``overrides`` applied.

    Args:
      config: a dataclass instance.
      overrides: ``["d_model=256", "rope=false"]`` strings (parsed against the field types) or a dict of
        already-typed values.

    Raises:
      ValueError: an override is not ``key=value``, names no field of the config, or has a value that
        does not parse as the field's type. The message names the key and what was expected.
    """
    hints = typing.get_type_hints(type(config))
    names = {f.name for f in dataclasses.fields(config)}
    changes: dict[str, Any] = {}
    items = overrides.items() if isinstance(overrides, dict) else parse_overrides(overrides).items()
    for key, value in items:
        if key not in names:
            raise ValueError(
                f"override {key!r}: {type(config).__name__} has no such field; fields are {sorted(names)}")
        changes[key] = _parse_value(value, hints[key], key) if isinstance(value, str) else value
    return dataclasses.replace(config, **changes)


def parse_overrides(overrides: Iterable[str]) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}`` (values still strings; a later key wins).

    Raises:
      ValueError: an item is not ``key=value``.
    """
    out = {}
    for override in overrides:
        if "=" not in override:
            raise ValueError(f"override {override!r}: expected key=value")
        key, value = override.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def get_preset(presets: dict[str, T], name: str, kind: str = "preset") -> T:
    """Look up ``name`` in ``presets``; raise ``ValueError`` listing the known names if it is absent."""
    if name not in presets:
        raise ValueError(f"unknown {kind} {name!r}; known: {sorted(presets)}")
    return presets[name]
