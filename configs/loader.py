"""Load YAML into typed config dataclasses, checking every key and value once, with messages a person can act on.

A config class is a dataclass whose fields are made with :func:`opt` (default + one-line doc). Supported
annotations: ``str``, ``int``, ``float``, ``bool``, ``X | None``, ``list[X]``, ``dict[str, X]``,
``Literal[...]`` and nested config dataclasses. A class may name keys it refuses in a ``REFUSED`` class attribute
(key -> what to do instead, or a function of the section's given keys that returns it, for advice that depends on
another key such as the chosen backend; ``{section}`` in it becomes the section's own key path, e.g.
``generate.``): a key that would be ignored is an error, never a no-op. Value checks live in the
class's ``__post_init__`` and raise ``ValueError`` naming the field; the loader prefixes the file and the dotted
key path.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")
_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A config file or override that does not fit its config class. The message names the file and key."""


def opt(default: Any = _MISSING, doc: str = "", *, factory: Any = _MISSING) -> Any:
    """A config field with a default (or ``factory`` for mutable defaults) and a one-line description."""
    kwargs: dict[str, Any] = {"metadata": {"doc": doc}}
    if factory is not _MISSING:
        kwargs["default_factory"] = factory
    elif default is not _MISSING:
        kwargs["default"] = default
    return dataclasses.field(**kwargs)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list (each {_type_name(typing.get_args(tp)[0])})"
    if origin is dict:
        return f"a mapping (each value {_type_name(typing.get_args(tp)[1])})"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", type(None): "null"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp`` and return it converted (nested dataclasses built)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: report X's own error (a nested section's key, say)
            return _convert(value, options[0], where)
        for arg in options:
            try:
                return _convert(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"'{where}' must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"'{where}' must be {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"'{where}' must be {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{where}' must be {_type_name(tp)}, got {value!r}")
        _, vtp = typing.get_args(tp)
        return {str(k): _convert(v, vtp, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (str, int, float, bool) and (type(value) is not tp):
        raise ConfigError(f"'{where}' must be {_type_name(tp)}, got {value!r}")
    return value


def _build(cls: type[T], data: Any, where: str) -> T:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"'{where}' must be a mapping of keys to values, got {data!r}"
            if where
            else f"the config must be a mapping of keys to values, got {data!r}"
        )
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{where}." if where else ""
    refused = getattr(cls, "REFUSED", {})  # keys a reader might expect here, and where they belong instead
    for key in data:
        if key in refused:
            why = refused[key](data) if callable(refused[key]) else refused[key]
            raise ConfigError(f"'{prefix}{key}' has no effect here: {why.replace('{section}', prefix)}")
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"unknown key '{prefix}{key}'{hint}")
    kwargs = {}
    for name, f in known.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], f"{prefix}{name}")
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise ConfigError(f"missing required key '{prefix}{name}': {f.metadata.get('doc', '')}".rstrip(": "))
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(f"in '{where}': {e}" if where else str(e)) from None


def from_dict(cls: type[T], data: dict[str, Any], source: str = "<dict>") -> T:
    """Build ``cls`` from a plain mapping; errors name ``source`` and the key."""
    try:
        return _build(cls, data, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"download.timeout=5"`` -> ``(["download", "timeout"], 5)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    path, raw = text.split("=", 1)
    return path.strip().split("."), yaml.safe_load(raw)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of ``data`` with each ``key.path=value`` override set."""
    import copy

    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
        node[path[-1]] = value
    return data


def load(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """Load a YAML file into ``cls``, applying ``key.path=value`` overrides first."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    try:
        data = apply_overrides(data or {}, overrides or [])
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return from_dict(cls, data, str(path))


def describe(
    cls: type, prefix: str = "", documented: dict[type, str] | None = None
) -> list[tuple[str, str, str, str]]:
    """Every key of a config class as ``(dotted key, type, default, doc)`` rows, nested sections expanded.

    ``documented``: config classes documented on their own (class -> command name); a section of one of those
    types is one row pointing there, not its keys again (a build's stage sections).
    """
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)] or [tp]
        if dataclasses.is_dataclass(inner[0]):
            doc = f.metadata.get("doc", "")
            if inner[0] in (documented or {}) and inner[0] is not cls:
                rows.append((prefix + f.name, "section", "", f"{doc} (its keys: see `{documented[inner[0]]}`)"))
                continue
            rows.append((prefix + f.name, "section", "", doc))
            rows.extend(describe(inner[0], prefix + f.name + ".", documented))
            continue
        if f.default is not _MISSING:
            default = repr(f.default)
        elif f.default_factory is not _MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        rows.append((prefix + f.name, _type_name(tp), default, f.metadata.get("doc", "")))
    return rows
