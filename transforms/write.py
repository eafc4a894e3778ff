"""Finalize a shard: drop cross-shard duplicates (a judge through the one rewrite), commit tar, index, dead letters
and stats.

The commit (:func:`~visinstruct.transforms.commit.commit_shard`) writes ``_stats.json`` last, and the staging files
(and temporary files a killed write left) are removed only after it exists, so a shard is either complete (stats
present) or can be finished again from staging (also by a rerun after a kill: see
:mod:`visinstruct.transforms.staging`).
"""

from __future__ import annotations

import logging
import posixpath
import tarfile
import time
from collections import Counter
from dataclasses import fields, replace

import apache_beam as beam

from visinstruct.schemas import Decision, IndexRow, Rejection, SampleMeta, ShardStats, parse_key, shard_name
from visinstruct.transforms import worker
from visinstruct.transforms.commit import commit_shard, committed_drops, drops
from visinstruct.transforms.dedup import Loser
from visinstruct.transforms.guard import internal_error
from visinstruct.transforms.layout import REJECTED_DIR, read_stats, shard_in
from visinstruct.transforms.rewrite import Earlier, Judge, rewrite_shard
from visinstruct.transforms.rewrite_stage import count_drops
from visinstruct.transforms.shards import ShardReadError, delete, exists, join, match, open_read, tar_end_problem
from visinstruct.transforms.staging import ShardDraft, StaleDraft, load_draft, remove_staging
from visinstruct.transforms.timing import busy

log = logging.getLogger(__name__)


def draft_columns(row: IndexRow) -> dict:
    """A draft row's index columns, for a judge that keeps them as they are (the rewrite places the members)."""
    return {f.name: getattr(row, f.name) for f in fields(IndexRow) if f.name not in ("key", "members")}


def dedup_judge(rows: list[IndexRow], losers: list[Loser]) -> Judge:
    """Ingest's finalize as a judge of its staging tar: a sample that lost to another (a smaller key or a reference
    image) is dropped with that loss; every sample keeps its draft's index row.

    A sample whose draft row is not ``success`` (or that has no draft row) is never kept: the download that staged
    it contradicts itself, so the judge refuses it and the guard makes it an ``internal_error`` row, which is not
    final (``write.retry_failed`` downloads it again).
    """
    by_key, lost = {row.key: row for row in rows}, dict(losers)

    def judge(key: str, meta: SampleMeta, members: dict[str, bytes]) -> Decision[SampleMeta]:
        row = by_key.get(key)
        if row is None or row.status != "success":
            status = row.status if row else "missing"
            raise LookupError(f"the staging tar holds this sample but its draft row is {status}")
        loss = lost.get(key)
        if loss is None:
            return Decision.keep(None, **draft_columns(row))
        detail = {**loss.detail, "sha256": row.sha256, "phash": row.phash}
        return Decision.drop(loss.reason, loss.message, detail, **draft_columns(row))

    return judge


def staged_keys(path: str) -> set[str]:
    """The keys of the samples a staging tar holds, from its member headers (the data is skipped by seeking).

    Raises :class:`ShardReadError` when the tar is cut short or unreadable: committing its rows as lost would make
    a damaged staging file final, while raising lets Beam retry the bundle and a rerun download the shard again.
    """
    try:
        with open_read(path, "application/x-tar") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            keys = {posixpath.basename(info.name).partition(".")[0] for info in tar}
            end = tar.offset
    except (tarfile.TarError, EOFError) as e:
        raise ShardReadError(f"{path}: {type(e).__name__}: {e}") from e
    problem = tar_end_problem(path, end)
    if problem:
        raise ShardReadError(problem.message)
    return keys


def unstaged_as_errors(
    rows: list[IndexRow], rejections: list[Rejection], staged: set[str]
) -> tuple[list[IndexRow], list[Rejection]]:
    """Rows marked written whose key is not among ``staged`` (the staging tar's samples, :func:`staged_keys`)
    become ``internal_error`` rejections of stage ``download``.

    Never expected; but an index must not claim a sample its tar does not hold, and a bug's rows are not final
    (``write.retry_failed`` downloads them again).
    """
    missing = [row for row in rows if row.status == "success" and row.key not in staged]
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
        replace(row, status=lost[row.key].reason, error_message=lost[row.key].message, members=[])
        if row.key in lost
        else row
        for row in rows
    ]
    return rows, [*rejections, *lost.values()]


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


def _finished(files, stage: str, dropped: Counter | None) -> ShardStats | None:
    """The stats of a shard already finished (a retried bundle: ``dropped`` gains what its first attempt
    committed, whose counters Beam discarded), else None."""
    if not exists(files.stats):
        return None
    if dropped is not None:
        dropped.update(committed_drops(files, stage))
    return read_stats(files.stats)


def finalize_staged(
    shard: int,
    reference: tuple[str, str],
    losers: list[Loser],
    out_dir: str,
    stage: str = "ingest",
    dropped: Counter | None = None,
) -> ShardStats:
    """:func:`finalize_shard` of the draft that download attempt ``reference = (digest, attempt)`` committed to
    staging: the attempt whose rows dedup saw, whatever another attempt of the same bundle committed.

    Drafts travel to the finalize by reference (the join carries a digest and an attempt, not every row twice: on
    Beam's local runner whatever crosses a shuffle is held in the controller process). For a shard not finished, a
    draft that is gone, damaged or from other inputs raises :class:`ShardReadError`: the run fails, and a rerun
    downloads the shard again.
    """
    files = shard_in(out_dir, shard)
    finished = _finished(files, stage, dropped)
    if finished is not None:
        return finished
    digest, attempt = reference
    try:
        draft = load_draft(out_dir, shard, digest, attempt)
    except StaleDraft as e:
        finished = _finished(files, stage, dropped)  # another attempt of this bundle finished it meanwhile
        if finished is not None:
            return finished
        raise ShardReadError(f"shard {shard_name(shard)}: cannot finalize: {e}; a rerun downloads it again") from None
    return finalize_shard(draft, losers, out_dir, stage, dropped)


def finalize_shard(
    draft: ShardDraft,
    losers: list[Loser],
    out_dir: str,
    stage: str = "ingest",
    dropped: Counter | None = None,
) -> ShardStats:
    """Commit every file of a shard; ``_stats.json`` last. Idempotent: a finished shard is left alone.

    The staging tar is rewritten by :func:`dedup_judge` through the one rewrite, or, when that judge would keep
    every sample as its draft row places it, committed itself (renamed; its offsets hold, and a shard is not
    written twice). Which samples the tar holds is read from the tar (:func:`staged_keys`, which raises for a
    damaged one), not from the draft. ``duration_s`` is the download's time plus the finalize's, either way.
    ``dropped``, when given, gains the shard's dead letters by reason: for a shard already finished, those it
    committed (a retried bundle counts what its first attempt did, whose counters Beam discarded).
    """
    start, files = time.monotonic(), shard_in(out_dir, draft.shard)
    finished = _finished(files, stage, dropped)
    if finished is not None:
        return finished
    source = draft.staging_tar if exists(draft.staging_tar) else files.tar  # a retry after the rename
    staged = staged_keys(source)
    rows, dead = unstaged_as_errors(draft.rows, draft.rejections, staged)
    lost = {key for key, _ in losers}
    keep = {row.key for row in rows if row.status == "success" and row.key not in lost}
    placed = all(row.members for row in rows if row.status == "success")
    if keep == staged and placed:  # the judge would keep every sample where the staging tar has it
        dead = sorted(dead, key=lambda r: r.key)
        stats = commit_shard(files, rows, dead, source, stage, draft.duration_s + time.monotonic() - start)
        if dropped is not None:
            dropped.update(drops(dead))
    else:
        refused = {row.key for row in rows if row.status != "success"} & staged  # the judge's internal_error rows
        dead = sorted((r for r in dead if r.key not in refused), key=lambda r: r.key)
        earlier = Earlier(rows, dead, draft.duration_s + time.monotonic() - start, step="dedup")
        stats = rewrite_shard(source, draft.shard, out_dir, stage, dedup_judge(rows, losers), dropped, earlier)
    remove_staging(out_dir, draft.shard)  # the draft, and the tars of every download attempt of this shard
    remove_leftover_temps(out_dir, draft.shard, stage)
    return stats


class FinalizeShard(beam.DoFn):
    """``(shard, {"draft": [(digest, attempt)], "losers": [Loser]})`` -> :class:`ShardStats`: the shard's
    committed draft (:func:`finalize_staged`) finalized."""

    def __init__(self, out_dir: str, stage: str = "ingest"):
        self.out_dir, self.stage = out_dir, stage
        self.written = beam.metrics.Metrics.counter(stage, "written")
        self.rejected = beam.metrics.Metrics.counter(stage, "rejected")

    def setup(self):
        worker.settle()

    def process(self, element):
        shard, groups = element
        drafts = list(groups["draft"])
        if not drafts:  # losers of an already complete shard: it was finalized with the same decisions
            return
        losers = [loser for loser in groups["losers"] if parse_key(loser[0])[0] == shard]
        dropped = Counter()
        with busy(self.stage):
            stats = finalize_staged(shard, drafts[0], losers, self.out_dir, self.stage, dropped)
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
