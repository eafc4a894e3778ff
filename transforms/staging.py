"""A shard's finished download, committed to the staging folder so that a killed ingest does not redo it.

Global dedup is a barrier: no shard is finalized before every shard is downloaded. So each shard's download is
committed on its own, in two files under ``OUT/_staging/``, both named by the download attempt (two attempts of
one bundle, even at once, never write the same file):

- ``NNNNN.<attempt>.tar``: the staging tar;
- ``NNNNN.<attempt>.draft.json``: the draft's index rows and rejections, the tar's name and size, and a digest of
  what the download depended on. Written last, to a temporary name then renamed: its presence commits the draft.

The finalize reads the draft of the attempt whose output Beam kept (:func:`~visinstruct.transforms.write.
finalize_staged`): the join before it carries ``(shard, (digest, attempt))``, not every row a second time, and the
rows dedup saw are the rows finalized, whatever another attempt of the same bundle committed.

A rerun reuses a committed draft only when its digest matches (same input rows, same download, resize and
takedown settings, same schema) and its tar is there with the recorded size; anything else is downloaded again.
"Its tar" is the staging tar, or the shard's final tar when finalizing renamed the staging tar to it (a kill
between that rename and ``_stats.json`` leaves the draft pointing at a tar that moved). Finalizing a shard removes
its staging files, temporary files included, after its ``_stats.json`` exists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from visinstruct.configs import IngestConfig
from visinstruct.schemas import SCHEMA_VERSION, IndexRow, Rejection, from_row, shard_name, to_row
from visinstruct.transforms.layout import (
    DRAFT_SUFFIX,
    draft_attempt,
    draft_path,
    draft_pattern,
    shard_in,
    staging_dir,
    staging_patterns,
)
from visinstruct.transforms.shards import delete, join, match, read_bytes, write_bytes

log = logging.getLogger(__name__)
# Download settings that change how fast rows are fetched, not what a fetched row becomes: changing them
# (more threads after a kill) keeps committed drafts. Timeouts and retries only change retryable failures,
# which `write.retry_failed` redoes anyway.
THROUGHPUT_SETTINGS = frozenset(
    {
        "threads",
        "timeout",
        "retries",
        "backoff",
        "max_backoff",
        "per_host_rps",
        "fetch_partitions",
        "large_host_urls",
        "progress_interval",
    }
)


@dataclass
class ShardDraft:
    """What ``DownloadShard`` made of one shard: rows for every input, and the staging tar."""

    shard: int
    staging_tar: str
    rows: list[IndexRow] = field(default_factory=list)  # one per input row, in key order
    rejections: list[Rejection] = field(default_factory=list)
    duration_s: float = 0.0
    tar_bytes: int = 0
    digest: str = ""  # of the inputs it was made from (:func:`input_digest`)
    attempt: str = ""  # the download attempt that made it (:func:`new_attempt`), naming its staging files


class StaleDraft(Exception):
    """A committed draft that cannot be used: gone, made from other inputs, damaged, or its tar missing or cut."""


def new_attempt(now_ns: int | None = None) -> str:
    """A fresh name for one download attempt of a shard (its staging tar's and its draft's): the time, then a
    random part, so that names sort by when attempts began (:func:`committed_drafts` prefers the newest)."""
    return f"{time.time_ns() if now_ns is None else now_ns:016x}{uuid.uuid4().hex[:8]}"


def _digestible(row) -> dict:
    """A row's fields for the digest: image bytes a pair carries (a Hugging Face dataset's) as their sha256, and
    no ``image`` key for a pair without them, so the digests of URL and path rows stay what they were."""
    fields = {f.name: _plain(getattr(row, f.name)) for f in dataclasses.fields(row)}
    image = fields.pop("image", None)
    if isinstance(image, bytes):
        fields["image"] = hashlib.sha256(image).hexdigest()
    images = fields.pop("images", [])
    if images:  # a multi-image row: locations as they are, bytes as their sha256
        fields["images"] = [i["location"] or hashlib.sha256(i["data"]).hexdigest() for i in images]
    if fields.pop("text_only", False):
        fields["text_only"] = True
    return fields


def _plain(value):
    """``value`` as ``dataclasses.asdict`` would give it for JSON, without its deep copy of every leaf (a tenth of
    the time per row: the digest is computed for every input row)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def input_digest(rows: list, cfg: IngestConfig, takedown_digest: str = "") -> str:
    """sha256 of what a shard's download depends on: its input rows (pairs and read rejections, by key) and
    the settings that change what a row becomes."""
    download = {k: v for k, v in dataclasses.asdict(cfg.download).items() if k not in THROUGHPUT_SETTINGS}
    state = {
        "schema_version": SCHEMA_VERSION,
        "download": download,
        "resize": dataclasses.asdict(cfg.resize),
        "takedown": takedown_digest,
        "rows": [[type(r).__name__, _digestible(r)] for r in sorted(rows, key=lambda r: r.key)],
    }
    text = json.dumps(state, sort_keys=True, default=repr, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def commit_draft(out_dir: str, draft: ShardDraft) -> None:
    """Record a draft (its ``digest`` and ``attempt`` set) whose staging tar is written; after this a kill no
    longer costs its download."""
    document = {
        "digest": draft.digest,
        "shard": draft.shard,
        "staging_tar": draft.staging_tar.rsplit("/", 1)[-1],
        "tar_bytes": draft.tar_bytes,
        "duration_s": draft.duration_s,
        "rows": [to_row(r) for r in draft.rows],
        "rejections": [to_row(r) for r in draft.rejections],
    }
    # ASCII escapes: a caption holding a lone surrogate (undecodable input) must not fail the whole shard here
    write_bytes(draft_path(out_dir, draft.shard, draft.attempt), json.dumps(document).encode("ascii"))


def _size(path: str) -> int | None:
    """Bytes in ``path``, or None when there is no such file."""
    found = match(path)
    return found[0].size if found else None


def load_draft(out_dir: str, shard: int, digest: str, attempt: str) -> ShardDraft:
    """The draft that download ``attempt`` of ``shard`` committed, when made from the inputs of ``digest`` and its
    tar is whole; else raises :class:`StaleDraft` saying why.

    Its tar is the staging tar, or else the shard's final tar when that has the recorded size: finalizing renames
    the staging tar to the final name (nothing dropped) before it writes ``_stats.json``.
    """
    path = draft_path(out_dir, shard, attempt)
    try:
        document = json.loads(read_bytes(path))
        if document["digest"] != digest:
            raise StaleDraft("its staged download was made from other inputs or settings")
        tar = join(staging_dir(out_dir), document["staging_tar"])
        if _size(tar) != document["tar_bytes"]:
            tar = shard_in(out_dir, shard).tar  # renamed by a finalize killed before its stats
            if _size(tar) != document["tar_bytes"]:
                raise StaleDraft("its staging tar is missing or cut short")
        return ShardDraft(
            shard,
            tar,
            [from_row(IndexRow, r) for r in document["rows"]],
            [from_row(Rejection, r) for r in document["rejections"]],
            document["duration_s"],
            document["tar_bytes"],
            digest,
            attempt,
        )
    except FileNotFoundError:
        raise StaleDraft(f"its staged draft {path} is gone") from None
    except (OSError, ValueError, KeyError, TypeError) as e:  # a damaged draft is only a lost shortcut
        raise StaleDraft(f"cannot read its staged draft ({type(e).__name__}: {e})") from None


def committed_drafts(out_dir: str, shard: int, digest: str) -> Iterator[ShardDraft]:
    """Every committed draft of ``shard`` a rerun may reuse (:func:`load_draft`), the newest attempt first (a
    ``write.retry_failed`` attempt, killed before its finalize, supersedes the draft it retried), each read only
    when asked for; the others are logged and left for the finalize to remove."""
    for info in sorted(match(draft_pattern(out_dir, shard)), key=lambda i: i.path, reverse=True):
        try:
            yield load_draft(out_dir, shard, digest, draft_attempt(info.path))
        except StaleDraft as e:
            log.info("shard %s: %s; not reused", shard_name(shard), e)


def remove_staging(out_dir: str, shard: int) -> None:
    """Delete every staging file of ``shard``: the drafts of all its attempts first (a kill midway leaves no
    draft whose tar is gone), then their tars and the temporary files of writes a kill cut short
    (``.NNNNN.*.tmp``)."""
    found = [info.path for pattern in staging_patterns(out_dir, shard) for info in match(pattern)]
    drafts = [path for path in found if path.endswith(DRAFT_SUFFIX)]  # temporary files end in .tmp
    for batch in (drafts, [path for path in found if not path.endswith(DRAFT_SUFFIX)]):
        if batch:
            delete(batch)
