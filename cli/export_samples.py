"""The written samples an export reads, in every row shape: checked keys, the JSON member, the image members in
``<image>`` order; and what could not be exported, by reason.

:mod:`visinstruct.cli.export` writes them out (LLaVA JSON, one flat parquet table, a Hugging Face dataset).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from visinstruct.cli.shards import Progress, Unread, describe_losses, samples_noting_losses
from visinstruct.schemas import SampleMeta
from visinstruct.transforms.layout import ShardError, image_member, image_members, match_paths, shard_files
from visinstruct.transforms.shards import join

MAX_KEY_CHARS = 64


@dataclass(frozen=True)
class Picture:
    """One image member of a sample: its name after the key's dot (``jpg``, ``1.png``), bytes and extension."""

    member: str
    data: bytes
    format: str


@dataclass(frozen=True)
class Sample:
    """A written sample as export needs it; ``key`` is safe to name a file with. ``images`` are its image members in
    ``<image>`` order: none for a text-only sample, one, or several."""

    key: str
    shard: str
    meta: SampleMeta
    images: tuple[Picture, ...]

    @property
    def single(self) -> Picture | None:
        """The image of a single-image sample, else ``None``."""
        return self.images[0] if len(self.images) == 1 else None

    @property
    def several(self) -> tuple[Picture, ...]:
        """The images of a multi-image sample, else ``()``."""
        return self.images if len(self.images) > 1 else ()

    def file_name(self, picture: Picture) -> str:
        """``KEY.jpg``, ``KEY.1.png``: a checked key, a number and an extension from a fixed list."""
        return f"{self.key}.{picture.member}"


def safe_key(key: str) -> bool:
    """Whether a key from a tar may name a file: ASCII digits only, as our keys and img2dataset's are (img2dataset's
    have fewer digits than ours when a shard holds fewer than 1,000 samples)."""
    return 0 < len(key) <= MAX_KEY_CHARS and key.isascii() and key.isdigit()


def check_out(out: str, overwrite: bool) -> None:
    """Refuse an OUT that already holds files (an export there would mix with them) unless ``overwrite``."""
    if "://" not in out and os.path.exists(out) and not os.path.isdir(out):
        raise ShardError(f"{out} is a file; export writes to a folder")
    # Locally every entry counts, a folder too (an earlier export's images/ or parquet/); a store has only files.
    found = match_paths(join(out, "*")) if "://" in out else os.listdir(out) if os.path.isdir(out) else []
    if found and not overwrite:
        raise ShardError(f"{out} is not empty ({len(found)} entries); choose another folder or pass --overwrite")


def written_samples(
    paths: list[str], skipped: Counter, progress: Progress | None = None, losses: list[Unread] | None = None
) -> Iterator[Sample]:
    """Every written sample of ``paths`` in shard order; what cannot be exported is counted in ``skipped``.

    Skipped: keys that are not safe file names (``unsafe_key``), a key seen in an earlier shard
    (``duplicate_key``), a single-image sample without its image member (``no_image``), image members that do not
    fit the JSON's ``image_count`` (``image_count_mismatch``: a text-only sample with an image, a multi-image one
    without members ``0.EXT`` .. ``(n-1).EXT``), a JSON member that does not parse (``bad_json``), and samples the
    index lists as written but the tar does not give (``missing_in_tar``: a tar cut short), which are also
    described shard by shard in ``losses``. ``validate`` says more about each.
    """
    seen, losses = set(), losses if losses is not None else []
    for done, tar in enumerate(paths, 1):
        files = shard_files(tar)
        before = len(losses)
        for key, members in samples_noting_losses(files, losses):
            reason = "unsafe_key" if not safe_key(key) else "duplicate_key" if key in seen else None
            try:
                meta = (
                    SampleMeta.from_json(members["json"])
                    if "json" in members
                    else SampleMeta(key=key, caption=members.get("txt", b"").decode("utf-8", "replace") or None)
                )
            except ValueError:  # includes JSON syntax errors: validate says more
                meta, reason = None, reason or "bad_json"
            pictures = sample_pictures(meta, members) if meta is not None else []
            reason = reason or (pictures if isinstance(pictures, str) else None)
            if reason:
                skipped[reason] += 1
                continue
            seen.add(key)
            yield Sample(key, files.name, meta, tuple(pictures))
        missing = sum(u.missing or 0 for u in losses[before:])
        if missing:
            skipped["missing_in_tar"] += missing
        if progress:
            progress(done, len(paths))


def sample_pictures(meta: SampleMeta, members: dict[str, bytes]) -> list[Picture] | str:
    """The image members of a sample in ``<image>`` order, as many as its JSON says; or why they do not fit."""
    count = meta.n_images
    if count == 1:
        ext = image_member(members)
        return "no_image" if ext is None else [Picture(ext, members[ext], ext)]
    names = image_members(members)
    if len(names) != (count if count >= 2 else 0):  # before enumerating: a hostile image_count costs nothing
        return "image_count_mismatch"
    if any(not n.startswith(f"{i}.") for i, n in enumerate(names)):
        return "image_count_mismatch"
    return [Picture(name, members[name], name.partition(".")[2]) for name in names]


def unread_report(losses: list[Unread]) -> dict:
    """The report's account of what could not be read: ``unread`` (per shard) and a one-line ``unread_summary``."""
    return {"unread": [asdict(u) for u in losses], "unread_summary": describe_losses(losses) if losses else None}


def location_columns(sample: Sample) -> dict:
    """The columns every export row starts with: key, shard, url, path, caption."""
    meta = sample.meta
    return {"key": sample.key, "shard": sample.shard, "url": meta.url, "path": meta.path, "caption": meta.caption}


def reasons(skipped: Counter) -> str:
    """``reason n, reason n`` for a message, most frequent first."""
    return ", ".join(f"{reason} {n}" for reason, n in skipped.most_common()) or "no written samples"
