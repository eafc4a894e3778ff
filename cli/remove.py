"""``remove``: take samples down by URL or image sha256, rewriting only the shards that hold them.

The parquet indexes give each key's url and sha256 (FORMAT.md), so the affected shards are found without opening
any tar, and only they are rewritten. A removed sample stays accounted for, so every shard still has
``inputs == written + rejected`` and ``validate`` passes:

- its index row keeps key, url, path and sha256 (what a later ingest needs to honour the takedown) with status
  ``takedown``, the reason code, as for every rejected row; caption, sizes, hashes and embeddings are cleared;
- a :class:`Rejection` (stage ``remove``, reason ``takedown``) goes to ``rejected/remove-NNNNN.parquet``;
- ``_stats.json`` is rewritten with the new counts and stage ``remove``.

Each file is replaced atomically, in an order that survives a kill at any point: the dead-letter rows first (they
are the removal's journal), then ``_stats.json`` is deleted, the tar and the index are replaced, and the stats are
written last. Until the tar is replaced the shard is unchanged but for those dead letters; after that it reads as
incomplete until the stats exist. The next ``remove`` on the shard, whatever its lists, finishes the removal its
journal names.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import replace

from visinstruct.cli.shards import Progress, ShardError, ShardFiles, read_index, shard_files, tar_samples
from visinstruct.schemas import SCHEMA_VERSION, IndexRow, JsonDict, Rejection, ShardStats, from_table
from visinstruct.transforms import takedown as takedown_lists
from visinstruct.transforms.shards import (
    TarShardWriter,
    delete,
    exists,
    join,
    read_table,
    write_stats,
    write_table,
)
from visinstruct.transforms.takedown import Takedown, TakedownError

log = logging.getLogger(__name__)
STAGE = "remove"
REASON = takedown_lists.REASON
_COLUMNS = ["key", "status", "url", "path", "sha256"]


def load_takedown(urls_file: str | None = None, sha256_file: str | None = None) -> Takedown:
    """The takedown lists of ``--urls`` and ``--sha256`` (see :mod:`visinstruct.transforms.takedown`)."""
    if not urls_file and not sha256_file:
        raise ShardError("give --urls FILE or --sha256 FILE (or both)")
    try:
        return takedown_lists.load_takedown(urls_file, sha256_file)
    except TakedownError as e:
        raise ShardError(str(e)) from None


def remove_samples(
    paths: list[str], takedown: Takedown, progress: Progress | None = None, dry_run: bool = False
) -> dict:
    """Remove every written sample of ``paths`` that ``takedown`` matches, rewriting only the affected shards.

    Args:
        paths: tar paths from :func:`~visinstruct.cli.shards.resolve_shards`; each needs its parquet index.
        takedown: the URLs and digests to remove.
        progress: called with ``(shards done, shards)`` while the indexes are searched; each rewritten shard is
            logged.
        dry_run: find and report, but write nothing.

    Returns:
        shards (how many were searched), rewritten (names of shards rewritten), removed (``{key, shard, url,
        matched_by}`` per sample), already_absent (matching rows that had no sample: rejected or removed before),
        not_found (list entries that matched no row), dry_run.
    """
    plans, seen, absent = [], set(), 0
    for done, tar in enumerate(paths, 1):
        files = shard_files(tar)
        removals, matched_absent = _plan_shard(files, takedown, seen)
        absent += matched_absent
        if removals is not None:
            plans.append((files, removals))
        if progress:
            progress(done, len(paths))
    removed = [
        {"key": key, "shard": files.name, "url": url, "matched_by": how}
        for files, removals in plans
        for key, (how, url) in sorted(removals.items())
    ]
    if not dry_run:
        for files, removals in plans:
            stats = rewrite_shard(files, {key: how for key, (how, _) in removals.items()})
            log.info("shard %s: removed %d samples, %d written now", files.name, len(removals), stats.written)
    not_found = sorted(takedown.urls - seen) + sorted(d for d in takedown.sha256 if f"sha256:{d}" not in seen)
    return {
        "shards": len(paths),
        "rewritten": [files.name for files, _ in plans],
        "removed": removed,
        "already_absent": absent,
        "not_found": not_found,
        "dry_run": dry_run,
    }


def _plan_shard(files: ShardFiles, takedown: Takedown, seen: set[str]) -> tuple[dict | None, int]:
    """``{key: (matched_by, url)}`` to remove (``None``: leave the shard alone), and matching rows not written.

    Adds to ``seen`` every list entry some row matches (URLs as they are, digests as ``sha256:HEX``). Also picks
    up an earlier removal that was cut off: its dead-letter rows name samples the index still has as written, or
    the shard has no stats.
    """
    table = read_index(files.index, _COLUMNS)
    if table is None:
        raise ShardError(f"shard {files.name} has no index ({files.index}): remove finds samples through it")
    removals, absent, written = {}, 0, set()
    for row in table.to_pylist():
        location, digest = row["url"] or row["path"], (row["sha256"] or "").strip().lower()
        if row["status"] == "success":
            written.add(row["key"])
        how = takedown.match(location, digest)
        if how is None:
            continue
        if location is not None and location.strip() in takedown.urls:
            seen.add(location.strip())
        if digest in takedown.sha256:
            seen.add(f"sha256:{digest}")
        if row["status"] == "success":
            removals[row["key"]] = (how, location)
        else:
            absent += 1
    journal = _previous_rejections(files)
    for key in journal.keys() & written:  # dead letters are written first: this removal never finished
        removals.setdefault(key, (journal[key].detail.get("matched_by", "earlier"), journal[key].url))
    complete = exists(files.stats)
    if not complete and not journal:
        if removals:
            raise ShardError(f"shard {files.name} is incomplete (no {files.stats}): finish writing it first")
        return None, absent
    if complete and not removals:
        return None, absent
    if not files.name.isdigit():
        raise ShardError(f"{files.tar} is not named like a shard (NNNNN.tar): cannot write its stats")
    return removals, absent


def rewrite_shard(files: ShardFiles, removals: dict[str, str]) -> ShardStats:
    """Rewrite one shard without the samples ``removals`` names (``{key: matched_by}``); returns its new stats.

    Order: the new tar is built in a temporary file; the dead-letter rows are written (the removal's journal);
    ``_stats.json`` is deleted; the tar, then the index replace theirs; the stats are counted again from the new
    index and written last.
    """
    start = time.monotonic()
    rows = from_table(IndexRow, read_table(files.index, IndexRow))
    new_rows, rejections = _takedown_rows(files, rows, removals)
    writer, members = TarShardWriter(), {}
    try:
        for key, sample in tar_samples(files):
            if key not in removals:
                members[key] = writer.add(key, list(sample.items()))
        lost = [r.key for r in new_rows if r.status == "success" and r.key not in members]
        if lost:  # rewriting would write an index that points at nothing: leave the shard as it is
            raise ShardError(
                f"shard {files.name}: the index lists {lost[0]} as written but the tar has no such "
                "sample; run validate"
            )
        write_table(_rejected_path(files), rejections, Rejection, SCHEMA_VERSION)
        if exists(files.stats):  # from here until the new stats exist, the shard reads as incomplete
            delete([files.stats])
        tar_bytes = writer.finish(files.tar)
    except BaseException:
        writer.abort()
        raise
    new_rows = [replace(r, members=members[r.key]) if r.status == "success" else r for r in new_rows]
    write_table(files.index, new_rows, IndexRow, SCHEMA_VERSION)
    reasons = Counter(r.status for r in new_rows if r.status != "success")
    written = len(new_rows) - sum(reasons.values())
    stats = ShardStats(
        shard=int(files.name),
        stage=STAGE,
        inputs=len(new_rows),
        written=written,
        rejected=len(new_rows) - written,
        rejected_by_reason=dict(reasons),
        tar_bytes=tar_bytes,
        duration_s=round(time.monotonic() - start, 3),
    )
    write_stats(files.stats, stats)
    return stats


def _takedown_rows(
    files: ShardFiles, rows: list[IndexRow], removals: dict[str, str]
) -> tuple[list[IndexRow], list[Rejection]]:
    """The index rows with the removed ones as ``takedown`` rows, and every removal's rejection, in key order."""
    rejections = _previous_rejections(files)
    new_rows = []
    for row in rows:
        if row.key in removals:
            message = f"removed on request (matched by {removals[row.key]})"
            rejections[row.key] = Rejection(
                STAGE,
                REASON,
                message,
                row.key,
                row.url or row.path,
                JsonDict({"matched_by": removals[row.key], "sha256": row.sha256}),
            )
            # Kept: what identifies the input, so a later ingest can honour the takedown. Dropped: its content.
            row = IndexRow(
                key=row.key, status=REASON, url=row.url, path=row.path, sha256=row.sha256, error_message=message
            )
        new_rows.append(row)
    return new_rows, [rejections[k] for k in sorted(rejections)]


def _rejected_path(files: ShardFiles) -> str:
    return join(files.folder, "rejected", f"{STAGE}-{files.name}.parquet")


def _previous_rejections(files: ShardFiles) -> dict[str, Rejection]:
    """Rejections of earlier removals from this shard, by key: a second takedown adds to them."""
    path = _rejected_path(files)
    if not exists(path):
        return {}
    return {r.key: r for r in from_table(Rejection, read_table(path, Rejection))}


def format_removal(report: dict, limit: int = 50) -> str:
    """The removal report for the terminal: what was removed (the first ``limit``), then a summary line."""
    lines = [f"{r['shard']}  {r['key']}  {r['matched_by']:<7} {r['url'] or '-'}" for r in report["removed"][:limit]]
    if len(report["removed"]) > limit:
        lines.append(f"... and {len(report['removed']) - limit} more (use --json for all)")
    verb = "would remove" if report["dry_run"] else "removed"
    by = Counter(r["matched_by"] for r in report["removed"])
    how = f" ({', '.join(f'{n} by {k}' for k, n in sorted(by.items()))})" if by else ""
    lines.append(
        f"{verb} {len(report['removed'])} samples{how} from {len(report['rewritten'])} of "
        f"{report['shards']} shards; {report['already_absent']} matching rows had no sample; "
        f"{len(report['not_found'])} list entries matched nothing"
    )
    return "\n".join(lines)
