"""URL lists (parquet, csv, tsv, jsonl, txt): their columns, their rows, and a row as an :class:`ImageTextPair`.

A reader (:data:`LIST_READERS`) yields each row of one file as a ``dict``, or the drop of a row that is not one
(a line over the bound, a csv record that does not parse, a parquet cell that does not convert);
:func:`pair_from_row` turns a ``dict`` into a pair with img2dataset's column options. A csv/tsv quoted field over
the bound is one dropped row up to where the field ends (text inside it never becomes rows); one that does not
end within another bound's worth of characters ends the file with one ``unreadable_file`` row, the rows before it
kept.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import zlib
from collections.abc import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from visinstruct.configs import ReadConfig
from visinstruct.schemas import Box, Decision, ImageTextPair, JsonDict
from visinstruct.transforms.read_bounds import (
    DELIMITERS,
    EXCERPT,
    MAX_ROW_CHARS,
    CsvFeed,
    InputError,
    bad_row,
    csv_reader,
    excerpt,
    json_object,
    lines,
    open_input,
    pair_problem,
    text,
    too_long_line,
)

JSONL_SAMPLE = 100  # objects of a jsonl file whose keys are its columns when the run is planned
log = logging.getLogger(__name__)


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
        with open_input(path) as f:
            if fmt == "parquet":
                return list(pq.read_schema(f).names)
            if fmt in DELIMITERS:
                reader = csv_reader((line for line, _ in lines(text(f, newline=""))), fmt)
                return [excerpt(c) for c in next(reader, [])]
            keys: dict[str, None] = {}
            for (line, cut), _ in zip(lines(text(f)), range(JSONL_SAMPLE)):
                row = json_object(line) if not cut else None
                keys.update(dict.fromkeys(row or {}))
            return list(keys)
    except (OSError, ValueError, EOFError, zlib.error, pa.ArrowException, csv.Error) as e:
        raise InputError(f"{path}: cannot read it as {fmt}: {type(e).__name__}: {e}"[:EXCERPT]) from None


# ---------------------------------------------------------------------------------------------------------------------
# A row as a pair


def pair_from_row(row: dict, cfg: ReadConfig) -> ImageTextPair | Decision:
    """A URL-list row as a pair, with img2dataset's column options; its drop when it cannot be one."""
    if cfg.url_col not in row:  # a later file of a glob without the column, or a sparse jsonl row
        return bad_row("missing_column", f"row has no column {cfg.url_col!r}", _raw(row))
    url = row[cfg.url_col]
    if url is None or (isinstance(url, str) and not url.strip()):
        return bad_row("missing_url", f"column {cfg.url_col!r} is empty", _raw(row))
    if not isinstance(url, str):
        return bad_row("bad_url", f"column {cfg.url_col!r} holds {type(url).__name__}, not text", _raw(row))
    url = url.strip()
    caption = None
    if cfg.caption_col is not None:
        caption = row.get(cfg.caption_col)
        if caption is not None and not isinstance(caption, str):
            return bad_row("bad_caption", f"column {cfg.caption_col!r} is not text", _raw(row), excerpt(url))
    try:
        source = JsonDict({c: plain_value(row.get(c)) for c in cfg.save_additional_columns if c in row})
    except UnicodeDecodeError:
        return bad_row("bad_encoding", "a saved column holds bytes that are not UTF-8", _raw(row), excerpt(url))
    try:
        boxes = [Box(str(b["category"]), [float(v) for v in b["bbox"]]) for b in listish(row, cfg.boxes_col)]
        tags = [str(t) for t in listish(row, cfg.tags_col)]
    except (KeyError, TypeError, ValueError, RecursionError) as e:
        return bad_row("bad_box", f"boxes or tags do not parse: {e}"[:EXCERPT], _raw(row), excerpt(url))
    pair = ImageTextPair(key="", url=url, caption=caption, boxes=boxes, tags=tags, source=source)
    problem = pair_problem(pair)
    if problem is None:
        return pair
    return bad_row(problem.reason, problem.message, _raw(row), problem.index.get("url"))


def _raw(row: dict) -> str:
    """A row's dead-letter excerpt; made only for a row that is dropped (most never are)."""
    return excerpt(json.dumps({k: _short(v) for k, v in row.items()}, default=repr, ensure_ascii=False))


def _short(value):
    """A value cut for an excerpt (a 1 MB caption must not be copied whole into a dead-letter row)."""
    return value[:EXCERPT] if isinstance(value, (str, bytes)) else value


def plain_value(value):
    """A cell as a JSON-safe value: bytes decoded as UTF-8 (or ``UnicodeDecodeError``), dates as text."""
    if value is None or isinstance(value, (str, int, float)):
        return value
    return json.loads(json.dumps(value, default=lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)))


def listish(row: dict, column: str | None) -> list:
    """A list-valued column: a real list (parquet, jsonl) or JSON text (csv, tsv); empty when absent."""
    value = row.get(column) if column else None
    if value is None or value == "":
        return []
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, list):
        raise TypeError(f"column {column!r} holds {type(value).__name__}, not a list")
    return value


# ---------------------------------------------------------------------------------------------------------------------
# The rows of one file, per format


def _parquet_rows(path: str, fmt: str, cfg: ReadConfig) -> Iterator[dict | Decision]:
    """A parquet file's rows, read a batch at a time: a list of millions of URLs never sits in memory whole (the
    reading worker's memory stays flat). Damage found past the footer ends the file with an ``unreadable_file``
    row after the rows before it (:func:`~visinstruct.transforms.read.read_unit`)."""
    with open_input(path) as f:
        try:
            batches = pq.ParquetFile(f).iter_batches(batch_size=1024)
        except (OSError, ValueError, pa.ArrowException) as e:
            yield bad_row("unreadable_file", excerpt(f"{path}: not a readable parquet file: {e}"))
            return
        yield from batch_rows(batches)


def batch_rows(batches: Iterable[pa.RecordBatch]) -> Iterator[dict | Decision]:
    """The rows of arrow batches as dicts; a row with a cell that does not convert (invalid UTF-8 in a string
    column) is a ``bad_encoding`` drop, and the batch's other rows are kept."""
    for batch in batches:
        try:
            yield from batch.to_pylist()
            continue
        except (ValueError, UnicodeError, pa.ArrowException):
            pass  # one cell does not convert: find it row by row
        for i in range(batch.num_rows):
            try:
                yield batch.slice(i, 1).to_pylist()[0]
            except (ValueError, UnicodeError, pa.ArrowException) as e:
                yield bad_row("bad_encoding", excerpt(f"row {i} of a batch does not convert: {e}"))


def _delimited_rows(path: str, fmt: str, cfg: ReadConfig) -> Iterator[dict | Decision]:
    """csv/tsv rows. After a parser error (a quoted field over the bound), reading goes on after the end of that
    quoted field, so no text inside it is read as rows; when it does not end within the bound, the rest of the
    file is one ``unreadable_file`` row."""
    with open_input(path) as f:
        feed = CsvFeed(text(f, newline=""), DELIMITERS[fmt])
        reader = csv_reader(feed, fmt)
        header = None
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                reason = "field_too_long" if "field larger" in str(e) else "malformed_row"
                first, ended = feed.first, feed.skip_record()
                where = f"line {first}" if feed.number == first else f"lines {first}-{feed.number}"
                yield bad_row(reason, f"{where}: {e}")
                if not ended:
                    yield bad_row(
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
                yield too_long_line(feed.number, ",".join(fields))
            elif header is None:
                header = fields or None
            elif fields and len(fields) != len(header):
                yield bad_row(
                    "malformed_row",
                    f"{len(fields)} fields where the header has {len(header)}",
                    excerpt(",".join(fields)),
                )
            elif fields:
                yield dict(zip(header, fields))
            feed.start_record()


def _jsonl_rows(path: str, fmt: str, cfg: ReadConfig) -> Iterator[dict | Decision]:
    with open_input(path) as f:
        for number, (line, cut) in enumerate(lines(text(f)), 1):
            if cut:
                yield too_long_line(number, line)
            elif line.strip():
                row = json_object(line)
                yield (
                    row
                    if row is not None
                    else bad_row("malformed_row", f"line {number} is not a JSON object", excerpt(line))
                )


def _txt_rows(path: str, fmt: str, cfg: ReadConfig) -> Iterator[dict | Decision]:
    with open_input(path) as f:
        for number, (line, cut) in enumerate(lines(text(f)), 1):
            if cut:
                yield too_long_line(number, line)
            elif line.strip():
                yield {cfg.url_col: line.strip()}


LIST_READERS: dict[str, Callable[[str, str, ReadConfig], Iterator[dict | Decision]]] = {
    "parquet": _parquet_rows,
    "csv": _delimited_rows,
    "tsv": _delimited_rows,
    "jsonl": _jsonl_rows,
    "txt": _txt_rows,
}
