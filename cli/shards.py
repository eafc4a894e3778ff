"""The read-only shard commands' common ground, as plain functions: read a shard's files, note what could not be
read; ``ls``.

``show``, ``stats`` and ``validate`` live in :mod:`visinstruct.cli.show`, :mod:`visinstruct.cli.stats` and
:mod:`visinstruct.cli.validate`; :mod:`visinstruct.cli.shards_cmd` wires them all to the command line. Nothing
here writes to a dataset. Where a shard's files lie, and which shards a PATH names, is
:mod:`visinstruct.transforms.layout`'s to say.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow as pa

from visinstruct.schemas import IndexRow
from visinstruct.transforms.layout import (
    IMG2DATASET_STAGE,
    ShardError,
    ShardFiles,
    match_paths,
    read_stats,
    shard_files,
)
from visinstruct.transforms.shards import UnsafeMember, exists, read_table, read_tar_samples

Progress = Callable[[int, int], None]  # (shards done, shards in all)


def file_size(path: str) -> int | None:
    """Size in bytes, or ``None`` when the file does not exist."""
    found = match_paths(path)
    return found[0].size if found else None


def read_index(path: str, columns: list[str] | None = None) -> pa.Table | None:
    """A shard's parquet index (only ``columns``, when given), or ``None`` when it does not exist.

    An index written before a nullable column was added to :class:`IndexRow` reads with that column all null,
    so the read-only commands work on older shards too. Raises :class:`ShardError` when it is unreadable.
    """
    if not exists(path):
        return None
    try:
        return read_table(path, IndexRow, columns)
    except (pa.ArrowException, ValueError, KeyError, OSError) as e:  # truncated file, wrong types...
        raise ShardError(f"unreadable index {path}: {e}".splitlines()[0]) from e


def tar_samples(files: ShardFiles) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``read_tar_samples``, with a broken or unsafe tar as a one-line :class:`ShardError`."""
    try:
        yield from read_tar_samples(files.tar)
    except (tarfile.TarError, UnsafeMember, OSError) as e:
        raise ShardError(f"shard {files.name}: unreadable tar ({e}); run validate".splitlines()[0]) from e


@dataclass(frozen=True)
class Unread:
    """What a command could not read from one shard: ``missing`` indexed samples (``None`` when the shard has no
    index to tell) and the error that stopped the reading (``None`` when the tar just lacks them)."""

    shard: str
    missing: int | None
    error: str | None


def samples_noting_losses(files: ShardFiles, losses: list[Unread]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The samples a tar gives, up to where it stops being readable; then, when the tar does not give every
    sample its index lists as written (or cannot be read to its end), an :class:`Unread` appended to ``losses``.

    Commands that read many shards (``export``) go on past a bad one and say at the end what they could not read,
    instead of stopping at the first or quietly writing fewer samples.
    """
    read, error = set(), None
    try:
        for key, members in read_tar_samples(files.tar):
            read.add(key)
            yield key, members
    except (tarfile.TarError, UnsafeMember, OSError) as e:  # OSError: a missing tar (BeamIOError for a URL)
        error = str(e).splitlines()[0] if str(e) else type(e).__name__
    index = read_index(files.index, ["key", "status"])
    if index is None:
        if error:
            losses.append(Unread(files.name, None, error))
        return
    written = {row["key"] for row in index.to_pylist() if row["status"] == "success"}
    missing = len(written - read)
    if missing or error:
        losses.append(Unread(files.name, missing, error))


def describe_losses(losses: list[Unread]) -> str:
    """One line: how many indexed samples could not be read, from which shards, and the first reason."""
    known = sum(u.missing or 0 for u in losses)
    unknown = sum(u.missing is None for u in losses)
    count = f"{known} indexed samples" + (f" (and {unknown} unindexed shards)" if unknown else "")
    first = losses[0]
    why = first.error or "the tar lacks them"
    return f"{count} could not be read from {len(losses)} shards (shard {first.shard}: {why}); run validate"


# ---------------------------------------------------------------------------------------------------------------
# ls


def list_shards(paths: list[str], progress: Progress | None = None) -> list[dict]:
    """One row per shard for ``ls``: samples written, inputs, rejected, tar size, complete, stages run.

    Counts come from the parquet index; a shard without one has its tar's samples counted instead (inputs and
    rejected then come from ``_stats.json``, or are ``None``).
    """
    rows = []
    for done, tar in enumerate(paths, 1):
        rows.append(_list_shard(shard_files(tar)))
        if progress:
            progress(done, len(paths))
    return rows


def _list_shard(files: ShardFiles) -> dict:
    row = {
        "shard": files.name,
        "path": files.tar,
        "written": None,
        "inputs": None,
        "rejected": None,
        "tar_bytes": file_size(files.tar),
        "complete": exists(files.stats),
        "stages": ["ingest"],
    }
    index = read_index(files.index, ["status", "clip_score", "conversation_kind"])
    if index is not None:
        status = index.column("status").to_pylist()
        row["inputs"], row["written"] = len(status), status.count("success")
        row["rejected"] = row["inputs"] - row["written"]
        if index.column("clip_score").null_count < len(index):
            row["stages"].append("filter")
        if index.column("conversation_kind").null_count < len(index):
            row["stages"].append("generate")
    elif row["tar_bytes"] is not None:
        row["written"], row["stages"] = _count_tar(files)
    if row["complete"]:
        try:
            stats = read_stats(files.stats)
        except (ValueError, TypeError, KeyError) as e:  # ShardStats refuses counts that do not add up
            raise ShardError(f"shard {files.name}: bad stats file ({e}); run validate".splitlines()[0]) from e
        if index is None:
            row["inputs"], row["rejected"] = stats.inputs, stats.rejected
        if stats.stage == IMG2DATASET_STAGE:  # written by img2dataset, not by our ingest
            row["stages"][0] = IMG2DATASET_STAGE
        elif stats.stage not in row["stages"]:  # the stats name the last stage that wrote the shard
            row["stages"].append(stats.stage)
    return row


def _count_tar(files: ShardFiles) -> tuple[int, list[str]]:
    """Samples in a tar, and the stages its JSON members show (no index to tell)."""
    count, clip, generated = 0, False, False
    for _, sample in tar_samples(files):
        count += 1
        try:
            data = json.loads(sample.get("json", b"{}"))
        except ValueError:  # validate reports it; ls only counts
            continue
        if isinstance(data, dict):
            clip, generated = clip or "clip" in data, generated or "generation" in data
    return count, ["ingest"] + ["filter"] * clip + ["generate"] * generated


def human_bytes(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_listing(rows: list[dict]) -> str:
    """``ls`` as a table with a total line."""

    def cell(value):
        return "-" if value is None else str(value)

    header = ("shard", "written", "inputs", "rejected", "tar size", "complete", "stages")
    lines = [
        (
            r["shard"],
            cell(r["written"]),
            cell(r["inputs"]),
            cell(r["rejected"]),
            human_bytes(r["tar_bytes"]),
            "yes" if r["complete"] else "NO",
            ",".join(r["stages"]),
        )
        for r in rows
    ]
    complete = f"{sum(r['complete'] for r in rows)}/{len(rows)}"
    total = (
        "total",
        *(str(sum(r[k] or 0 for r in rows)) for k in ("written", "inputs", "rejected")),
        human_bytes(sum(r["tar_bytes"] or 0 for r in rows)),
        complete,
        "",
    )
    widths = [max(len(line[i]) for line in [header, *lines, total]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) if i in (0, 5, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()
        for line in [header, *lines, total]
    )
