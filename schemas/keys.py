"""Sample keys: ``{shard:05d}{index:0Nd}``, unique across a dataset, dot-free, zero-padded, sortable.

Keys derive from the input order only (the shard an input row falls in and its position there), so the same
input gives the same keys on every run and runner. webdataset splits a member name at its first dot, so a key
must never contain one.
"""

from __future__ import annotations

SHARD_DIGITS = 5
MIN_INDEX_DIGITS = 4


def index_digits(shard_size: int) -> int:
    """Digits for the index part: 4, or more when a shard holds more than 10,000 samples."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return max(MIN_INDEX_DIGITS, len(str(shard_size - 1)))


def make_key(shard: int, index: int, digits: int = MIN_INDEX_DIGITS) -> str:
    """The key of the ``index``-th row of shard ``shard``."""
    if not 0 <= shard < 10**SHARD_DIGITS:
        raise ValueError(f"shard id {shard} does not fit in {SHARD_DIGITS} digits")
    if not 0 <= index < 10**digits:
        raise ValueError(f"index {index} does not fit in {digits} digits")
    return f"{shard:0{SHARD_DIGITS}d}{index:0{digits}d}"


def key_for_row(row: int, shard_size: int) -> str:
    """The key of global input row ``row`` when inputs are cut into shards of ``shard_size`` rows."""
    return make_key(row // shard_size, row % shard_size, index_digits(shard_size))


def parse_key(key: str) -> tuple[int, int]:
    """``(shard, index)`` of a key made by :func:`make_key`."""
    if not key.isdigit() or len(key) < SHARD_DIGITS + MIN_INDEX_DIGITS:
        raise ValueError(f"not a visinstruct key: {key!r}")
    return int(key[:SHARD_DIGITS]), int(key[SHARD_DIGITS:])


def shard_name(shard: int) -> str:
    """The file stem of a shard: ``00042`` for shard 42."""
    return f"{shard:0{SHARD_DIGITS}d}"
