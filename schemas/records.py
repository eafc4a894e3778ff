"""The records that flow between stages, and the rows of the tables we write.

Every record is a frozen dataclass; :mod:`visinstruct.schemas.arrow` derives its Arrow schema, so a record
and its table cannot drift apart. Shapes:

- :class:`ImageTextPair`: one input row as read (url or path, caption(s), boxes, tags, source columns).
- :class:`FetchedImage`: the image of a pair after download, validation and resizing.
- :class:`ClipScore`: a CLIP image-text score with the model that produced it.
- :class:`Turn` lists: a conversation in LLaVA's format (``{"from": "human", "value": "<image>\\n..."}``).
- :class:`GenerationInfo`: provenance of a generated conversation.
- :class:`Curation`: what curation found in an image (NSFW score, faces, whether they were blurred).
- :class:`SampleMeta`: the ``KEY.json`` member of a shard sample.
- :class:`Rejection`: a dead-letter row (stage, reason code, message, key, url, detail).
- :class:`IndexRow` / :class:`ShardStats`: the per-shard parquet index and ``_stats.json``.
"""

from __future__ import annotations

import functools
import json
import operator
import reprlib
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from types import UnionType
from typing import Any, Union, get_args, get_origin

from visinstruct.schemas.arrow import JsonDict, field_key, from_row, to_row, type_hints

SCHEMA_VERSION = 1
IMAGE_TOKEN = "<image>"
ROLES = ("human", "gpt")


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


@functools.cache
def _field_values(cls: type) -> Callable[[Any], tuple]:
    """A record's field values as a tuple, in field order (``attrgetter``: no Python loop per record)."""
    names = _field_names(cls)
    if len(names) == 1:
        return lambda record: (getattr(record, names[0]),)
    return operator.attrgetter(*names)


def _restore(cls: type, values: tuple) -> Any:
    """A record unpickled from its field values; like pickle's default, without calling ``__init__``."""
    record = object.__new__(cls)
    record.__dict__.update(zip(_field_names(cls), values))
    return record


class Record:
    """Base of every record here: pickles as its class and its field values, in field order.

    Beam moves records between stages as pickles (its fallback coder), one pickle per element: pickle's default
    form spells every field name in each of them, which made a dead-letter row or an input pair nearly twice as
    big, in every shuffle and in the local runner's memory. (Field order is the class's: pickles never outlive a
    run, nothing stores them.)
    """

    __slots__ = ()

    def __reduce__(self):
        cls = type(self)
        return _restore, (cls, _field_values(cls)(self))


@dataclass(frozen=True)
class Box(Record):
    """An object in an image: a category and a normalised ``[x1, y1, x2, y2]`` box (0 <= x1 <= x2 <= 1)."""

    category: str
    bbox: list[float]

    def __post_init__(self):
        if len(self.bbox) != 4:
            raise ValueError(f"bbox needs 4 numbers (x1, y1, x2, y2), got {self.bbox!r}")
        x1, y1, x2, y2 = self.bbox
        if not (0.0 <= x1 <= x2 <= 1.0 and 0.0 <= y1 <= y2 <= 1.0):
            raise ValueError(f"bbox must be normalised with x1 <= x2 and y1 <= y2, got {self.bbox!r}")


@dataclass(frozen=True)
class Turn(Record):
    """One turn of a LLaVA conversation; ``role`` is written as LLaVA's ``from``."""

    role: str = field(metadata={"key": "from"})
    value: str = ""


@dataclass(frozen=True)
class ImageRef(Record):
    """One image of a multi-image input row: where to fetch it (a URL or path), or its bytes."""

    location: str | None = None
    data: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ImageTextPair(Record):
    """One input record as read, before any download.

    Attributes:
        key: stable sample key (see :mod:`visinstruct.schemas.keys`).
        url: image URL (http, https, or any Beam filesystem path); ``None`` when ``path`` is set.
        path: local image path, for folder and annotation sources.
        caption: the main caption.
        captions: further captions (COCO has five per image).
        boxes: objects with normalised boxes, when the source has them.
        tags: free-form labels, when the source has them.
        conversations: an existing conversation (LLaVA JSON inputs).
        source: input columns kept as metadata (img2dataset's ``save_additional_columns``).
        image: the image's bytes, when the input row holds them (a Hugging Face dataset's ``Image`` column):
            nothing is fetched then, and ``url`` and ``path`` are ``None``.
        images: the images of a multi-image row (two or more), in the order of the conversation's ``<image>``
            placeholders (:class:`ImageRef`: a URL or path to fetch, or the bytes); ``url``, ``path`` and ``image``
            are ``None``.
        text_only: a row without any image (a LLaVA text-only conversation): nothing to fetch.
    """

    key: str
    url: str | None = None
    path: str | None = None
    caption: str | None = None
    captions: list[str] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    conversations: list[Turn] = field(default_factory=list)
    source: JsonDict = field(default_factory=JsonDict)
    image: bytes | None = field(default=None, repr=False)
    images: list[ImageRef] = field(default_factory=list, repr=False)
    text_only: bool = False

    @property
    def location(self) -> str:
        """What to fetch: the URL, or else the path (for a multi-image row, its first image's, when named)."""
        if self.images and self.images[0].location:
            return self.images[0].location
        return self.url or self.path or ""

    @property
    def image_count(self) -> int:
        """0 for a text-only row, the number of ``images`` for a multi-image row, else 1."""
        return 0 if self.text_only else len(self.images) or 1


@dataclass(frozen=True)
class FetchedImage(Record):
    """An image after download, validation and resizing. ``format`` is the member extension (jpg/png/webp)."""

    key: str
    image: bytes
    format: str
    width: int
    height: int
    original_width: int
    original_height: int
    sha256: str
    phash: str


@dataclass(frozen=True)
class ClipScore(Record):
    """Cosine similarity of normalised CLIP embeddings, with the model that produced it."""

    score: float
    model: str
    pretrained: str | None = None


@dataclass(frozen=True)
class GenerationInfo(Record):
    """Provenance of a generated conversation.

    ``kind`` names the kinds whose turns the conversation holds, joined by ``+`` when several were asked for one
    image (``parts`` then has one entry per kind asked: its seed, tokens, and its ``reason`` when it was rejected).
    A kind that saw the image records it in ``image`` (sha256 of the bytes sent, size, format) and its image
    tokens apart in ``image_tokens`` (when the backend reports them); ``recaption`` is the re-caption that
    text-only kinds read in two-pass runs when it is not itself one of the conversation's kinds, ``grounding``
    the lowest CLIP agreement of a reply with its image.
    Fields left at None or empty are not written.
    """

    kind: str
    model: str
    template_sha256: str
    seed: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    image_tokens: int | None = None
    image: JsonDict | None = None
    parts: list[JsonDict] = field(default_factory=list)
    recaption: str | None = None
    grounding: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None and v != []}


@dataclass(frozen=True)
class Curation(Record):
    """What curation found in a sample's image: its NSFW score (0-1, open_nsfw), its face boxes (category
    ``face``; an empty list: looked, found none; None: not looked for), and whether those faces were blurred in the
    written image. Fields left at None are not written."""

    nsfw: float | None = None
    faces: list[Box] | None = None
    faces_blurred: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.nsfw is not None:
            out["nsfw"] = self.nsfw
        if self.faces is not None:
            out["faces"] = [to_row(box) for box in self.faces]
        if self.faces_blurred is not None:
            out["faces_blurred"] = self.faces_blurred
        return out


@dataclass(frozen=True)
class ImageInfo(Record):
    """One image of a multi-image sample (``SampleMeta.images``): its tar member (``0.jpg``, ``1.png``...), where it
    came from, and its sizes and hashes as a single-image sample records them at the top level."""

    member: str
    url: str | None = None
    path: str | None = None
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    sha256: str | None = None
    phash: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class SampleMeta(Record):
    """The ``KEY.json`` member of a sample; fields a stage has not produced are left out of the JSON.

    Keys found in a JSON member that this class does not know (img2dataset writes ``status``, ``exif``...)
    are kept in ``extra`` so that reading and rewriting a shard loses nothing.
    """

    key: str
    schema_version: int = SCHEMA_VERSION
    url: str | None = None
    path: str | None = None
    caption: str | None = None
    captions: list[str] = field(default_factory=list)
    source: JsonDict = field(default_factory=JsonDict)
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    sha256: str | None = None
    phash: str | None = None
    boxes: list[Box] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    clip: ClipScore | None = None
    conversations: list[Turn] = field(default_factory=list)
    generation: GenerationInfo | None = None
    curation: Curation | None = None
    image_count: int | None = None
    images: list[ImageInfo] = field(default_factory=list)
    extra: JsonDict = field(default_factory=JsonDict)

    @property
    def n_images(self) -> int:
        """How many images the sample has: ``image_count`` (0 for a text-only sample, 2 or more with ``images``),
        else 1 (a single-image sample, the image's sizes and hashes at the top level)."""
        return 1 if self.image_count is None else self.image_count

    @classmethod
    def from_pair(cls, pair: ImageTextPair, image: Any = None) -> SampleMeta:
        """The metadata of a sample made from an input pair and (optionally) its fetched image or images.

        ``image`` is a :class:`FetchedImage` or anything with its size and hash attributes; for a multi-image or
        text-only pair, a list of them (one per image, in order; empty for text-only), with their ``format``.
        """
        sizes: dict[str, Any] = {}
        names = ("width", "height", "original_width", "original_height", "sha256", "phash")
        if isinstance(image, list):
            sizes["image_count"] = len(image)
            sizes["images"] = [
                ImageInfo(
                    f"{i}.{one.format}",
                    **_image_origin(pair.images[i] if i < len(pair.images) else None),
                    **{name: getattr(one, name) for name in names},
                )
                for i, one in enumerate(image)
            ]
        elif image is not None:
            sizes = {name: getattr(image, name) for name in names}
        return cls(
            key=pair.key,
            url=pair.url,
            path=pair.path,
            caption=pair.caption,
            captions=list(pair.captions),
            source=JsonDict(pair.source),
            boxes=list(pair.boxes),
            tags=list(pair.tags),
            conversations=list(pair.conversations),
            **sizes,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict without empty fields; ``extra`` keys are merged back at the top level."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or (f.name != "schema_version" and value in ([], {})) or f.name == "extra":
                continue
            if f.name in ("boxes", "conversations"):
                value = [to_row(v) for v in value]
            elif f.name == "clip":
                value = asdict(value)
            elif f.name in ("generation", "curation"):
                value = value.to_dict()
            elif f.name == "images":
                value = [v.to_dict() for v in value]
            out[field_key(f)] = value
        for k, v in self.extra.items():
            out.setdefault(k, v)
        return out

    def to_json(self) -> str:
        """Compact, deterministic JSON (field order fixed by this class)."""
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Any) -> SampleMeta:
        """Parse a JSON member; raises ``ValueError`` naming the field for any value of the wrong shape.

        Every field is checked against its annotation before a record is built (``[1]``, ``{"key": 5}``, a box
        that is a string, a turn without ``from``), so a caller needs to handle ``ValueError`` alone.
        """
        if not isinstance(data, dict):
            raise ValueError(f"sample JSON must be an object, got {type(data).__name__}")
        _check_text(data)
        known = {field_key(f) for f in fields(cls)} - {"extra"}
        row = {k: v for k, v in data.items() if k in known}
        row["extra"] = {k: v for k, v in data.items() if k not in known}
        if "key" not in row:
            raise ValueError("sample JSON has no 'key'")
        if not isinstance(row["key"], str):
            raise ValueError(f"sample JSON: key must be a string, got {reprlib.repr(row['key'])}")
        _check_shape(cls, row, f"sample {row['key']!r}")
        try:
            meta = from_row(cls, row)
        except (TypeError, ValueError, AttributeError, KeyError) as e:  # a box out of range; shapes checked above
            raise ValueError(f"sample {row.get('key')!r}: {e}") from e
        _check_types(meta)
        return meta

    @classmethod
    def from_json(cls, text: str | bytes) -> SampleMeta:
        """Parse a ``KEY.json`` member; ``ValueError`` for bytes that are not JSON or JSON of the wrong shape."""
        try:
            data = json.loads(text)
        except RecursionError as e:  # nesting deeper than the interpreter's stack
            raise ValueError("sample JSON is nested too deeply") from e
        return cls.from_dict(data)


def is_url(location: str) -> bool:
    """Whether an image location is an http(s) URL (fetched by the checked downloader), not a path."""
    return location.startswith(("http://", "https://"))


def location_fields(location: str) -> dict[str, str]:
    """An image location as the field that holds it: ``{"url": ...}`` or ``{"path": ...}`` (pairs, ``ImageInfo``)."""
    return {"url": location} if is_url(location) else {"path": location}


def _image_origin(ref: ImageRef | None) -> dict[str, str]:
    """Where one image of a multi-image pair came from, as ``ImageInfo`` records it (nothing for bytes)."""
    location = ref.location if ref is not None else None
    return location_fields(location) if location else {}


_NON_NEGATIVE = ("width", "height", "original_width", "original_height", "image_count")
MAX_JSON_DEPTH = 100
_INT64 = range(-(2**63), 2**63)  # every integer field lands in an int64 column of some table


def _check_text(data: Any) -> None:
    """Refuse strings that cannot be written as UTF-8 (JSON's ``"\\ud800"`` parses to a lone surrogate), which
    would fail the shard's tables or the rewritten JSON later, and nesting so deep that writing it back or quoting
    it in a message would exhaust the stack. Iterative for the same reason."""
    stack = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"sample JSON is nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((item, depth + 1) for item in [*value.keys(), *value.values()])
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"sample JSON holds text that is not valid Unicode ({e.reason})") from e


def _check_shape(cls: type, row: dict, where: str) -> None:
    """Raise ``ValueError`` unless every field of ``row`` present has the JSON shape its annotation asks for."""
    hints = type_hints(cls)
    for f in fields(cls):
        name = field_key(f)
        if name not in row:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ValueError(f"{where}: {name!r} is missing")
            continue
        _check_value(row[name], hints[f.name], f"{where}: {name}", name in _NON_NEGATIVE)


def _check_value(value: Any, tp: Any, where: str, non_negative: bool = False) -> None:
    args = [a for a in get_args(tp) if a is not type(None)]
    if get_origin(tp) in (Union, UnionType):
        if value is None:
            return
        tp = args[0]
    ok, wanted = True, None
    if tp is JsonDict:
        ok, wanted = isinstance(value, dict), "a JSON object"
    elif tp is str:
        ok, wanted = isinstance(value, str), "a string"
    elif tp is int:
        ok = (
            isinstance(value, int)
            and not isinstance(value, bool)
            and value in _INT64
            and (value >= 0 or not non_negative)
        )
        wanted = "a non-negative integer" if non_negative else "an integer"
    elif tp is float:
        ok, wanted = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif get_origin(tp) is list:
        ok, wanted = isinstance(value, list), "a list"
        for i, item in enumerate(value if ok else []):
            _check_value(item, get_args(tp)[0], f"{where}[{i}]")
    elif is_dataclass(tp):
        ok, wanted = isinstance(value, dict), "a JSON object"
        if ok:
            _check_shape(tp, value, where)
    if not ok:
        raise ValueError(f"{where} must be {wanted}, got {reprlib.repr(value)}"[:500])


def _check_types(meta: SampleMeta) -> None:
    for name in ("width", "height", "original_width", "original_height"):
        value = getattr(meta, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"sample {meta.key!r}: {name} must be a non-negative integer, got {value!r}")
    for name in ("caption", "url", "sha256", "phash"):
        value = getattr(meta, name)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"sample {meta.key!r}: {name} must be a string, got {value!r}")
    for turn in meta.conversations:
        if not isinstance(turn.role, str) or not isinstance(turn.value, str):
            raise ValueError(f"sample {meta.key!r}: conversation turns need string 'from' and 'value'")


def conversation_problems(turns: list[Turn], max_chars: int | None = None, images: int = 1) -> list[str]:
    """Why a conversation is not valid LLaVA training data for a sample with ``images`` images (empty list when it is).

    Rules: at least one human/gpt exchange; turns alternate starting with ``human``; no empty turn; optional length
    bound per turn. ``<image>`` placeholders: exactly one, in the first human turn, for a single image; none for a
    text-only sample; one per image, all in human turns, for several (the n-th placeholder is the n-th image).
    """
    problems = []
    if len(turns) < 2:
        problems.append("needs at least one human turn and one gpt turn")
    for i, turn in enumerate(turns):
        expected = ROLES[i % 2]
        if turn.role != expected:
            problems.append(f"turn {i} is from {turn.role!r}, expected {expected!r}")
        if not turn.value.strip():
            problems.append(f"turn {i} is empty")
        if max_chars is not None and len(turn.value) > max_chars:
            problems.append(f"turn {i} is longer than {max_chars} characters")
    count = sum(t.value.count(IMAGE_TOKEN) for t in turns)
    if images == 1:
        if count != 1 or (turns and IMAGE_TOKEN not in turns[0].value):
            problems.append(f"{IMAGE_TOKEN} must appear exactly once, in the first human turn (found {count})")
    elif count != images:
        what = "no" if images == 0 else f"{images}"
        problems.append(f"a sample with {images} images needs {what} {IMAGE_TOKEN} placeholders (found {count})")
    elif any(IMAGE_TOKEN in t.value for t in turns if t.role != ROLES[0]):
        problems.append(f"{IMAGE_TOKEN} placeholders belong in human turns")
    return problems


@dataclass(frozen=True)
class Rejection(Record):
    """A dead-letter row: a record some stage dropped, and why (made from its :class:`~visinstruct.schemas.Decision`).

    Attributes:
        stage: ``read``, ``download``, ``decode``, ``dedup``, ``filter``, ``generate``, ``remove``.
        reason: a stable reason code (``http_404``, ``timeout``, ``too_small``, ``clip_below_threshold``...).
        message: a human-readable explanation.
        key: the sample key (``""`` when the input row was too malformed to have one).
        url: the input URL or path, when known.
        detail: what the stage had: the score, the raw LLM text, the offending row.
    """

    stage: str
    reason: str
    message: str
    key: str = ""
    url: str | None = None
    detail: JsonDict = field(default_factory=JsonDict)


@dataclass(frozen=True)
class Member(Record):
    """Where one member of a sample lies in its tar: the bytes ``[offset, offset + size)`` of the file data."""

    name: str
    offset: int
    size: int


@dataclass(frozen=True)
class IndexRow(Record):
    """One row of a shard's parquet index: one per input row of the shard, written or not.

    ``status`` is ``success`` or the reason code the row was rejected with.
    """

    key: str
    status: str
    url: str | None = None
    path: str | None = None
    caption: str | None = None
    error_message: str | None = None
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    sha256: str | None = None
    phash: str | None = None
    members: list[Member] = field(default_factory=list)
    clip_score: float | None = None
    clip_image_embedding: bytes | None = None  # float16, normalised (filter.store_embeddings)
    clip_text_embedding: bytes | None = None
    conversation_kind: str | None = None
    nsfw_score: float | None = None  # curate's safety check (open_nsfw, 0-1)
    faces: int | None = None  # faces curate found (their boxes are in the JSON)
    image_count: int | None = None  # images of the sample: 0 text-only, 1, or more (None: not recorded)
    image_sha256s: list[str] = field(default_factory=list)  # each image's sha256, for multi-image samples
    image_phashes: list[str] = field(default_factory=list)  # each image's pHash, for multi-image samples
    image_locations: list[str] = field(default_factory=list)  # each image's URL or path, for multi-image samples
    turns: int | None = None  # conversation turns the sample carries (None or 0: none)
    mix_source: str | None = None  # the `visinstruct mix` source the sample was drawn from


@dataclass(frozen=True)
class ShardStats(Record):
    """The ``NNNNN_stats.json`` of a shard, written last: its presence marks the shard complete."""

    shard: int
    stage: str
    inputs: int
    written: int
    rejected: int
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    tar_bytes: int = 0
    duration_s: float = 0.0
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        if self.inputs != self.written + self.rejected:
            raise ValueError(
                f"shard {self.shard}: inputs ({self.inputs}) != written ({self.written}) + rejected ({self.rejected})"
            )
        if sum(self.rejected_by_reason.values()) != self.rejected:
            raise ValueError(f"shard {self.shard}: rejections by reason do not add up to {self.rejected}")
