"""Megatron-Energon's dataset metadata for our shards, written from the parquet indexes: no ``energon prepare``.

Energon reads WebDataset shards only once a preparation pass has written what it needs: ``NNNNN.tar.idx`` beside
each tar (the byte offset of every sample, then the end of the last one, as little-endian uint64) and a
``.nv-meta/`` folder in the dataset folder::

    .nv-meta/.info.json      {"shard_counts": {"00000.tar": 2, ...}}: the shards and their samples
    .nv-meta/split.yaml      which shards are train (and val, when asked)
    .nv-meta/dataset.yaml    the sample type and how a sample's members become its fields
    .nv-meta/sample_loader.py  those functions (energon loads the file itself; it needs no visinstruct)
    .nv-meta/index.sqlite    every sample and member with its byte range (random access by key, aux datasets)
    .nv-meta/index.uuid      an id of this index (energon names join caches after it)

``energon prepare`` reads every tar to find these offsets, which users report stalling on thousands of shards. Our
index already holds each member's offset and size (``IndexRow.members``), so this module reads the parquet files
alone; only a shard whose index lacks offsets (img2dataset's) is scanned.

Samples load as:

- ``CaptioningSample`` (``image``, ``caption``: the ``txt`` member) when no written sample has a conversation and
  every one has exactly one image;
- otherwise ``SimilarityInterleavedSample``, as Megatron-LM's LLaVA recipe reads instruction data: ``images`` (every
  image in order, ``KEY.jpg`` or ``KEY.0.jpg, KEY.1.png...``; empty for a text-only sample) and ``texts`` (the LLaVA
  turns as ``{"from", "value"}`` dicts; empty for a sample without a conversation). ``__subflavors__`` has
  ``has_image: true`` when every sample has an image.

Images decode with energon's decoder (a float tensor C x H x W by default). A rerun on the same shards writes the
same bytes. A stage that rewrites shards in place (``remove``) moves samples: write the metadata again after it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sqlite3
import struct
import tarfile
import tempfile
import uuid
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor

import pyarrow.compute as pc
import yaml

from visinstruct.schemas import IndexRow
from visinstruct.transforms.layout import ShardError, image_members, match_paths, resolve_shards, shard_files
from visinstruct.transforms.shards import (
    atomic_write,
    delete,
    exists,
    filled_columns,
    is_remote,
    join,
    open_read,
    read_bytes,
    read_table,
    write_bytes,
)

# Energon's names for its files (megatron/energon/flavors/webdataset/config.py and itar.py).
META_DIR = ".nv-meta"
INFO_NAME = ".info.json"
SPLIT_NAME = "split.yaml"
MIX_BLEND_NAME = "energon.yaml"  # a mix's metadataset, blending its sources (OUT/energon.yaml)
DATASET_NAME = "dataset.yaml"
LOADER_NAME = "sample_loader.py"
SQLITE_NAME = "index.sqlite"
UUID_NAME = "index.uuid"
ITAR_SUFFIX = ".idx"  # appended to the tar's name: 00000.tar.idx
CAPTIONING = "CaptioningSample"
CONVERSATION = "SimilarityInterleavedSample"
BLOCK = tarfile.BLOCKSIZE
READ_THREADS = 8  # indexes read at once: object stores answer each read in tens of milliseconds
_INDEX_COLUMNS = ["key", "status", "members", "turns", "conversation_kind"]

# The functions dataset.yaml names. Energon evaluates this file itself, so it may use the standard library only.
SAMPLE_LOADER = '''"""Written by visinstruct (see its FORMAT.md): a sample's members as energon sample fields."""

import re

IMAGE_PART = re.compile(r"^(?:(\\d+)\\.)?(jpg|jpeg|png|webp)$")


def images(raw):
    """The sample's decoded images in order: KEY.jpg alone, or KEY.0.jpg, KEY.1.png, ...; none for text only."""
    found = []
    for part, value in raw.items():
        match = IMAGE_PART.match(part) if isinstance(part, str) and not part.startswith("__") else None
        if match:
            found.append((int(match.group(1) or 0), value))
    return [value for _, value in sorted(found, key=lambda item: item[0])]


def conversation_sample(raw):
    """SimilarityInterleavedSample fields: every image, and the LLaVA turns as {"from", "value"} dicts."""
    meta = raw.get("json") or {}
    turns = [{"from": turn["from"], "value": turn["value"]} for turn in meta.get("conversations") or []]
    return {"images": images(raw), "texts": turns}


def caption_sample(raw):
    """CaptioningSample fields: the image and the caption (the txt member)."""
    return {"image": images(raw)[0], "caption": raw.get("txt") or ""}


def part_filter(part):
    """The members a sample loads: its metadata, caption and images."""
    return part in ("json", "txt") or IMAGE_PART.match(part) is not None
'''


@dataclasses.dataclass(frozen=True)
class SampleSpan:
    """Where one sample lies in its tar: ``start`` (its first member's header) to ``end`` (after its last member's
    padded data), and each member's ``(part, data offset, size)``; ``conversation`` is ``None`` when the index does
    not say."""

    key: str
    start: int
    end: int
    parts: tuple[tuple[str, int, int], ...]
    conversation: bool | None
    images: int = dataclasses.field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "images", len(image_members(dict.fromkeys(part for part, _, _ in self.parts))))


@dataclasses.dataclass(frozen=True)
class ShardSpans:
    name: str  # the tar's file name, relative to the dataset folder: 00000.tar
    tar: str
    samples: list[SampleSpan]


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def spans_from_index(tar: str) -> list[SampleSpan] | None:
    """The written samples of a shard from its parquet index, in tar order; ``None`` when the index cannot say
    (no index, or rows without member offsets, as img2dataset writes them)."""
    index = shard_files(tar).index
    return _index_spans(index) if exists(index) else None


def _index_spans(index: str) -> list[SampleSpan] | None:
    table = read_table(index, IndexRow, _INDEX_COLUMNS)
    knows_turns = "turns" not in filled_columns(table)
    rows = table.filter(pc.equal(table["status"], "success"))
    # Columns, not row dicts: a shard of 10,000 samples has 30,000 members.
    members = rows["members"].combine_chunks()
    bounds = members.offsets.to_pylist()
    names = members.values.field("name").to_pylist()
    offsets = members.values.field("offset").to_pylist()
    sizes = members.values.field("size").to_pylist()
    conversations = pc.or_kleene(pc.greater(rows["turns"], 0), pc.is_valid(rows["conversation_kind"]))
    spans = []
    for i, (key, conversation) in enumerate(zip(rows["key"].to_pylist(), conversations.to_pylist(), strict=True)):
        lo, hi = bounds[i], bounds[i + 1]
        if lo == hi:
            return None
        prefix = len(key) + 1
        parts = tuple(sorted(zip((n[prefix:] for n in names[lo:hi]), offsets[lo:hi], sizes[lo:hi]), key=_offset))
        if any(not n.startswith(key + ".") for n in names[lo:hi]):
            return None
        spans.append(
            SampleSpan(
                key,
                # Our tars are USTAR: one 512-byte header per member, so a member's header starts a block before its
                # data. _contiguous() proves it for the whole shard.
                parts[0][1] - BLOCK,
                parts[-1][1] + _padded(parts[-1][2]),
                parts,
                True if conversation else (False if knows_turns else None),
            )
        )
    spans.sort(key=lambda s: s.start)
    return spans if _contiguous(spans) else None


def _offset(part: tuple[str, int, int]) -> int:
    return part[1]


def _contiguous(spans: list[SampleSpan]) -> bool:
    """Whether the samples tile the tar from byte 0 with no gap: then a sample is exactly its members, and the
    header-size assumption above held (a longer header would leave the first sample starting past 0)."""
    position = 0
    for span in spans:
        if span.start != position:
            return False
        position = span.end
    return True


def spans_from_tar(tar: str) -> list[SampleSpan]:
    """The samples of a tar by reading it (for a shard whose index has no offsets): what ``energon prepare`` does."""
    try:
        return _scan(tar)
    except tarfile.TarError as e:
        raise ShardError(f"{tar}: cannot read the tar ({e}); run visinstruct validate") from e


def _scan(tar: str) -> list[SampleSpan]:
    spans, key, parts, start, conversation = [], None, [], 0, False
    with open_read(tar, "application/x-tar") as f, tarfile.open(fileobj=f, mode="r|") as archive:
        for info in archive:
            if not info.isfile():
                continue
            stem, _, part = os.path.basename(info.name).partition(".")
            if stem != key and parts:
                spans.append(SampleSpan(key, start, parts[-1][1] + _padded(parts[-1][2]), tuple(parts), conversation))
                parts, conversation = [], False
            if not parts:
                key, start = stem, info.offset
            parts.append((part, info.offset_data, info.size))
            if part == "json":
                conversation = _has_conversation(archive.extractfile(info).read())
    if parts:
        spans.append(SampleSpan(key, start, parts[-1][1] + _padded(parts[-1][2]), tuple(parts), conversation))
    return spans


def _has_conversation(data: bytes) -> bool:
    with contextlib.suppress(ValueError):
        meta = json.loads(data)
        return isinstance(meta, dict) and bool(meta.get("conversations"))
    return False


def _any_conversation_in_tar(shard: ShardSpans) -> bool:
    """Whether any sample's JSON member holds a conversation, read by offset (an index without ``turns``)."""
    with open_read(shard.tar, "application/x-tar") as f:
        for span in shard.samples:
            for part, offset, size in span.parts:
                if part == "json":
                    f.seek(offset)
                    if _has_conversation(f.read(size)):
                        return True
    return False


def read_spans(folder: str, progress: Callable[[int, int], None] | None = None) -> list[ShardSpans]:
    """Every shard of a dataset folder with its written samples, in name order; shards that wrote none are left out.

    The folder is listed once and the indexes read on a few threads, so thousands of shards on an object store
    cost one listing and one read each. Raises :class:`ShardError` for a shard that is not complete (no stats
    file: a run still writing, or one that failed) or whose tar is missing while its index lists written samples.
    """
    tars = resolve_shards(folder)
    if any(tar.rpartition("/")[0] != folder for tar in tars):
        raise ShardError(f"{folder}: not a dataset folder (energon's metadata describes a folder of shards)")
    listed = {info.path for info in match_paths(join(folder, "*"))}
    shards = []
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        for done, shard in enumerate(pool.map(lambda tar: _shard_spans(tar, listed), tars), start=1):
            if shard.samples:
                shards.append(shard)
            if progress is not None:
                progress(done, len(tars))
    return shards


def _shard_spans(tar: str, listed: set[str]) -> ShardSpans:
    files = shard_files(tar)
    if files.stats not in listed:
        raise ShardError(f"{tar}: the shard is not complete (no stats file); finish or rerun the run first")
    spans = _index_spans(files.index) if files.index in listed else None
    if spans is None:
        spans = spans_from_tar(tar) if tar in listed else []
    elif spans and tar not in listed:
        raise ShardError(f"{tar}: missing, but its index lists {len(spans)} written samples")
    return ShardSpans(tar.rpartition("/")[2], tar, spans)


def sample_kind(shards: list[ShardSpans]) -> str:
    """``CaptioningSample`` for single-image samples without conversations, else ``SimilarityInterleavedSample``."""
    unknown = []
    for shard in shards:
        for span in shard.samples:
            if span.conversation or span.images != 1:
                return CONVERSATION
        if any(span.conversation is None for span in shard.samples):
            unknown.append(shard)
    return CONVERSATION if any(_any_conversation_in_tar(shard) for shard in unknown) else CAPTIONING


def split_shards(names: list[str], val_fraction: float) -> dict[str, list[str]]:
    """All shards train, or the last ``round(val_fraction * n)`` (at least one, never all) val."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be within [0, 1), got {val_fraction}")
    if val_fraction == 0:
        return {"train": list(names)}
    if len(names) < 2:
        raise ShardError(f"a val split needs at least two shards with samples, found {len(names)}")
    n_val = min(len(names) - 1, max(1, round(val_fraction * len(names))))
    return {"train": names[:-n_val], "val": names[-n_val:]}


def named_split(names: list[str], val: set[str]) -> dict[str, list[str]]:
    """``train`` and ``val`` with the shards ``val`` names in ``val`` (``val`` left out when none holds samples)."""
    splits = {"train": [n for n in names if n not in val], "val": [n for n in names if n in val]}
    if not splits["train"]:
        raise ShardError("no shard with samples is left for the train split")
    return splits if splits["val"] else {"train": splits["train"]}


def dataset_config(kind: str, shards: list[ShardSpans]) -> dict:
    """The contents of ``dataset.yaml``: the sample type and the loader functions of ``sample_loader.py``."""
    loader = "caption_sample" if kind == CAPTIONING else "conversation_sample"
    config = {
        "sample_type": {"__module__": "megatron.energon", "__class__": kind},
        "sample_loader": f"{LOADER_NAME}:{loader}",
        "part_filter": f"{LOADER_NAME}:part_filter",
    }
    if kind == CONVERSATION and all(span.images for shard in shards for span in shard.samples):
        config["subflavors"] = {"has_image": True}  # Megatron-LM's LLaVA recipe reads images only when set
    return config


def tar_index(spans: list[SampleSpan]) -> bytes:
    """A shard's ``.tar.idx``: each sample's start, then the end of the last one."""
    offsets = [span.start for span in spans] + [spans[-1].end]
    return struct.pack(f"<{len(offsets)}Q", *offsets)


def _sqlite_index(shards: list[ShardSpans], path: str) -> None:
    """Energon's ``index.sqlite`` (the tables ``energon prepare`` fills) at the local ``path``."""
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA journal_mode = OFF")  # a temporary file, copied once complete: no journal to keep
        db.execute("PRAGMA synchronous = OFF")
        db.execute(
            "CREATE TABLE samples (tar_file_id INTEGER NOT NULL, sample_key TEXT NOT NULL UNIQUE, "
            "sample_index INTEGER NOT NULL, byte_offset INTEGER, byte_size INTEGER)"
        )
        db.execute(
            "CREATE TABLE sample_parts (tar_file_id INTEGER, sample_index INTEGER, part_name TEXT, "
            "content_byte_offset INTEGER, content_byte_size INTEGER)"
        )
        for tar_id, shard in enumerate(shards):
            db.executemany(
                "INSERT INTO samples VALUES (?, ?, ?, ?, ?)",
                ((tar_id, s.key, i, s.start, s.end - s.start) for i, s in enumerate(shard.samples)),
            )
            db.executemany(
                "INSERT INTO sample_parts VALUES (?, ?, ?, ?, ?)",
                ((tar_id, i, *part) for i, s in enumerate(shard.samples) for part in s.parts),
            )
        db.execute("CREATE INDEX idx_samples_by_tar_and_idx ON samples(tar_file_id, sample_index)")
        db.execute("CREATE INDEX idx_sample_parts_seq ON sample_parts(tar_file_id, sample_index, content_byte_offset)")
        db.execute(
            "CREATE INDEX idx_sample_parts_full ON sample_parts(tar_file_id, sample_index, part_name, "
            "content_byte_offset, content_byte_size)"
        )
        db.commit()
    except sqlite3.IntegrityError as e:  # keys are unique across a dataset of ours; another tool's may not be
        raise ShardError(f"duplicate sample keys across shards ({e}): energon needs unique keys") from e
    finally:
        db.close()


def _write_sqlite(shards: list[ShardSpans], target: str) -> None:
    """Build the sqlite index in a local temporary folder (sqlite cannot write to object stores) and copy it to
    ``target`` atomically; the same shards give the same bytes."""
    with tempfile.TemporaryDirectory(prefix="visinstruct-energon-") as tmp:
        local = os.path.join(tmp, SQLITE_NAME)
        _sqlite_index(shards, local)
        with open(local, "rb") as src, atomic_write(target) as out:
            shutil.copyfileobj(src, out, 1 << 20)


def index_id(shards: list[ShardSpans]) -> str:
    """``index.uuid``: derived from every shard's name, sample keys and byte ranges, so a rerun on the same shards
    writes the same id and a changed dataset a new one (``energon prepare`` draws a random one when it changed)."""
    digest = hashlib.sha256()
    for shard in shards:
        digest.update(shard.name.encode() + b"\0" + tar_index(shard.samples))
        digest.update("\n".join(span.key for span in shard.samples).encode() + b"\0")
    return str(uuid.UUID(bytes=digest.digest()[:16], version=4))


def _yaml(data: dict) -> bytes:
    header = "# Written by visinstruct: energon loads these shards without `energon prepare`.\n"
    return (header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)).encode()


def write_metadata(
    folder: str,
    val_fraction: float = 0.0,
    progress: Callable[[int, int], None] | None = None,
    val_shards: Collection[str] | None = None,
) -> dict:
    """Write energon's metadata for the dataset folder ``folder``: the ``.tar.idx`` files and ``.nv-meta/``.

    Args:
        folder: a dataset folder (FORMAT.md), local or on any Beam filesystem.
        val_fraction: the share of shards (the last ones) in a ``val`` split; 0 puts every shard in ``train``.
        val_shards: instead of a fraction, the names (``00003.tar``) of the shards in ``val`` (those still holding
            samples; the rest train).
        progress: called with (shards read, shards) after each shard.

    Returns:
        A summary: folder, sample_type, shards, samples, and the shard names per split.
    """
    folder = folder.rstrip("/") or "/"
    shards = read_spans(folder, progress)
    if not shards:
        raise ShardError(f"{folder}: no shard holds a written sample")
    names = [shard.name for shard in shards]
    splits = split_shards(names, val_fraction) if val_shards is None else named_split(names, set(val_shards))
    kind = sample_kind(shards)
    meta = join(folder, META_DIR)
    for shard in shards:
        write_bytes(shard.tar + ITAR_SUFFIX, tar_index(shard.samples))
    info = json.dumps({"shard_counts": {s.name: len(s.samples) for s in shards}}, indent=2) + "\n"
    write_bytes(join(meta, LOADER_NAME), SAMPLE_LOADER.encode())
    write_bytes(join(meta, DATASET_NAME), _yaml(dataset_config(kind, shards)))
    write_bytes(join(meta, SPLIT_NAME), _yaml({"split_parts": splits, "exclude": []}))
    _write_sqlite(shards, join(meta, SQLITE_NAME))
    write_bytes(join(meta, UUID_NAME), index_id(shards).encode())
    write_bytes(join(meta, INFO_NAME), info.encode())  # last: its presence makes the folder an energon dataset
    return {
        "folder": folder,
        "sample_type": kind,
        "shards": len(shards),
        "samples": sum(len(s.samples) for s in shards),
        "splits": splits,
    }


def refresh_metadata(folder: str) -> dict | None:
    """Write a folder's energon metadata again after its shards were rewritten in place (``remove``), keeping which
    shards are ``val``; ``None`` when the folder has none. When what is left cannot be described (no samples, or
    none outside ``val``), the old metadata is withdrawn (its ``.info.json`` deleted: energon no longer takes the
    folder for a dataset) and the summary says ``withdrawn`` and why."""
    info = join(folder, META_DIR, INFO_NAME)
    if not exists(info):
        return None
    parts = yaml.safe_load(read_bytes(join(folder, META_DIR, SPLIT_NAME)))["split_parts"]
    try:
        return write_metadata(folder, val_shards=set(parts.get("val") or []))
    except ShardError as e:
        delete([info])
        return {"folder": folder, "withdrawn": str(e)}


def write_mix_metadata(out: str, sources: Sequence[tuple[str, int]]) -> dict:
    """A mix's metadata: each source folder's (:func:`write_metadata`) and ``OUT/energon.yaml`` blending them by
    the samples each wrote, so one epoch of the blend draws the mix's proportions. Sources that wrote none are
    left out. Returns ``{"blend": path, "sources": {folder: write_metadata's summary}}``."""
    written = [(folder, count) for folder, count in sources if count > 0]
    summaries = {folder: write_metadata(folder) for folder, _ in written}
    path = join(out, MIX_BLEND_NAME)
    write_blend(path, written)
    return {"blend": path, "sources": summaries}


def write_blend(path: str, sources: Sequence[tuple[str, float]]) -> dict:
    """Write an energon metadataset (``MetadatasetV2``) at ``path`` that blends dataset folders by weight.

    Energon draws each training sample from source ``i`` with probability ``weight_i / sum(weights)``. Each folder
    needs its metadata first (:func:`write_metadata`). A ``val`` split is blended too (same weights) when every
    folder has one. Local folders are written relative to the YAML's folder, so the two move together.

    Args:
        path: the YAML file to write, e.g. ``OUT/energon.yaml``.
        sources: ``(dataset folder, weight)`` pairs; weights positive.

    Returns:
        The metadataset as written (a dict).
    """
    if not sources:
        raise ValueError("a blend needs at least one dataset folder")
    base = path.rpartition("/")[0] or "."
    splits: dict[str, list[dict]] = {"train": [], "val": []}
    for folder, weight in sources:
        if not weight > 0:
            raise ValueError(f"{folder}: blend weights must be positive, got {weight}")
        if not exists(join(folder, META_DIR, INFO_NAME)):
            raise ShardError(f"{folder}: no energon metadata; write it first (visinstruct energon {folder})")
        parts = yaml.safe_load(read_bytes(join(folder, META_DIR, SPLIT_NAME)))["split_parts"]
        for split in splits:
            if parts.get(split):
                splits[split].append({"path": _relative(folder, base), "weight": float(weight)})
    blend = {"__module__": "megatron.energon", "__class__": "MetadatasetV2", "splits": {}}
    for split, entries in splits.items():
        if len(entries) == len(sources):
            blend["splits"][split] = {"blend": entries}
    write_bytes(path, _yaml(blend))
    return blend


def _relative(folder: str, base: str) -> str:
    if is_remote(folder) or is_remote(base):
        return folder
    return os.path.relpath(os.path.abspath(folder), os.path.abspath(base))
