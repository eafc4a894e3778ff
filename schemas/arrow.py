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


def _encode(value: Any, tp: Any) -> Any:
    tp, _ = _unwrap_optional(tp)
    if value is None:
        return None
    if tp is JsonDict:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return [_encode(v, item) for v in value]
    if origin is dict:
        _, vtp = typing.get_args(tp)
        return [(k, _encode(v, vtp)) for k, v in sorted(value.items())]
    if dataclasses.is_dataclass(tp):
        return to_row(value)
    return value


def _decode(value: Any, tp: Any) -> Any:
    tp, _ = _unwrap_optional(tp)
    if value is None:
        return None
    if tp is JsonDict:
        return json.loads(value) if isinstance(value, str) else dict(value)
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return [_decode(v, item) for v in value]
    if origin is dict:
        _, vtp = typing.get_args(tp)
        pairs = value.items() if isinstance(value, dict) else value
        return {k: _decode(v, vtp) for k, v in pairs}
    if dataclasses.is_dataclass(tp):
        return from_row(tp, value)
    if tp is float and isinstance(value, int):
        return float(value)
    return value


def to_row(record: Any) -> dict[str, Any]:
    """A record as a plain dict that ``pa.Table.from_pylist(..., schema=arrow_schema(cls))`` accepts."""
    hints = type_hints(type(record))
    return {field_key(f): _encode(getattr(record, f.name), hints[f.name]) for f in dataclasses.fields(record)}


def from_row(cls: type[T], row: dict[str, Any]) -> T:
    """Rebuild a record from a row (as ``Table.to_pylist()`` or ``to_row`` give it); missing keys take defaults."""
    hints = type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = field_key(f)
        if key in row:
            kwargs[f.name] = _decode(row[key], hints[f.name])
    return cls(**kwargs)


def to_table(records: list[Any], cls: type, schema_version: int | None = None) -> pa.Table:
    """Records of one class as an Arrow table with that class's schema."""
    return pa.Table.from_pylist([to_row(r) for r in records], schema=arrow_schema(cls, schema_version))


def from_table(cls: type[T], table: pa.Table) -> list[T]:
    """The records of a table written with :func:`to_table`."""
    return [from_row(cls, row) for row in table.to_pylist()]
