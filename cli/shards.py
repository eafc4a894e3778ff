"""The read-only shard commands' common ground, as plain functions: resolve a PATH, read a shard's files; ``ls``.

``show``, ``stats`` and ``validate`` live in :mod:`visinstruct.cli.show`, :mod:`visinstruct.cli.stats` and
:mod:`visinstruct.cli.validate`; :mod:`visinstruct.cli.shards_cmd` wires them all to the command line. Nothing
here writes to a dataset.

A PATH names shards as a folder, a glob (``shards/*.tar``) or a brace pattern (``shards/{00000..00099}.tar``),
locally or on any Beam filesystem (``gs://...``). A shard is named by its tar; its index and stats lie beside it
(FORMAT.md). In a folder, a shard whose tar is gone still counts when its index or stats remain, so ``stats``
(which reads only the indexes) still works and ``validate`` reports the missing tar.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow as pa

from visinstruct.schemas import IndexRow
from visinstruct.transforms.shards import (
    IMG2DATASET_STAGE,
    FileInfo,
    UnsafeMember,
    exists,
    match,
    read_stats,
    read_table,
    read_tar_samples,
)

IMAGE_EXTENSIONS = ("jpg", "png", "webp")
GLOB_CHARS = "*?["
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
Progress = Callable[[int, int], None]  # (shards done, shards in all)


class ShardError(ValueError):
    """A PATH that names no shards, or a sample that is not there; the message is one line for the terminal."""


class _NoSuchPath(ShardError):
    """A literal path that does not exist (a brace pattern collects these to report them together)."""


@dataclass(frozen=True)
class ShardFiles:
    """The files of one shard: ``name`` is the tar's stem, e.g. ``00042``."""

    name: str
    tar: str
    index: str
    stats: str
    folder: str


def shard_files(tar: str) -> ShardFiles:
    """The files of the shard whose tar is ``tar`` (which need not exist)."""
    folder, _, base = tar.rpartition("/")
    stem = base[: -len(".tar")] if base.endswith(".tar") else base
    prefix = f"{folder}/" if folder else ""
    return ShardFiles(stem, tar, f"{prefix}{stem}.parquet", f"{prefix}{stem}_stats.json", folder or ".")


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


def match_paths(pattern: str) -> list[FileInfo]:
    """The files a glob or a literal path matches, local or remote (``gs://`` globs too), with their sizes."""
    try:
        return match(pattern)
    except Exception as e:  # noqa: BLE001 - Beam wraps every filesystem's errors in BeamIOError
        raise ShardError(f"cannot list {pattern}: {e}".splitlines()[0]) from e


# ---------------------------------------------------------------------------------------------------------------
# Resolving a PATH


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{a,b}`` lists and ``{00000..00099}`` numeric ranges (zero padding kept), like the shell."""
    found = _BRACE.search(pattern)
    if not found:
        return [pattern]
    body, head, tail = found.group(1), pattern[: found.start()], pattern[found.end() :]
    numbers = _RANGE.fullmatch(body)
    if numbers:
        lo, hi = numbers.groups()
        padded = any(len(n.lstrip("-")) > 1 and n.lstrip("-").startswith("0") for n in (lo, hi))
        width = max(len(lo), len(hi)) if padded else 0
        step = 1 if int(hi) >= int(lo) else -1
        items = [f"{n:0{width}d}" for n in range(int(lo), int(hi) + step, step)]
    elif "," in body:
        items = body.split(",")
    else:
        raise ShardError(f"bad brace pattern {{{body}}} in {pattern}: expected {{a,b}} or {{00000..00099}}")
    return [out for item in items for out in expand_braces(head + item + tail)]


def resolve_shards(path: str) -> list[str]:
    """The tar paths a PATH names, sorted; raises :class:`ShardError` with a one-line message when none.

    Args:
        path: a shard folder, a ``.tar`` file, a glob, or a brace pattern; local or any Beam filesystem URL.
    """
    if not path:
        raise ShardError("no PATH given")
    pieces = expand_braces(path)
    found, missing = set(), []
    for piece in pieces:
        try:
            found.update(_resolve_piece(piece))
        except _NoSuchPath:
            missing.append(piece)
    if len(pieces) == 1 and missing:
        raise ShardError(f"no such file or folder: {path}")
    if missing:  # a brace pattern names shards one by one: report the gaps at once, not the first alone
        more = f" (and {len(missing) - 1} more of {len(pieces)})" if len(missing) > 1 else ""
        raise ShardError(f"no such shard: {missing[0]}{more}")
    return sorted(found)


def _resolve_piece(piece: str) -> list[str]:
    if any(c in piece for c in GLOB_CHARS):
        bare = "://" not in piece and "/" not in piece  # Beam lists nothing for a glob with no folder part
        matches = [m.path for m in match_paths(f"./{piece}" if bare else piece)]
        matches = [p[2:] for p in matches] if bare else matches
        if not matches:
            raise ShardError(f"nothing matches {piece}")
        tars = [p for p in matches if p.endswith(".tar")]
        if not tars:
            raise ShardError(f"{piece} matches {len(matches)} files but no shards (.tar files)")
        return tars
    if _is_folder(piece):
        return _folder_shards(piece)
    if not match_paths(piece):
        raise _NoSuchPath(piece)
    if not piece.endswith(".tar"):
        raise ShardError(f"{piece} is not a shard (expected a .tar file or a folder of them)")
    return [piece]


def _is_folder(path: str) -> bool:
    if "://" not in path:
        return os.path.isdir(path)
    # Object stores have no folders: a prefix is one when something lies under it and it is no file itself.
    return path.endswith("/") or (not match_paths(path) and bool(match_paths(path.rstrip("/") + "/*")))


def _folder_shards(folder: str) -> list[str]:
    folder = folder.rstrip("/") or "/"
    stems = set()
    for meta in match_paths(f"{folder}/*"):
        name = meta.path.rpartition("/")[2]
        if name.endswith(".tar"):
            stems.add(name[: -len(".tar")])
        for suffix in (".parquet", "_stats.json"):  # only shard-named ones: urls.parquet is no shard
            if name.endswith(suffix) and name[: -len(suffix)].isdigit():
                stems.add(name[: -len(suffix)])
    if not stems:
        raise ShardError(f"{folder} holds no shards (no .tar files)")
    return [f"{folder}/{stem}.tar" for stem in stems]


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
