"""Rewrite a shard sample by sample: the writing half of every stage that reads shards (filter, generate).

A stage supplies a *judge* that, for each sample of the input tar, returns the new metadata (sample kept) or a
rejection (sample dropped), plus index columns of its own. :func:`rewrite_shard` does the rest the same way
for every stage: an index row for every input sample, dead-letter rows, reproducible tar bytes, atomic files,
``_stats.json`` last. Nothing is shuffled: the input tar is read again where the shard is written.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import pyarrow as pa

from visinstruct.schemas import SCHEMA_VERSION, IndexRow, Rejection, SampleMeta, ShardStats, from_table
from visinstruct.transforms.guard import guarded
from visinstruct.transforms.shards import (
    TarShardWriter,
    exists,
    join,
    read_table,
    read_tar_samples,
    write_stats,
    write_table,
)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
UNREADABLE = "unreadable_shard"  # the tar stops being readable (cut short, bad header, not a tar)
MISSING = "missing_in_tar"  # the index lists a written sample the tar does not give
DUPLICATE_KEY = "duplicate_key"  # a further row of a key the input index already has

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Judgement:
    """A stage's verdict on one sample: ``meta`` to keep it (with the stage's fields), or a ``rejection``."""

    meta: SampleMeta | None = None
    rejection: Rejection | None = None
    index: dict = field(default_factory=dict)  # IndexRow fields the stage fills (clip_score...)


Judge = Callable[[str, SampleMeta], Judgement]


def shard_id(path: str, position: int | None) -> int:
    """Output shard id: the input tar's numeric stem (``00042.tar`` -> 42), else its position in the input."""
    stem = os.path.basename(path).split(".", 1)[0]
    if stem.isdigit():
        return int(stem)
    if position is None:
        raise ValueError(f"{path}: shard names must be numbers (00042.tar) when read from a pipeline")
    return position


def iter_samples(path: str, stage: str) -> Iterator[tuple[str | None, dict | Rejection]]:
    """``(key, members)`` of a tar, then a final ``(None, Rejection)`` if it cannot be read to its end.

    The rejection (reason ``unreadable_shard``, keyed by no sample) says where and why reading stopped; the
    samples after that point are accounted for by :func:`rewrite_shard` from the shard's index.
    """
    try:
        yield from read_tar_samples(path)
    except Exception as e:  # noqa: BLE001 - tarfile, Beam's filesystems and the OS raise many types here
        yield None, Rejection(stage, UNREADABLE, f"{type(e).__name__}: {e}"[:500], "", path)


def sample_meta(key: str, members: dict[str, bytes]) -> SampleMeta:
    """The sample's metadata: its JSON member (ours or img2dataset's), else just the key and caption.

    Raises ``ValueError`` (the sample's ``bad_metadata``) for a JSON member of any wrong shape, and for one whose
    ``key`` is not the tar's key: rows are indexed, sorted and accounted by the tar's key.
    """
    if "json" in members:
        meta = SampleMeta.from_json(members["json"])
        if meta.key != key:
            raise ValueError(f"sample {key}: its JSON says key {meta.key!r}"[:500])
        return meta
    caption = members["txt"].decode("utf-8", "replace") if "txt" in members else None
    return SampleMeta(key=key, caption=caption)


def read_meta(stage: str, key: str, members: dict[str, bytes], url: str | None = None) -> SampleMeta | Rejection:
    """:func:`sample_meta`, or the sample's ``bad_metadata`` rejection when it raises ``ValueError``.

    The one classification every stage that reads samples shares: ``ValueError`` is what a bad JSON member raises;
    anything else is a bug, left to the caller's guard (``internal_error``).
    """
    try:
        return sample_meta(key, members)
    except ValueError as e:
        return Rejection(stage, "bad_metadata", f"{type(e).__name__}: {e}"[:500], key, url)


def image_member(members: dict[str, bytes]) -> str | None:
    return next((ext for ext in IMAGE_EXTS if ext in members), None)


def index_row(meta: SampleMeta, **extra) -> IndexRow:
    """The index row of a sample from its metadata; ``extra`` fields (the stage's own) win."""
    fields = dict(
        key=meta.key,
        status="success",
        url=meta.url,
        path=meta.path,
        caption=meta.caption,
        width=meta.width,
        height=meta.height,
        original_width=meta.original_width,
        original_height=meta.original_height,
        sha256=meta.sha256,
        phash=meta.phash,
        clip_score=meta.clip.score if meta.clip else None,
        conversation_kind=meta.generation.kind if meta.generation else None,
    )
    return IndexRow(**(fields | extra))


def input_index(tar_path: str) -> list[IndexRow] | None:
    """The rows of the input shard's index (one per input row, across stages), or ``None`` when there is none.

    Another tool's parquet reads too when it has our required columns (img2dataset's does); one that cannot be
    read as an index counts as none.
    """
    index = tar_path[: -len(".tar")] + ".parquet" if tar_path.endswith(".tar") else None
    if index is None or not exists(index):
        return None
    try:
        return from_table(IndexRow, read_table(index, IndexRow))
    except (pa.ArrowException, ValueError, KeyError, OSError, TypeError):
        return None


def first_rows(earlier: list[IndexRow] | None, stage: str, path: str) -> tuple[list[IndexRow] | None, list[Rejection]]:
    """The input index with its first row per key, and a ``duplicate_key`` dead letter for every further row.

    A key twice in one index is a damaged input (``validate`` reports it); it costs the extra rows, never the shard.
    """
    if earlier is None:
        return None, []
    first: dict[str, IndexRow] = {}
    dead = []
    for row in earlier:
        if row.key not in first:
            first[row.key] = row
            continue
        message = f"the index of {path} has another row for key {row.key} (status {row.status}); the first is kept"
        dead.append(Rejection(stage, DUPLICATE_KEY, message[:500], row.key, row.url or row.path))
    return list(first.values()), dead


def unread_rows(
    earlier: list[IndexRow], seen: set[str], stage: str, path: str, error: Rejection | None
) -> tuple[list[IndexRow], list[Rejection]]:
    """Input index rows without a sample read from the tar: carried as they are when an earlier stage rejected
    them, else (the index says written, the tar did not give it) ``missing_in_tar`` rows and dead letters.

    The index keeps one row per *input row* of the shard across every stage, so ``inputs`` stays the number of
    rows the dataset started from and every drop, whichever stage or cut made it, stays on record.
    """
    why = f"the tar stopped being readable: {error.message}" if error else "the tar has no such sample"
    rows, dead = [], []
    for row in earlier:
        if row.key in seen:
            continue
        if row.status == "success":
            message = f"indexed as written but not read from {path}: {why}"[:500]
            row = replace(row, status=MISSING, error_message=message, members=[])
            dead.append(Rejection(stage, MISSING, message, row.key, row.url or row.path))
        rows.append(row)
    return rows, dead


def judge_sample(
    stage: str, judge: Judge, writer: TarShardWriter, key: str, members: dict[str, bytes]
) -> tuple[IndexRow, Rejection | None]:
    """One sample's index row (written to ``writer`` when kept) and its dead letter when dropped.

    A JSON member that does not fit (``ValueError``, :func:`read_meta`) is its ``bad_metadata`` row; whatever else
    reading the metadata, the judge or the writer raise becomes its ``internal_error`` row (the shared guard), so
    one odd sample costs that sample only. The row always carries the tar's key.
    """
    meta = guarded(stage, lambda: read_meta(stage, key, members), key)
    if isinstance(meta, Rejection):
        meta, verdict = SampleMeta(key=key), Judgement(rejection=meta)
    else:
        outcome = guarded(stage, lambda: judge(key, meta), key, meta.url or meta.path)
        verdict = Judgement(rejection=outcome) if isinstance(outcome, Rejection) else outcome
    if verdict.meta is not None:
        kept = verdict.meta

        def add() -> list:
            return writer.add(key, list(dict(members, json=kept.to_json().encode("utf-8")).items()))

        added = guarded(stage, add, key, meta.url or meta.path)
        if not isinstance(added, Rejection):  # the tar's key, whatever key the judge's record carries
            return index_row(kept, key=key, members=added, **verdict.index), None
        verdict = Judgement(rejection=added, index=verdict.index)
    rejection = verdict.rejection
    row = replace(index_row(meta, key=key, **verdict.index), status=rejection.reason, error_message=rejection.message)
    return row, rejection


class AccountingError(RuntimeError):
    """A rewritten shard whose rows do not account for every input row: a bug, never committed."""


def check_accounting(shard: int, rows: list[IndexRow], earlier: list[IndexRow] | None) -> None:
    """Before anything is written: one row per key, and every input index row still has its row."""
    keys = [r.key for r in rows]
    if len(set(keys)) != len(keys):
        twice = next(k for k, n in Counter(keys).items() if n > 1)
        raise AccountingError(f"shard {shard:05d}: key {twice} has {keys.count(twice)} rows")
    lost = {r.key for r in earlier or []} - set(keys)
    if lost:
        raise AccountingError(f"shard {shard:05d}: {len(lost)} input rows lost, e.g. {min(lost)}")


def read_and_judge(
    path: str, stage: str, judge: Judge, writer: TarShardWriter
) -> tuple[list[IndexRow], list[Rejection], Rejection | None]:
    """Every sample of the tar judged: index rows, dead letters, and why reading stopped early (or ``None``)."""
    rows, dead, error, seen = [], [], None, set()
    for key, members in iter_samples(path, stage):
        if key is None:
            error = members
            continue
        if key in seen:  # members not adjacent: the key's first sample stands (its input row is accounted once)
            log.warning("%s: a second sample %s (members not adjacent) left out; run validate", path, key)
            continue
        seen.add(key)
        row, rejection = judge_sample(stage, judge, writer, key, members)
        rows.append(row)
        if rejection is not None:
            dead.append(rejection)
    return rows, dead, error


def rewrite_shard(path: str, position: int, out_dir: str, stage: str, judge: Judge) -> ShardStats:
    """Write the stage's version of one input shard into ``out_dir``; returns its stats.

    Every input row comes out written, judged, or dead-lettered with a reason: a sample the index lists but the
    tar does not give (a tar cut short in transit) becomes a ``missing_in_tar`` row, and the recount is checked
    before anything is committed. A tar that cannot be read to its end *and* has no index to account from is not
    written at all: only its ``unreadable_shard`` dead letter is, the shard stays incomplete (no ``_stats.json``)
    and the returned stats count nothing.
    """
    start = time.monotonic()
    shard = shard_id(path, position)
    stem = f"{shard:05d}"
    (earlier, duplicates), writer = first_rows(input_index(path), stage, path), TarShardWriter()
    try:
        rows, dead, error = read_and_judge(path, stage, judge, writer)
        dead = duplicates + dead
        if duplicates:
            log.warning("shard %s: %d duplicated index rows dead-lettered as %s", stem, len(duplicates), DUPLICATE_KEY)
        if error is not None and earlier is None:
            writer.abort()
            log.warning(
                "shard %s not written: %s has no index to account for its rows (%s)", stem, path, error.message
            )
            write_table(join(out_dir, "rejected", f"{stage}-{stem}.parquet"), [error], Rejection, SCHEMA_VERSION)
            return ShardStats(shard=shard, stage=stage, inputs=0, written=0, rejected=0)
        carried, missing = unread_rows(earlier or [], {r.key for r in rows}, stage, path, error)
        rows = sorted(rows + carried, key=lambda r: r.key)
        dead += missing  # each carries the read error; a keyless row would count as one more drop
        if error is not None:
            log.warning(
                "shard %s: %s; %d indexed samples after it dead-lettered as %s",
                stem,
                error.message,
                len(missing),
                MISSING,
            )
        check_accounting(shard, rows, earlier)
        tar_bytes = writer.finish(join(out_dir, f"{stem}.tar"))
    except BaseException:
        writer.abort()
        raise
    write_table(join(out_dir, f"{stem}.parquet"), rows, IndexRow, SCHEMA_VERSION)
    write_table(join(out_dir, "rejected", f"{stage}-{stem}.parquet"), dead, Rejection, SCHEMA_VERSION)
    reasons = Counter(r.status for r in rows if r.status != "success")
    written = sum(r.status == "success" for r in rows)
    stats = ShardStats(
        shard=shard,
        stage=stage,
        inputs=len(rows),
        written=written,
        rejected=len(rows) - written,
        rejected_by_reason=dict(reasons),
        tar_bytes=tar_bytes,
        duration_s=round(time.monotonic() - start, 3),
    )
    write_stats(join(out_dir, f"{stem}_stats.json"), stats)
    return stats
