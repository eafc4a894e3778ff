"""Download, validate and resize the images of one URL shard, and write them to a staging tar.

One worker handles one shard, as img2dataset does: URLs are shuffled between workers, image bytes never are.
:func:`fetch_and_process` is the plain per-pair function; :class:`DownloadShard` is the Beam stage around it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from visinstruct.configs import IngestConfig
from visinstruct.schemas import ImageTextPair, IndexRow, JsonDict, Rejection, SampleMeta, from_table, shard_name
from visinstruct.transforms.fetch import Fetcher
from visinstruct.transforms.images import ImageRejected, ProcessedImage, process_image
from visinstruct.transforms.shards import TarShardWriter, exists, join, read_table, read_tar_samples, shard_paths
from visinstruct.transforms.takedown import REASON as TAKEDOWN
from visinstruct.transforms.takedown import Takedown, load_takedown_lists
from visinstruct.transforms.timing import add_busy

REJECTED_DIR = "rejected"

log = logging.getLogger(__name__)
STAGING = "_staging"
# Failures another attempt may fix: what `write.retry_failed` downloads again.
RETRYABLE_REASONS = frozenset({"timeout", "connection_error", "truncated", "dns_error", "empty_body", "http_408",
                               "http_425", "http_429", "http_500", "http_502", "http_503", "http_504"})
Previous = dict[str, "tuple[IndexRow, dict[str, bytes]] | Rejection"]


@dataclass
class ShardDraft:
    """What :class:`DownloadShard` made of one shard: rows for every input, and the staging tar."""

    shard: int
    staging_tar: str
    rows: list[IndexRow] = field(default_factory=list)  # one per input row, in key order
    rejections: list[Rejection] = field(default_factory=list)
    duration_s: float = 0.0


def staging_path(out_dir: str, shard: int) -> str:
    return join(out_dir, STAGING, f"{shard_name(shard)}.tar")


def read_location(location: str) -> bytes:
    """Bytes of a local path or a Beam filesystem URL (gs://...)."""
    with FileSystems.open(location, mime_type="application/octet-stream", compression_type="uncompressed") as f:
        return f.read()


def fetch_and_process(pair: ImageTextPair, fetcher: Fetcher, cfg: IngestConfig) -> ProcessedImage | Rejection:
    """Fetch one pair's image and validate/resize it; every failure becomes a :class:`Rejection`."""
    location = pair.location
    if pair.url is not None:  # URLs come from untrusted lists: only the checked HTTP(S) fetcher reads them
        result = fetcher.fetch(location)
        if not result.ok:
            return Rejection("download", result.reason, result.message, pair.key, location,
                             JsonDict({"attempts": result.attempts}))
        data = result.data
    else:  # paths come from sources the user points at (folders, COCO, LLaVA JSON): local or gs://...
        try:
            data = read_location(location)
        except (OSError, ValueError) as e:  # Beam filesystems raise BeamIOError (an IOError) or ValueError
            return Rejection("download", "file_error", f"cannot read {location}: {e}"[:500], pair.key, location)
    try:
        return process_image(data, cfg.resize)
    except ImageRejected as e:
        return Rejection("decode", e.reason, str(e)[:500], pair.key, location)


def rejected_row(rejection: Rejection, pair: ImageTextPair | None = None) -> IndexRow:
    return IndexRow(key=rejection.key, status=rejection.reason, url=pair.url if pair else rejection.url,
                    path=pair.path if pair else None, caption=pair.caption if pair else None,
                    error_message=rejection.message)


def sample_members(pair: ImageTextPair, image: ProcessedImage) -> list[tuple[str, bytes]]:
    """The tar members of one sample, in FORMAT.md's order: image, caption, metadata."""
    meta = SampleMeta.from_pair(pair, image)
    return [(image.format, image.data), ("txt", (pair.caption or "").encode("utf-8")),
            ("json", meta.to_json().encode("utf-8"))]


def load_previous(out_dir: str, shard: int) -> Previous:
    """What a complete shard already holds, except rows that failed with a retryable reason.

    Successes map to ``(index row, {ext: bytes})`` read from the tar; other failures to their rejection.
    """
    paths = shard_paths(out_dir, shard)
    samples = dict(read_tar_samples(paths["tar"]))
    rejections = {}  # every stage's dead letters for this shard (ingest, and later ones such as remove)
    pattern = join(out_dir, REJECTED_DIR, f"*-{shard_name(shard)}.parquet")
    for meta in FileSystems.match([pattern])[0].metadata_list:
        rejections.update({r.key: r for r in from_table(Rejection, read_table(meta.path, Rejection))})
    previous: Previous = {}
    for row in from_table(IndexRow, read_table(paths["parquet"], IndexRow)):
        if row.status == "success":
            previous[row.key] = (row, samples[row.key])
        elif row.status not in RETRYABLE_REASONS:
            previous[row.key] = rejections.get(row.key) or Rejection(
                "unknown", row.status, row.error_message or row.status, row.key, row.url or row.path)
    return previous


def taken_down(key: str, location: str | None, how: str) -> Rejection:
    what = "URL" if how == "url" else "image's sha256"
    return Rejection("dedup", TAKEDOWN, f"the {what} is on a takedown list", key, location)


def build_draft(shard: int, rows: list[ImageTextPair | Rejection], fetcher: Fetcher, cfg: IngestConfig,
                tar_path: str, previous: Previous | None = None, takedown: Takedown | None = None) -> ShardDraft:
    """Fetch and process a shard's pairs concurrently, write the staging tar, account for every row.

    Rows found in ``previous`` (a retry of a complete shard) are reused instead of downloaded. Pairs whose URL
    ``takedown`` lists are not downloaded; images whose sha256 it lists are dropped (also reused ones).
    """
    start = time.monotonic()
    previous, takedown = previous or {}, takedown or Takedown()
    rows = sorted((previous.get(r.key) if isinstance(previous.get(r.key), Rejection) else r for r in rows),
                  key=lambda r: r.key)
    if takedown:
        rows = [taken_down(r.key, r.url, "url") if isinstance(r, ImageTextPair) and takedown.match(r.url, None)
                else r for r in rows]
    pairs = [r for r in rows if isinstance(r, ImageTextPair) and r.key not in previous]
    outcomes = dict(zip((p.key for p in pairs), fetcher.map(lambda p: fetch_and_process(p, fetcher, cfg), pairs)))
    draft = ShardDraft(shard, tar_path)
    writer = TarShardWriter()
    try:
        for row in rows:
            pair = row if isinstance(row, ImageTextPair) else None
            if pair is not None and pair.key in previous:  # a retry reuses what the shard holds
                kept, sample = previous[pair.key]
                if not takedown.match(None, kept.sha256):
                    draft.rows.append(replace(kept, members=writer.add(pair.key, list(sample.items()))))
                    continue
                outcome = taken_down(pair.key, pair.location, "sha256")
            else:
                outcome = row if pair is None else outcomes[pair.key]
                if isinstance(outcome, ProcessedImage) and takedown.match(None, outcome.sha256):
                    outcome = taken_down(pair.key, pair.location, "sha256")
            if isinstance(outcome, Rejection):
                draft.rows.append(rejected_row(outcome, pair))
                draft.rejections.append(outcome)
                continue
            members = writer.add(pair.key, sample_members(pair, outcome))
            draft.rows.append(IndexRow(
                key=pair.key, status="success", url=pair.url, path=pair.path, caption=pair.caption,
                width=outcome.width, height=outcome.height, original_width=outcome.original_width,
                original_height=outcome.original_height, sha256=outcome.sha256, phash=outcome.phash,
                members=members))
        writer.finish(tar_path)
    except BaseException:
        writer.abort()
        raise
    draft.duration_s = time.monotonic() - start
    return draft


class DownloadShard(beam.DoFn):
    """``(shard, [ImageTextPair | Rejection])`` -> :class:`ShardDraft`; images go to a staging tar."""

    def __init__(self, cfg: IngestConfig, retry_shards: frozenset[int] = frozenset()):
        self.cfg, self.retry_shards = cfg, retry_shards
        self.fetched = beam.metrics.Metrics.counter("ingest", "images_ok")
        self.failed = beam.metrics.Metrics.counter("ingest", "images_rejected")

    def setup(self):
        self.fetcher = Fetcher(self.cfg.download)
        self.takedown = load_takedown_lists(self.cfg.dedup.takedown_lists)

    def teardown(self):
        self.fetcher.close()

    def process(self, element):
        shard, rows = element
        out, previous = self.cfg.write.path, None
        if shard in self.retry_shards:
            previous = load_previous(out, shard)
        stats = shard_paths(out, shard)["stats"]
        if exists(stats):  # a retry, or a build redoing a shard its later stages never finished
            FileSystems.delete([stats])  # until the new stats land, the shard is incomplete
        draft = build_draft(shard, list(rows), self.fetcher, self.cfg, staging_path(out, shard), previous,
                            self.takedown)
        ok = sum(r.status == "success" for r in draft.rows)
        add_busy("ingest", draft.duration_s)
        self.fetched.inc(ok)
        self.failed.inc(len(draft.rows) - ok)
        log.info("shard %s downloaded: %d ok, %d rejected in %.1fs", shard_name(shard), ok,
                 len(draft.rows) - ok, draft.duration_s)
        yield draft
