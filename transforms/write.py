"""Finalize a shard: drop cross-shard duplicates, write tar, parquet index, dead-letter table, then stats.

Order matters for retries: the staging tar is removed only after ``_stats.json`` exists, and ``_stats.json``
is written last, so a shard is either complete (stats present) or can be finished again from staging.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from visinstruct.schemas import SCHEMA_VERSION, IndexRow, JsonDict, Rejection, ShardStats, parse_key, shard_name
from visinstruct.transforms.download import REJECTED_DIR, ShardDraft
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
from visinstruct.transforms.timing import busy

log = logging.getLogger(__name__)
DEDUP_MESSAGES = {"duplicate_sha256": "same image bytes as {}", "near_duplicate": "near-identical to {}",
                  "near_reference": "near-identical to reference image {}"}


def apply_losers(draft: ShardDraft, losers: list[tuple[str, str, str]]) -> ShardDraft:
    """The draft with each loser's row turned into a dedup rejection."""
    by_key = {key: (reason, other) for key, reason, other in losers}
    rows, rejections = [], list(draft.rejections)
    for row in draft.rows:
        if row.key in by_key and row.status == "success":
            reason, other = by_key[row.key]
            message = DEDUP_MESSAGES[reason].format(other)
            rejections.append(Rejection("dedup", reason, message, row.key, row.url or row.path,
                                        JsonDict({"duplicate_of": other, "sha256": row.sha256, "phash": row.phash})))
            row = replace(row, status=reason, error_message=message, members=[])
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


def finalize_shard(draft: ShardDraft, losers: list[tuple[str, str, str]], out_dir: str,
                   stage: str = "ingest") -> ShardStats:
    """Write every file of a shard; ``_stats.json`` last. Idempotent: a finished shard is left alone."""
    paths = shard_paths(out_dir, draft.shard)
    if exists(paths["stats"]):
        return read_stats(paths["stats"])
    staged = {row.key for row in draft.rows if row.members}
    draft = apply_losers(draft, losers)
    rows, tar_bytes = write_shard_tar(draft, staged, paths["tar"])
    write_table(paths["parquet"], rows, IndexRow, SCHEMA_VERSION)
    write_table(join(out_dir, REJECTED_DIR, f"{stage}-{shard_name(draft.shard)}.parquet"), draft.rejections,
                Rejection, SCHEMA_VERSION)
    reasons = Counter(row.status for row in rows if row.status != "success")
    written = sum(row.status == "success" for row in rows)
    stats = ShardStats(shard=draft.shard, stage=stage, inputs=len(rows), written=written,
                       rejected=len(rows) - written, rejected_by_reason=dict(reasons), tar_bytes=tar_bytes,
                       duration_s=round(draft.duration_s, 3))
    write_stats(paths["stats"], stats)
    if exists(draft.staging_tar):
        FileSystems.delete([draft.staging_tar])
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
        log.info("shard %s: %d written, %d rejected %s", shard_name(shard), stats.written, stats.rejected,
                 dict(stats.rejected_by_reason))
        yield stats
