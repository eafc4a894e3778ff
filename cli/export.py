"""``export``: written samples out of the shards, as LLaVA's training layout or as one flat parquet table.

``--format llava`` writes what LLaVA's ``train.py`` reads (``--data_path OUT/llava.json --image_folder
OUT/images``)::

    OUT/images/KEY.jpg          the image member as it is in the tar (jpg, jpeg, png or webp)
    OUT/llava.json              [{"id": KEY, "image": "KEY.jpg", "conversations": [{"from", "value"}, ...]}, ...]

Only samples with a valid conversation (``conversation_problems``) are exported; with ``caption_only`` a sample
that has none but has a caption gets ``human: <image>\\nDescribe the image briefly.`` / ``gpt: CAPTION``. The JSON
is written last, when every image it names exists.

``--format parquet`` writes ``OUT/samples.parquet``: one row per written sample (key, shard, url, path, caption,
sizes, sha256, phash, clip_score, conversations as LLaVA JSON text, the whole JSON member as ``metadata``, the
image bytes and their format), one row group per shard.

``--format hf`` writes a Hugging Face dataset (local OUT only; needs the ``datasets`` package)::

    OUT/data-00000-of-0000N.arrow   what ``datasets.load_from_disk(OUT)`` reads (``save_to_disk``'s layout)
    OUT/state.json, dataset_info.json
    OUT/parquet/data-00000-of-0000N.parquet   the same rows, for ``load_dataset("parquet", data_files=...)``

Columns (:data:`HF_COLUMNS`): key, shard, url, path, caption, sha256 (of the original bytes, as in the JSON member),
conversations (``[{"from", "value"}]``, empty when the sample has none), metadata (the whole JSON member), and
image, an ``Image`` feature holding the tar member's bytes unchanged (``{"bytes", "path": "KEY.EXT"}``). Rows are
in shard order. The same shards give byte-identical files: ``state.json``'s ``_fingerprint`` (which ``datasets``
otherwise derives from temporary paths) is the sha256 of the rows as staged (an Arrow stream), cut to 16 hex
digits. ``--overwrite`` replaces an earlier hf export's files (``data-*``, ``parquet/data-*``, the two JSON files).

Nothing in a tar names an output file: image files are named by keys checked to be plain digit strings, and by
an extension from a fixed list, so nothing is written outside OUT.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from visinstruct.cli.shards import Progress, Unread, describe_losses, samples_noting_losses
from visinstruct.schemas import IMAGE_TOKEN, SampleMeta, Turn, conversation_problems, to_row
from visinstruct.transforms.layout import ShardError, image_member, match_paths, shard_files
from visinstruct.transforms.shards import atomic_write, delete, join, write_bytes

MAX_KEY_CHARS = 64
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
    ]
)


HF_PARQUET_DIR = "parquet"
HF_TEMPORARY = ".hf-export"  # rows staged in OUT before save_to_disk; removed at the end
HF_BATCH_ROWS = 256  # rows a record batch of the staged file holds: bounded memory for images
HF_MAX_SHARD_BYTES = 500 * 2**20  # save_to_disk's default shard size
HF_COLUMNS = ("key", "shard", "url", "path", "caption", "sha256", "conversations", "metadata", "image")


@dataclass(frozen=True)
class Sample:
    """A written sample as export needs it; ``key`` is safe to name a file with."""

    key: str
    shard: str
    meta: SampleMeta
    image: bytes
    image_format: str


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
    (``duplicate_key``), no image member (``no_image``), a JSON member that does not parse (``bad_json``), and
    samples the index lists as written but the tar does not give (``missing_in_tar``: a tar cut short), which are
    also described shard by shard in ``losses``.
    """
    seen, losses = set(), losses if losses is not None else []
    for done, tar in enumerate(paths, 1):
        files = shard_files(tar)
        before = len(losses)
        for key, members in samples_noting_losses(files, losses):
            ext = image_member(members)
            reason = (
                "unsafe_key"
                if not safe_key(key)
                else "duplicate_key"
                if key in seen
                else "no_image"
                if ext is None
                else None
            )
            try:
                meta = (
                    SampleMeta.from_json(members["json"])
                    if "json" in members
                    else SampleMeta(key=key, caption=members.get("txt", b"").decode("utf-8", "replace") or None)
                )
            except ValueError:  # includes JSON syntax errors: validate says more
                reason = reason or "bad_json"
            if reason:
                skipped[reason] += 1
                continue
            seen.add(key)
            yield Sample(key, files.name, meta, members[ext], ext)
        missing = sum(u.missing or 0 for u in losses[before:])
        if missing:
            skipped["missing_in_tar"] += missing
        if progress:
            progress(done, len(paths))


def llava_conversation(meta: SampleMeta, caption_only: bool) -> tuple[list[Turn] | None, str | None]:
    """The turns to export for a sample and ``None``, or ``None`` and why it is not exported."""
    if meta.conversations:
        if conversation_problems(meta.conversations):
            return None, "bad_conversation"
        return meta.conversations, None
    if caption_only and meta.caption and meta.caption.strip():
        return [Turn("human", BRIEF_PROMPT), Turn("gpt", meta.caption.strip())], None
    return None, "no_caption" if caption_only else "no_conversation"


def export_llava(
    paths: list[str], out: str, caption_only: bool = False, overwrite: bool = False, progress: Progress | None = None
) -> dict:
    """Write LLaVA's layout to ``out`` (see the module docstring).

    Returns:
        format, out, json (its path), image_folder, exported, skipped (``{reason: n}``), shards.
    """
    check_out(out, overwrite)
    skipped: Counter = Counter()
    entries, losses = [], []
    for sample in written_samples(paths, skipped, progress, losses):
        turns, reason = llava_conversation(sample.meta, caption_only)
        if turns is None:
            skipped[reason] += 1
            continue
        image = f"{sample.key}.{sample.image_format}"  # a checked key and an extension from a fixed list
        write_bytes(join(out, IMAGE_DIR, image), sample.image)
        entries.append({"id": sample.key, "image": image, "conversations": [to_row(t) for t in turns]})
    if not entries:
        hint = " (pass --caption-only to export captions)" if skipped.get("no_conversation") else ""
        hint += f"; {describe_losses(losses)}" if losses else ""
        raise ShardError(f"nothing to export from {len(paths)} shards: {_reasons(skipped)}{hint}")
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
        **_unread(losses),
    }


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
        **_unread(losses),
    }


def hf_features():
    """The ``datasets.Features`` of an hf export (see the module docstring); imports ``datasets``."""
    import datasets

    text = datasets.Value("string")
    columns = {name: text for name in HF_COLUMNS}
    columns["conversations"] = datasets.List({"from": text, "value": text})
    columns["image"] = datasets.Image()
    return datasets.Features(columns)


def hf_row(sample: Sample) -> dict:
    """One sample as a row of an hf export: the image member's bytes as they are, named ``KEY.EXT``."""
    meta = sample.meta
    return {
        **_where(sample),
        "sha256": meta.sha256,
        "conversations": [to_row(t) for t in meta.conversations],
        "metadata": meta.to_json(),
        "image": {"bytes": sample.image, "path": f"{sample.key}.{sample.image_format}"},
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
            raise ShardError(f"nothing to export from {len(paths)} shards: {_reasons(skipped)}{hint}")
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
        **_unread(losses),
    }


def _unread(losses: list[Unread]) -> dict:
    """The report's account of what could not be read: ``unread`` (per shard) and a one-line ``unread_summary``."""
    return {"unread": [asdict(u) for u in losses], "unread_summary": describe_losses(losses) if losses else None}


def _where(sample: Sample) -> dict:
    """The columns every export row starts with: key, shard, url, path, caption."""
    meta = sample.meta
    return {"key": sample.key, "shard": sample.shard, "url": meta.url, "path": meta.path, "caption": meta.caption}


def _flat_row(sample: Sample) -> dict:
    meta = sample.meta
    conversations = [to_row(t) for t in meta.conversations]
    return {
        **_where(sample),
        "width": meta.width,
        "height": meta.height,
        "original_width": meta.original_width,
        "original_height": meta.original_height,
        "sha256": meta.sha256,
        "phash": meta.phash,
        "clip_score": meta.clip.score if meta.clip else None,
        "conversations": json.dumps(conversations, ensure_ascii=False) if conversations else None,
        "metadata": meta.to_json(),
        "image": sample.image,
        "image_format": sample.image_format,
    }


def _reasons(skipped: Counter) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in skipped.most_common()) or "no written samples"


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
    if report["skipped"]:
        lines.append(f"skipped {sum(report['skipped'].values())}: {_reasons(Counter(report['skipped']))}")
    if report.get("unread_summary"):
        lines.append(f"NOT READ: {report['unread_summary']}")
    return "\n".join(lines)
