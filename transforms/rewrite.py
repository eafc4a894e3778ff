"""Rewrite a shard sample by sample: the one way every stage writes shards (ingest's finalize, filter, generate,
remove).

A stage supplies a :data:`Judge` that, for each sample of the input tar, returns a :class:`Decision`: keep (with the
new metadata, or ``None`` to keep the sample's members as they are) or drop (a reason code, a message, a detail),
plus index columns of its own either way. :func:`rewrite_shard` does the rest the same way for every stage: an
index row for every input row, dead-letter rows, reproducible tar bytes, and the commit of
:func:`~visinstruct.transforms.commit.commit_shard` (atomic files, ``_stats.json`` last). Nothing is shuffled: the
input tar is read again where the shard is written.

A stage may also finish a draft of its own (ingest's finalize: the staging tar and the download's rows, from which
the judge drops dedup losers): :class:`Earlier` then stands for the index beside the tar.

A rewrite may write into the input's own folder (a build rewrites its shards in place; ``remove`` always does).
Then this stage's dead letters from an earlier run on the shard are its journal: a row it carries keeps its dead
letter, and a row the earlier run dropped from the tar but could not yet mark in the index (killed between the
two) is finished from that journal instead of being reported missing.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Protocol

import pyarrow as pa

from visinstruct.schemas import SCHEMA_VERSION, Decision, IndexRow, Rejection, SampleMeta, ShardStats, from_table
from visinstruct.transforms.commit import commit_shard, drops
from visinstruct.transforms.guard import guarded
from visinstruct.transforms.layout import index_of, rejected_path, shard_files, shard_id, shard_in
from visinstruct.transforms.shards import TarShardWriter, exists, is_remote, read_table, read_tar_samples, write_table

UNREADABLE = "unreadable_shard"  # the tar stops being readable (cut short, bad header, not a tar)
MISSING = "missing_in_tar"  # the index lists a written sample the tar does not give
DUPLICATE_KEY = "duplicate_key"  # a further row of a key the input index already has

# key, metadata, members -> keep (new metadata, or None: members unchanged) or drop; index columns either way.
Judge = Callable[[str, SampleMeta, dict[str, bytes]], Decision[SampleMeta]]


class Rekey(Protocol):
    """New keys for a shard's rows, for a stage whose output shard is numbered apart from its input
    (``visinstruct mix``): every input row becomes one row per key :meth:`keys` gives it (a kept sample is written
    once per key, its copies), and :meth:`copy` gives the metadata of each written copy."""

    def keys(self, key: str) -> list[str]:
        """The output keys of the input row ``key``, copy 0 first; never empty, never shared with another row."""
        ...

    def copy(self, meta: SampleMeta, key: str, n: int) -> SampleMeta:
        """The metadata of copy ``n`` of a kept sample, written under ``key``."""
        ...

    def carried(self, row: IndexRow, key: str) -> IndexRow:
        """The index row of an input row carried (rejected before) under ``key``, still traceable to its input."""
        ...


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Earlier:
    """A stage's own draft of the shard, read instead of the index beside the tar (ingest's finalize: its staging
    tar holds the written samples, the download's rows and dead letters account for the rest)."""

    rows: list[IndexRow] | None  # one per input row, as the stage made them (None: no index)
    dead: list[Rejection] = field(default_factory=list)  # the stage's dead letters so far: committed and counted
    duration_s: float = 0.0  # seconds the stage spent on the shard before the rewrite
    step: str | None = None  # the ``stage`` column of the dead letters the rewrite makes (ingest's: ``dedup``)


def iter_samples(path: str, stage: str) -> Iterator[tuple[str | None, dict | Rejection]]:
    """``(key, members)`` of a tar, then a final ``(None, Rejection)`` if it cannot be read to its end.

    The rejection (reason ``unreadable_shard``, keyed by no sample) says where and why reading stopped; the
    samples after that point are accounted for by :func:`rewrite_shard` from the shard's index.
    """
    try:
        yield from read_tar_samples(path)
    except Exception as e:  # tarfile, Beam's filesystems and the OS raise many types here
        yield None, Rejection(stage, UNREADABLE, f"{type(e).__name__}: {e}"[:500], "", path)


def sample_meta(key: str, members: dict[str, bytes]) -> SampleMeta:
    """The sample's metadata: its JSON member (ours or img2dataset's), else just the key and caption; the caption
    comes from the ``.txt`` member when the JSON has none.

    Raises ``ValueError`` (the sample's ``bad_metadata``) for a JSON member of any wrong shape, and for one whose
    ``key`` is not the tar's key: rows are indexed, sorted and accounted by the tar's key.
    """
    if "json" in members:
        meta = SampleMeta.from_json(members["json"])
        if meta.key != key:
            raise ValueError(f"sample {key}: its JSON says key {meta.key!r}"[:500])
        if meta.caption is None and "txt" in members:  # webdatasets whose JSON leaves the caption to the .txt
            meta = replace(meta, caption=members["txt"].decode("utf-8", "replace"))
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
        nsfw_score=meta.curation.nsfw if meta.curation else None,
        faces=len(meta.curation.faces) if meta.curation and meta.curation.faces is not None else None,
        image_count=meta.n_images,
        image_sha256s=[image.sha256 for image in meta.images if image.sha256],
        image_phashes=[image.phash for image in meta.images if image.phash],
        image_locations=[location for image in meta.images if (location := image.url or image.path)],
        turns=len(meta.conversations) or None,
        mix_source=(meta.extra.get("mix") or {}).get("source") if isinstance(meta.extra.get("mix"), dict) else None,
    )
    return IndexRow(**(fields | extra))


def identity_row(row: IndexRow, status: str, message: str) -> IndexRow:
    """A dropped row that keeps only what identifies its input (key, url, path, sha256, and a multi-image
    sample's image locations and digests), with its reason."""
    return IndexRow(
        row.key,
        status,
        url=row.url,
        path=row.path,
        sha256=row.sha256,
        error_message=message,
        image_sha256s=list(row.image_sha256s),
        image_locations=list(row.image_locations),
    )


def input_index(tar_path: str) -> list[IndexRow] | None:
    """The rows of the input shard's index (one per input row, across stages), or ``None`` when there is none.

    Another tool's parquet reads too when it has our required columns (img2dataset's does); one that cannot be
    read as an index counts as none.
    """
    index = index_of(tar_path)
    if index is None or not exists(index):
        return None
    try:
        return from_table(IndexRow, read_table(index, IndexRow))
    except (pa.ArrowException, ValueError, KeyError, OSError, TypeError):
        return None


def journal(path: str, out_dir: str, stage: str) -> dict[str, Rejection]:
    """This stage's earlier dead letters of the shard, by key, when it is rewritten in its own folder; else none."""
    files = shard_files(path)
    if not _same_folder(files.folder, out_dir) or not exists(files.rejected(stage)):
        return {}
    return {r.key: r for r in from_table(Rejection, read_table(files.rejected(stage), Rejection)) if r.key}


def _same_folder(a: str, b: str) -> bool:
    if is_remote(a) or is_remote(b):
        return a.rstrip("/") == b.rstrip("/")
    return os.path.abspath(a) == os.path.abspath(b)


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
    earlier: list[IndexRow], seen: set[str], stage: str, path: str, error: Rejection | None, kept: dict[str, Rejection]
) -> tuple[list[IndexRow], list[Rejection], list[Rejection]]:
    """Input index rows without a sample read from the tar: their rows, new dead letters, and journal ones kept.

    A row an earlier stage rejected is carried as it is (with this stage's journal letter for it, if any). A row
    the index says written that the tar did not give is finished from the journal when an earlier run of this
    stage dropped it, else it becomes a ``missing_in_tar`` row and dead letter. The index keeps one row per
    *input row* of the shard across every stage, so ``inputs`` stays the number of rows the dataset started from.
    """
    why = f"the tar stopped being readable: {error.message}" if error else "the tar has no such sample"
    rows, dead, carried = [], [], []
    for row in earlier:
        if row.key in seen:
            continue
        letter = kept.get(row.key)
        if row.status == "success" and letter is not None:  # dropped by a run killed before its index
            row = identity_row(row, letter.reason, letter.message)
        elif row.status == "success":
            message = f"indexed as written but not read from {path}: {why}"[:500]
            row = replace(row, status=MISSING, error_message=message, members=[])
            dead.append(Rejection(stage, MISSING, message, row.key, row.url or row.path))
        if letter is not None and letter.reason == row.status:
            carried.append(letter)
        rows.append(row)
    return rows, dead, carried


def judge_sample(
    stage: str, judge: Judge, writer: TarShardWriter, key: str, members: dict[str, bytes]
) -> tuple[IndexRow, Rejection | None]:
    """One sample's index row (written to ``writer`` when kept) and its dead letter when dropped.

    A JSON member that does not fit (``ValueError``, :func:`read_meta`) is its ``bad_metadata`` row; whatever else
    reading the metadata, the judge or the writer raise becomes its ``internal_error`` row (the shared guard), so
    one odd sample costs that sample only. The row always carries the tar's key.
    """
    meta, decision = read_and_decide(stage, judge, key, members)
    if decision.kept:
        kept = decision.value or meta

        def add() -> list:
            new = members if decision.value is None else dict(members, json=kept.to_json().encode("utf-8"))
            if "txt" in members and kept.caption != meta.caption:  # the .txt member is the caption (FORMAT.md)
                new["txt"] = (kept.caption or "").encode("utf-8")
            return writer.add(key, list(new.items()))

        added = guarded(stage, add, key, meta.url or meta.path)
        if not isinstance(added, Rejection):  # the tar's key, whatever key the judge's record carries
            return index_row(kept, **(dict(decision.index) | {"key": key, "members": added})), None
        decision = Decision.from_rejection(added, **decision.index)
    row = index_row(meta, **(dict(decision.index) | {"key": key}))
    row = replace(row, status=decision.reason, error_message=decision.message)
    return row, decision.rejection(stage, key, meta.url or meta.path)


def read_and_decide(
    stage: str, judge: Judge, key: str, members: dict[str, bytes]
) -> tuple[SampleMeta, Decision[SampleMeta]]:
    """A sample's metadata and the judge's decision: a JSON member that does not fit is its ``bad_metadata`` drop,
    anything reading or judging raises its ``internal_error`` drop (the shared guard)."""
    meta = guarded(stage, lambda: read_meta(stage, key, members), key)
    if isinstance(meta, Rejection):
        return SampleMeta(key=key), Decision.from_rejection(meta)
    decision = guarded(stage, lambda: judge(key, meta, members), key, meta.url or meta.path)
    return meta, Decision.from_rejection(decision) if isinstance(decision, Rejection) else decision


def judge_rekeyed(
    stage: str, judge: Judge, writer: TarShardWriter, key: str, members: dict[str, bytes], rekey: Rekey
) -> tuple[list[IndexRow], list[Rejection]]:
    """:func:`judge_sample` under new keys: a kept sample is written once per key of ``rekey.keys(key)`` (every
    member renamed, ``KEY.0.jpg`` too, its JSON from ``rekey.copy``), each copy with its own row; a dropped one
    has a row per key with its reason and one dead letter under its input key (what names it in its source)."""
    meta, decision = read_and_decide(stage, judge, key, members)
    keys = rekey.keys(key)
    if not decision.kept:
        row = replace(index_row(meta, **dict(decision.index)), status=decision.reason, error_message=decision.message)
        return [replace(row, key=k) for k in keys], [decision.rejection(stage, key, meta.url or meta.path)]
    kept, rows, dead = decision.value or meta, [], []
    for n, new_key in enumerate(keys):
        copy = guarded(stage, partial(rekey.copy, kept, new_key, n), key, meta.url or meta.path)
        add = partial(_add_copy, writer, new_key, members, meta, copy)
        added = copy if isinstance(copy, Rejection) else guarded(stage, add, key, meta.url or meta.path)
        if not isinstance(added, Rejection):
            rows.append(index_row(copy, **(dict(decision.index) | {"key": new_key, "members": added})))
            continue
        failed = Decision.from_rejection(added, **decision.index)
        row = index_row(meta, **(dict(failed.index) | {"key": new_key}))
        rows.append(replace(row, status=failed.reason, error_message=failed.message))
        dead.append(failed.rejection(stage, key, meta.url or meta.path))
    return rows, dead


def _add_copy(writer: TarShardWriter, key: str, members: dict[str, bytes], meta: SampleMeta, copy: SampleMeta) -> list:
    """Write one copy of a sample under ``key``: every member renamed by the writer, its JSON and caption new."""
    new = dict(members, json=copy.to_json().encode("utf-8"))
    if "txt" in members and copy.caption != meta.caption:  # the .txt member is the caption (FORMAT.md)
        new["txt"] = (copy.caption or "").encode("utf-8")
    return writer.add(key, list(new.items()))


def rekeyed_rows(rows: list[IndexRow], rekey: Rekey) -> list[IndexRow]:
    """Input-keyed rows (carried, or the input index itself) as the output holds them: one per new key."""
    return [rekey.carried(row, k) for row in rows for k in rekey.keys(row.key)]


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
    path: str, stage: str, judge: Judge, writer: TarShardWriter, rekey: Rekey | None = None
) -> tuple[list[IndexRow], list[Rejection], Rejection | None]:
    """Every sample of the tar judged: index rows, dead letters, and why reading stopped early (or ``None``);
    with ``rekey``, each sample's rows under its new keys (:func:`judge_rekeyed`)."""
    rows, dead, error, seen = [], [], None, set()
    for key, members in iter_samples(path, stage):
        if key is None:
            error = members
            continue
        if key in seen:  # members not adjacent: the key's first sample stands (its input row is accounted once)
            log.warning("%s: a second sample %s (members not adjacent) left out; run validate", path, key)
            continue
        seen.add(key)
        if rekey is not None:
            more, letters = judge_rekeyed(stage, judge, writer, key, members, rekey)
            rows += more
            dead += letters
            continue
        row, rejection = judge_sample(stage, judge, writer, key, members)
        rows.append(row)
        if rejection is not None:
            dead.append(rejection)
    return rows, dead, error


def rewrite_shard(
    path: str,
    position: int | None,
    out_dir: str,
    stage: str,
    judge: Judge,
    dropped: Counter | None = None,
    earlier: Earlier | None = None,
    rekey: Rekey | None = None,
    out_shard: int | None = None,
) -> ShardStats:
    """Write the stage's version of one input shard into ``out_dir`` (which may be its own folder); returns its
    stats. ``dropped``, when given, gains this stage's new drops by reason once they are committed. ``earlier``,
    when given, is the stage's own draft of the shard: its rows stand for the input index (no journal is read) and
    its dead letters are committed and counted with the judge's.

    Every input row comes out written, judged, or dead-lettered with a reason: a sample the index lists but the
    tar does not give (a tar cut short in transit) becomes a ``missing_in_tar`` row, and the recount is checked
    before anything is committed. A tar that cannot be read to its end *and* has no index to account from is not
    written at all: only its ``unreadable_shard`` dead letter is, the shard stays incomplete (no ``_stats.json``)
    and the returned stats count nothing.

    ``out_shard``, when given, numbers the output shard instead of the input's name or position; ``rekey``, when
    given, gives every row its new keys (:class:`Rekey`): dead letters keep the input keys, which name the rows
    in their source, and the recount checks that every new key of every input row has its row.
    """
    start, shard = time.monotonic(), shard_id(path, position)
    if out_shard is not None:
        shard = out_shard
    if earlier is not None:
        draft, before = earlier, {}
    else:  # the index beside the tar, and this stage's journal when the shard is rewritten in its own folder
        draft, before = Earlier(input_index(path)), journal(path, out_dir, stage)
    step = draft.step or stage
    (first, duplicates), writer = first_rows(draft.rows, step, path), TarShardWriter()
    try:
        rows, dead, error = read_and_judge(path, step, judge, writer, rekey)
        if duplicates:
            log.warning(
                "shard %05d: %d duplicated index rows dead-lettered as %s", shard, len(duplicates), DUPLICATE_KEY
            )
        if error is not None and first is None:
            writer.abort()
            log.warning(
                "shard %05d not written: %s has no index to account for its rows (%s)", shard, path, error.message
            )
            write_table(rejected_path(out_dir, stage, shard), [error], Rejection, SCHEMA_VERSION)
            if dropped is not None:
                dropped.update(drops([error]))
            return ShardStats(shard=shard, stage=stage, inputs=0, written=0, rejected=0)
        read = {r.key for r in rows}
        if rekey is not None:  # the input keys whose samples were read: their first new key has a row
            read = {r.key for r in first or [] if rekey.keys(r.key)[0] in read}
        carried, missing, kept = unread_rows(first or [], read, step, path, error, before)
        if rekey is not None:
            carried = rekeyed_rows(carried, rekey)
        rows = sorted(rows + carried, key=lambda r: r.key)
        new = draft.dead + duplicates + dead + missing  # the read error is no letter of its own: missing rows name it
        if error is not None:
            log.warning(
                "shard %05d: %s; %d indexed samples after it dead-lettered as %s",
                shard,
                error.message,
                len(missing),
                MISSING,
            )
        check_accounting(shard, rows, first if rekey is None or first is None else rekeyed_rows(first, rekey))
    except BaseException:
        writer.abort()
        raise
    dead = sorted(new + kept, key=lambda r: r.key)
    duration = draft.duration_s + time.monotonic() - start
    stats = commit_shard(shard_in(out_dir, shard), rows, dead, writer, stage, duration)
    if dropped is not None:
        dropped.update(drops(new))
    return stats
