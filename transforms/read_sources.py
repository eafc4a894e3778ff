"""Readers for sources that are not URL lists: image folders, COCO annotation files, LLaVA training JSON.

Each reader is split in two so that :func:`visinstruct.transforms.read.read_unit` can guard every record: a
generator of raw records (or the drop of what is already known bad) and a per-record conversion to an
:class:`ImageTextPair` or its drop. Any exception a record raises in its conversion costs that record only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import replace

from visinstruct.configs import ReadConfig
from visinstruct.schemas import (
    Box,
    Decision,
    ImageRef,
    ImageTextPair,
    JsonDict,
    Turn,
    conversation_problems,
    is_url,
    location_fields,
)
from visinstruct.transforms.read_bounds import (
    EXCERPT,
    MAX_CAPTION_CHARS,
    InputError,
    bad_row,
    contained_path,
    excerpt,
    open_input,
)

# Files of an input folder read as images (what Pillow decodes; the written shard holds jpg, png or webp).
FOLDER_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
Convert = Callable[[object, ReadConfig], "ImageTextPair | Decision"]


def source_rows(fmt: str, paths: list[str], cfg: ReadConfig) -> tuple[Iterator, Convert]:
    """``(raw records, conversion)`` for a folder (``fmt="folder"``) or annotation files (coco, llava, json)."""
    if fmt == "folder":
        return folder_images(paths[0]), folder_pair
    documents = [_load_json(p) for p in paths]
    if fmt == "coco" or (fmt == "json" and all(isinstance(d, dict) and "images" in d for d in documents)):
        return coco_records(documents), coco_pair
    for document in documents:
        if not isinstance(document, list):
            raise InputError("LLaVA JSON must be a list of {id, image, conversations} objects")
    return (entry for document in documents for entry in document), llava_pair


def folder_images(folder: str) -> Iterator[str]:
    """Image files in a folder, recursively, sorted by path."""
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names)
    return (p for p in paths if os.path.splitext(p)[1].lower() in FOLDER_IMAGE_EXTENSIONS)


def folder_pairs(folder: str) -> Iterator[ImageTextPair]:
    """The readable images of a folder as pairs (reference sets for dedup)."""
    for path in folder_images(folder):
        pair = folder_pair(path)
        if isinstance(pair, ImageTextPair):
            yield pair


def folder_pair(path: str, _: ReadConfig | None = None) -> ImageTextPair | Decision:
    """An image captioned by a sibling ``.txt`` when there is one (read up to just over the caption bound)."""
    caption_file = os.path.splitext(path)[0] + ".txt"
    caption = None
    if os.path.exists(caption_file):
        try:
            with open(caption_file, encoding="utf-8-sig", errors="surrogateescape") as f:
                caption = f.read(MAX_CAPTION_CHARS + 1).strip()
        except OSError as e:
            return bad_row("file_error", excerpt(f"cannot read {caption_file}: {e}"))
    return ImageTextPair(key="", path=path, caption=caption)


def _load_json(path: str):
    with open_input(path) as f:
        text = f.read().decode("utf-8-sig", "surrogateescape")  # bad bytes: that entry's bad_encoding, later
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise InputError(f"{path}: not valid JSON (nested too deeply)") from None


def resolve_location(name: str, cfg: ReadConfig) -> str | None:
    """An image name of an annotation row (COCO, LLaVA): a URL as it is; a path joined to ``read.image_root``, or
    None when it would leave the root (an absolute path elsewhere, ``..``: a downloaded annotation file must not make
    ingest read the user's own files). Without a root, names are the paths they say (relative to the working
    folder): set ``read.image_root`` for files you did not write yourself."""
    if is_url(name) or not cfg.image_root:
        return name
    return contained_path(name, cfg.image_root)


def unsafe_path(name: str, raw: str) -> Decision:
    return bad_row("unsafe_path", f"image path {name[:200]!r} is not inside read.image_root", raw)


def _items(doc, field: str) -> list:
    value = doc.get(field, []) if isinstance(doc, dict) else []
    return value if isinstance(value, list) else []


def coco_records(documents: list) -> Iterator[tuple[dict, list[str], list] | Decision]:
    """COCO instances and/or captions files merged by image id, in order of first appearance.

    Yields ``(image, captions, annotations with a bbox)`` per image, then the drop of each entry that
    does not fit (no id, an unknown image id, a non-object).
    """
    images: dict = {}
    categories: dict = {}
    bad: list[Decision] = []
    for doc in documents:
        if not isinstance(doc, dict):
            bad.append(bad_row("malformed_row", "a COCO file is not a JSON object"))
        for image in _items(doc, "images"):
            try:
                images.setdefault(image["id"], image)
            except (KeyError, TypeError):
                bad.append(bad_row("malformed_row", "image entry without a usable id", _raw(image)))
        for cat in _items(doc, "categories"):
            try:
                categories[cat["id"]] = str(cat["name"])
            except (KeyError, TypeError):
                bad.append(bad_row("malformed_row", "category without id and name", _raw(cat)))
    captions: dict = {i: [] for i in images}
    boxes: dict = {i: [] for i in images}
    for doc in documents:
        for ann in _items(doc, "annotations"):
            try:
                image_id = ann.get("image_id")
                target = captions if "caption" in ann else boxes if "bbox" in ann else None
                if image_id not in images:
                    bad.append(bad_row("malformed_row", "annotation for an unknown image_id", _raw(ann)))
                elif target is not None:
                    target[image_id].append(ann)
            except (AttributeError, TypeError):
                bad.append(bad_row("malformed_row", "annotation is not an object with an image_id", _raw(ann)))
    for image_id, image in images.items():
        yield image, captions[image_id], [(ann, categories) for ann in boxes[image_id]]
    yield from bad


def coco_pair(record: tuple, cfg: ReadConfig) -> ImageTextPair | Decision:
    """One merged COCO image as a pair: the first caption becomes ``caption``, the rest ``captions``; boxes
    are COCO's pixel ``[x, y, w, h]`` normalised to ``[x1, y1, x2, y2]`` by the image size, with the category."""
    image, caption_anns, box_anns = record
    caps = [str(a["caption"]).strip() for a in caption_anns]
    try:
        found = [_coco_box(ann, image, categories) for ann, categories in box_anns]
    except (KeyError, ValueError, TypeError, ArithmeticError) as e:
        return bad_row("bad_box", f"image {image.get('id')}: {type(e).__name__}: {e}"[:EXCERPT], _raw(image))
    url = image.get("coco_url") if not cfg.image_root and image.get("coco_url") else None
    if url is None and not isinstance(image.get("file_name"), str):
        return bad_row("missing_url", f"image {image.get('id')} has neither coco_url nor file_name", _raw(image))
    path = None if url else resolve_location(image["file_name"], cfg)
    if url is None and path is None:
        return unsafe_path(image["file_name"], _raw(image))
    return ImageTextPair(
        key="",
        url=url,
        path=path,
        caption=caps[0] if caps else None,
        captions=caps[1:],
        boxes=found,
        source=JsonDict({"coco_id": image["id"]}),
    )


def _coco_box(ann: dict, image: dict, categories: dict) -> Box:
    x, y, w, h = (float(v) for v in ann["bbox"])
    width, height = float(image["width"]), float(image["height"])
    clamp = lambda v: min(1.0, max(0.0, v))  # COCO boxes may overshoot the border by rounding
    return Box(
        categories.get(ann.get("category_id"), str(ann.get("category_id"))),
        [clamp(x / width), clamp(y / height), clamp((x + w) / width), clamp((y + h) / height)],
    )


LLAVA_KEYS = ("id", "image", "conversations")


def llava_pair(entry, cfg: ReadConfig) -> ImageTextPair | Decision:
    """One entry of LLaVA's training JSON, in any of its shapes; conversations are kept.

    ``{"id", "image": "a.jpg", "conversations"}`` is a single-image row; ``"image": ["a.jpg", "b.jpg"]`` a
    multi-image row (the n-th file answers the n-th ``<image>``); no ``image`` (mix665k's ShareGPT rows) a text-only
    row (``"image": []`` too). Rows naming the same file are separate samples. ``source`` keeps the ``id``, that the
    image was a list of one or none (``llava_image_list``), and any other keys of the entry (``llava_fields``), so
    an export writes the row back as it came.
    """
    raw = _raw(entry)
    if not isinstance(entry, dict):
        return bad_row("malformed_row", f"an entry must be an object, got {type(entry).__name__}", raw)
    image = entry.get("image")
    names = image if isinstance(image, list) else [] if image in (None, "") else [image]
    if not all(isinstance(name, str) and name for name in names):
        return bad_row("missing_url", "'image' must be a file name or a list of file names", raw)
    try:
        turns = [Turn(str(t["from"]), str(t["value"])) for t in entry.get("conversations") or []]
    except (KeyError, TypeError):
        return bad_row("bad_conversation", "turns need 'from' and 'value'", raw)
    problems = conversation_problems(turns, images=len(names))
    if problems:
        return bad_row("bad_conversation", "; ".join(problems), raw)
    source = {"llava_id": entry.get("id")}
    if isinstance(image, list) and len(names) <= 1:  # written back as a list: ["a.jpg"], or [] (text-only)
        source["llava_image_list"] = True
    others = {k: v for k, v in entry.items() if k not in LLAVA_KEYS}
    if others:
        source["llava_fields"] = others
    pair = ImageTextPair(key="", conversations=turns, source=JsonDict(source))
    if not names:
        return replace(pair, text_only=True)
    locations = [resolve_location(name, cfg) for name in names]
    if None in locations:
        return unsafe_path(names[locations.index(None)], raw)
    if len(locations) > 1:
        return replace(pair, images=[ImageRef(location) for location in locations])
    return replace(pair, **location_fields(locations[0]))


def _raw(value) -> str:
    return excerpt(json.dumps(value, default=repr, ensure_ascii=False)[:EXCERPT])
