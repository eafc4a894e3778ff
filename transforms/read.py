"""Read input rows: URL lists (parquet, csv, tsv, jsonl, txt), image folders, COCO annotations, LLaVA JSON, and
Hugging Face datasets (a ``save_to_disk`` folder or parquet files: format ``hf``).

A *unit* is what one reader call consumes: one URL-list file, or a whole folder / set of annotation files
(they must be merged before rows can be numbered). :func:`plan_units` lists them when the pipeline is built;
:func:`read_unit` yields, in a deterministic order, either an :class:`ImageTextPair` without its key (the pipeline
numbers rows globally) or the :class:`~visinstruct.schemas.Decision` that drops a malformed row, which the
pipeline dead-letters. Nothing one row holds makes it raise: over-long fields, NUL bytes, bad UTF-8, wrong cell
types, broken lines and any unexpected exception (reason ``internal_error``) cost that row only. A missing or
unreadable input, or a ``*_col`` option naming a column the input lacks, raises
:class:`~visinstruct.transforms.read_bounds.InputError` (a ``ConfigError``) with a one-line message when the
pipeline is planned.

The formats live in :mod:`~visinstruct.transforms.read_lists` (URL lists),
:mod:`~visinstruct.transforms.read_sources` (folders, COCO, LLaVA) and :mod:`~visinstruct.transforms.read_hf`
(Hugging Face datasets, one unit per data file); the bounds a row must fit, and the bounded
reading of text, in :mod:`~visinstruct.transforms.read_bounds`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import partial

from apache_beam.io.filesystems import FileSystems

from visinstruct.configs import ReadConfig
from visinstruct.schemas import Decision, ImageTextPair, Rejection
from visinstruct.transforms.guard import guarded
from visinstruct.transforms.read_bounds import EXCERPT, InputError, bad_row, excerpt, pair_problem
from visinstruct.transforms.read_hf import hf_files, hf_pair, hf_rows, hf_schema, is_hf_folder, resolve_columns
from visinstruct.transforms.read_lists import LIST_READERS, check_columns, pair_from_row
from visinstruct.transforms.read_sources import source_rows

SOURCE_FORMATS = ("folder", "coco", "llava", "json")  # "json": COCO or LLaVA, told apart by content
_BY_EXTENSION = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".txt": "txt",
    ".json": "json",
}


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
    if fmt == "hf" or (fmt == "auto" and _is_folder(cfg.path) and is_hf_folder(cfg.path)):
        return _hf_units(cfg)
    hf_keys = [k for k in cfg.HF_ONLY if getattr(cfg, k) is not None]
    if hf_keys:  # format auto found another format: the key would be ignored
        raise InputError(f"read.{hf_keys[0]} is read.format hf's, and {cfg.path} is not a Hugging Face dataset")
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
    if fmt in SOURCE_FORMATS:  # one unit: annotation files are merged before numbering
        return [(fmt, matches)]
    check_columns(fmt, matches, cfg)
    return [(fmt, [p]) for p in matches]


def _hf_units(cfg: ReadConfig) -> list[tuple[str, list[str]]]:
    """One unit per data file of a Hugging Face dataset, in row order; the named columns checked in every file (a
    schema is a footer or a stream's first message: cheap), so no file's rows are lost to a missing column."""
    if cfg.url_col != ReadConfig.url_col:
        raise InputError(f"read.url_col: {cfg.path} is a Hugging Face dataset; its images come from read.image_col")
    files = hf_files(cfg)
    for path in files:
        resolve_columns(cfg, hf_schema(path))
    return [("hf", [path]) for path in files]


def _is_folder(path: str) -> bool:
    return "://" not in path and os.path.isdir(path)


def read_unit(fmt: str, paths: list[str], cfg: ReadConfig) -> Iterator[ImageTextPair | Decision]:
    """Every row of one unit, in order; pairs carry ``key=""`` until the pipeline numbers them.

    Each row is converted under :func:`guarded`: an unexpected exception becomes that row's ``internal_error``.
    A reader that fails mid-file (a corrupt compressed stream) ends the unit with one ``unreadable_file`` row.
    """
    if fmt in LIST_READERS:
        rows, convert = _reader_rows(LIST_READERS[fmt](paths[0], fmt, cfg), paths[0]), pair_from_row
    elif fmt == "hf":  # the columns resolved for this file (the image column may be found by its feature)
        resolved = resolve_columns(cfg, hf_schema(paths[0]))
        rows, convert = _reader_rows(hf_rows(paths[0]), paths[0]), lambda row, _: hf_pair(row, resolved)
    elif fmt in SOURCE_FORMATS:
        records, build = source_rows(fmt, paths, cfg)
        rows, convert = _reader_rows(records, paths[0]), lambda record, c: _checked(build(record, c))
    else:
        raise InputError(f"unknown input format {fmt!r}")
    for row in rows:
        if isinstance(row, Decision):
            yield row
            continue
        out = guarded("read", partial(convert, row, cfg))
        if isinstance(out, Rejection):
            out = bad_row(out.reason, out.message, excerpt(repr(row)[:EXCERPT]))
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
        except Exception as e:  # the rest of the file cannot be parsed; say so and go on
            yield bad_row(
                "unreadable_file", excerpt(f"{path}: reading stopped after {count} rows: {type(e).__name__}: {e}")
            )
            return
        count += 1
        yield row


def _checked(pair: ImageTextPair | Decision) -> ImageTextPair | Decision:
    problem = pair_problem(pair) if isinstance(pair, ImageTextPair) else None
    return pair if problem is None else problem
