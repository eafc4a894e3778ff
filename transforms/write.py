"""Finalize a shard: drop cross-shard duplicates, write tar, parquet index, dead-letter table, then stats.

Order matters for retries: the staging files (and temporary files a killed write left) are removed only after
``_stats.json`` exists, and ``_stats.json`` is written last, so a shard is either complete (stats present) or can
be finished again from staging (also by a rerun after a kill: see :mod:`visinstruct.transforms.staging`).
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import replace

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from visinstruct.schemas import SCHEMA_VERSION, IndexRow, JsonDict, Rejection, ShardStats, parse_key, shard_name
from visinstruct.transforms.download import REJECTED_DIR
from visinstruct.transforms.guard import guarded, internal_error
from visinstruct.transforms.shards import (
    TarShardWriter,
    exists,
    join,
    read_stats,
    read_tar_samples,
    shard_paths,
    write_stats,
    write_table,
)
from visinstruct.transforms.staging import ShardDraft, remove_staging
from visinstruct.transforms.timing import busy

log = logging.getLogger(__name__)
DEDUP_MESSAGES = {
    "duplicate_sha256": "same image bytes as {}",
    "near_duplicate": "near-identical to {}",
    "near_reference": "near-identical to reference image {}",
}


def dedup_rejection(row: IndexRow, reason: str, other: str) -> Rejection:
    """The dead-letter row of a written row that lost to ``other`` (a smaller key or a reference image)."""
    message = DEDUP_MESSAGES.get(reason, reason + " of {}").format(other)
    return Rejection(
        "dedup",
        reason,
        message,
        row.key,
        row.url or row.path,
        JsonDict({"duplicate_of": other, "sha256": row.sha256, "phash": row.phash}),
    )


def apply_losers(draft: ShardDraft, losers: list[tuple[str, str, str]]) -> ShardDraft:
    """The draft with each loser's row turned into a dedup rejection (any error: an ``internal_error`` one)."""
    by_key = {key: (reason, other) for key, reason, other in losers}
    rows, rejections = [], list(draft.rejections)
    for row in draft.rows:
        if row.key in by_key and row.status == "success":
            rejection = guarded(
                "dedup", functools.partial(dedup_rejection, row, *by_key[row.key]), row.key, row.url or row.path
            )
            rejections.append(rejection)
            row = replace(row, status=rejection.reason, error_message=rejection.message, members=[])
        rows.append(row)
    return replace(draft, rows=rows, rejections=sorted(rejections, key=lambda r: r.key))


def write_shard_tar(draft: ShardDraft, staged: set[str], tar_path: str) -> tuple[list[IndexRow], int]:
    """Write the final tar from the staging tar (holding ``staged``), keeping only successful rows.

    Returns the rows with their members' offsets in the final tar, and the tar's size.
    """
    keep = {row.key for row in draft.rows if row.status == "success"}
    source = draft.staging_tar if exists(draft.staging_tar) else tar_path  # a retry after the rename
    if keep == staged:  # nothing dropped: the staging tar is the final tar, offsets included
        if source != tar_path:
            if exists(tar_path):
                FileSystems.delete([tar_path])
            FileSystems.rename([source], [tar_path])
        return draft.rows, FileSystems.match([tar_path])[0].metadata_list[0].size_in_bytes
    writer = TarShardWriter()
    members = {}
    try:
        for key, sample in read_tar_samples(source):
            if key in keep:
                members[key] = writer.add(key, list(sample.items()))
        size = writer.finish(tar_path)
    except BaseException:
        writer.abort()
        raise
    rows = [replace(row, members=members.get(row.key, [])) for row in draft.rows]
    return rows, size


def unstaged_as_errors(rows: list[IndexRow], rejections: list[Rejection]) -> tuple[list, list]:
    """Rows marked written whose sample the staging tar lacked become ``internal_error`` rejections.

    Never expected; but an index must not claim a sample its tar does not hold.
    """
    missing = [row for row in rows if row.status == "success" and not row.members]
    if not missing:
        return rows, rejections
    log.warning("%d written rows have no sample in the staging tar (first: %s)", len(missing), missing[0].key)
    lost = {
        row.key: internal_error(
            "download", LookupError("the staging tar lacks this sample"), row.key, row.url or row.path
        )
        for row in missing
    }
    rows = [
        replace(row, status=lost[row.key].reason, error_message=lost[row.key].message) if row.key in lost else row
        for row in rows
    ]
    return rows, sorted([*rejections, *lost.values()], key=lambda r: r.key)


def remove_leftover_temps(out_dir: str, shard: int, stage: str = "ingest") -> None:
    """Delete temporary files of this shard's final files that a killed write left behind (local ones are
    ``.NNNNN.tar.<hex>.tmp``, remote ones ``NNNNN.tar.tmp-<hex>``); called once the shard is complete."""
    name = shard_name(shard)
    patterns = [
        join(out_dir, f".{name}[._]*.tmp"),
        join(out_dir, f"{name}[._]*.tmp-*"),
        join(out_dir, REJECTED_DIR, f".{stage}-{name}.parquet.*.tmp"),
        join(out_dir, REJECTED_DIR, f"{stage}-{name}.parquet.tmp-*"),
    ]
    found = []
    for pattern in patterns:
        try:
            found += [m.path for m in FileSystems.match([pattern])[0].metadata_list]
        except Exception:  # noqa: BLE001 - no such folder: nothing to remove
            continue
    if found:
        FileSystems.delete(found)


def finalize_shard(
    draft: ShardDraft, losers: list[tuple[str, str, str]], out_dir: str, stage: str = "ingest"
) -> ShardStats:
    """Write every file of a shard; ``_stats.json`` last. Idempotent: a finished shard is left alone."""
    paths = shard_paths(out_dir, draft.shard)
    if exists(paths["stats"]):
        return read_stats(paths["stats"])
    staged = {row.key for row in draft.rows if row.members}
    draft = apply_losers(draft, losers)
    rows, tar_bytes = write_shard_tar(draft, staged, paths["tar"])
    rows, rejections = unstaged_as_errors(rows, draft.rejections)
    write_table(paths["parquet"], rows, IndexRow, SCHEMA_VERSION)
    write_table(
        join(out_dir, REJECTED_DIR, f"{stage}-{shard_name(draft.shard)}.parquet"),
        rejections,
        Rejection,
        SCHEMA_VERSION,
    )
    reasons = Counter(row.status for row in rows if row.status != "success")
    written = sum(row.status == "success" for row in rows)
    stats = ShardStats(
        shard=draft.shard,
        stage=stage,
        inputs=len(rows),
        written=written,
        rejected=len(rows) - written,
        rejected_by_reason=dict(reasons),
        tar_bytes=tar_bytes,
        duration_s=round(draft.duration_s, 3),
    )
    write_stats(paths["stats"], stats)
    remove_staging(out_dir, draft.shard)  # the draft, and the tars of every download attempt of this shard
    remove_leftover_temps(out_dir, draft.shard, stage)
    return stats


class FinalizeShard(beam.DoFn):
    """``(shard, {"draft": [ShardDraft], "losers": [Loser]})`` -> :class:`ShardStats`."""

    def __init__(self, out_dir: str, stage: str = "ingest"):
        self.out_dir, self.stage = out_dir, stage
        self.written = beam.metrics.Metrics.counter(stage, "written")
        self.rejected = beam.metrics.Metrics.counter(stage, "rejected")

    def process(self, element):
        shard, groups = element
        drafts = list(groups["draft"])
        if not drafts:  # losers of an already complete shard: it was finalized with the same decisions
            return
        losers = [loser for loser in groups["losers"] if parse_key(loser[0])[0] == shard]
        with busy(self.stage):
            stats = finalize_shard(drafts[0], losers, self.out_dir, self.stage)
        self.written.inc(stats.written)
        self.rejected.inc(stats.rejected)
        for reason, count in stats.rejected_by_reason.items():
            beam.metrics.Metrics.counter(self.stage, f"dropped_{reason}").inc(count)
        log.info(
            "shard %s: %d written, %d rejected %s",
            shard_name(shard),
            stats.written,
            stats.rejected,
            dict(stats.rejected_by_reason),
        )
        yield stats
