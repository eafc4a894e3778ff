"""``remove``: take samples down by URL or image sha256, rewriting only the shards that hold them.

The parquet indexes give each key's url and sha256 (FORMAT.md), so the affected shards are found without opening
any tar, and only they are rewritten. A removed sample stays accounted for, so every shard still has
``inputs == written + rejected`` and ``validate`` passes:

- its index row keeps key, url, path and sha256 (what a later ingest needs to honour the takedown) with status
  ``takedown``, the reason code, as for every rejected row; caption, sizes, hashes and embeddings are cleared;
- a :class:`Rejection` (stage ``remove``, reason ``takedown``) goes to ``rejected/remove-NNNNN.parquet``;
- ``_stats.json`` is rewritten with the new counts and stage ``remove``.

Each shard is rewritten through the one shard rewrite (:func:`~visinstruct.transforms.rewrite.rewrite_shard`, in
its own folder) with a judge that drops the samples to remove, and committed in the order that survives a kill at
any point (:mod:`visinstruct.transforms.commit`): the dead-letter rows first (they are the removal's journal), then
``_stats.json`` is deleted, the tar and the index are replaced, and the stats are written last. Until the tar is
replaced the shard is unchanged but for those dead letters; after that it reads as incomplete until the stats
exist. The next ``remove`` on the shard, whatever its lists, finishes the removal its journal names; earlier
removals' dead letters are kept. A sample the index lists as written that the tar lacks is dead-lettered as
``missing_in_tar``, as every rewrite does.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import fields, replace

from visinstruct.cli.shards import Progress, read_index
from visinstruct.schemas import Decision, IndexRow, SampleMeta, ShardStats, from_table
from visinstruct.transforms import takedown as takedown_lists
from visinstruct.transforms.layout import ShardError, ShardFiles, shard_files
from visinstruct.transforms.rewrite import Judge, identity_row, journal, rewrite_shard
from visinstruct.transforms.shards import exists, read_table
from visinstruct.transforms.takedown import Takedown, TakedownError

log = logging.getLogger(__name__)
STAGE = "remove"
REASON = takedown_lists.REASON
_COLUMNS = ["key", "status", "url", "path", "sha256", "image_sha256s", "image_locations"]
_SET_BY_REWRITE = {"key", "status", "members", "error_message"}


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
    refreshed = []
    if not dry_run:
        for files, removals in plans:
            stats = remove_from_shard(files, {key: how for key, (how, _) in removals.items()}, takedown)
            log.info("shard %s: removed %d samples, %d written now", files.name, len(removals), stats.written)
        from visinstruct.transforms.energon import refresh_metadata

        # energon's metadata points at byte offsets the rewrite moved: written again, same splits
        for folder in sorted({files.folder for files, _ in plans}):
            summary = refresh_metadata(folder)
            if summary is not None:
                refreshed.append(summary)
    not_found = sorted(takedown.urls - seen) + sorted(d for d in takedown.sha256 if f"sha256:{d}" not in seen)
    return {
        "shards": len(paths),
        "rewritten": [files.name for files, _ in plans],
        "removed": removed,
        "already_absent": absent,
        "not_found": not_found,
        "dry_run": dry_run,
        "energon": refreshed,
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
        # a multi-image sample matches by any of its images' locations and digests
        locations = [u.strip() for u in [row["url"] or row["path"], *(row["image_locations"] or [])] if u]
        digests = [(d or "").strip().lower() for d in [row["sha256"], *(row["image_sha256s"] or [])]]
        if row["status"] == "success":
            written.add(row["key"])
        listed = [u for u in locations if u in takedown.urls]
        how = "url" if listed else "sha256" if any(d in takedown.sha256 for d in digests) else None
        if how is None:
            continue
        location = listed[0] if listed else locations[0] if locations else None
        seen.update(listed)
        seen.update(f"sha256:{d}" for d in digests if d in takedown.sha256)
        if row["status"] == "success":
            removals[row["key"]] = (how, location)
        else:
            absent += 1
    earlier = journal(files.tar, files.folder, STAGE)
    for key in earlier.keys() & written:  # dead letters are written first: this removal never finished
        removals.setdefault(key, (earlier[key].detail.get("matched_by", "earlier"), earlier[key].url))
    complete = exists(files.stats)
    if not complete and not earlier:
        if removals:
            raise ShardError(f"shard {files.name} is incomplete (no {files.stats}): finish writing it first")
        return None, absent
    if complete and not removals:
        return None, absent
    if not files.name.isdigit():
        raise ShardError(f"{files.tar} is not named like a shard (NNNNN.tar): cannot write its stats")
    return removals, absent


def remove_from_shard(files: ShardFiles, removals: dict[str, str], takedown: Takedown | None = None) -> ShardStats:
    """Rewrite one shard in place without the samples ``removals`` names (``{key: matched_by}``); returns its new
    stats."""
    rows = {r.key: r for r in from_table(IndexRow, read_table(files.index, IndexRow))}
    return rewrite_shard(files.tar, None, files.folder, STAGE, takedown_judge(rows, removals, takedown))


def matched_images(row: IndexRow, takedown: Takedown | None) -> IndexRow:
    """A multi-image row with only the images ``takedown`` lists (by location or digest) in its image columns: its
    takedown row then keeps out those images at a rebuild, not the sample's other images."""
    if takedown is None or not (row.image_locations or row.image_sha256s):
        return row
    pairs = list(zip(row.image_locations, row.image_sha256s))
    hit = [(u, d) for u, d in pairs if u.strip() in takedown.urls or d.strip().lower() in takedown.sha256]
    return replace(row, image_locations=[u for u, _ in hit], image_sha256s=[d for _, d in hit])


def takedown_judge(rows: dict[str, IndexRow], removals: dict[str, str], takedown: Takedown | None = None) -> Judge:
    """Drop the samples ``removals`` names as ``takedown``; keep every other sample and its index row as they are.

    A removed row keeps what identifies the input (key, url, path, sha256, and of a multi-image sample the images
    ``takedown`` lists: what a later ingest needs to honour the takedown); its content (caption, sizes, hashes,
    embeddings) is cleared.
    """

    def judge(key: str, meta: SampleMeta, members: dict[str, bytes]) -> Decision[SampleMeta]:
        if key not in removals:  # a sample the index lacks (validate reports it) keeps the row its metadata gives
            return Decision.keep(None, **(_columns(rows[key]) if key in rows else {}))
        row, message = matched_images(rows[key], takedown), f"removed on request (matched by {removals[key]})"
        detail = {"matched_by": removals[key], "sha256": row.sha256}
        return Decision.drop(REASON, message, detail, **_columns(identity_row(row, REASON, message)))

    return judge


def _columns(row: IndexRow) -> dict:
    """An index row's columns a judge passes on (all but those the rewrite sets: key, status, members, message)."""
    return {f.name: getattr(row, f.name) for f in fields(IndexRow) if f.name not in _SET_BY_REWRITE}


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
    for summary in report.get("energon", []):
        if "withdrawn" in summary:
            lines.append(f"energon metadata of {summary['folder']} withdrawn: {summary['withdrawn']}")
        else:
            lines.append(f"energon metadata of {summary['folder']} written again: {summary['samples']} samples")
    return "\n".join(lines)
