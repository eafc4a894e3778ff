"""Commit a shard: the one place that writes a shard's files, in an order that is safe for a rewrite in place.

Ingest's finalize, every stage that rewrites shards (filter, generate) and ``remove`` hand their result here: the
index rows (one per input row), the dead letters this stage made, and the tar of the kept samples. The order
survives a kill at any point, even when the shard is rewritten in its own folder:

1. the dead-letter table (``rejected/<stage>-NNNNN.parquet``): the rewrite's journal, naming what it drops;
2. ``_stats.json`` is deleted: from here the shard reads as incomplete, so a rerun redoes it;
3. the tar, then the index, each replaced atomically;
4. ``_stats.json``, counted again from the rows, last: its presence marks the shard complete.

Until the tar is replaced the shard is the old one, readable as it was. ``dropped_<reason>`` counters are counted
from the same dead letters (:func:`drops`), never from stats, so rows an earlier stage rejected and this one only
carried are not this stage's drops.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable

from visinstruct.schemas import SCHEMA_VERSION, IndexRow, Rejection, ShardStats, from_table
from visinstruct.transforms.layout import ShardFiles, write_stats
from visinstruct.transforms.shards import TarShardWriter, delete, exists, is_remote, match, read_table, write_table

# The kept samples: a writer holding them (written to the shard's tar name), or a finished tar file (moved there).
TarSource = TarShardWriter | str


def recount(shard: int, stage: str, rows: list[IndexRow], tar_bytes: int = 0, duration_s: float = 0.0) -> ShardStats:
    """The shard's stats, counted from its index rows (``ShardStats`` refuses counts that do not add up)."""
    reasons = Counter(r.status for r in rows if r.status != "success")
    written = len(rows) - sum(reasons.values())
    return ShardStats(
        shard=shard,
        stage=stage,
        inputs=len(rows),
        written=written,
        rejected=len(rows) - written,
        rejected_by_reason=dict(reasons),
        tar_bytes=tar_bytes,
        duration_s=round(duration_s, 3),
    )


def drops(dead: Iterable[Rejection]) -> Counter[str]:
    """This stage's drops by reason: the dead letters it commits for a shard (carried rows have none here)."""
    return Counter(r.reason for r in dead)


def committed_drops(files: ShardFiles, stage: str) -> Counter[str]:
    """:func:`drops` of the dead letters ``stage`` committed for a finished shard (none when it has no table).

    What a retried bundle counts for a shard its first attempt committed: Beam keeps only the counters of the
    attempt that succeeds, so the retry must count the drops it finds instead of the ones it would have made.
    """
    if not exists(files.rejected(stage)):
        return Counter()
    return drops(from_table(Rejection, read_table(files.rejected(stage), Rejection)))


def commit_shard(
    files: ShardFiles, rows: list[IndexRow], dead: list[Rejection], tar: TarSource, stage: str, duration_s: float
) -> ShardStats:
    """Write a shard's files in the kill-safe order of the module docstring; returns the stats written last.

    Args:
        files: where the shard goes (its ``name`` must be a shard number).
        rows: one index row per input row, in key order; written rows carry their members' offsets in ``tar``.
        dead: the dead letters ``stage`` made for this shard (with any earlier ones of the same stage it keeps).
        tar: a :class:`TarShardWriter` holding the kept samples, or the path of a finished tar holding them
            (moved to ``files.tar``; it may already be ``files.tar``, as on a retry after the move).
        stage: the stage that commits: names the dead-letter table and the stats.
        duration_s: seconds the stage spent on the shard.
    """
    if files.number is None:
        raise ValueError(f"{files.tar} is not named like a shard (NNNNN.tar): cannot commit it")
    try:
        recount(files.number, stage, rows)  # before anything is written: counts that do not add up are a bug
        write_table(files.rejected(stage), dead, Rejection, SCHEMA_VERSION)
        if exists(files.stats):
            delete([files.stats])
        tar_bytes = _place_tar(tar, files.tar)
    except BaseException:
        if isinstance(tar, TarShardWriter):
            tar.abort()
        raise
    write_table(files.index, rows, IndexRow, SCHEMA_VERSION)
    stats = recount(files.number, stage, rows, tar_bytes, duration_s)
    write_stats(files.stats, stats)
    return stats


def _place_tar(tar: TarSource, path: str) -> int:
    """Put the kept samples' tar at ``path`` atomically; returns its size in bytes."""
    if isinstance(tar, TarShardWriter):
        return tar.finish(path)
    if tar != path:
        _move(tar, path)
    return match(path)[0].size


def _move(source: str, target: str) -> None:
    """Rename ``source`` to ``target``, replacing it (one rename locally; delete then rename on object stores)."""
    if not is_remote(target):
        os.replace(source, target)
        return
    from apache_beam.io.filesystems import FileSystems  # only remote paths pay for importing Beam

    if FileSystems.exists(target):
        FileSystems.delete([target])
    FileSystems.rename([source], [target])
