"""Finalize a shard: drop cross-shard duplicates, then commit tar, index, dead letters and stats.

The commit (:func:`~visinstruct.transforms.commit.commit_shard`) writes ``_stats.json`` last, and the staging files
(and temporary files a killed write left) are removed only after it exists, so a shard is either complete (stats
present) or can be finished again from staging (also by a rerun after a kill: see
:mod:`visinstruct.transforms.staging`).
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import replace

import apache_beam as beam

from visinstruct.schemas import Decision, IndexRow, Rejection, ShardStats, parse_key, shard_name
from visinstruct.transforms.commit import TarSource, commit_shard, drops
from visinstruct.transforms.dedup import Loser
from visinstruct.transforms.guard import guarded, internal_error
from visinstruct.transforms.layout import REJECTED_DIR, read_stats, shard_in
from visinstruct.transforms.rewrite_stage import count_drops
from visinstruct.transforms.shards import TarShardWriter, delete, exists, join, match, read_tar_samples
from visinstruct.transforms.staging import ShardDraft, remove_staging
from visinstruct.transforms.timing import busy

log = logging.getLogger(__name__)


def dedup_rejection(row: IndexRow, loss: Decision) -> Rejection:
    """The dead-letter row of a written row that lost to another (a smaller key or a reference image)."""
    detail = {**loss.detail, "sha256": row.sha256, "phash": row.phash}
    return Decision.drop(loss.reason, loss.message, detail).rejection("dedup", row.key, row.url or row.path)


def apply_losers(draft: ShardDraft, losers: list[Loser]) -> ShardDraft:
    """The draft with each loser's row turned into a dedup rejection (any error: an ``internal_error`` one)."""
    by_key = dict(losers)
    rows, rejections = [], list(draft.rejections)
    for row in draft.rows:
        if row.key in by_key and row.status == "success":
            rejection = guarded(
                "dedup", functools.partial(dedup_rejection, row, by_key[row.key]), row.key, row.url or row.path
            )
            rejections.append(rejection)
            row = replace(row, status=rejection.reason, error_message=rejection.message, members=[])
        rows.append(row)
    return replace(draft, rows=rows, rejections=sorted(rejections, key=lambda r: r.key))


def kept_tar(draft: ShardDraft, staged: set[str], tar_path: str) -> tuple[list[IndexRow], TarSource]:
    """The final tar's samples from the staging tar (holding ``staged``): only successful rows are kept.

    Returns the rows with their members' offsets in that tar, and the tar to commit: when nothing was dropped,
    the staging tar itself (offsets included; the commit renames it), else a writer holding the kept samples.
    """
    keep = {row.key for row in draft.rows if row.status == "success"}
    source = draft.staging_tar if exists(draft.staging_tar) else tar_path  # a retry after the rename
    if keep == staged:
        return draft.rows, source
    writer, members = TarShardWriter(), {}
    try:
        for key, sample in read_tar_samples(source):
            if key in keep:
                members[key] = writer.add(key, list(sample.items()))
    except BaseException:
        writer.abort()
        raise
    return [replace(row, members=members.get(row.key, [])) for row in draft.rows], writer


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
            found += [m.path for m in match(pattern)]
        except OSError:  # a remote folder that cannot be listed: nothing to remove
            continue
    if found:
        delete(found)


def finalize_shard(
    draft: ShardDraft,
    losers: list[Loser],
    out_dir: str,
    stage: str = "ingest",
    dropped: Counter | None = None,
) -> ShardStats:
    """Commit every file of a shard; ``_stats.json`` last. Idempotent: a finished shard is left alone.

    ``dropped``, when given, gains the shard's dead letters by reason (nothing for a shard already finished).
    """
    files = shard_in(out_dir, draft.shard)
    if exists(files.stats):
        return read_stats(files.stats)
    staged = {row.key for row in draft.rows if row.members}
    draft = apply_losers(draft, losers)
    rows, tar = kept_tar(draft, staged, files.tar)
    rows, rejections = unstaged_as_errors(rows, draft.rejections)
    stats = commit_shard(files, rows, rejections, tar, stage, draft.duration_s)
    if dropped is not None:
        dropped.update(drops(rejections))
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
        dropped = Counter()
        with busy(self.stage):
            stats = finalize_shard(drafts[0], losers, self.out_dir, self.stage, dropped)
        self.written.inc(stats.written)
        self.rejected.inc(stats.rejected)
        count_drops(self.stage, dropped)
        log.info(
            "shard %s: %d written, %d rejected %s",
            shard_name(shard),
            stats.written,
            stats.rejected,
            dict(stats.rejected_by_reason),
        )
        yield stats
