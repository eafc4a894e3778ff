"""Hugging Face ``datasets`` as input (``read.format: hf``): a folder ``save_to_disk`` wrote, or parquet files.

Read with pyarrow alone (``datasets`` is not needed on workers, and ``gs://`` inputs read like local ones):

- a ``save_to_disk`` folder: its ``state.json`` lists the Arrow files (IPC streams) in row order;
- a saved ``DatasetDict`` (``dataset_dict.json``): the split ``read.split`` names, or its only split;
- parquet files (``Dataset.to_parquet``, the Hub's parquet conversion): a file or a glob, sorted by name.

Each data file is one read unit. A row's image is ``read.image_col``: an ``Image`` feature (Arrow
``struct<bytes, path>``), plain bytes, or a path. Bytes become the pair's ``image`` and are never fetched; a path
alone is read like a LLaVA JSON image (``read.image_root``; an http(s) path is fetched as a URL). Conversations are
LLaVA's ``[{from, value}]`` (``read.conversations_col``), a list or JSON text, checked as LLaVA JSON's are, for the
row's number of images.

Every LLaVA row shape reads back as ``export --format hf`` writes it (and as multi-image datasets on the Hub spell
it): a list column ``images`` (a ``List(Image)`` feature, or a list of bytes or paths) holding two or more images
makes a multi-image pair, in ``<image>`` order; holding one, a single-image pair (when the row's ``image`` cell is
empty); a row with no image at all whose conversation has no ``<image>`` is a text-only pair. A row holding both an
image and a non-empty ``images`` list is ``bad_image``.

A row that cannot become a pair is dropped with a reason: ``missing_image`` (no bytes and no path, and a
conversation or caption that needs an image), ``bad_image`` (the image cell is neither), ``bad_caption``,
``bad_conversation``, ``bad_box``, ``unsafe_path``, and the bounds of
:func:`~visinstruct.transforms.read_bounds.pair_problem`. Bytes that do not decode are the decode stage's drop.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from visinstruct.configs import ReadConfig
from visinstruct.schemas import (
    IMAGE_TOKEN,
    Box,
    Decision,
    ImageRef,
    ImageTextPair,
    JsonDict,
    Turn,
    conversation_problems,
    location_fields,
)
from visinstruct.transforms.read_bounds import (
    EXCERPT,
    InputError,
    bad_row,
    contained_path,
    excerpt,
    open_input,
    pair_problem,
)
from visinstruct.transforms.read_lists import batch_rows, listish, plain_value

STATE_FILE = "state.json"  # what save_to_disk writes beside a Dataset's Arrow files
DICT_FILE = "dataset_dict.json"  # ... and at the top of a DatasetDict, one folder per split
DEFAULT_IMAGE_COL = "image"
IMAGES_COL = "images"  # a list of images per row (multi-image rows): what export --format hf writes
DEFAULT_CONVERSATIONS_COL = "conversations"
BATCH_ROWS = 256  # rows converted to Python at a time: bounded memory for image columns


def is_hf_folder(path: str) -> bool:
    """Whether ``path`` is a local folder ``save_to_disk`` wrote (a Dataset or a DatasetDict)."""
    return os.path.isfile(os.path.join(path, STATE_FILE)) or os.path.isfile(os.path.join(path, DICT_FILE))


def _read_json(path: str):
    try:
        with open_input(path) as f:
            return json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read it: {type(e).__name__}: {e}"[:EXCERPT]) from None


def _plain_name(name, where: str) -> None:
    """A file or split name from a dataset's own JSON must name something inside its folder."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or os.path.normpath(name) != name or ".." in name:
        raise InputError(f"{where} names {str(name)[:100]!r}, which is not a plain name inside the folder")


def _split_folder(folder: str, split: str | None) -> str:
    """The folder of the split to read from a saved DatasetDict."""
    splits = _read_json(os.path.join(folder, DICT_FILE)).get("splits", [])
    if split is None and len(splits) == 1:
        return os.path.join(folder, splits[0])
    for name in splits:
        _plain_name(name, os.path.join(folder, DICT_FILE))
    if split is None or split not in splits:
        named = "names no split" if split is None else f"names split {split!r}, which is not there"
        raise InputError(f"read.split: {folder} holds splits {', '.join(splits) or 'none'}; the config {named}")
    return os.path.join(folder, split)


def hf_files(cfg: ReadConfig) -> list[str]:
    """The data files of an hf input in row order (see the module docstring); :class:`InputError` when there are
    none, or ``read.split`` does not fit the input."""
    folder = cfg.path.rstrip("/")
    if FileSystems.exists(os.path.join(folder, DICT_FILE)):
        folder = _split_folder(folder, cfg.split)
    elif cfg.split is not None and FileSystems.exists(os.path.join(folder, STATE_FILE)):
        raise InputError(f"read.split: {folder} holds one Dataset, not a DatasetDict of splits; remove read.split")
    if FileSystems.exists(os.path.join(folder, STATE_FILE)):
        try:
            names = [entry["filename"] for entry in _read_json(os.path.join(folder, STATE_FILE))["_data_files"]]
        except (KeyError, TypeError):
            raise InputError(f"{folder}/{STATE_FILE} does not list the dataset's files (_data_files)") from None
        if not names:
            raise InputError(f"{folder}: the dataset holds no rows")
        for name in names:
            _plain_name(name, f"{folder}/{STATE_FILE}")
        return [os.path.join(folder, name) for name in names]
    if cfg.split is not None:
        raise InputError("read.split: only a saved DatasetDict folder has splits; parquet files are read as given")
    if "://" not in folder and os.path.isdir(folder):
        raise InputError(f"{folder}: not a folder Hugging Face datasets' save_to_disk wrote (no {STATE_FILE})")
    files = sorted(m.path for m in FileSystems.match([cfg.path])[0].metadata_list if m.path.endswith(".parquet"))
    if not files:
        raise InputError(f"{cfg.path}: no parquet files match, and it is no save_to_disk folder (format hf)")
    return files


def _open(path: str, f) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """The schema and record batches of an open data file: parquet, or an Arrow IPC stream (save_to_disk) or file.

    Only the schema is read here (a parquet footer, a stream's first message); batches are read as they are taken.
    """
    if path.endswith(".parquet"):
        parquet = pq.ParquetFile(f)
        return parquet.schema_arrow, parquet.iter_batches(batch_size=BATCH_ROWS)
    try:
        stream = pa.ipc.open_stream(f)
        return stream.schema, iter(stream)
    except pa.ArrowInvalid:  # not a stream: the IPC file format (random access), which other writers use
        f.seek(0)
        file = pa.ipc.open_file(f)
        return file.schema, (file.get_batch(i) for i in range(file.num_record_batches))


def hf_schema(path: str) -> pa.Schema:
    """The Arrow schema of one data file (its ``huggingface`` metadata holds the features)."""
    try:
        with open_input(path) as f:
            return _open(path, f)[0]
    except (OSError, ValueError, pa.ArrowException) as e:
        raise InputError(f"{path}: cannot read it as a Hugging Face dataset file: {type(e).__name__}: {e}") from None


def image_columns(schema: pa.Schema) -> list[str]:
    """Columns the schema's ``huggingface`` metadata declares as ``Image`` features."""
    try:
        features = json.loads((schema.metadata or {}).get(b"huggingface", b"{}"))["info"]["features"]
    except (ValueError, KeyError, TypeError):
        return []
    return [
        name for name, feature in features.items() if isinstance(feature, dict) and feature.get("_type") == "Image"
    ]


def resolve_columns(cfg: ReadConfig, schema: pa.Schema) -> ReadConfig:
    """``cfg`` with ``image_col`` and ``conversations_col`` filled in for this input; :class:`InputError` when a
    column the config names is not there."""
    names = schema.names
    image_col = cfg.image_col
    if image_col is None:
        declared = image_columns(schema)
        image_col = declared[0] if len(declared) == 1 else DEFAULT_IMAGE_COL
        if image_col not in names and images_column(schema) is not None:
            image_col = None  # every row's images are in the images list column
    conversations_col = cfg.conversations_col
    if conversations_col is None and DEFAULT_CONVERSATIONS_COL in names:
        conversations_col = DEFAULT_CONVERSATIONS_COL
    named = [("image_col", image_col), ("conversations_col", conversations_col)]
    if cfg.caption_col is not None and cfg.caption_col != "caption":
        named.append(("caption_col", cfg.caption_col))
    named += [(option, getattr(cfg, option)) for option in ("boxes_col", "tags_col") if getattr(cfg, option)]
    named += [("save_additional_columns", c) for c in cfg.save_additional_columns]
    for option, column in named:
        if column is not None and column not in names:
            shown = ", ".join(names[:30]) + (f", ... ({len(names)} in all)" if len(names) > 30 else "")
            raise InputError(f"read.{option}: column {column!r} not in the dataset (columns: {shown})")
    return replace(cfg, image_col=image_col, conversations_col=conversations_col)


def images_column(schema: pa.Schema) -> str | None:
    """``images`` when the schema has it as a list column (a ``List(Image)`` feature, or a list of bytes or
    paths), else ``None``."""
    if IMAGES_COL not in schema.names:
        return None
    kind = schema.field(IMAGES_COL).type
    return IMAGES_COL if pa.types.is_list(kind) or pa.types.is_large_list(kind) else None


def hf_rows(path: str) -> Iterator[dict | Decision]:
    """The rows of one data file as dicts, in order; a row that does not convert is its ``bad_encoding`` drop."""
    with open_input(path) as f:
        _, batches = _open(path, f)
        yield from batch_rows(batches)


def _image(value) -> tuple[bytes | None, str | None] | str:
    """``(bytes, path)`` of an image cell, or why it holds no image."""
    if isinstance(value, dict):  # an Image feature: {"bytes": ..., "path": ...}
        if not {"bytes", "path"} & value.keys():
            return "bad_image"
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, str)):
        data, path = (value, None) if isinstance(value, bytes) else (None, value)
    elif value is None:
        return "missing_image"
    else:
        return "bad_image"
    if not isinstance(data, (bytes, type(None))) or not isinstance(path, (str, type(None))):
        return "bad_image"
    if not data and not (path and path.strip()):
        return "missing_image"
    return data or None, path


def _turns(value) -> list[Turn]:
    """A conversations cell as turns (a list or JSON text of ``{from, value}``); raises on any other shape."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, list):
        raise TypeError(f"conversations hold {type(value).__name__}, not a list")
    turns = []
    for turn in value:
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("from"), str)
            or not isinstance(turn.get("value"), str)
        ):
            raise TypeError("each turn needs text 'from' and 'value'")
        turns.append(Turn(turn["from"], turn["value"]))
    return turns


def _raw(row: dict) -> str:
    """A dropped row's dead-letter excerpt: its image bytes as their length, every other cell cut short."""

    def short(value):
        if isinstance(value, dict):
            return {k: short(v) for k, v in value.items()}
        if isinstance(value, bytes):
            return f"<{len(value)} bytes>"
        return value[:EXCERPT] if isinstance(value, str) else value

    return excerpt(json.dumps({k: short(v) for k, v in row.items()}, default=repr, ensure_ascii=False))


def _images(row: dict, cfg: ReadConfig) -> list[tuple[bytes | None, str | None]] | Decision:
    """The row's images as ``(bytes, path)`` in order: its ``image`` cell, or its ``images`` list; ``[]`` for none."""
    single = _image(row.get(cfg.image_col)) if cfg.image_col else "missing_image"
    several = row.get(IMAGES_COL) if cfg.image_col != IMAGES_COL else None
    several = several if isinstance(several, list) else None  # a column of that name holding no list: not ours
    cells = [_image(value) for value in several or []]
    if any(isinstance(cell, str) for cell in cells):
        return bad_row(
            "bad_image", f"column {IMAGES_COL!r} holds a cell with neither image bytes nor a path", _raw(row)
        )
    if single == "bad_image":
        return bad_row("bad_image", f"column {cfg.image_col!r} holds neither image bytes nor a path", _raw(row))
    if single != "missing_image" and cells:
        return bad_row("bad_image", f"columns {cfg.image_col!r} and {IMAGES_COL!r} both hold images", _raw(row))
    return cells if single == "missing_image" else [single]


def _location(data: bytes | None, name: str | None, cfg: ReadConfig) -> bytes | str | Decision:
    """What a pair fetches an image from: its bytes, an http(s) URL, or a path under ``read.image_root``."""
    if data is not None:
        return data
    if name.startswith(("http://", "https://")):  # fetched by the checked HTTP(S) downloader
        return name
    location = contained_path(name, cfg.image_root)
    if location is None:
        return bad_row("unsafe_path", f"image path {name[:200]!r} is not inside read.image_root")
    return location


def hf_pair(row: dict, cfg: ReadConfig) -> ImageTextPair | Decision:
    """One dataset row as a pair (``cfg`` as :func:`resolve_columns` filled it in)."""
    images = _images(row, cfg)
    if isinstance(images, Decision):
        return images
    caption = row.get(cfg.caption_col) if cfg.caption_col else None
    if caption is not None and not isinstance(caption, str):
        return bad_row("bad_caption", f"column {cfg.caption_col!r} is not text", _raw(row))
    try:
        turns = _turns(row.get(cfg.conversations_col)) if cfg.conversations_col else []
    except (TypeError, ValueError, RecursionError) as e:
        return bad_row("bad_conversation", f"{type(e).__name__}: {e}"[:EXCERPT], _raw(row))
    if not images and not (turns and all(IMAGE_TOKEN not in t.value for t in turns)):
        what = f"column {cfg.image_col!r} is empty" if cfg.image_col else f"column {IMAGES_COL!r} is empty"
        return bad_row("missing_image", what, _raw(row))
    problems = conversation_problems(turns, images=len(images)) if turns else []
    if problems:
        return bad_row("bad_conversation", "; ".join(problems)[:EXCERPT], _raw(row))
    try:
        boxes = [Box(str(b["category"]), [float(v) for v in b["bbox"]]) for b in listish(row, cfg.boxes_col)]
        tags = [str(t) for t in listish(row, cfg.tags_col)]
        source = JsonDict({c: plain_value(row.get(c)) for c in cfg.save_additional_columns})
    except UnicodeDecodeError:
        return bad_row("bad_encoding", "a saved column holds bytes that are not UTF-8", _raw(row))
    except (KeyError, TypeError, ValueError, RecursionError) as e:
        return bad_row("bad_box", f"boxes or tags do not parse: {e}"[:EXCERPT], _raw(row))
    locations = [_location(data, name, cfg) for data, name in images]
    unsafe = next((loc for loc in locations if isinstance(loc, Decision)), None)
    if unsafe is not None:
        return bad_row(unsafe.reason, unsafe.message, _raw(row))
    pair = ImageTextPair(key="", caption=caption, conversations=turns, boxes=boxes, tags=tags, source=source)
    if not locations:
        pair = replace(pair, text_only=True)
    elif len(locations) > 1:
        refs = [ImageRef(data=loc) if isinstance(loc, bytes) else ImageRef(location=loc) for loc in locations]
        pair = replace(pair, images=refs)
    elif isinstance(locations[0], bytes):
        pair = replace(pair, image=locations[0])  # the bytes are the image: nothing to fetch
    else:
        pair = replace(pair, **location_fields(locations[0]))
    problem = pair_problem(pair)
    return pair if problem is None else bad_row(problem.reason, problem.message, _raw(row), problem.index.get("url"))
