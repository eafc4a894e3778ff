"""``export``: written samples out of the shards, as LLaVA's training layout or as one flat parquet table.

``--format llava`` writes what LLaVA's ``train.py`` reads (``--data_path OUT/llava.json --image_folder
OUT/images``)::

    OUT/images/KEY.jpg          an image member as it is in the tar (jpg, jpeg, png or webp); KEY.I.jpg for
                                image I of a multi-image sample
    OUT/llava.json              [{"id": ID, "image": "KEY.jpg", "conversations": [{"from", "value"}, ...]}, ...]

Every LLaVA row shape comes back as it went in (FORMAT.md): a text-only sample is a row with no ``"image"``; a
multi-image sample's ``"image"`` is the list of its file names in ``<image>`` order; a single-image sample's is the
file name, or a one-element list when its source row had one (``source.llava_image_list``; an empty list for a
text-only row that had ``"image": []``). Keys the source row had
besides id, image and conversations (``source.llava_fields``) are written back too. Rows are in key order.

``id`` is the source row's LLaVA id (``source.llava_id``, kept by ingest) so an export of an ingested LLaVA JSON
equals it but for image paths; a sample without one gets its key. Ids stay unique: when several rows would carry the
same id (the source repeated it, or it equals another row's key), every one of them gets its key instead.

Image files are written once per distinct content: several conversations about one image (several LLaVA rows
naming one file, as mix665k has) are separate samples, each with its own copy in the shards, and their rows name
one file again. A file is named after the first sample (in key order) holding those bytes; a later image whose
bytes have the same sha256 names that file and writes nothing.

Only samples with a valid conversation (``conversation_problems``, for the sample's number of images) are exported;
with ``caption_only`` a single-image sample that has none but has a caption gets ``human: <image>\\nDescribe the
image briefly.`` / ``gpt: CAPTION``. The JSON is written last, when every image it names exists.

``--format parquet`` writes ``OUT/samples.parquet``: one flat row per written sample (key, shard, url, path, caption,
sizes, sha256, phash, clip_score, conversations as LLaVA JSON text, the whole JSON member as ``metadata``, the
image bytes and their format, image_count, turns), one row group per shard. The table stays flat (no list columns),
so ``image`` holds a single-image sample's image only: it is null for a text-only sample and for a multi-image one
(whose images ``--format llava`` and ``--format hf`` export).

``--format hf`` writes a Hugging Face dataset (local OUT only; needs the ``datasets`` package)::

    OUT/data-00000-of-0000N.arrow   what ``datasets.load_from_disk(OUT)`` reads (``save_to_disk``'s layout)
    OUT/state.json, dataset_info.json
    OUT/parquet/data-00000-of-0000N.parquet   the same rows, for ``load_dataset("parquet", data_files=...)``

Columns (:data:`HF_COLUMNS`): key, shard, url, path, caption, sha256 (of the original bytes, as in the JSON member),
conversations (``[{"from", "value"}]``, empty when the sample has none), metadata (the whole JSON member), image, an
``Image`` feature holding a single-image sample's tar member bytes unchanged (``{"bytes", "path": "KEY.EXT"}``; null
for the other shapes), images, a list of ``Image`` holding a multi-image sample's members in ``<image>`` order
(``path`` ``KEY.I.EXT``; empty for the other shapes), and image_count (0 text-only, 1, or n). No image is stored
twice: ``images or [image]`` (without nulls) is every row's image list. Rows are in shard order. The same shards
give byte-identical files: ``state.json``'s ``_fingerprint`` (which ``datasets`` otherwise derives from temporary
paths) is the sha256 of the rows as staged (an Arrow stream), cut to 16 hex digits. ``--overwrite`` replaces an
earlier hf export's files (``data-*``, ``parquet/data-*``, the two JSON files).

Nothing in a tar names an output file: image files are named by keys checked to be plain digit strings, an image
number, and an extension from a fixed list, so nothing is written outside OUT.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from visinstruct.cli.export_samples import (
    Picture,
    Sample,
    check_out,
    location_columns,
    reasons,
    unread_report,
    written_samples,
)
from visinstruct.cli.shards import Progress, Unread, describe_losses
from visinstruct.schemas import IMAGE_TOKEN, SampleMeta, Turn, conversation_problems, to_row
from visinstruct.transforms.layout import ShardError
from visinstruct.transforms.shards import atomic_write, delete, join, write_bytes

LLAVA_JSON = "llava.json"
IMAGE_DIR = "images"
PARQUET_FILE = "samples.parquet"
BRIEF_PROMPT = f"{IMAGE_TOKEN}\nDescribe the image briefly."
PARQUET_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("url", pa.string()),
        ("path", pa.string()),
        ("caption", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("original_width", pa.int64()),
        ("original_height", pa.int64()),
        ("sha256", pa.string()),
        ("phash", pa.string()),
        ("clip_score", pa.float64()),
        ("conversations", pa.string()),
        ("metadata", pa.string()),
        ("image", pa.binary()),
        ("image_format", pa.string()),
        ("image_count", pa.int64()),
        ("turns", pa.int64()),
    ]
)


HF_PARQUET_DIR = "parquet"
HF_TEMPORARY = ".hf-export"  # rows staged in OUT before save_to_disk; removed at the end
HF_BATCH_ROWS = 256  # rows a record batch of the staged file holds: bounded memory for images
HF_MAX_SHARD_BYTES = 500 * 2**20  # save_to_disk's default shard size
HF_COLUMNS = (
    "key",
    "shard",
    "url",
    "path",
    "caption",
    "sha256",
    "conversations",
    "metadata",
    "image",
    "images",
    "image_count",
)


def llava_conversation(meta: SampleMeta, caption_only: bool) -> tuple[list[Turn] | None, str | None]:
    """The turns to export for a sample and ``None``, or ``None`` and why it is not exported."""
    if meta.conversations:
        if conversation_problems(meta.conversations, images=meta.n_images):
            return None, "bad_conversation"
        return meta.conversations, None
    if caption_only and meta.n_images == 1 and meta.caption and meta.caption.strip():
        return [Turn("human", BRIEF_PROMPT), Turn("gpt", meta.caption.strip())], None
    return None, "no_caption" if caption_only else "no_conversation"


def export_llava(
    paths: list[str], out: str, caption_only: bool = False, overwrite: bool = False, progress: Progress | None = None
) -> dict:
    """Write LLaVA's layout to ``out`` (see the module docstring).

    Returns:
        format, out, json (its path), image_folder, exported, skipped (``{reason: n}``), shards, image_files (image
        files written), shared_images (images that named a file an earlier sample's identical image wrote), and
        ids_from_keys (rows given their key as id because their LLaVA id was missing or not unique).
    """
    check_out(out, overwrite)
    skipped: Counter = Counter()
    entries, sources, losses = [], [], []
    files: dict[str, str] = {}  # sha256 of an image's bytes -> the file holding them
    shared = 0
    for sample in written_samples(paths, skipped, progress, losses):
        turns, reason = llava_conversation(sample.meta, caption_only)
        if turns is None:
            skipped[reason] += 1
            continue
        names = []
        for picture in sample.images:
            digest = hashlib.sha256(picture.data).hexdigest()
            if digest in files:
                shared += 1
            else:
                files[digest] = sample.file_name(picture)
                write_bytes(join(out, IMAGE_DIR, files[digest]), picture.data)
            names.append(files[digest])
        entries.append(llava_entry(sample, names, turns))
        sources.append((sample.key, sample.meta.source.get("llava_id")))
    if not entries:
        hint = " (pass --caption-only to export captions)" if skipped.get("no_conversation") else ""
        hint += f"; {describe_losses(losses)}" if losses else ""
        raise ShardError(f"nothing to export from {len(paths)} shards: {reasons(skipped)}{hint}")
    ids = unique_ids(sources)
    entries = [{"id": i, **e} for i, e in zip(ids, entries)]
    json_path = join(out, LLAVA_JSON)
    # One entry a line: compact for 600k-entry files, yet greppable and diffable.
    text = "[\n" + ",\n".join(json.dumps(e, ensure_ascii=False) for e in entries) + "\n]\n"
    write_bytes(json_path, text.encode("utf-8"))
    return {
        "format": "llava",
        "out": out,
        "json": json_path,
        "image_folder": join(out, IMAGE_DIR),
        "exported": len(entries),
        "skipped": dict(skipped.most_common()),
        "shards": len(paths),
        "image_files": len(files),
        "shared_images": shared,
        "ids_from_keys": sum(i == key for i, (key, _) in zip(ids, sources)),
        **unread_report(losses),
    }


def llava_entry(sample: Sample, names: list[str], turns: list[Turn]) -> dict:
    """A sample's LLaVA row without its id: ``image`` in the shape its source row had (absent for a text-only
    sample, a list for several images or when the source row listed its one image), the conversation, then the
    source row's other keys (``source.llava_fields``)."""
    entry: dict = {}
    if len(names) > 1 or sample.meta.source.get("llava_image_list") is True:  # [] too: a text-only row said so
        entry["image"] = names
    elif names:
        entry["image"] = names[0]
    entry["conversations"] = [to_row(t) for t in turns]
    others = sample.meta.source.get("llava_fields")
    if isinstance(others, dict):
        entry.update((k, v) for k, v in others.items() if k not in ("id", "image", "conversations"))
    return entry


def unique_ids(rows: list[tuple[str, object]]) -> list[object]:
    """The id of each exported row from ``(key, LLaVA id or None)``: the LLaVA id when no other row would carry the
    same one, else the key (keys are unique). Repeated until no two rows share an id: a key may equal another row's
    LLaVA id, which then gets its own key."""
    ids = [key if llava_id is None else llava_id for key, llava_id in rows]
    while True:
        counts = Counter(json.dumps(i) for i in ids)  # ids may be numbers or strings: compare as JSON does
        clashing = [n for n, i in enumerate(ids) if counts[json.dumps(i)] > 1 and i != rows[n][0]]
        if not clashing:
            return ids
        for n in clashing:
            ids[n] = rows[n][0]


def export_parquet(paths: list[str], out: str, overwrite: bool = False, progress: Progress | None = None) -> dict:
    """Write every written sample to ``out/samples.parquet`` (see the module docstring), one row group a shard.

    Returns:
        format, out, parquet (its path), exported, skipped (``{reason: n}``), shards.
    """
    check_out(out, overwrite)
    skipped: Counter = Counter()
    path, exported, losses = join(out, PARQUET_FILE), 0, []
    with atomic_write(path) as f, pq.ParquetWriter(f, PARQUET_SCHEMA, compression="zstd") as writer:
        batch, shard = [], None
        for sample in written_samples(paths, skipped, progress, losses):
            if batch and sample.shard != shard:
                writer.write_table(pa.Table.from_pylist(batch, PARQUET_SCHEMA))
                batch = []
            shard = sample.shard
            batch.append(_flat_row(sample))
            exported += 1
        writer.write_table(pa.Table.from_pylist(batch, PARQUET_SCHEMA))
    return {
        "format": "parquet",
        "out": out,
        "parquet": path,
        "exported": exported,
        "skipped": dict(skipped.most_common()),
        "shards": len(paths),
        **unread_report(losses),
    }


def hf_features():
    """The ``datasets.Features`` of an hf export (see the module docstring); imports ``datasets``."""
    import datasets

    text = datasets.Value("string")
    columns = {name: text for name in HF_COLUMNS}
    columns["conversations"] = datasets.List({"from": text, "value": text})
    columns["image"] = datasets.Image()
    columns["images"] = datasets.List(datasets.Image())
    columns["image_count"] = datasets.Value("int64")
    return datasets.Features(columns)


def hf_row(sample: Sample) -> dict:
    """One sample as a row of an hf export: image members' bytes as they are, named ``KEY.EXT`` (``KEY.I.EXT``)."""
    meta = sample.meta

    def cell(picture: Picture) -> dict:
        return {"bytes": picture.data, "path": sample.file_name(picture)}

    return {
        **location_columns(sample),
        "sha256": meta.sha256,
        "conversations": [to_row(t) for t in meta.conversations],
        "metadata": meta.to_json(),
        "image": cell(sample.single) if sample.single else None,
        "images": [cell(picture) for picture in sample.several],
        "image_count": len(sample.images),
    }


def _stage_hf_rows(samples: Iterator[Sample], schema: pa.Schema, path: str) -> tuple[int, str]:
    """Write rows to one Arrow stream file at ``path``; returns how many and the sha256 of the file."""
    digest, count, batch = hashlib.sha256(), 0, []
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for sample in samples:
            batch.append(hf_row(sample))
            if len(batch) == HF_BATCH_ROWS:
                writer.write_batch(pa.RecordBatch.from_pylist(batch, schema))
                count, batch = count + len(batch), []
        if batch:
            writer.write_batch(pa.RecordBatch.from_pylist(batch, schema))
            count += len(batch)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return count, digest.hexdigest()


def _remove_hf_export(out: str) -> None:
    """Remove the files an earlier hf export wrote to ``out`` (``--overwrite``), so no stale shard file stays."""
    names = [n for n in os.listdir(out) if n.startswith("data-") and n.endswith(".arrow")]
    names += [n for n in ("state.json", "dataset_info.json", HF_TEMPORARY) if os.path.exists(join(out, n))]
    parquet = join(out, HF_PARQUET_DIR)
    if os.path.isdir(parquet):
        names += [
            join(HF_PARQUET_DIR, n) for n in os.listdir(parquet) if n.startswith("data-") and n.endswith(".parquet")
        ]
    delete([join(out, n) for n in names])


def export_hf(paths: list[str], out: str, overwrite: bool = False, progress: Progress | None = None) -> dict:
    """Write every written sample as a Hugging Face dataset to ``out`` (see the module docstring).

    Rows are staged in one Arrow file in ``out``, which ``datasets`` then saves in its layout and as parquet.

    Returns:
        format, out, dataset (the folder load_from_disk reads), parquet (the parquet files), exported, skipped
        (``{reason: n}``), shards, and the unread samples.
    """
    if "://" in out:
        raise ShardError(f"--format hf writes to a local folder, not {out}: export there and copy it")
    try:
        import datasets
    except ImportError:
        raise ShardError("--format hf needs the Hugging Face datasets package: pip install datasets") from None
    check_out(out, overwrite)
    os.makedirs(out, exist_ok=True)
    _remove_hf_export(out)
    skipped: Counter = Counter()
    losses: list[Unread] = []
    features = hf_features()
    staged = join(out, HF_TEMPORARY)
    os.makedirs(staged)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # our own progress line; theirs would fill the terminal and --json output
    try:
        rows = join(staged, "rows.arrow")
        exported, digest = _stage_hf_rows(
            written_samples(paths, skipped, progress, losses), features.arrow_schema, rows
        )
        if not exported:
            hint = f"; {describe_losses(losses)}" if losses else ""
            raise ShardError(f"nothing to export from {len(paths)} shards: {reasons(skipped)}{hint}")
        info = datasets.DatasetInfo(features=features)
        dataset = datasets.Dataset.from_file(rows, info=info).select_columns(
            list(HF_COLUMNS), new_fingerprint=digest[:16]
        )  # a fingerprint from the rows, not from the staged file's path
        shards = min(exported, dataset.data.nbytes // HF_MAX_SHARD_BYTES + 1)
        parquet = [join(out, HF_PARQUET_DIR, f"data-{i:05d}-of-{shards:05d}.parquet") for i in range(shards)]
        os.makedirs(join(out, HF_PARQUET_DIR), exist_ok=True)
        for i, path in enumerate(parquet):
            dataset.shard(num_shards=shards, index=i, contiguous=True).to_parquet(path)
        dataset.save_to_disk(out, num_shards=shards)  # its state.json last: a folder cut short does not load
    finally:
        shutil.rmtree(staged, ignore_errors=True)
        if bars:
            datasets.enable_progress_bars()
    return {
        "format": "hf",
        "out": out,
        "dataset": out,
        "parquet": parquet,
        "exported": exported,
        "skipped": dict(skipped.most_common()),
        "shards": len(paths),
        **unread_report(losses),
    }


def _flat_row(sample: Sample) -> dict:
    meta = sample.meta
    conversations = [to_row(t) for t in meta.conversations]
    return {
        **location_columns(sample),
        "width": meta.width,
        "height": meta.height,
        "original_width": meta.original_width,
        "original_height": meta.original_height,
        "sha256": meta.sha256,
        "phash": meta.phash,
        "clip_score": meta.clip.score if meta.clip else None,
        "conversations": json.dumps(conversations, ensure_ascii=False) if conversations else None,
        "metadata": meta.to_json(),
        "image": sample.single.data if sample.single else None,
        "image_format": sample.single.format if sample.single else None,
        "image_count": len(sample.images),
        "turns": len(meta.conversations),
    }


def format_export(report: dict) -> str:
    """The export report for the terminal."""
    if report["format"] == "llava":
        where = f"{report['json']} (images in {report['image_folder']})"
    elif report["format"] == "hf":
        parquet = join(report["dataset"], HF_PARQUET_DIR)
        where = f"{report['dataset']} (for datasets.load_from_disk; parquet files in {parquet})"
    else:
        where = report["parquet"]
    lines = [f"exported {report['exported']} samples from {report['shards']} shards to {where}"]
    if report.get("shared_images"):
        lines.append(
            f"{report['shared_images']} images named a file an identical image wrote: {report['image_files']} files"
        )
    if report["skipped"]:
        lines.append(f"skipped {sum(report['skipped'].values())}: {reasons(Counter(report['skipped']))}")
    if report.get("unread_summary"):
        lines.append(f"NOT READ: {report['unread_summary']}")
    return "\n".join(lines)
