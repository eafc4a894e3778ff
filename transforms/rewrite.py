"""Rewrite a shard sample by sample: the writing half of every stage that reads shards (filter, generate).

A stage supplies a *judge* that, for each sample of the input tar, returns the new metadata (sample kept) or a
rejection (sample dropped), plus index columns of its own. :func:`rewrite_shard` does the rest the same way
for every stage: an index row for every input sample, dead-letter rows, reproducible tar bytes, atomic files,
``_stats.json`` last. Nothing is shuffled: the input tar is read again where the shard is written.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from visinstruct.schemas import SCHEMA_VERSION, IndexRow, Rejection, SampleMeta, ShardStats, from_table
from visinstruct.transforms.shards import (
    TarShardWriter,
    UnsafeMember,
    exists,
    join,
    read_table,
    read_tar_samples,
    write_stats,
    write_table,
)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


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
    """``(key, members)`` of a tar, then a final ``(None, Rejection)`` if the tar is truncated or unsafe."""
    try:
        yield from read_tar_samples(path)
    except (UnsafeMember, OSError, EOFError, ValueError) as e:
        yield None, Rejection(stage, "corrupt_shard", f"{type(e).__name__}: {e}"[:500], "", path)
    except Exception as e:  # noqa: BLE001 - tarfile's StreamError and ReadError are not OSErrors
        yield None, Rejection(stage, "corrupt_shard", f"{type(e).__name__}: {e}"[:500], "", path)


def sample_meta(key: str, members: dict[str, bytes]) -> SampleMeta:
    """The sample's metadata: its JSON member (ours or img2dataset's), else just the key and caption."""
    if "json" in members:
        return SampleMeta.from_json(members["json"])
    caption = members["txt"].decode("utf-8", "replace") if "txt" in members else None
    return SampleMeta(key=key, caption=caption)


def image_member(members: dict[str, bytes]) -> str | None:
    return next((ext for ext in IMAGE_EXTS if ext in members), None)


def index_row(meta: SampleMeta, **extra) -> IndexRow:
    """The index row of a sample from its metadata; ``extra`` fields (the stage's own) win."""
    fields = dict(key=meta.key, status="success", url=meta.url, path=meta.path, caption=meta.caption,
                  width=meta.width, height=meta.height, original_width=meta.original_width,
                  original_height=meta.original_height, sha256=meta.sha256, phash=meta.phash,
                  clip_score=meta.clip.score if meta.clip else None,
                  conversation_kind=meta.generation.kind if meta.generation else None)
    return IndexRow(**(fields | extra))


def carried_rows(tar_path: str, seen: set[str]) -> list[IndexRow]:
    """Rows an earlier stage rejected (they have no sample in the tar), from the input shard's index.

    The index keeps one row per *input row* of the shard across every stage, so ``inputs`` stays the number
    of rows the dataset started from and every drop, whichever stage made it, stays on record.
    """
    index = tar_path[: -len(".tar")] + ".parquet" if tar_path.endswith(".tar") else None
    if index is None or not exists(index):
        return []
    try:
        earlier = from_table(IndexRow, read_table(index, IndexRow))
    except (ValueError, KeyError, OSError):  # not our index (another tool's parquet): nothing to carry
        return []
    return [row for row in earlier if row.status != "success" and row.key not in seen]


def rewrite_shard(path: str, position: int, out_dir: str, stage: str, judge: Judge) -> ShardStats:
    """Write the stage's version of one input shard into ``out_dir``; returns its stats."""
    start = time.monotonic()
    shard = shard_id(path, position)
    stem = f"{shard:05d}"
    writer, rows, dead = TarShardWriter(), [], []
    try:
        for key, members in iter_samples(path, stage):
            if key is None:
                dead.append(members)
                continue
            try:
                meta = sample_meta(key, members)
            except ValueError as e:
                meta = SampleMeta(key=key)
                verdict = Judgement(rejection=Rejection(stage, "bad_metadata", str(e)[:500], key))
            else:
                verdict = judge(key, meta)
            if verdict.meta is not None:
                kept = dict(members, json=verdict.meta.to_json().encode("utf-8"))
                rows.append(index_row(verdict.meta, members=writer.add(key, list(kept.items())), **verdict.index))
            else:
                rejection = verdict.rejection
                rows.append(replace(index_row(meta, **verdict.index), status=rejection.reason,
                                    error_message=rejection.message))
                dead.append(rejection)
        tar_bytes = writer.finish(join(out_dir, f"{stem}.tar"))
    except BaseException:
        writer.abort()
        raise
    rows = sorted(rows + carried_rows(path, {r.key for r in rows}), key=lambda r: r.key)
    write_table(join(out_dir, f"{stem}.parquet"), rows, IndexRow, SCHEMA_VERSION)
    write_table(join(out_dir, "rejected", f"{stage}-{stem}.parquet"), dead, Rejection, SCHEMA_VERSION)
    reasons = Counter(r.status for r in rows if r.status != "success")
    written = sum(r.status == "success" for r in rows)
    stats = ShardStats(shard=shard, stage=stage, inputs=len(rows), written=written, rejected=len(rows) - written,
                       rejected_by_reason=dict(reasons), tar_bytes=tar_bytes,
                       duration_s=round(time.monotonic() - start, 3))
    write_stats(join(out_dir, f"{stem}_stats.json"), stats)
    return stats
