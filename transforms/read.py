"""Read input rows: URL lists (parquet, csv, tsv, jsonl, txt), image folders, COCO annotations, LLaVA JSON.

A *unit* is what one reader call consumes: one URL-list file, or a whole folder / set of annotation files
(they must be merged before rows can be numbered). :func:`read_unit` yields, in a deterministic order, either
an :class:`ImageTextPair` without its key (the pipeline numbers rows globally) or a :class:`BadRow` for a
malformed row, which the pipeline dead-letters. Nothing one row holds makes it raise: over-long fields, NUL
bytes, bad UTF-8, wrong cell types, broken lines and any unexpected exception (reason ``internal_error``) cost
that row only. A missing or unreadable input, or a ``*_col`` option naming a column the input lacks, raises
:class:`InputError` (a :class:`ConfigError`) with a one-line message when the pipeline is planned.

Bounds (a row over one is rejected with reason ``field_too_long``): :data:`MAX_URL_CHARS` for a URL,
:data:`MAX_CAPTION_CHARS` for a caption, :data:`MAX_ROW_CHARS` for a line of csv/tsv/jsonl/txt or any other
cell. Text must be UTF-8: a row with bytes that are not is rejected as ``bad_encoding`` (never guessed at),
the rows around it are read as usual. A csv/tsv quoted field over the bound is one rejected row up to where
the field ends (text inside it never becomes rows); one that does not end within another bound's worth of
characters ends the file with one ``unreadable_file`` row, the rows before it kept.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from visinstruct.configs import ConfigError, ReadConfig
from visinstruct.schemas import Box, ImageTextPair, JsonDict, Rejection
from visinstruct.transforms.fetch import CONTROL_CHARS, MAX_URL_CHARS  # as for redirects; re-exported
from visinstruct.transforms.guard import guarded

MAX_CAPTION_CHARS = 64 * 1024  # 10x the longest dense captions in public datasets
MAX_ROW_CHARS = 4 * 2**20  # one csv/tsv/jsonl/txt line, or any other cell; also the csv parser's field limit
EXCERPT = 500  # characters of a bad row kept in its dead-letter row
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
_BY_EXTENSION = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".txt": "txt",
    ".json": "json",
}  # COCO or LLaVA: told apart by content
_SURROGATE = re.compile("[\ud800-\udfff]")  # undecodable bytes (surrogateescape), or a lone \\ud800 from JSON
JSONL_SAMPLE = 100  # objects of a jsonl file whose keys are its columns when the run is planned
log = logging.getLogger(__name__)


class InputError(ConfigError):
    """The input cannot be read at all (missing file, unknown format, a named column it lacks); one line."""


@dataclass(frozen=True)
class BadRow:
    """A row that cannot become a pair; ``raw`` keeps a bounded excerpt for the dead-letter table."""

    reason: str
    message: str
    raw: str = ""
    url: str | None = None


def excerpt(text: str) -> str:
    """At most :data:`EXCERPT` characters of ``text``, valid UTF-8 (undecodable bytes become U+FFFD)."""
    return _SURROGATE.sub("\ufffd", text[:EXCERPT])


def _open(path: str):
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


def _text(f, newline: str | None = None) -> io.TextIOWrapper:
    """Text of a binary file: UTF-8 (a leading BOM dropped), undecodable bytes kept as surrogates for the row
    check to find, so one bad line costs that line, not the file."""
    binary = f if isinstance(f, io.IOBase) else io.BufferedReader(_Raw(f))
    return io.TextIOWrapper(binary, encoding="utf-8-sig", errors="surrogateescape", newline=newline)


def _lines(text: io.TextIOWrapper) -> Iterator[tuple[str, bool]]:
    """Physical lines, read at most :data:`MAX_ROW_CHARS` at a time; ``True`` marks a longer line (cut, and the
    rest of it skipped), so a 1 GB line never sits in memory."""
    while True:
        line = text.readline(MAX_ROW_CHARS)
        if not line:
            return
        if len(line) < MAX_ROW_CHARS or line.endswith(("\n", "\r")):
            yield line, False
            continue
        rest = line
        while rest and not rest.endswith(("\n", "\r")):
            rest = text.readline(MAX_ROW_CHARS)
        yield line, True


def _too_long_line(number: int, line: str) -> BadRow:
    return BadRow("field_too_long", f"line {number} is longer than {MAX_ROW_CHARS} characters", excerpt(line))


def detect_format(path: str, cfg: ReadConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    ext = os.path.splitext(path.rstrip("/"))[1].lower()
    if ext in _BY_EXTENSION:
        return _BY_EXTENSION[ext]
    raise InputError(f"{path}: cannot tell the input format from the extension; set read.format")


def plan_units(cfg: ReadConfig) -> list[tuple[str, list[str]]]:
    """``[(format, [paths])]`` in a fixed order: the input glob expanded and sorted by name.

    Also checks that every column the ``*_col`` options name is in the input (:func:`check_columns`), so a
    typo fails here, at pipeline construction, instead of rejecting every row.
    """
    fmt = cfg.format
    if fmt == "folder" or (fmt == "auto" and _is_folder(cfg.path)):
        return [("folder", [cfg.path])]
    matches = sorted(m.path for m in FileSystems.match([cfg.path])[0].metadata_list)
    if not matches:
        raise InputError(f"{cfg.path}: no input file matches")
    formats = {detect_format(p, cfg) for p in matches}
    if len(formats) > 1:
        raise InputError(
            f"{cfg.path}: files of several formats match ({', '.join(sorted(formats))}); "
            "set read.format or narrow the pattern"
        )
    fmt = formats.pop()
    if fmt in ("coco", "llava", "json"):  # one unit: annotation files are merged before numbering
        return [(fmt, matches)]
    check_columns(fmt, matches, cfg)
    return [(fmt, [p]) for p in matches]


def _is_folder(path: str) -> bool:
    return "://" not in path and os.path.isdir(path)


def named_columns(cfg: ReadConfig) -> list[tuple[str, str]]:
    """``(option, column)`` for every column the config names and the input must have.

    ``caption_col`` at its default (``caption``) is optional: URL lists without captions are common.
    """
    named = [("url_col", cfg.url_col)]
    if cfg.caption_col is not None and cfg.caption_col != "caption":
        named.append(("caption_col", cfg.caption_col))
    named += [(option, getattr(cfg, option)) for option in ("boxes_col", "tags_col") if getattr(cfg, option)]
    return named + [("save_additional_columns", c) for c in cfg.save_additional_columns]


def check_columns(fmt: str, paths: list[str], cfg: ReadConfig) -> None:
    """Raise :class:`InputError` when a named column is not in the first input file that has any columns.

    Looks at the parquet schema, the csv/tsv header, or the keys of a jsonl file's first :data:`JSONL_SAMPLE`
    objects. jsonl objects need not share keys, so there only ``url_col`` and an explicitly named ``caption_col``
    must be in the sample; an optional column (boxes, tags, saved columns) missing from it is a warning.
    """
    if fmt == "txt":
        return  # one URL per line: there are no columns to name
    for path in paths[:10]:  # an empty first file says nothing; give up after a few
        columns = input_columns(fmt, path)
        if not columns:
            continue
        for option, column in named_columns(cfg):
            if column in columns:
                continue
            name = os.path.basename(path)
            if fmt == "jsonl" and option not in ("url_col", "caption_col"):
                log.warning(
                    "read.%s: column %r not in the first %d objects of %s; objects without it are read without it",
                    option,
                    column,
                    JSONL_SAMPLE,
                    name,
                )
                continue
            shown = ", ".join(columns[:30]) + (f", ... ({len(columns)} in all)" if len(columns) > 30 else "")
            raise InputError(f"read.{option}: column {column!r} not in {name} (columns: {shown})")
        return


def input_columns(fmt: str, path: str) -> list[str]:
    """The columns of one URL-list file, in file order; ``[]`` for an empty file."""
    try:
        with _open(path) as f:
            if fmt == "parquet":
                return list(pq.read_schema(f).names)
            if fmt in ("csv", "tsv"):
                reader = _csv_reader((line for line, _ in _lines(_text(f, newline=""))), fmt)
                return [excerpt(c) for c in next(reader, [])]
            keys: dict[str, None] = {}
            for (line, cut), _ in zip(_lines(_text(f)), range(JSONL_SAMPLE)):
                row = _json_object(line) if not cut else None
                keys.update(dict.fromkeys(row or {}))
            return list(keys)
    except (OSError, ValueError, EOFError, zlib.error, pa.ArrowException, csv.Error) as e:
        raise InputError(f"{path}: cannot read it as {fmt}: {type(e).__name__}: {e}"[:EXCERPT]) from None


def _json_object(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return row if isinstance(row, dict) else None


def read_unit(fmt: str, paths: list[str], cfg: ReadConfig) -> Iterator[ImageTextPair | BadRow]:
    """Every row of one unit, in order; pairs carry ``key=""`` until the pipeline numbers them.

    Each row is converted under :func:`guarded`: an unexpected exception becomes that row's ``internal_error``.
    A reader that fails mid-file (a corrupt compressed stream) ends the unit with one ``unreadable_file`` row.
    """
    if fmt in _READERS:
        rows, convert = _reader_rows(_READERS[fmt](paths[0], fmt, cfg), paths[0]), pair_from_row
    elif fmt in ("folder", "coco", "llava", "json"):
        from visinstruct.transforms.read_sources import source_rows  # it imports this module

        records, build = source_rows(fmt, paths, cfg)
        rows, convert = _reader_rows(records, paths[0]), lambda record, c: _checked(build(record, c))
    else:
        raise InputError(f"unknown input format {fmt!r}")
    for row in rows:
        if isinstance(row, BadRow):
            yield row
            continue
        out = guarded("read", lambda: convert(row, cfg))  # noqa: B023 - called at once, inside this iteration
        if isinstance(out, Rejection):
            out = BadRow(out.reason, out.message, excerpt(repr(row)[:EXCERPT]))
        yield out


def _reader_rows(rows: Iterator, path: str) -> Iterator:
    """A reader's rows; when the reader itself raises mid-file, one ``unreadable_file`` row says where it stopped."""
    count = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - the rest of the file cannot be parsed; say so and go on
            yield BadRow(
                "unreadable_file", excerpt(f"{path}: reading stopped after {count} rows: {type(e).__name__}: {e}")
            )
            return
        count += 1
        yield row


def _checked(pair: ImageTextPair | BadRow) -> ImageTextPair | BadRow:
    problem = pair_problem(pair) if isinstance(pair, ImageTextPair) else None
    return pair if problem is None else problem


def _folder_pairs(folder: str) -> Iterator[ImageTextPair]:
    """The readable images of a folder as pairs (reference sets for dedup)."""
    from visinstruct.transforms.read_sources import folder_images, folder_pair

    for path in folder_images(folder):
        pair = folder_pair(path)
        if isinstance(pair, ImageTextPair):
            yield pair


def pair_from_row(row: dict, cfg: ReadConfig) -> ImageTextPair | BadRow:
    """A URL-list row as a pair, with img2dataset's column options; ``BadRow`` when it cannot be one."""
    if cfg.url_col not in row:  # a later file of a glob without the column, or a sparse jsonl row
        return BadRow("missing_column", f"row has no column {cfg.url_col!r}", _raw(row))
    url = row[cfg.url_col]
    if url is None or (isinstance(url, str) and not url.strip()):
        return BadRow("missing_url", f"column {cfg.url_col!r} is empty", _raw(row))
    if not isinstance(url, str):
        return BadRow("bad_url", f"column {cfg.url_col!r} holds {type(url).__name__}, not text", _raw(row))
    url = url.strip()
    caption = None
    if cfg.caption_col is not None:
        caption = row.get(cfg.caption_col)
        if caption is not None and not isinstance(caption, str):
            return BadRow("bad_caption", f"column {cfg.caption_col!r} is not text", _raw(row), excerpt(url))
    try:
        source = JsonDict({c: _plain(row.get(c)) for c in cfg.save_additional_columns if c in row})
    except UnicodeDecodeError:
        return BadRow("bad_encoding", "a saved column holds bytes that are not UTF-8", _raw(row), excerpt(url))
    try:
        boxes = [Box(str(b["category"]), [float(v) for v in b["bbox"]]) for b in _listish(row, cfg.boxes_col)]
        tags = [str(t) for t in _listish(row, cfg.tags_col)]
    except (KeyError, TypeError, ValueError, RecursionError) as e:
        return BadRow("bad_box", f"boxes or tags do not parse: {e}"[:EXCERPT], _raw(row), excerpt(url))
    pair = ImageTextPair(key="", url=url, caption=caption, boxes=boxes, tags=tags, source=source)
    problem = pair_problem(pair)
    return pair if problem is None else BadRow(problem.reason, problem.message, _raw(row), problem.url)


def pair_problem(pair: ImageTextPair) -> BadRow | None:
    """What makes a pair unfit to carry on (too long, NUL in text, bad UTF-8), or ``None``."""
    url = excerpt(pair.url) if pair.url else None
    if pair.url is not None:
        if len(pair.url) > MAX_URL_CHARS:
            return BadRow("field_too_long", f"the URL is {len(pair.url)} characters, over {MAX_URL_CHARS}", "", url)
        if _SURROGATE.search(pair.url):
            return BadRow("bad_encoding", "the URL holds bytes that are not UTF-8", "", url)
        if CONTROL_CHARS.search(pair.url):
            return BadRow("bad_url", "the URL holds a control character (NUL, CR, LF, ...)", "", url)
    if pair.path is not None and _SURROGATE.search(pair.path):
        return BadRow("bad_encoding", "the file name is not UTF-8", "", None)
    for caption in ([pair.caption] if pair.caption is not None else []) + pair.captions:
        if len(caption) > MAX_CAPTION_CHARS:
            return BadRow(
                "field_too_long", f"a caption is {len(caption)} characters, over {MAX_CAPTION_CHARS}", "", url
            )
        if _SURROGATE.search(caption):
            return BadRow("bad_encoding", "a caption holds bytes that are not UTF-8", "", url)
        if "\x00" in caption:
            return BadRow("bad_caption", "a caption holds a NUL character", "", url)
    if not (pair.source or pair.conversations or pair.tags or pair.boxes):
        return None
    turns, categories = [t.value for t in pair.conversations], [b.category for b in pair.boxes]
    rest = json.dumps([pair.source, turns, pair.tags, categories], ensure_ascii=False)
    if len(rest) > MAX_ROW_CHARS:
        return BadRow(
            "field_too_long", f"tags, boxes, conversations and saved columns exceed {MAX_ROW_CHARS}", "", url
        )
    if _SURROGATE.search(rest):
        return BadRow("bad_encoding", "a saved column, tag or turn holds bytes that are not UTF-8", "", url)
    return None


def _raw(row: dict) -> str:
    """A row's dead-letter excerpt; made only for a row that is rejected (most never are)."""
    return excerpt(json.dumps({k: _short(v) for k, v in row.items()}, default=repr, ensure_ascii=False))


def _short(value):
    """A value cut for an excerpt (a 1 MB caption must not be copied whole into a dead-letter row)."""
    return value[:EXCERPT] if isinstance(value, (str, bytes)) else value


def _plain(value):
    """A cell as a JSON-safe value: bytes decoded as UTF-8 (or ``UnicodeDecodeError``), dates as text."""
    if value is None or isinstance(value, (str, int, float)):
        return value
    return json.loads(json.dumps(value, default=lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)))


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


def _parquet_rows(path: str, fmt: str, cfg: ReadConfig) -> Iterator[dict | BadRow]:
    with _open(path) as f:
        try:
            table = pq.read_table(f)
        except (OSError, ValueError, pa.ArrowException) as e:
            yield BadRow("unreadable_file", excerpt(f"{path}: not a readable parquet file: {e}"))
            return
    for batch in table.to_batches(max_chunksize=1024):
        try:
            yield from batch.to_pylist()
            continue
        except (ValueError, UnicodeError, pa.ArrowException):
            pass  # one cell does not convert (invalid UTF-8 in a string column): find it row by row
        for i in range(batch.num_rows):
            try:
                yield batch.slice(i, 1).to_pylist()[0]
            except (ValueError, UnicodeError, pa.ArrowException) as e:
                yield BadRow("bad_encoding", excerpt(f"row {i} of a batch does not convert: {e}"))


_DELIMITERS = {"csv": ",", "tsv": "\t"}


def _csv_reader(lines: Iterator[str], fmt: str):
    csv.field_size_limit(MAX_ROW_CHARS)  # the default 128 KiB would fail the whole file on one long caption
    return csv.reader(lines, delimiter=_DELIMITERS[fmt])


def _still_quoted(line: str, delimiter: str, inside: bool) -> bool:
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


class _Feed:
    """The physical lines of a csv/tsv file as the csv reader takes them: numbered, a cut line as an empty one.

    Knows whether the record being parsed is inside a quoted field at the end of the lines taken (for the
    recovery after a parser error), folding its lines into that one bit when they get long, so memory stays
    bounded.
    """

    def __init__(self, text: io.TextIOWrapper, delimiter: str):
        self._lines, self.delimiter = _lines(text), delimiter
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
            inside = _still_quoted(line, self.delimiter, inside)
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
            inside = _still_quoted(line, self.delimiter, True)
        return True


def _delimited_rows(path: str, fmt: str, cfg: ReadConfig) -> Iterator[dict | BadRow]:
    """csv/tsv rows. After a parser error (a quoted field over the bound), reading goes on after the end of that
    quoted field, so no text inside it is read as rows; when it does not end within the bound, the rest of the
    file is one ``unreadable_file`` row."""
    with _open(path) as f:
        feed = _Feed(_text(f, newline=""), _DELIMITERS[fmt])
        reader = _csv_reader(feed, fmt)
        header = None
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                reason = "field_too_long" if "field larger" in str(e) else "malformed_row"
                first, ended = feed.first, feed.skip_record()
                lines = f"line {first}" if feed.number == first else f"lines {first}-{feed.number}"
                yield BadRow(reason, f"{lines}: {e}")
                if not ended:
                    yield BadRow(
                        "unreadable_file",
                        excerpt(
                            f"{path}: reading stopped at line {feed.number}: the quoted field of the row on line "
                            f"{first} does not end within {MAX_ROW_CHARS} more characters; the rest of the file "
                            "is not read"
                        ),
                    )
                    return
                feed.start_record()
                continue
            if feed.cut:
                yield _too_long_line(feed.number, ",".join(fields))
            elif header is None:
                header = fields or None
            elif fields and len(fields) != len(header):
                yield BadRow(
                    "malformed_row",
                    f"{len(fields)} fields where the header has {len(header)}",
                    excerpt(",".join(fields)),
                )
            elif fields:
                yield dict(zip(header, fields))
            feed.start_record()


def _jsonl_rows(path: str, fmt: str, cfg: ReadConfig) -> Iterator[dict | BadRow]:
    with _open(path) as f:
        for number, (line, cut) in enumerate(_lines(_text(f)), 1):
            if cut:
                yield _too_long_line(number, line)
            elif line.strip():
                row = _json_object(line)
                yield (
                    row
                    if row is not None
                    else BadRow("malformed_row", f"line {number} is not a JSON object", excerpt(line))
                )


def _txt_rows(path: str, fmt: str, cfg: ReadConfig) -> Iterator[dict | BadRow]:
    with _open(path) as f:
        for number, (line, cut) in enumerate(_lines(_text(f)), 1):
            if cut:
                yield _too_long_line(number, line)
            elif line.strip():
                yield {cfg.url_col: line.strip()}


_READERS = {
    "parquet": _parquet_rows,
    "csv": _delimited_rows,
    "tsv": _delimited_rows,
    "jsonl": _jsonl_rows,
    "txt": _txt_rows,
}
