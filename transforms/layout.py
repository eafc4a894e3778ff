"""FORMAT.md as data: where every file of a dataset folder lies, which paths name shards, where a sample's image is.

This is the only module that spells the layout (``NNNNN.tar``, ``NNNNN.parquet``, ``NNNNN_stats.json``,
``rejected/<stage>-NNNNN.parquet``, ``_staging/``, ``run_report.json``); every stage, the shard commands and the
trainer ask it. img2dataset's layout is ours without a stage name, so the same functions read it (its stats file
reads through :func:`read_stats`).

A *spec* names shards as a folder, a ``.tar`` file, a glob (``shards/*.tar``), a brace pattern
(``shards/{00000..00099}.tar``) or several of those joined by ``::`` (webdataset's spelling), locally or on any Beam
filesystem (``gs://...``). In a folder, a shard whose tar is gone still counts when its index or stats remain, so
``stats`` (which reads only the indexes) still works and ``validate`` reports the missing tar.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from visinstruct.schemas import ShardStats, shard_name, to_row
from visinstruct.transforms.shards import FileInfo, join, match, read_bytes, write_bytes

TAR_SUFFIX = ".tar"
INDEX_SUFFIX = ".parquet"
STATS_SUFFIX = "_stats.json"
REJECTED_DIR = "rejected"
STAGING_DIR = "_staging"
DRAFT_SUFFIX = ".draft.json"
REPORT_NAME = "run_report.json"
MIX_REPORT = "mix_report.json"  # a mix folder's: what each source gave (its subfolders are the sources' datasets)
MIX_INGEST_DIR = "_ingest"  # OUT/_ingest/<name>/: what a mix ingested for a source with an ingest section
# Members a sample's image may be stored as, in the order a reader looks for them. We write jpg, png or webp;
# other tools (img2dataset with another encode format, webdataset users) also write jpeg.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
IMG2DATASET_STAGE = "img2dataset"  # the stage named by img2dataset's stats (it has no stage of ours)
IMG2DATASET_FAILURES = ("failed_to_download", "failed_to_resize")
GLOB_CHARS = "*?["
SPEC_SEPARATOR = "::"
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")


class ShardError(ValueError):
    """A spec that names no shards, or a shard that cannot be used; the message is one line for the terminal."""


class _NoSuchPath(ShardError):
    """A literal path that does not exist (a brace pattern collects these to report them together)."""


@dataclass(frozen=True)
class ShardFiles:
    """The files of one shard: ``name`` is the tar's stem, e.g. ``00042``; ``folder`` the dataset folder."""

    name: str
    tar: str
    index: str
    stats: str
    folder: str

    @property
    def number(self) -> int | None:
        """The shard id the name spells (``00042`` -> 42), or ``None`` for a tar not named like a shard."""
        return int(self.name) if self.name.isdigit() else None

    def rejected(self, stage: str) -> str:
        """The dead-letter table ``stage`` writes for this shard."""
        return rejected_path(self.folder, stage, self.name)

    def rejected_pattern(self) -> str:
        """A glob matching the dead-letter tables of every stage for this shard."""
        return join(self.folder, REJECTED_DIR, f"*-{self.name}{INDEX_SUFFIX}")


def shard_files(tar: str) -> ShardFiles:
    """The files of the shard whose tar is ``tar`` (which need not exist)."""
    folder, _, base = tar.rpartition("/")
    stem = base[: -len(TAR_SUFFIX)] if base.endswith(TAR_SUFFIX) else base
    prefix = f"{folder}/" if folder else ""
    return ShardFiles(stem, tar, f"{prefix}{stem}{INDEX_SUFFIX}", f"{prefix}{stem}{STATS_SUFFIX}", folder or ".")


def shard_in(folder: str, shard: int) -> ShardFiles:
    """The files of shard number ``shard`` in dataset folder ``folder``."""
    stem = shard_name(shard)
    return ShardFiles(
        stem,
        join(folder, stem + TAR_SUFFIX),
        join(folder, stem + INDEX_SUFFIX),
        join(folder, stem + STATS_SUFFIX),
        folder,
    )


def shard_id(tar: str, position: int | None = None) -> int:
    """Output shard id: the tar's numeric stem (``00042.tar`` -> 42), else its position in the input."""
    number = shard_files(tar).number
    if number is not None:
        return number
    if position is None:
        raise ShardError(f"{tar}: shard names must be numbers (00042.tar) when read from a pipeline")
    return position


def index_of(tar: str) -> str | None:
    """The index beside a tar (``None`` when ``tar`` is not named ``*.tar``)."""
    return shard_files(tar).index if tar.endswith(TAR_SUFFIX) else None


def rejected_path(folder: str, stage: str, shard: int | str) -> str:
    """``folder/rejected/<stage>-NNNNN.parquet``."""
    name = shard if isinstance(shard, str) else shard_name(shard)
    return join(folder, REJECTED_DIR, f"{stage}-{name}{INDEX_SUFFIX}")


def rejected_shard(path: str) -> tuple[str, str] | None:
    """The ``(stage, shard name)`` a dead-letter table's path names (``.../rejected/filter-00042.parquet`` ->
    ``("filter", "00042")``), or ``None`` for a file not named like one."""
    base = path.rpartition("/")[2]
    if not base.endswith(INDEX_SUFFIX):
        return None
    stage, _, name = base[: -len(INDEX_SUFFIX)].rpartition("-")
    return (stage, name) if stage and name else None


def rejected_pattern(folder: str) -> str:
    """A glob matching every dead-letter table of a dataset folder."""
    return join(folder, REJECTED_DIR, f"*{INDEX_SUFFIX}")


def stats_pattern(folder: str) -> str:
    """A glob matching every shard's stats file of a dataset folder."""
    return join(folder, f"*{STATS_SUFFIX}")


def index_pattern(folder: str) -> str:
    """A glob matching every shard's index of a dataset folder (and any other parquet there: filter with
    :func:`shard_stem`)."""
    return join(folder, f"*{INDEX_SUFFIX}")


def report_path(folder: str) -> str:
    return join(folder, REPORT_NAME)


def staging_dir(folder: str) -> str:
    return join(folder, STAGING_DIR)


def staging_tar(folder: str, shard: int, attempt: str) -> str:
    """The staging tar of one download attempt of a shard: ``_staging/NNNNN.<attempt>.tar``."""
    return join(folder, STAGING_DIR, f"{shard_name(shard)}.{attempt}{TAR_SUFFIX}")


def draft_path(folder: str, shard: int, attempt: str) -> str:
    """The committed draft of one download attempt of a shard: ``_staging/NNNNN.<attempt>.draft.json``."""
    return join(folder, STAGING_DIR, f"{shard_name(shard)}.{attempt}{DRAFT_SUFFIX}")


def draft_pattern(folder: str, shard: int) -> str:
    """A glob matching the committed drafts of every download attempt of a shard."""
    return join(folder, STAGING_DIR, f"{shard_name(shard)}.*{DRAFT_SUFFIX}")


def draft_attempt(path: str) -> str:
    """The attempt a draft's path names (:func:`draft_path`)."""
    return path.rpartition("/")[2].removesuffix(DRAFT_SUFFIX).partition(".")[2]


def staging_patterns(folder: str, shard: int) -> list[str]:
    """Globs matching every staging file of a shard: its draft, the tars of all its attempts, and the temporary
    files of writes a kill cut short (``.NNNNN.*.tmp``, see :func:`~visinstruct.transforms.shards.atomic_write`)."""
    name = shard_name(shard)
    return [join(folder, STAGING_DIR, f"{name}.*"), join(folder, STAGING_DIR, f".{name}.*")]


def shard_stem(filename: str) -> str | None:
    """The shard name a file of the layout belongs to (``00042.tar``, ``00042.parquet``, ``00042_stats.json``
    -> ``00042``), or ``None`` for any other file (``urls.parquet`` is no shard)."""
    base = filename.rpartition("/")[2]
    for suffix in (TAR_SUFFIX, INDEX_SUFFIX, STATS_SUFFIX):
        if base.endswith(suffix) and base[: -len(suffix)].isdigit():
            return base[: -len(suffix)]
    return None


def image_member(sample: Mapping[str, object]) -> str | None:
    """The extension of a single-image sample's image member (``jpg``, ``jpeg``, ``png``, ``webp``), or ``None``
    (a text-only or multi-image sample, or none at all)."""
    return next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)


def numbered_member(index: int, ext: str) -> str:
    """The member name (after the key's dot) of the ``index``-th image of a multi-image sample: ``0.jpg``."""
    return f"{index}.{ext}"


def image_members(sample: Mapping[str, object]) -> list[str]:
    """A sample's image members in image order: ``["jpg"]`` for a single image, ``["0.jpg", "1.png", ...]`` for
    several (the n-th answers the conversation's n-th ``<image>``), ``[]`` for a text-only sample."""
    single = image_member(sample)
    if single is not None:
        return [single]
    numbered = []
    for name in sample:
        index, _, ext = str(name).partition(".")
        if index.isdigit() and ext in IMAGE_EXTENSIONS and str(int(index)) == index:
            numbered.append((int(index), str(name)))
    return [name for _, name in sorted(numbered)]


# ---------------------------------------------------------------------------------------------------------------
# Stats files: ours, and img2dataset's


def write_stats(path: str, stats: ShardStats) -> None:
    row = to_row(stats) | {"rejected_by_reason": dict(sorted(stats.rejected_by_reason.items()))}
    write_bytes(path, (json.dumps(row, indent=1) + "\n").encode())


def read_stats(path: str) -> ShardStats:
    """A shard's ``_stats.json``: ours, or img2dataset's (see :func:`img2dataset_stats`)."""
    data = json.loads(read_bytes(path))
    if isinstance(data, dict) and "count" in data and "inputs" not in data:
        return img2dataset_stats(path, data)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return ShardStats(**data)


def img2dataset_stats(path: str, data: dict) -> ShardStats:
    """img2dataset's stats (``count``, ``successes``, ``failed_to_download``, ``failed_to_resize``...) as ours.

    The reasons are the statuses img2dataset writes in its index, so stats and index agree as ours do; the stage is
    ``img2dataset``; img2dataset records no tar size, so ``tar_bytes`` is 0 (not checked against the tar).
    """
    failed = {reason: int(data.get(reason) or 0) for reason in IMG2DATASET_FAILURES}
    stem = os.path.basename(path)[: -len(STATS_SUFFIX)]
    return ShardStats(
        shard=int(stem) if stem.isdigit() else 0,
        stage=IMG2DATASET_STAGE,
        inputs=int(data["count"]),
        written=int(data.get("successes") or 0),
        rejected=sum(failed.values()),
        rejected_by_reason={reason: n for reason, n in failed.items() if n},
        duration_s=float(data.get("duration") or 0.0),
    )


# ---------------------------------------------------------------------------------------------------------------
# Resolving a spec


def match_paths(pattern: str) -> list[FileInfo]:
    """The files a glob or a literal path matches, local or remote (``gs://`` globs too), with their sizes."""
    try:
        return match(pattern)
    except Exception as e:  # Beam wraps every filesystem's errors in BeamIOError
        raise ShardError(f"cannot list {pattern}: {e}".splitlines()[0]) from e


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


def resolve_shards(spec: str) -> list[str]:
    """The tar paths a spec names, sorted; raises :class:`ShardError` with a one-line message when none.

    Args:
        spec: a shard folder, a ``.tar`` file, a glob, a brace pattern, or several joined by ``::``; local or any
            Beam filesystem URL.
    """
    if not spec:
        raise ShardError("no shards given")
    found: set[str] = set()
    for part in spec.split(SPEC_SEPARATOR):
        found.update(_resolve_braced(part))
    return sorted(found)


def _resolve_braced(path: str) -> list[str]:
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
        tars = [p for p in matches if p.endswith(TAR_SUFFIX)]
        if not tars:
            raise ShardError(f"{piece} matches {len(matches)} files but no shards ({TAR_SUFFIX} files)")
        return tars
    if _is_folder(piece):
        return _folder_shards(piece)
    if not match_paths(piece):
        raise _NoSuchPath(piece)
    if not piece.endswith(TAR_SUFFIX):
        raise ShardError(f"{piece} is not a shard (expected a {TAR_SUFFIX} file or a folder of them)")
    return [piece]


def _is_folder(path: str) -> bool:
    if "://" not in path:
        return os.path.isdir(path)
    # Object stores have no folders: a prefix is one when something lies under it and it is no file itself.
    return path.endswith("/") or (not match_paths(path) and bool(match_paths(path.rstrip("/") + "/*")))


def _folder_shards(folder: str) -> list[str]:
    folder = folder.rstrip("/") or "/"
    if match_paths(f"{folder}/{MIX_REPORT}"):  # a mix: one dataset folder per source (not what it ingested first)
        return [
            m.path for m in match_paths(f"{folder}/*/*{TAR_SUFFIX}") if m.path.split("/")[-2] != MIX_INGEST_DIR
        ] or _no_shards(folder)
    stems = set()
    for meta in match_paths(f"{folder}/*"):
        name = meta.path.rpartition("/")[2]
        if name.endswith(TAR_SUFFIX):  # any tar in a folder is a shard, numbered or not
            stems.add(name[: -len(TAR_SUFFIX)])
        elif shard_stem(name) is not None:  # an index or stats whose tar is gone
            stems.add(shard_stem(name))
    if not stems:
        _no_shards(folder)
    return [f"{folder}/{stem}{TAR_SUFFIX}" for stem in stems]


def _no_shards(folder: str):
    raise ShardError(f"{folder} holds no shards (no {TAR_SUFFIX} files)")
