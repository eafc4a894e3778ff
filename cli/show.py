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
from visinstruct.transforms.layout import ShardError, ShardFiles, image_member, shard_files
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

    Returns:
        key, shard, index (global, when known) and total, caption, meta (the JSON member as a dict), conversation
        (pretty-printed, or ``None``), image_path, image_size.
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
    ext = image_member(sample)
    image_path = None
    if ext:
        os.makedirs(out_dir, exist_ok=True)
        # the file name comes from the key, which comes from the data: never let it leave out_dir
        image_path = os.path.join(out_dir, f"{key if _SAFE_KEY.fullmatch(key) else 'sample'}.{ext}")
        with open(image_path, "wb") as f:
            f.write(sample[ext])
    return {
        "key": key,
        "shard": files.name,
        "caption": sample["txt"].decode("utf-8", "replace") if "txt" in sample else None,
        "meta": meta.to_dict() if meta else None,
        "conversation": format_conversation(meta) if meta else None,
        "image_path": image_path,
        "image_size": _image_size(sample[ext]) if ext else None,
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
    size = "x".join(map(str, sample["image_size"])) if sample["image_size"] else "does not decode"
    image = f"{sample['image_path']} ({size})" if sample["image_path"] else "(no image member)"
    lines = [
        f"key            {sample['key']} ({where})",
        f"image          {image}",
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
