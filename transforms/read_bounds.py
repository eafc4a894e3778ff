"""What one input row may hold, what the read stage says about a row that does not fit, and reading text within bounds.

Bounds (a row over one is dropped with reason ``field_too_long``): :data:`MAX_URL_CHARS` for a URL,
:data:`MAX_CAPTION_CHARS` for a caption, :data:`MAX_ROW_CHARS` for a line of csv/tsv/jsonl/txt or any other cell.
Text must be UTF-8: bytes that are not are kept as surrogates (``surrogateescape``) for :func:`pair_problem` to
find, so a row holding them is dropped as ``bad_encoding`` (never guessed at) and the rows around it are read as
usual. Lines are read at most :data:`MAX_ROW_CHARS` at a time (:func:`lines`), so a 1 GB line never sits in memory.

The read stage's verdict on a row that cannot become a pair is a :class:`~visinstruct.schemas.Decision` made by
:func:`bad_row`; a whole input that cannot be read raises :class:`InputError` when the pipeline is planned.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterator

from apache_beam.io.filesystems import FileSystems

from visinstruct.configs import ConfigError
from visinstruct.schemas import Decision, ImageTextPair, is_url
from visinstruct.transforms.fetch import CONTROL_CHARS, MAX_URL_CHARS  # the fetcher's own checks, applied early

MAX_CAPTION_CHARS = 64 * 1024  # 10x the longest dense captions in public datasets
MAX_ROW_CHARS = 4 * 2**20  # one csv/tsv/jsonl/txt line, or any other cell; also the csv parser's field limit
EXCERPT = 500  # characters of a bad row kept in its dead-letter row
SURROGATE = re.compile("[\ud800-\udfff]")  # undecodable bytes (surrogateescape), or a lone \\ud800 from JSON
DELIMITERS = {"csv": ",", "tsv": "\t"}


class InputError(ConfigError):
    """The input cannot be read at all (missing file, unknown format, a named column it lacks); one line."""


def bad_row(reason: str, message: str, raw: str = "", url: str | None = None) -> Decision:
    """The read stage's drop of one row.

    ``detail["raw"]`` is always there (the dead-letter table's excerpt of the row, ``""`` when there is none to
    show); the row's URL, when it has one, is its ``url`` index column, which the dead-letter row carries.
    """
    return Decision.drop(reason, message, {"raw": raw}, url=url)


def excerpt(text: str) -> str:
    """At most :data:`EXCERPT` characters of ``text``, valid UTF-8 (undecodable bytes become U+FFFD)."""
    return SURROGATE.sub("\ufffd", text[:EXCERPT])


MAX_IMAGES_PER_ROW = 256  # a multi-image row's images (interleaved data and video frames stay far below)


def pair_problem(pair: ImageTextPair) -> Decision | None:
    """The drop of a pair unfit to carry on (a field over its bound, NUL in text, bad UTF-8), or ``None``.

    A multi-image row's every image location is held to the bounds of a row's one URL or path.
    """
    url = excerpt(pair.url) if pair.url else None
    if len(pair.images) > MAX_IMAGES_PER_ROW:
        return bad_row("too_many_images", f"{len(pair.images)} images, over {MAX_IMAGES_PER_ROW}", url=url)
    locations = [(pair.url, True), (pair.path, False)]
    locations += [(i.location, is_url(i.location)) for i in pair.images if i.location]
    for location, url_like in locations:
        problem = location_problem(location, url_like) if location is not None else None
        if problem is not None:
            return problem
    for caption in ([pair.caption] if pair.caption is not None else []) + pair.captions:
        if len(caption) > MAX_CAPTION_CHARS:
            return bad_row(
                "field_too_long", f"a caption is {len(caption)} characters, over {MAX_CAPTION_CHARS}", url=url
            )
        if SURROGATE.search(caption):
            return bad_row("bad_encoding", "a caption holds bytes that are not UTF-8", url=url)
        if "\x00" in caption:
            return bad_row("bad_caption", "a caption holds a NUL character", url=url)
    if not (pair.source or pair.conversations or pair.tags or pair.boxes):
        return None
    turns, categories = [t.value for t in pair.conversations], [b.category for b in pair.boxes]
    rest = json.dumps([pair.source, turns, pair.tags, categories], ensure_ascii=False)
    if len(rest) > MAX_ROW_CHARS:
        return bad_row(
            "field_too_long", f"tags, boxes, conversations and saved columns exceed {MAX_ROW_CHARS}", url=url
        )
    if SURROGATE.search(rest):
        return bad_row("bad_encoding", "a saved column, tag or turn holds bytes that are not UTF-8", url=url)
    return None


def contained_path(name: str, root: str | None) -> str | None:
    """An input row's image path resolved under ``root`` (``read.image_root``), or None when it would leave it (an
    absolute path elsewhere, ``..``, another filesystem) or there is no root: a downloaded dataset or annotation file
    must not make ingest read the user's own files or buckets."""
    if not root:
        return None
    if "://" in root:  # a bucket: a name inside it, or a relative name joined to it, never climbing out
        prefix = root.rstrip("/") + "/"
        full = name if "://" in name else prefix + name
        return full if full.startswith(prefix) and ".." not in full[len(prefix) :].split("/") else None
    base = os.path.normpath(root)
    full = os.path.normpath(name if os.path.isabs(name) else os.path.join(base, name))
    return full if "://" not in name and full.startswith(base.rstrip(os.sep) + os.sep) else None


def location_problem(location: str, is_url: bool) -> Decision | None:
    """The drop of an image URL over its bound, not UTF-8 or holding a control character; of a file name that is
    not UTF-8 or over the same bound."""
    shown = excerpt(location) if is_url else None
    what = "URL" if is_url else "file name"
    if len(location) > MAX_URL_CHARS:
        return bad_row("field_too_long", f"the {what} is {len(location)} characters, over {MAX_URL_CHARS}", url=shown)
    if SURROGATE.search(location):
        return bad_row(
            "bad_encoding",
            "the URL holds bytes that are not UTF-8" if is_url else "the file name is not UTF-8",
            url=shown,
        )
    if is_url and CONTROL_CHARS.search(location):
        return bad_row("bad_url", "the URL holds a control character (NUL, CR, LF, ...)", url=shown)
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Text files, line by line within the bound


def open_input(path: str):
    """A local or remote input file as binary, decompressed by its extension (``.gz``, ``.bz2``...)."""
    return FileSystems.open(path, mime_type="application/octet-stream", compression_type="auto")


class _Raw(io.RawIOBase):
    """Beam's ``CompressedFile`` (``.gz``, ``.bz2``...) as the raw stream ``TextIOWrapper`` needs."""

    def __init__(self, f):
        self.f = f

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.f.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def text(f, newline: str | None = None) -> io.TextIOWrapper:
    """Text of a binary file: UTF-8 (a leading BOM dropped), undecodable bytes kept as surrogates for the row
    check to find, so one bad line costs that line, not the file."""
    binary = f if isinstance(f, io.IOBase) else io.BufferedReader(_Raw(f))
    return io.TextIOWrapper(binary, encoding="utf-8-sig", errors="surrogateescape", newline=newline)


def lines(stream: io.TextIOWrapper) -> Iterator[tuple[str, bool]]:
    """Physical lines, read at most :data:`MAX_ROW_CHARS` at a time; ``True`` marks a longer line (cut, and the
    rest of it skipped)."""
    while True:
        line = stream.readline(MAX_ROW_CHARS)
        if not line:
            return
        if len(line) < MAX_ROW_CHARS or line.endswith(("\n", "\r")):
            yield line, False
            continue
        rest = line
        while rest and not rest.endswith(("\n", "\r")):
            rest = stream.readline(MAX_ROW_CHARS)
        yield line, True


def too_long_line(number: int, line: str) -> Decision:
    return bad_row("field_too_long", f"line {number} is longer than {MAX_ROW_CHARS} characters", excerpt(line))


def json_object(line: str) -> dict | None:
    """A line as a JSON object, or ``None`` when it is not one (any other JSON value, or no JSON at all)."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return row if isinstance(row, dict) else None


# ---------------------------------------------------------------------------------------------------------------------
# csv/tsv records: where a quoted field ends, so a parser error costs one record


def csv_reader(records: Iterator[str], fmt: str):
    csv.field_size_limit(MAX_ROW_CHARS)  # the default 128 KiB would fail the whole file on one long caption
    return csv.reader(records, delimiter=DELIMITERS[fmt])


def still_quoted(line: str, delimiter: str, inside: bool) -> bool:
    """Whether a csv/tsv line ends inside a quoted field, given whether it starts inside one.

    Follows Python's csv reader (``"`` quotes, ``""`` escapes, non-strict), jumping with ``str.find``.
    """
    i, n, field_start = 0, len(line), not inside
    while i < n:
        if inside:
            j = line.find('"', i)
            if j < 0:
                return True
            if line.startswith('"', j + 1):  # an escaped quote
                i = j + 2
                continue
            inside, field_start, i = False, False, j + 1  # what follows the closing quote is plain text
        elif field_start and line[i] == '"':
            inside, i = True, i + 1
        else:
            j = line.find(delimiter, i)
            if j < 0:
                return False
            field_start, i = True, j + 1
    return inside


class CsvFeed:
    """The physical lines of a csv/tsv file as the csv reader takes them: numbered, a cut line as an empty one.

    Knows whether the record being parsed is inside a quoted field at the end of the lines taken (for the
    recovery after a parser error), folding its lines into that one bit when they get long, so memory stays
    bounded.
    """

    def __init__(self, stream: io.TextIOWrapper, delimiter: str):
        self._lines, self.delimiter = lines(stream), delimiter
        self.number = 0  # lines taken so far
        self.start_record()

    def start_record(self) -> None:
        self.first, self.cut = self.number + 1, False  # the record's first line; whether a line of it was cut
        self._kept, self._size, self._inside = [], 0, False

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line, cut = next(self._lines)
        self.number += 1
        self.cut |= cut
        line = "\n" if cut else line
        self._kept.append(line)
        self._size += len(line)
        if self._size > MAX_ROW_CHARS:
            self._inside, self._kept, self._size = self.inside(), [], 0
        return line

    def inside(self) -> bool:
        """Whether the lines taken end inside a quoted field of the record being parsed."""
        inside = self._inside
        for line in self._kept:
            inside = still_quoted(line, self.delimiter, inside)
        return inside

    def skip_record(self) -> bool:
        """Read on to the end of the record being parsed; ``False`` when it does not end within
        :data:`MAX_ROW_CHARS` more characters (the rest of the file is one open quoted field)."""
        inside, skipped = self.inside(), 0
        while inside:
            line, cut = next(self._lines, ("", False))
            if not line:
                return True  # the quoted field runs to the end of the file, as the parser would read it
            self.number += 1
            skipped += len(line)
            if cut or skipped > MAX_ROW_CHARS:
                return False
            inside = still_quoted(line, self.delimiter, True)
        return True
