"""``show``: find one written sample (by key, by position, or at random), print it and write its image to a file.

A key names its shard (``{shard:05d}{index}``), and the shard's parquet index says where each member's bytes lie
in the tar, so a sample is read with one seek instead of a scan; shards without an index are scanned.
"""

from __future__ import annotations

import io
import json
import os
import random
import re

import pyarrow.compute as pc

from visinstruct.cli.shards import read_index, tar_samples
from visinstruct.schemas import IndexRow, SampleMeta, from_table, parse_key, shard_name
from visinstruct.transforms.layout import ShardError, ShardFiles, image_members, shard_files
from visinstruct.transforms.shards import exists, open_read

_SAFE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def show_sample(
    paths: list[str],
    key: str | None = None,
    index: int | None = None,
    random_seed: int | None = None,
    out_dir: str = ".",
) -> dict:
    """Find one written sample and write its image to ``out_dir``.

    Pick by ``key`` (its shard comes from the key, and the index's member offsets let us read just its bytes),
    by global ``index`` over written samples in shard order, or at random with ``random_seed``; the first sample
    when none is given.

    A text-only sample writes no image; a multi-image sample writes each image, named as its member
    (``KEY.0.jpg``, ``KEY.1.png``...).

    Returns:
        key, shard, index (global, when known) and total, caption, meta (the JSON member as a dict), conversation
        (pretty-printed, or ``None``), image_count (image members found), image_paths and image_sizes (one per
        image, a size ``None`` when it does not decode), and image_path and image_size (the first image's, or
        ``None``).
    """
    if key is not None:
        files, row = _find_key(paths, key)
        position = total = None
    else:
        counts = [_written_keys(shard_files(tar)) for tar in paths]
        total = sum(len(keys) for keys in counts)
        if total == 0:
            raise ShardError(f"no written samples in {len(paths)} shards")
        position = random.Random(random_seed).randrange(total) if random_seed is not None else index or 0
        if not 0 <= position < total:
            raise ShardError(f"index {position} is out of range: {total} samples written")
        files, row = _nth_sample(paths, counts, position)
        key = row.key if isinstance(row, IndexRow) else row
    sample = _read_sample(files, key, row)
    return _describe(files, key, sample, out_dir) | {"index": position, "total": total}


def _written_keys(files: ShardFiles) -> list[str]:
    table = read_index(files.index, ["key", "status"])
    if table is None:
        return [k for k, _ in tar_samples(files)]
    return [r["key"] for r in table.select(["key", "status"]).to_pylist() if r["status"] == "success"]


def _nth_sample(paths: list[str], counts: list[list[str]], position: int) -> tuple[ShardFiles, IndexRow | str]:
    for tar, keys in zip(paths, counts):
        if position < len(keys):
            files = shard_files(tar)
            return files, _index_row(files, keys[position]) or keys[position]
        position -= len(keys)
    raise AssertionError("position was checked against the total")


def _index_row(files: ShardFiles, key: str) -> IndexRow | None:
    table = read_index(files.index)
    if table is None:
        return None
    rows = from_table(IndexRow, table.filter(pc.equal(table.column("key"), key)))
    return rows[0] if rows else None


def _find_key(paths: list[str], key: str) -> tuple[ShardFiles, IndexRow | str]:
    try:
        home = shard_name(parse_key(key)[0])
    except ValueError:
        home = None
    ordered = sorted(paths, key=lambda tar: shard_files(tar).name != home)  # the key's own shard first
    for tar in ordered:
        files = shard_files(tar)
        if exists(files.index):
            row = _index_row(files, key)
            if row is not None and row.status != "success":
                raise ShardError(f"sample {key} was not written: {row.status} ({row.error_message})")
            if row is not None:
                return files, row
        elif exists(files.tar) and any(k == key for k, _ in tar_samples(files)):
            return files, key
    raise ShardError(f"no sample {key!r} in {len(paths)} shards")


def _read_sample(files: ShardFiles, key: str, row: IndexRow | str) -> dict[str, bytes]:
    """``{ext: bytes}``: read at the index's offsets when there is one, else by scanning the tar."""
    if isinstance(row, IndexRow) and row.members:
        sample = {}
        with open_read(files.tar, "application/x-tar") as f:
            for member in sorted(row.members, key=lambda m: m.offset):
                f.seek(member.offset)
                data = f.read(member.size)
                if len(data) != member.size:  # the index points past the end: the tar was cut short
                    raise ShardError(
                        f"sample {key}: {member.name} lies past the end of {files.tar} (the tar is "
                        "cut short); run validate"
                    )
                sample[member.name.partition(".")[2]] = data
        return sample
    for found, sample in tar_samples(files):
        if found == key:
            return sample
    raise ShardError(f"sample {key} is in the index of shard {files.name} but not in its tar (try validate)")


def _describe(files: ShardFiles, key: str, sample: dict[str, bytes], out_dir: str) -> dict:
    try:
        meta = SampleMeta.from_json(sample["json"]) if "json" in sample else None
    except ValueError as e:
        raise ShardError(f"sample {key}: bad JSON member ({e}); run validate".splitlines()[0]) from e
    names = image_members(sample)
    paths = []
    if names:
        os.makedirs(out_dir, exist_ok=True)
    for name in names:
        # the file name comes from the key, which comes from the data: never let it leave out_dir
        paths.append(os.path.join(out_dir, f"{key if _SAFE_KEY.fullmatch(key) else 'sample'}.{name}"))
        with open(paths[-1], "wb") as f:
            f.write(sample[name])
    sizes = [_image_size(sample[name]) for name in names]
    return {
        "key": key,
        "shard": files.name,
        "caption": sample["txt"].decode("utf-8", "replace") if "txt" in sample else None,
        "meta": meta.to_dict() if meta else None,
        "conversation": format_conversation(meta) if meta else None,
        "image_count": len(names),
        "text_only": not names and meta is not None and meta.n_images == 0,
        "image_paths": paths,
        "image_sizes": sizes,
        "image_path": paths[0] if paths else None,
        "image_size": sizes[0] if sizes else None,
    }


def _image_size(data: bytes) -> tuple[int, int] | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:  # Pillow raises many types for bad data; validate reports it
        return None


def format_conversation(meta: SampleMeta) -> str | None:
    """A LLaVA conversation one turn per paragraph, continuation lines indented under the speaker."""
    if not meta.conversations:
        return None
    width = max(len(turn.role) for turn in meta.conversations) + 2
    lines = []
    for turn in meta.conversations:
        first, *rest = turn.value.splitlines() or [""]
        lines.append(f"{turn.role + ':':<{width}}{first}")
        lines.extend(" " * width + line for line in rest)
    return "\n".join(lines)


def format_sample(sample: dict) -> str:
    """``show`` for the terminal: where the sample is, its image file, caption, conversation, then metadata."""
    where = f"shard {sample['shard']}"
    if sample["index"] is not None:
        where += f", sample {sample['index']} of {sample['total']}"
    shown = [
        f"{path} ({'x'.join(map(str, size)) if size else 'does not decode'})"
        for path, size in zip(sample.get("image_paths", []), sample.get("image_sizes", []))
    ]
    if len(shown) > 1:
        images = [f"images         {len(shown)} images", *(f"  {i}  {line}" for i, line in enumerate(shown))]
    else:
        none = "text-only (no image)" if sample.get("text_only") else "(no image member)"
        images = [f"image          {shown[0] if shown else none}"]
    lines = [
        f"key            {sample['key']} ({where})",
        *images,
        f"caption        {sample['caption']}",
    ]
    if sample.get("seed") is not None:
        lines.append(f"random seed    {sample['seed']}")
    if sample["conversation"]:
        lines += ["conversation:", *("  " + line for line in sample["conversation"].splitlines())]
    if sample["meta"] is not None:  # one line per field: boxes and sources stay readable
        lines.append("metadata:")
        for name, value in sample["meta"].items():
            if name == "conversations":
                value = f"{len(value)} turns (above)"
            lines.append(f"  {name:<17}{value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)}")
    return "\n".join(lines)
