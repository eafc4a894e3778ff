"""Derive pyarrow schemas from the record dataclasses, and convert records to and from rows.

One mapping serves every table we write, so a record class and its table can never drift apart:

=====================  ==========================================================
Python annotation      Arrow type
=====================  ==========================================================
``str``                ``string``
``int``                ``int64``
``float``              ``float64``
``bool``               ``bool``
``bytes``              ``binary``
``X | None``           ``X``, nullable
``list[X]``            ``list<X>``
``dict[str, int]``     ``map<string, int64>``
``JsonDict``           ``string`` holding compact, key-sorted JSON
a record dataclass     ``struct`` of its fields
=====================  ==========================================================

A field may carry ``metadata={"key": "from"}`` to use another name in rows and JSON (LLaVA's ``from``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import pyarrow as pa

T = TypeVar("T")


class JsonDict(dict):
    """Annotation marker: a free-form JSON object (e.g. source columns), stored as a JSON string in Arrow."""


_SCALARS: dict[Any, pa.DataType] = {
    str: pa.string(),
    int: pa.int64(),
    float: pa.float64(),
    bool: pa.bool_(),
    bytes: pa.binary(),
}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """Return ``(inner, nullable)`` for ``X | None`` and ``Optional[X]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"only X | None unions are supported, got {tp}")
        return args[0], True
    return tp, False


@functools.cache  # resolving string annotations costs ~0.4 ms a class, and rows are converted by the million
def type_hints(cls: type) -> dict[str, Any]:
    """A record class's resolved annotations (callers only read the dict)."""
    return typing.get_type_hints(cls)


def field_key(f: dataclasses.Field) -> str:
    """The name a field has in rows and JSON."""
    return f.metadata.get("key", f.name)


def arrow_type(tp: Any) -> pa.DataType:
    """The Arrow type for one annotation (see the module docstring for the mapping)."""
    tp, _ = _unwrap_optional(tp)
    if tp is JsonDict:
        return pa.string()
    if tp in _SCALARS:
        return _SCALARS[tp]
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return pa.list_(arrow_type(item))
    if origin is dict:
        key, value = typing.get_args(tp)
        return pa.map_(arrow_type(key), arrow_type(value))
    if dataclasses.is_dataclass(tp):
        return pa.struct([_arrow_field(f, type_hints(tp)[f.name]) for f in dataclasses.fields(tp)])
    raise TypeError(f"no Arrow type for annotation {tp!r}")


def _arrow_field(f: dataclasses.Field, tp: Any) -> pa.Field:
    _, nullable = _unwrap_optional(tp)
    return pa.field(field_key(f), arrow_type(tp), nullable=nullable)


@functools.lru_cache(maxsize=None)  # built from type hints on every call otherwise: ~1 ms, per shard read
def arrow_schema(cls: type, schema_version: int | None = None) -> pa.Schema:
    """The Arrow schema of a record class; the record name and schema version ride in its metadata."""
    hints = type_hints(cls)
    fields = [_arrow_field(f, hints[f.name]) for f in dataclasses.fields(cls)]
    metadata = {"visinstruct.record": cls.__name__}
    if schema_version is not None:
        metadata["visinstruct.schema_version"] = str(schema_version)
    return pa.schema(fields, metadata=metadata)


def _step(convert: Callable[[Any], Any] | None, value: Any) -> Any:
    return value if convert is None else convert(value)


# Rows are converted by the million (every index row and dead letter of a run), so each annotation is analysed once
# into a converter (``None``: the value as it is) instead of once per value.


@functools.cache
def _encoder(tp: Any) -> Callable[[Any], Any] | None:
    """How a non-None value annotated ``tp`` becomes a row cell; ``None`` when it is the cell as it is."""
    tp, _ = _unwrap_optional(tp)
    if tp is JsonDict:
        return _json_text
    origin = typing.get_origin(tp)
    if origin is list:
        item = _encoder(typing.get_args(tp)[0])
        return list if item is None else functools.partial(_each, item)
    if origin is dict:
        return functools.partial(_sorted_pairs, _encoder(typing.get_args(tp)[1]))
    if dataclasses.is_dataclass(tp):
        return to_row
    return None


@functools.cache
def _decoder(tp: Any) -> Callable[[Any], Any] | None:
    """How a non-None row cell becomes a value annotated ``tp``; ``None`` when it is the value as it is."""
    tp, _ = _unwrap_optional(tp)
    if tp is JsonDict:
        return _json_value
    origin = typing.get_origin(tp)
    if origin is list:
        item = _decoder(typing.get_args(tp)[0])
        return list if item is None else functools.partial(_each, item)
    if origin is dict:
        return functools.partial(_mapping, _decoder(typing.get_args(tp)[1]))
    if dataclasses.is_dataclass(tp):
        return functools.partial(from_row, tp)
    if tp is float:
        return _float
    return None


def _json_text(value: Any) -> str:
    if isinstance(value, dict) and not value:  # most detail and source cells: no call into the encoder
        return "{}"
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _json_value(value: Any) -> dict:
    return json.loads(value) if isinstance(value, str) else dict(value)


def _each(convert: Callable[[Any], Any], values: Any) -> list:
    return [None if v is None else convert(v) for v in values]


def _sorted_pairs(convert: Callable[[Any], Any] | None, value: dict) -> list[tuple]:
    return [(k, _step(convert, v) if v is not None else None) for k, v in sorted(value.items())]


def _mapping(convert: Callable[[Any], Any] | None, value: Any) -> dict:
    pairs = value.items() if isinstance(value, dict) else value
    return {k: _step(convert, v) if v is not None else None for k, v in pairs}


def _float(value: Any) -> Any:
    return float(value) if isinstance(value, int) else value


@functools.cache
def _plan(cls: type) -> tuple[tuple[str, str, Callable[[Any], Any] | None, Callable[[Any], Any] | None], ...]:
    """Per field of a record class: its name, its row key, its encoder and its decoder."""
    hints = type_hints(cls)
    return tuple(
        (f.name, field_key(f), _encoder(hints[f.name]), _decoder(hints[f.name])) for f in dataclasses.fields(cls)
    )


def to_row(record: Any) -> dict[str, Any]:
    """A record as a plain dict that ``pa.Table.from_pylist(..., schema=arrow_schema(cls))`` accepts."""
    row = {}
    for name, key, encode, _ in _plan(type(record)):
        value = getattr(record, name)
        row[key] = value if encode is None or value is None else encode(value)
    return row


def from_row(cls: type[T], row: dict[str, Any]) -> T:
    """Rebuild a record from a row (as ``Table.to_pylist()`` or ``to_row`` give it); missing keys take defaults."""
    kwargs = {}
    for name, key, _, decode in _plan(cls):
        if key in row:
            value = row[key]
            kwargs[name] = value if decode is None or value is None else decode(value)
    return cls(**kwargs)


def to_table(records: list[Any], cls: type, schema_version: int | None = None) -> pa.Table:
    """Records of one class as an Arrow table with that class's schema."""
    return pa.Table.from_pylist([to_row(r) for r in records], schema=arrow_schema(cls, schema_version))


def from_table(cls: type[T], table: pa.Table) -> list[T]:
    """The records of a table written with :func:`to_table`."""
    return [from_row(cls, row) for row in table.to_pylist()]
