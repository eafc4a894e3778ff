"""Read input rows: URL lists (parquet, csv, tsv, jsonl, txt), image folders, COCO annotations, LLaVA JSON.

A *unit* is what one reader call consumes: one URL-list file, or a whole folder / set of annotation files
(they must be merged before rows can be numbered). :func:`read_unit` yields, in a deterministic order, either
an :class:`ImageTextPair` without its key (the pipeline numbers rows globally) or a :class:`BadRow` for a
malformed row, which the pipeline dead-letters. Nothing here raises for bad rows; a missing or unreadable file
raises :class:`InputError` with a one-line message.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from visinstruct.configs import ReadConfig
from visinstruct.schemas import Box, ImageTextPair, JsonDict, Turn, conversation_problems

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
_BY_EXTENSION = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".txt": "txt",
                 ".json": "json"}  # COCO or LLaVA: told apart by content


class InputError(ValueError):
    """The input cannot be read at all (missing file, unknown format); one-line message."""


@dataclass(frozen=True)
class BadRow:
    """A row that cannot become a pair; ``raw`` keeps a bounded excerpt for the dead-letter table."""

    reason: str
    message: str
    raw: str = ""
    url: str | None = None


def _open(path: str):
    return FileSystems.open(path, mime_type="application/octet-stream", compression_type="auto")


def detect_format(path: str, cfg: ReadConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    ext = os.path.splitext(path.rstrip("/"))[1].lower()
    if ext in _BY_EXTENSION:
        return _BY_EXTENSION[ext]
    raise InputError(f"{path}: cannot tell the input format from the extension; set read.format")


def plan_units(cfg: ReadConfig) -> list[tuple[str, list[str]]]:
    """``[(format, [paths])]`` in a fixed order: the input glob expanded and sorted by name."""
    fmt = cfg.format
    if fmt == "folder" or (fmt == "auto" and _is_folder(cfg.path)):
        return [("folder", [cfg.path])]
    matches = sorted(m.path for m in FileSystems.match([cfg.path])[0].metadata_list)
    if not matches:
        raise InputError(f"{cfg.path}: no input file matches")
    formats = {detect_format(p, cfg) for p in matches}
    if len(formats) > 1:
        raise InputError(f"{cfg.path}: files of several formats match ({', '.join(sorted(formats))}); "
                         "set read.format or narrow the pattern")
    fmt = formats.pop()
    if fmt in ("coco", "llava", "json"):  # one unit: annotation files are merged before numbering
        return [(fmt, matches)]
    return [(fmt, [p]) for p in matches]


def _is_folder(path: str) -> bool:
    return "://" not in path and os.path.isdir(path)


def read_unit(fmt: str, paths: list[str], cfg: ReadConfig) -> Iterator[ImageTextPair | BadRow]:
    """Every row of one unit, in order; pairs carry ``key=""`` until the pipeline numbers them."""
    readers = {"parquet": _parquet_rows, "csv": _delimited_rows, "tsv": _delimited_rows, "jsonl": _jsonl_rows,
               "txt": _txt_rows}
    if fmt in readers:
        for row in readers[fmt](paths[0], fmt):
            yield row if isinstance(row, BadRow) else pair_from_row(row, cfg)
    elif fmt == "folder":
        yield from _folder_pairs(paths[0])
    elif fmt in ("coco", "llava", "json"):
        documents = [_load_json(p) for p in paths]
        if fmt == "coco" or (fmt == "json" and all(isinstance(d, dict) and "images" in d for d in documents)):
            yield from coco_pairs(documents, cfg)
        else:
            for document in documents:
                yield from llava_pairs(document, cfg)
    else:
        raise InputError(f"unknown input format {fmt!r}")


def pair_from_row(row: dict, cfg: ReadConfig) -> ImageTextPair | BadRow:
    """A URL-list row as a pair, with img2dataset's column options; ``BadRow`` when it has no usable URL."""
    raw = json.dumps(row, default=str)[:500]
    url = row.get(cfg.url_col)
    if cfg.url_col not in row:
        return BadRow("missing_url", f"row has no column {cfg.url_col!r}", raw)
    if not isinstance(url, str) or not url.strip():
        return BadRow("missing_url", f"column {cfg.url_col!r} is empty or not text", raw)
    caption = None
    if cfg.caption_col is not None:
        caption = row.get(cfg.caption_col)
        if caption is not None and not isinstance(caption, str):
            return BadRow("bad_caption", f"column {cfg.caption_col!r} is not text", raw, url.strip())
    source = JsonDict({c: row.get(c) for c in cfg.save_additional_columns if c in row})
    try:
        boxes = [Box(str(b["category"]), [float(v) for v in b["bbox"]]) for b in _listish(row, cfg.boxes_col)]
        tags = [str(t) for t in _listish(row, cfg.tags_col)]
    except (KeyError, TypeError, ValueError) as e:
        return BadRow("bad_box", f"boxes or tags do not parse: {e}", raw, url.strip())
    return ImageTextPair(key="", url=url.strip(), caption=caption, boxes=boxes, tags=tags, source=source)


def _listish(row: dict, column: str | None) -> list:
    """A list-valued column: a real list (parquet, jsonl) or JSON text (csv, tsv); empty when absent."""
    value = row.get(column) if column else None
    if value is None or value == "":
        return []
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, list):
        raise TypeError(f"column {column!r} holds {type(value).__name__}, not a list")
    return value


def _parquet_rows(path: str, _: str) -> Iterator[dict]:
    with _open(path) as f:
        table = pq.read_table(f)
    yield from table.to_pylist()


def _delimited_rows(path: str, fmt: str) -> Iterator[dict | BadRow]:
    with _open(path) as f:
        text = io.TextIOWrapper(f, encoding="utf-8", errors="replace", newline="")
        reader = csv.reader(text, delimiter="\t" if fmt == "tsv" else ",")
        header = next(reader, None)
        if not header:
            return
        for line in reader:
            if not line:
                continue
            if len(line) != len(header):
                yield BadRow("malformed_row", f"{len(line)} fields where the header has {len(header)}",
                             ",".join(line)[:500])
                continue
            yield dict(zip(header, line))


def _jsonl_rows(path: str, _: str) -> Iterator[dict | BadRow]:
    with _open(path) as f:
        for number, line in enumerate(io.TextIOWrapper(f, encoding="utf-8", errors="replace"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield BadRow("malformed_row", f"line {number} is not JSON: {e.msg}", line[:500])
                continue
            yield row if isinstance(row, dict) else BadRow("malformed_row", f"line {number} is not an object",
                                                           line[:500])


def _txt_rows(path: str, _: str) -> Iterator[dict]:
    with _open(path) as f:
        for line in io.TextIOWrapper(f, encoding="utf-8", errors="replace"):
            if line.strip():
                yield {"url": line.strip()}


def _folder_pairs(folder: str) -> Iterator[ImageTextPair | BadRow]:
    """Images in a folder (recursively, sorted), each captioned by a sibling ``.txt`` when there is one."""
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names)
    present = set(paths)
    for path in paths:
        stem, ext = os.path.splitext(path)
        if ext.lower() not in IMAGE_EXTENSIONS:
            continue
        caption = None
        if stem + ".txt" in present:
            with open(stem + ".txt", encoding="utf-8", errors="replace") as f:
                caption = f.read().strip()
        yield ImageTextPair(key="", path=path, caption=caption)


def _load_json(path: str):
    with _open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def _resolve(name: str, cfg: ReadConfig) -> str:
    if "://" in name or os.path.isabs(name) or not cfg.image_root:
        return name
    return os.path.join(cfg.image_root, name)


def coco_pairs(documents: list[dict], cfg: ReadConfig) -> Iterator[ImageTextPair | BadRow]:
    """COCO instances and/or captions files merged by image id, in order of first appearance.

    Captions: the first becomes ``caption``, the rest ``captions``. Boxes: COCO's pixel ``[x, y, w, h]``
    normalised to ``[x1, y1, x2, y2]`` by the image size, with the category name.
    """
    images: dict[int, dict] = {}
    categories: dict[int, str] = {}
    for doc in documents:
        for image in doc.get("images", []):
            images.setdefault(image["id"], image)
        for cat in doc.get("categories", []):
            categories[cat["id"]] = cat["name"]
    captions: dict[int, list[str]] = {i: [] for i in images}
    boxes: dict[int, list] = {i: [] for i in images}
    bad: list[BadRow] = []
    for doc in documents:
        for ann in doc.get("annotations", []):
            image = images.get(ann.get("image_id"))
            if image is None:
                bad.append(BadRow("malformed_row", "annotation for an unknown image_id", json.dumps(ann)[:500]))
            elif "caption" in ann:
                captions[image["id"]].append(str(ann["caption"]).strip())
            elif "bbox" in ann:
                try:
                    boxes[image["id"]].append(_coco_box(ann, image, categories))
                except (KeyError, ValueError, TypeError) as e:
                    bad.append(BadRow("bad_box", f"image {image['id']}: {e}", json.dumps(ann)[:500]))
    for image_id, image in images.items():
        caps = captions[image_id]
        url = image.get("coco_url") if not cfg.image_root and image.get("coco_url") else None
        path = None if url else _resolve(image["file_name"], cfg)
        yield ImageTextPair(key="", url=url, path=path, caption=caps[0] if caps else None, captions=caps[1:],
                            boxes=boxes[image_id], source=JsonDict({"coco_id": image_id}))
    yield from bad


def _coco_box(ann: dict, image: dict, categories: dict[int, str]) -> Box:
    x, y, w, h = (float(v) for v in ann["bbox"])
    width, height = float(image["width"]), float(image["height"])
    clamp = lambda v: min(1.0, max(0.0, v))  # noqa: E731 - COCO boxes may overshoot the border by rounding
    return Box(categories.get(ann.get("category_id"), str(ann.get("category_id"))),
               [clamp(x / width), clamp(y / height), clamp((x + w) / width), clamp((y + h) / height)])


def llava_pairs(document, cfg: ReadConfig) -> Iterator[ImageTextPair | BadRow]:
    """LLaVA's training JSON (a list of ``{"id", "image", "conversations"}``); conversations are kept."""
    if not isinstance(document, list):
        raise InputError("LLaVA JSON must be a list of {id, image, conversations} objects")
    for entry in document:
        raw = json.dumps(entry)[:500]
        if not isinstance(entry, dict) or not entry.get("image"):
            yield BadRow("missing_url", "entry has no image", raw)
            continue
        try:
            turns = [Turn(t["from"], t["value"]) for t in entry.get("conversations", [])]
        except (KeyError, TypeError):
            yield BadRow("bad_conversation", "turns need 'from' and 'value'", raw)
            continue
        problems = conversation_problems(turns)
        if problems:
            yield BadRow("bad_conversation", "; ".join(problems), raw)
            continue
        location = _resolve(str(entry["image"]), cfg)
        pair = ImageTextPair(key="", conversations=turns, source=JsonDict({"llava_id": entry.get("id")}))
        yield replace(pair, url=location) if location.startswith(("http://", "https://")) else replace(
            pair, path=location)
