"""Write and read shard files atomically and reproducibly, on local disk or any Beam filesystem.

- :func:`exists`, :func:`open_read`, :func:`match`, :func:`delete` and :func:`join` use the local filesystem for
  local paths and Beam's ``FileSystems`` only for URLs (``gs://...``), imported on first use: importing Beam
  takes about 2 s, which the shard commands on local folders never pay.
- :func:`atomic_write` writes to a temporary name beside the target and renames on success, so a killed or
  retried Beam bundle never leaves a partial file under a final name.
- :class:`TarShardWriter` writes WebDataset tars with fixed metadata (mtime 0, uid/gid 0, mode 0644, no
  owner names) and records where each member's data lies, for the parquet index.
- :func:`read_tar_samples` reads a tar back as samples, refusing unsafe member names and links.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
import uuid
from collections.abc import Iterator
from typing import BinaryIO, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from visinstruct.schemas import Member, arrow_schema, to_table
from visinstruct.schemas.arrow import field_key

TAR_FORMAT = tarfile.USTAR_FORMAT
END_OF_ARCHIVE = 2 * tarfile.BLOCKSIZE  # two zero blocks close every tar
FILLED_KEY = b"visinstruct:filled_columns"


def is_remote(path: str) -> bool:
    """Whether ``path`` is a URL (``gs://...``) for Beam's filesystems rather than a local path."""
    return "://" in path


def _beam_filesystems():
    """Beam's ``FileSystems``, imported only when a URL needs it (see the module docstring)."""
    from apache_beam.io.filesystems import FileSystems

    return FileSystems


class FileInfo(NamedTuple):
    """A file :func:`match` found: its path and size in bytes."""

    path: str
    size: int


def join(*parts: str) -> str:
    """Join path parts for local paths and URLs (gs://...) alike."""
    return _beam_filesystems().join(*parts) if is_remote(parts[0]) else os.path.join(*parts)


def exists(path: str) -> bool:
    return _beam_filesystems().exists(path) if is_remote(path) else os.path.exists(path)


def open_read(path: str, mime_type: str = "application/octet-stream") -> BinaryIO:
    """``path`` opened for reading bytes, never decompressed. A file that does not exist raises
    ``FileNotFoundError``, local or remote (Beam's GCS reader raises the client's own ``NotFound``, which is not
    even an ``OSError``)."""
    if is_remote(path):
        filesystems = _beam_filesystems()
        try:
            return filesystems.open(path, mime_type=mime_type, compression_type="uncompressed")
        except Exception as e:
            if not filesystems.exists(path):
                raise FileNotFoundError(errno.ENOENT, "no such file", path) from e
            raise
    return open(path, "rb")  # the caller closes it


def delete(paths: list[str]) -> None:
    """Delete files (folders with what they hold); a local path that does not exist raises ``FileNotFoundError``."""
    remote = [p for p in paths if is_remote(p)]
    if remote:
        _beam_filesystems().delete(remote)
    for path in paths:
        if is_remote(path):
            continue
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def match(pattern: str) -> list[FileInfo]:
    """The files a glob or a literal path matches, with their sizes; Beam's ``FileSystems.match`` for a URL.

    Local patterns match as Beam's local filesystem matches them (which this replaced): a literal path matches
    itself when it exists; ``*`` matches within one path segment, ``**`` across segments, ``?`` any one character
    and ``[...]`` a class; dot-files are not special; a pattern ending in ``/`` matches what the folder holds;
    paths come back as the pattern spells them (``./x.tar`` for ``./*.tar``); a glob with no folder part matches
    nothing. Raises ``OSError`` (Beam's ``BeamIOError``) when a remote listing fails.
    """
    if is_remote(pattern):
        return [FileInfo(m.path, m.size_in_bytes) for m in _beam_filesystems().match([pattern])[0].metadata_list]
    if pattern.endswith(("/", "\\")):
        pattern += "*"
    prefix = re.match(r"^[^[*?]*", pattern).group(0)
    if prefix == pattern:
        return [FileInfo(pattern, os.path.getsize(pattern))] if os.path.exists(pattern) else []
    folder, regex = os.path.dirname(prefix), _glob_regex(pattern)
    if not os.path.exists(folder):
        return []
    # Only "**", "?" and "[...]" can match a "/": without them a match has as many slashes as the pattern, so
    # folders deeper than that (a shard folder's rejected/ and _staging/) need no walk.
    depth = None if ("**" in pattern or "?" in pattern or "[" in pattern) else pattern.count("/")
    if depth is not None and os.path.dirname(pattern) == folder:  # only the folder's own files can match
        return _match_in(folder, os.path.basename(prefix), regex)
    found = []
    for parent, folders, files in os.walk(folder):
        if depth is not None:  # a file in a subfolder has one slash more than the subfolder's path
            folders[:] = [d for d in folders if os.path.join(parent, d).count("/") < depth]
        for name in files:
            path = os.path.join(parent, name)
            if regex.match(path):
                with contextlib.suppress(OSError):  # gone since it was listed, or a broken link
                    found.append(FileInfo(path, os.path.getsize(path)))
    return found


def _match_in(folder: str, start: str, regex: re.Pattern) -> list[FileInfo]:
    """The files of ``folder`` (not of its subfolders) whose names begin with ``start`` and whose paths match
    ``regex``, as ``os.walk`` lists them; a name is tested only when it begins with ``start`` (one shard's files
    among thousands in ``_staging/``: a test per name, no path built and matched per name)."""
    found = []
    try:
        entries = os.scandir(folder)
    except OSError:  # not a folder, or unreadable: nothing, as os.walk gives
        return found
    with entries:
        for entry in entries:
            if entry.name.startswith(start) and not entry.is_dir():
                path = os.path.join(folder, entry.name)
                if regex.match(path):
                    with contextlib.suppress(OSError):  # gone since it was listed, or a broken link
                        found.append(FileInfo(path, os.path.getsize(path)))
    return found


def _glob_regex(pattern: str) -> re.Pattern:
    """A pattern as a regular expression, by the rules of Beam's ``FileSystem.translate_pattern``."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c, i = pattern[i], i + 1
        if c == "*" and pattern[i : i + 1] == "*":
            out.append(".*")
            i += 1
        elif c == "*":
            out.append(r"[^/\\]*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            j = i + (pattern[i : i + 1] == "!")
            j += pattern[j : j + 1] == "]"
            j = pattern.find("]", j)
            if j < 0:
                out.append(r"\[")
                continue
            body, i = pattern[i:j].replace("\\", "\\\\"), j + 1
            body = "^" + body[1:] if body[0] == "!" else "\\" + body if body[0] == "^" else body
            out.append(f"[{body}]")
        else:
            out.append(re.escape(c))
    return re.compile("(?ms)" + "".join(out) + r"\Z")


@contextlib.contextmanager
def atomic_write(path: str) -> Iterator[io.BufferedWriter]:
    """Yield a binary file; on success it appears at ``path`` in one rename, on failure nothing appears."""
    if not is_remote(path):
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        fd, tmp = _create_temporary(folder, os.path.basename(path))
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return
    filesystems = _beam_filesystems()
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with filesystems.create(tmp) as f:
            yield f
        if filesystems.exists(path):
            filesystems.delete([path])
        filesystems.rename([tmp], [path])
    except BaseException:
        with contextlib.suppress(Exception):
            filesystems.delete([tmp])
        raise


def _create_temporary(folder: str, name: str) -> tuple[int, str]:
    """A new file beside the target, mode 0666 less the umask (as ``open(path, "w")`` would create it).

    ``tempfile.mkstemp`` creates 0600 and ``os.replace`` keeps that mode, so shards came out unreadable to
    teammates and to training jobs under another user. Letting the kernel apply the umask at creation (rather
    than reading it with ``os.umask``, which briefly changes it for every thread) also honours default ACLs.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # a 48-bit name collided: draw another
            continue


def write_bytes(path: str, data: bytes) -> None:
    with atomic_write(path) as f:
        f.write(data)


def read_bytes(path: str) -> bytes:
    with open_read(path) as f:
        return f.read()


class TarShardWriter:
    """Builds one tar in a local temporary file; members get fixed metadata so bytes are reproducible."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile()
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=TAR_FORMAT)
        self.members: dict[str, list[Member]] = {}

    def add(self, key: str, members: list[tuple[str, bytes]]) -> list[Member]:
        """Add one sample's members, e.g. ``[("jpg", b"..."), ("txt", b"..."), ("json", b"...")]``.

        All or nothing: every header is built (a name USTAR cannot hold raises here) before any byte is written,
        and a write that fails part-way is undone, so the tar never holds part of a sample.
        """
        if "." in key or "/" in key:
            raise ValueError(f"invalid sample key {key!r}: keys are dot-free and slash-free")
        infos, written, offset = [], [], self._tar.offset
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            header = len(info.tobuf(TAR_FORMAT, "utf-8", "surrogateescape"))
            written.append(Member(info.name, offset + header, len(data)))
            infos.append((info, data))
            offset += header + -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        start, count = self._tar.offset, len(self._tar.members)
        try:
            for info, data in infos:
                self._tar.addfile(info, io.BytesIO(data))
        except BaseException:
            self._file.seek(start)
            self._file.truncate()
            self._tar.offset = start
            del self._tar.members[count:]
            raise
        self.members[key] = written
        return written

    def finish(self, path: str) -> int:
        """Close the tar and move it to ``path`` atomically; returns its size in bytes."""
        self._tar.close()
        size = self._file.tell()
        self._file.seek(0)
        with atomic_write(path) as out:
            while chunk := self._file.read(1 << 20):
                out.write(chunk)
        self._file.close()
        return size

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._tar.close()
        self._file.close()


class UnsafeMember(ValueError):
    """A tar member whose name or type could escape the output folder."""


def check_member(info: tarfile.TarInfo) -> None:
    """Refuse links, devices, absolute paths and ``..``: never trust names inside a tar."""
    if not info.isfile():
        raise UnsafeMember(f"{info.name!r} is not a regular file")
    name = info.name
    if name.startswith("/") or "\\" in name or ".." in posixpath.normpath(name).split("/"):
        raise UnsafeMember(f"unsafe member name {name!r}")
    try:  # tarfile decodes names with surrogate escapes: such a key could never be written to an index
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafeMember(f"member name {name!r} is not UTF-8") from None


class ShardReadError(tarfile.ReadError):
    """A tar that cannot be read to its end: not a tar, cut short (mid-member or at a member boundary), or a bad
    header after some members; the message names the file and the byte where reading stopped."""


def read_tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` for each sample of a tar, in file order; members of a sample are adjacent.

    A sample is yielded only once it is known to be whole (the next sample began, or the archive ended
    properly), so a tar cut short never yields a sample missing the members after the cut. Raises
    :class:`ShardReadError` where the tar stops being readable (after yielding every whole sample before it) and
    :class:`UnsafeMember` at a link or an escaping name.
    """
    with open_read(path, "application/x-tar") as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r|")
        except tarfile.TarError as e:
            raise ShardReadError(f"{path}: not a tar ({e})") from e
        with tar:
            key, sample = None, {}
            try:
                for info in tar:
                    check_member(info)
                    stem, _, ext = posixpath.basename(info.name).partition(".")
                    if stem != key and sample:
                        yield key, sample
                        sample = {}
                    key = stem
                    sample[ext] = tar.extractfile(info).read()
            except tarfile.TarError as e:  # stream mode reports a member cut short as ReadError
                raise ShardReadError(f"{path}: {e} (at byte {tar.offset})") from e
            end = tar.offset
    problem = tar_end_problem(path, end)
    if problem:
        raise ShardReadError(problem.message)
    if sample:
        yield key, sample


class TarEndProblem(NamedTuple):
    """Why a tar does not end properly: ``code`` is ``truncated`` (cut short) or ``bad_tar`` (a bad header)."""

    code: str
    message: str


def tar_end_problem(path: str, end: int) -> TarEndProblem | None:
    """Why the tar does not end properly at byte ``end`` (where its last member's data ends), or ``None``.

    tarfile stops quietly at a cut or unreadable header once one member was read, so only the end-of-archive
    blocks prove a tar is whole: a tar cut at a member boundary otherwise reads as a shorter, valid one.
    """
    with open_read(path, "application/x-tar") as f:
        f.seek(end)
        tail = f.read(END_OF_ARCHIVE)
    if len(tail) == END_OF_ARCHIVE and not tail.strip(b"\0"):
        return None
    if len(tail) < tarfile.BLOCKSIZE or not tail.strip(b"\0"):
        return TarEndProblem(
            "truncated", f"{path}: cut short: ends at byte {end + len(tail)} without the end-of-archive blocks"
        )
    return TarEndProblem("bad_tar", f"{path}: unreadable header at byte {end}")


def write_table(path: str, records: list, cls: type, schema_version: int) -> None:
    """A parquet table of records, atomically; deterministic bytes for the same records."""
    table = to_table(records, cls, schema_version)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    write_bytes(path, sink.getvalue().to_pybytes())


def read_table(path: str, cls: type, columns: list[str] | None = None) -> pa.Table:
    """A parquet table of ``cls`` records (only ``columns``, when given), cast to the record's schema.

    A column the file lacks reads as null when the field is nullable, or as the field's default when it has one
    (img2dataset's index has no ``members``: empty lists, i.e. offsets unknown), so newer code reads older
    datasets and img2dataset's (resume, takedown, stats, the shard commands); :func:`filled_columns` names
    them. A missing column with neither raises ``ValueError``.
    """
    expected = arrow_schema(cls)
    if columns is not None:
        expected = pa.schema([expected.field(name) for name in columns], metadata=expected.metadata)
    file = pq.ParquetFile(pa.BufferReader(read_bytes(path)))
    present = [name for name in expected.names if name in file.schema_arrow.names]
    table = file.read(columns=present)
    defaults = _field_defaults(cls)
    for f in expected:
        if f.name in present:
            continue
        if f.nullable:
            table = table.append_column(f, pa.nulls(len(table), f.type))
        elif f.name in defaults:
            table = table.append_column(f, pa.array([defaults[f.name]] * len(table), f.type))
        else:
            raise ValueError(f"{path}: no column {f.name!r}")
    filled = ",".join(name for name in expected.names if name not in present)
    table = table.select(expected.names).cast(expected)
    return table.replace_schema_metadata({**(table.schema.metadata or {}), FILLED_KEY: filled.encode()})


def filled_columns(table: pa.Table) -> set[str]:
    """The columns :func:`read_table` filled in because the file lacked them."""
    filled = (table.schema.metadata or {}).get(FILLED_KEY, b"").decode()
    return set(filled.split(",")) - {""}


def _field_defaults(cls: type) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[field_key(f)] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[field_key(f)] = f.default_factory()
    return out
