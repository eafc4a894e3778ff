"""Write and read shard files atomically and reproducibly, on any Beam filesystem.

- :func:`atomic_write` writes to a temporary name beside the target and renames on success, so a killed or
  retried Beam bundle never leaves a partial file under a final name.
- :class:`TarShardWriter` writes WebDataset tars with fixed metadata (mtime 0, uid/gid 0, mode 0644, no
  owner names) and records where each member's data lies, for the parquet index.
- :func:`read_tar_samples` reads a tar back as samples, refusing unsafe member names and links.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import tarfile
import tempfile
import uuid
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from visinstruct.schemas import Member, ShardStats, arrow_schema, shard_name, to_row, to_table

TAR_FORMAT = tarfile.USTAR_FORMAT
DEFAULT_EXTENSIONS = ("jpg", "png", "webp", "txt", "json")


def join(*parts: str) -> str:
    """Join path parts for local paths and URLs (gs://...) alike."""
    return FileSystems.join(*parts) if "://" in parts[0] else os.path.join(*parts)


def exists(path: str) -> bool:
    return FileSystems.exists(path)


def makedirs(path: str) -> None:
    if "://" not in path:
        os.makedirs(path, exist_ok=True)


@contextlib.contextmanager
def atomic_write(path: str) -> Iterator[io.BufferedWriter]:
    """Yield a binary file; on success it appears at ``path`` in one rename, on failure nothing appears."""
    if "://" not in path:
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with FileSystems.create(tmp) as f:
            yield f
        if FileSystems.exists(path):
            FileSystems.delete([path])
        FileSystems.rename([tmp], [path])
    except BaseException:
        with contextlib.suppress(Exception):
            FileSystems.delete([tmp])
        raise


def write_bytes(path: str, data: bytes) -> None:
    with atomic_write(path) as f:
        f.write(data)


def read_bytes(path: str) -> bytes:
    with FileSystems.open(path, mime_type="application/octet-stream", compression_type="uncompressed") as f:
        return f.read()


class TarShardWriter:
    """Builds one tar in a local temporary file; members get fixed metadata so bytes are reproducible."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile()
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=TAR_FORMAT)
        self.members: dict[str, list[Member]] = {}

    def add(self, key: str, members: list[tuple[str, bytes]]) -> list[Member]:
        """Add one sample's members, e.g. ``[("jpg", b"..."), ("txt", b"..."), ("json", b"...")]``."""
        if "." in key or "/" in key:
            raise ValueError(f"invalid sample key {key!r}: keys are dot-free and slash-free")
        written = []
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            header = len(info.tobuf(TAR_FORMAT, "utf-8", "surrogateescape"))
            written.append(Member(info.name, self._tar.offset + header, len(data)))
            self._tar.addfile(info, io.BytesIO(data))
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


def read_tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` for each sample of a tar, in file order; members of a sample are adjacent."""
    with FileSystems.open(path, mime_type="application/x-tar", compression_type="uncompressed") as f:
        with tarfile.open(fileobj=f, mode="r|") as tar:
            key, sample = None, {}
            for info in tar:
                check_member(info)
                base = posixpath.basename(info.name)
                stem, _, ext = base.partition(".")
                if stem != key and sample:
                    yield key, sample
                    sample = {}
                key = stem
                sample[ext] = tar.extractfile(info).read()
            if sample:
                yield key, sample


def shard_paths(out_dir: str, shard: int) -> dict[str, str]:
    """The files of shard ``shard`` in ``out_dir``."""
    stem = shard_name(shard)
    return {"tar": join(out_dir, f"{stem}.tar"), "parquet": join(out_dir, f"{stem}.parquet"),
            "stats": join(out_dir, f"{stem}_stats.json")}


def write_table(path: str, records: list, cls: type, schema_version: int) -> None:
    """A parquet table of records, atomically; deterministic bytes for the same records."""
    table = to_table(records, cls, schema_version)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    write_bytes(path, sink.getvalue().to_pybytes())


def read_table(path: str, cls: type, columns: list[str] | None = None) -> pa.Table:
    """A parquet table of ``cls`` records (only ``columns``, when given), cast to the record's schema.

    A file written before a nullable field was added to the record reads with that column all null, so newer
    code reads older datasets (resume, takedown, stats). A missing required column raises ``ValueError``.
    """
    expected = arrow_schema(cls)
    if columns is not None:
        expected = pa.schema([expected.field(name) for name in columns], metadata=expected.metadata)
    file = pq.ParquetFile(pa.BufferReader(read_bytes(path)))
    present = [name for name in expected.names if name in file.schema_arrow.names]
    table = file.read(columns=present)
    for f in expected:
        if f.name not in present:
            if not f.nullable:
                raise ValueError(f"{path}: no column {f.name!r}")
            table = table.append_column(f, pa.nulls(len(table), f.type))
    return table.select(expected.names).cast(expected)


def write_stats(path: str, stats: ShardStats) -> None:
    write_bytes(path, (json.dumps(to_row(stats) | {"rejected_by_reason": dict(sorted(
        stats.rejected_by_reason.items()))}, indent=1) + "\n").encode())


def read_stats(path: str) -> ShardStats:
    data = json.loads(read_bytes(path))
    return ShardStats(**data)
