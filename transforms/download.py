"""Download, validate and resize the images of one URL shard, and write them to a staging tar.

Two paths make a shard's draft. Without a rate limit (``download.per_host_rps: null``) one worker handles one
shard, as img2dataset does: URLs are shuffled between workers, image bytes never are (:class:`DownloadShard`).
With one, URLs are fetched by host so that the limit holds for the whole job: the steps of that routed path are
in :mod:`.routed`, the plain functions in :mod:`.hosts`. Both paths share :func:`build_draft` and
:class:`_ShardStep` (reusing committed drafts, building and committing new ones).
:func:`fetch_and_process` is the plain per-pair function. Every per-row step runs through the guard
(:mod:`visinstruct.transforms.guard`): what one row raises becomes that row's ``internal_error`` rejection.

A finished shard is committed to staging (:mod:`.staging`) so that a killed run does not download it again, and
reports progress while it runs (:mod:`.progress`). On the direct path a killed run keeps every shard already
built; on the routed path a shard with URLs to fetch is built only after every fetch partition has finished (its
outcomes cross a batch ``CoGroupByKey``, a barrier), so a run killed while fetching redoes its fetching; shards
that need no network are built (and committed) at once.

Fetchers: every step that fetches makes one per worker with ``fetcher_factory(cfg.download)``
(:class:`FetcherStep`); what such a fetcher must do is :class:`FetcherLike` (the real one is
:class:`~visinstruct.transforms.fetch.Fetcher`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Protocol

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from visinstruct.configs import DownloadConfig, IngestConfig
from visinstruct.schemas import (
    Decision,
    Dropped,
    ImageTextPair,
    IndexRow,
    Rejection,
    SampleMeta,
    from_table,
    location_fields,
    shard_name,
)
from visinstruct.transforms import worker
from visinstruct.transforms.fetch import Fetcher, HostRateLimiter, RobotsRecord
from visinstruct.transforms.guard import INTERNAL_ERROR, count_internal_error, guarded
from visinstruct.transforms.hosts import first_url
from visinstruct.transforms.http import RETRYABLE_REASONS as HTTP_RETRYABLE_REASONS
from visinstruct.transforms.images import ProcessedImage, process_image
from visinstruct.transforms.layout import numbered_member, shard_in, staging_tar
from visinstruct.transforms.progress import ShardProgress, map_with_progress
from visinstruct.transforms.rewrite import index_row
from visinstruct.transforms.shards import (
    ShardReadError,
    TarShardWriter,
    exists,
    read_table,
    read_tar_samples,
)
from visinstruct.transforms.staging import (
    ShardDraft,
    commit_draft,
    committed_drafts,
    input_digest,
    new_attempt,
)
from visinstruct.transforms.takedown import REASON as TAKEDOWN
from visinstruct.transforms.takedown import Takedown, load_takedown_lists
from visinstruct.transforms.timing import add_busy

log = logging.getLogger(__name__)
# Failures another attempt may fix: the HTTP exchange's, and a DNS error, an empty body, an unreachable robots.txt.
RETRYABLE_REASONS = frozenset({"dns_error", "empty_body", "robots_unreachable", *HTTP_RETRYABLE_REASONS})
# Failures the run's settings (or a bug of ours) caused, not the image: a wrong url_col, loopback or private
# addresses not allowed, an unreadable image folder, an internal error. A corrected rerun may fix them.
# (Opt-outs, robots.txt, 404s, bad images and duplicates are the image's or its site's: final.)
CONFIG_REASONS = frozenset(
    {"blocked_address", "missing_column", "missing_url", "invalid_url", "file_error", INTERNAL_ERROR}
)
# Rows with these reasons are not final: `write.retry_failed` processes them again, and a shard whose rows
# ALL failed with them is not complete (a rerun redoes it; see `shard_is_final`).
NOT_FINAL_REASONS = RETRYABLE_REASONS | CONFIG_REASONS
Previous = dict[str, "tuple[IndexRow, dict[str, bytes]] | Rejection"]
# A row's download: its image, its images (a multi-image row; none for a text-only one), or why not.
Outcome = ProcessedImage | list[ProcessedImage] | Rejection


class FetcherLike(Protocol):
    """What ``fetcher_factory(cfg.download)`` must return: :class:`~visinstruct.transforms.fetch.Fetcher`, or a
    stand-in with the same methods (``visinstruct.testing.responder.Responder`` answers from memory)."""

    def fetch(self, url: str, limiter: HostRateLimiter | None = None) -> Decision:
        """One URL's answer, never an exception: kept with a value carrying ``data``, ``url`` and ``attempts``
        (:class:`~visinstruct.transforms.fetch.Fetched`), or dropped with a reason. ``limiter``: the one to pace
        with (a fetch partition's), ``None`` for the fetcher's own. Called from ``map``'s threads."""

    def map(self, fn: Callable, items: list) -> list:
        """``[fn(item) for item in items]`` on the fetcher's threads (``download.threads`` of them)."""

    def robots_record(self, origin: str, limiter: HostRateLimiter | None = None) -> RobotsRecord:
        """``origin``'s robots.txt as plain data (:data:`~visinstruct.transforms.fetch.RobotsRecord`)."""

    def seed_robots(self, records: dict[str, RobotsRecord]) -> int:
        """Take verdicts fetched elsewhere into the robots.txt cache; how many origins were added."""

    def close(self) -> None:
        """Release the threads and connections (the step's teardown)."""


def all_not_final(statuses: Iterable[str]) -> bool:
    """Whether there are rows and every one failed for a reason a rerun may fix (none written, none final)."""
    statuses = list(statuses)
    return bool(statuses) and all(status in NOT_FINAL_REASONS for status in statuses)


def read_location(location: str, max_bytes: int | None = None) -> bytes:
    """Bytes of a local path or a Beam filesystem URL (gs://...); more than ``max_bytes`` raises ``ValueError``
    after reading one byte past the cap (a device file or a huge file never fills memory)."""
    with FileSystems.open(location, mime_type="application/octet-stream", compression_type="uncompressed") as f:
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise ValueError(f"over download.max_bytes ({max_bytes} bytes)")
    return data


def _read_local(pair: ImageTextPair, max_bytes: int) -> bytes | Rejection:
    try:
        return read_location(pair.location, max_bytes)
    except ValueError as e:
        if "max_bytes" in str(e):
            return Rejection("download", "too_large", f"{pair.location}: {e}", pair.key, pair.location)
        return Rejection("download", "file_error", f"cannot read {pair.location}: {e}"[:500], pair.key, pair.location)
    except OSError as e:  # Beam filesystems raise BeamIOError (an IOError) or ValueError
        return Rejection("download", "file_error", f"cannot read {pair.location}: {e}"[:500], pair.key, pair.location)


def _cpus() -> int:
    affinity = getattr(os, "sched_getaffinity", None)  # the CPUs this process may use (Linux); else all of them
    return max(1, len(affinity(0)) if affinity else os.cpu_count() or 1)


# Image work (decode, resize, encode) is CPU-bound: with more fetch threads at it than there are CPUs, they only
# contend for the GIL and the caches. A fetch thread waits for one of these slots before its image work, so the
# requests in flight stay ``download.threads`` while at most one image per CPU is worked on. Measured on 2 cores,
# 32 threads, 1,000 small images served at 20 ms: 3.1-3.4 ms of CPU per image with the slots, 3.7-3.9 without,
# same throughput.
IMAGE_SLOTS = threading.BoundedSemaphore(_cpus())


def _decode(pair: ImageTextPair, data: bytes, cfg: IngestConfig) -> ProcessedImage | Rejection:
    try:
        with IMAGE_SLOTS:
            return process_image(data, cfg.resize, with_phash=cfg.dedup.uses_phash)
    except Dropped as e:
        return Rejection("decode", e.reason, str(e)[:500], pair.key, pair.location)


def fetch_and_process(
    pair: ImageTextPair, fetcher: FetcherLike, cfg: IngestConfig, limiter: HostRateLimiter | None = None
) -> Outcome:
    """Fetch one pair's image (or images) and validate/resize it; every failure (any exception too) is a
    :class:`Rejection`. A multi-image pair gives a list of its processed images, a text-only pair an empty list;
    the first image of several that fails rejects the row, its message saying which. ``limiter``: the fetch
    partition's (:class:`~visinstruct.transforms.routed.FetchPartition`), else the fetcher paces with its own."""
    if pair.text_only:
        return []
    if not pair.images:
        return _fetch_one(pair, fetcher, cfg, limiter)
    images = []
    for i, image in enumerate(pair.images):
        where = {"image": image.data} if image.data is not None else location_fields(image.location or "")
        one = replace(pair, images=[], **where)
        outcome = _fetch_one(one, fetcher, cfg, limiter)
        if isinstance(outcome, Rejection):
            message = f"image {i + 1} of {len(pair.images)}: {outcome.message}"[:500]
            return replace(outcome, message=message, url=outcome.url or pair.location)
        images.append(outcome)
    return images


def _fetch_one(
    pair: ImageTextPair, fetcher: FetcherLike, cfg: IngestConfig, limiter: HostRateLimiter | None = None
) -> ProcessedImage | Rejection:
    location = pair.location
    if pair.image is not None:  # the input row held the bytes (a Hugging Face dataset): nothing to fetch
        data = pair.image
    elif pair.url is not None:  # URLs come from untrusted lists: only the checked HTTP(S) fetcher reads them
        fetched = guarded("download", lambda: fetcher.fetch(location, limiter=limiter), pair.key, location)
        if isinstance(fetched, Rejection):
            return fetched
        if not fetched.kept:
            return fetched.rejection("download", pair.key, location)  # its detail: {"attempts": n}
        data = fetched.value.data
    else:  # paths come from sources the user points at (folders, COCO, LLaVA JSON): local or gs://...
        data = guarded("download", lambda: _read_local(pair, cfg.download.max_bytes), pair.key, location)
        if isinstance(data, Rejection):
            return data
    return guarded("decode", lambda: _decode(pair, data, cfg), pair.key, location)


def rejected_row(rejection: Rejection, pair: ImageTextPair | None = None) -> IndexRow:
    return IndexRow(
        key=rejection.key,
        status=rejection.reason,
        url=pair.url if pair else rejection.url,
        path=pair.path if pair else None,
        caption=pair.caption if pair else None,
        error_message=rejection.message,
    )


def sample_members(pair: ImageTextPair, image: ProcessedImage | list[ProcessedImage]) -> list[tuple[str, bytes]]:
    """The tar members of one sample, in FORMAT.md's order: image (or numbered images), caption, metadata."""
    meta = SampleMeta.from_pair(pair, image)
    if isinstance(image, list):
        images = [(numbered_member(i, one.format), one.data) for i, one in enumerate(image)]
    else:
        images = [(image.format, image.data)]
    return [
        *images,
        ("txt", (pair.caption or "").encode("utf-8")),
        ("json", meta.to_json().encode("utf-8")),
    ]


def load_previous(out_dir: str, shard: int) -> Previous:
    """What a complete shard already holds, except rows whose failure is not final (``NOT_FINAL_REASONS``).

    Successes map to ``(index row, {ext: bytes})`` read from the tar; other failures to their rejection. A tar
    damaged since it was written keeps what can still be read; rows whose sample is gone are downloaded again.
    """
    paths = shard_in(out_dir, shard)
    samples = {}
    try:
        for key, sample in read_tar_samples(paths.tar):
            samples[key] = sample
    except (ShardReadError, OSError) as e:
        log.warning(
            "shard %s: its tar is damaged (%s); samples past the damage are downloaded again", shard_name(shard), e
        )
    rejections = {}  # every stage's dead letters for this shard (ingest, and later ones such as remove)
    for meta in FileSystems.match([paths.rejected_pattern()])[0].metadata_list:
        rejections.update({r.key: r for r in from_table(Rejection, read_table(meta.path, Rejection))})
    previous: Previous = {}
    for row in from_table(IndexRow, read_table(paths.index, IndexRow)):
        if row.status == "success":
            if row.key in samples:
                previous[row.key] = (row, samples[row.key])
        elif row.status not in NOT_FINAL_REASONS:
            previous[row.key] = rejections.get(row.key) or Rejection(
                "unknown", row.status, row.error_message or row.status, row.key, row.url or row.path
            )
    return previous


def taken_down(key: str, location: str | None, how: str) -> Rejection:
    what = "URL" if how == "url" else "image's sha256"
    return Rejection("dedup", TAKEDOWN, f"the {what} is on a takedown list", key, location)


def _before_download(row, previous: Previous, takedown: Takedown):
    """A row as it enters the download: a pair, or its rejection (kept from ``previous``, or a listed URL)."""
    if isinstance(previous.get(row.key), Rejection):
        return previous[row.key]
    if isinstance(row, ImageTextPair) and takedown:
        for url in [row.url, *(i.location for i in row.images)]:  # a multi-image row: any of its images
            if url and takedown.match(url, None):
                return taken_down(row.key, url, "url")
    return row


def _after_download(pair: ImageTextPair, outcome, previous: Previous, takedown: Takedown):
    """A downloaded (or reused) pair's outcome: a rejection, a :class:`ProcessedImage` or a reused sample."""
    if pair.key in previous:  # a retry reuses what the shard holds: (index row, {ext: bytes})
        kept, _ = previous[pair.key]
        hashes = [kept.sha256, *kept.image_sha256s]
        if any(takedown.match(None, sha256) for sha256 in hashes if sha256):
            return taken_down(pair.key, pair.location, "sha256")
        return previous[pair.key]
    images = outcome if isinstance(outcome, list) else [outcome] if isinstance(outcome, ProcessedImage) else []
    if any(takedown.match(None, image.sha256) for image in images):
        return taken_down(pair.key, pair.location, "sha256")
    return outcome


def _add_row(draft: ShardDraft, writer: TarShardWriter, row, outcome) -> None:
    """Append one row's index row (and its sample to the staging tar, when kept)."""
    pair = row if isinstance(row, ImageTextPair) else None
    if isinstance(outcome, tuple):  # reused from the complete shard
        kept, sample = outcome
        draft.rows.append(replace(kept, members=writer.add(pair.key, list(sample.items()))))
        return
    if isinstance(outcome, (ProcessedImage, list)):
        # stage "decode": making the sample is the end of turning bytes into one (and builds count it as ingest)
        members = guarded("decode", functools.partial(sample_members, pair, outcome), pair.key, pair.location)
        if not isinstance(members, Rejection):  # the row says what the sample's JSON says (one way to build both)
            meta = SampleMeta.from_pair(pair, outcome)
            draft.rows.append(index_row(meta, members=writer.add(pair.key, members)))
            return
        outcome = members
    draft.rows.append(rejected_row(outcome, pair))
    draft.rejections.append(outcome)


def entering(rows: list, previous: Previous, takedown: Takedown) -> list[ImageTextPair | Rejection]:
    """A shard's rows as they enter the download, in key order: pairs, and rejections (read's, kept from
    ``previous``, or URLs ``takedown`` lists). ``build_draft`` and ``PlanShard`` both start here."""
    return [
        guarded("dedup", functools.partial(_before_download, r, previous, takedown), r.key, r.url)
        for r in sorted(rows, key=lambda r: r.key)
    ]


def _lost_fetch(pair: ImageTextPair) -> Rejection:
    """The rejection of a pair whose fetch partition sent no outcome (a bug of ours: never lose the row)."""
    message = "its outcome never came back from its fetch partition"
    return Rejection("download", INTERNAL_ERROR, message, pair.key, pair.location)


def build_draft(
    shard: int,
    rows: list[ImageTextPair | Rejection],
    fetcher: FetcherLike,
    cfg: IngestConfig,
    tar_path: str,
    previous: Previous | None = None,
    takedown: Takedown | None = None,
    progress: ShardProgress | None = None,
    prefetched: dict[str, Outcome] | None = None,
) -> ShardDraft:
    """Fetch and process a shard's pairs concurrently, write the staging tar, account for every row.

    Rows found in ``previous`` (a retry of a complete shard) are reused instead of downloaded. Pairs whose URL
    ``takedown`` lists are not downloaded; images whose sha256 it lists are dropped (also reused ones).
    ``progress`` hears of each row as it finishes.

    ``prefetched`` (the routed path: outcomes by key from the fetch partitions) replaces the fetch of the pairs
    it holds; they were counted where they were fetched, so ``progress`` does not hear of them again. A pair that
    needs the network but has no outcome there becomes an ``internal_error`` rejection, never a lost row;
    pairs of paths or bytes are still read here.
    """
    start = time.monotonic()
    previous, takedown = previous or {}, takedown or Takedown()
    progress = progress or ShardProgress(shard, len(rows), cfg.download.progress_interval)
    rows = entering(rows, previous, takedown)
    pairs = [r for r in rows if isinstance(r, ImageTextPair) and r.key not in previous]
    outcomes: dict[str, Outcome] = {}
    if prefetched is not None:
        outcomes = {p.key: prefetched[p.key] for p in pairs if p.key in prefetched}
        for pair in pairs:
            if pair.key not in outcomes and first_url(pair) is not None:
                outcomes[pair.key] = _lost_fetch(pair)
                log.warning("shard %s: %s: %s", shard_name(shard), pair.key, outcomes[pair.key].message)
                count_internal_error("download")
                progress.row(outcomes[pair.key])
        pairs = [p for p in pairs if p.key not in outcomes]
    for row in rows:  # rows that need no download are done already
        if not isinstance(row, ImageTextPair) or row.key in previous:
            progress.row(row)
    fetched = map_with_progress(
        fetcher.map,
        lambda p: guarded("download", lambda: fetch_and_process(p, fetcher, cfg), p.key, p.location),
        pairs,
        progress,
    )
    outcomes.update(zip((p.key for p in pairs), fetched))
    draft = ShardDraft(shard, tar_path)
    writer = TarShardWriter()
    try:
        for row in rows:
            outcome = row
            if isinstance(row, ImageTextPair):
                outcome = guarded(
                    "dedup",
                    functools.partial(_after_download, row, outcomes.get(row.key), previous, takedown),
                    row.key,
                    row.location,
                )
            _add_row(draft, writer, row, outcome)
        draft.tar_bytes = writer.finish(tar_path)
    except BaseException:
        writer.abort()
        raise
    draft.duration_s = time.monotonic() - start
    return draft


def takedown_digest(takedown: Takedown) -> str:
    """sha256 of a takedown set: a changed list invalidates staged drafts (they were filtered by the old one)."""
    return hashlib.sha256(
        "\n".join(sorted(takedown.urls) + ["#"] + sorted(takedown.sha256)).encode("utf-8", "surrogatepass")
    ).hexdigest()


class FetcherStep(beam.DoFn):
    """A step with one fetcher per worker: made in ``setup`` by ``fetcher_factory(download)``, closed in
    ``teardown``. ``fetcher_factory`` returns a :class:`FetcherLike` (tests and the scale simulation pass an
    importable one that answers without a network)."""

    def __init__(self, download: DownloadConfig, fetcher_factory: Callable[[DownloadConfig], FetcherLike] = Fetcher):
        self.download, self.fetcher_factory = download, fetcher_factory

    def setup(self):
        worker.settle()
        self.fetcher = self.fetcher_factory(self.download)

    def teardown(self):
        if getattr(self, "fetcher", None) is not None:
            self.fetcher.close()


class _ShardStep(FetcherStep):
    """What the steps that make a shard's draft share: the fetcher, the takedown lists, reusing a committed draft,
    building and committing a new one, and the closing log line."""

    def __init__(
        self,
        cfg: IngestConfig,
        retry_shards: frozenset[int] = frozenset(),
        fetcher_factory: Callable[[DownloadConfig], FetcherLike] = Fetcher,
    ):
        super().__init__(cfg.download, fetcher_factory)
        self.cfg, self.retry_shards = cfg, retry_shards
        self.reused = beam.metrics.Metrics.counter("ingest", "rows_reused_from_staging")

    def setup(self):
        super().setup()
        self.takedown = load_takedown_lists(self.cfg.dedup.takedown_lists)
        self.takedown_digest = takedown_digest(self.takedown)

    def committed(self, shard: int, digest: str) -> ShardDraft | None:
        """The draft an earlier run (or attempt) committed from the rows of ``digest`` (:meth:`digest`), when it
        may be reused, else None.

        Deletes the shard's ``_stats.json`` first: until the new stats land, the shard is incomplete.
        """
        stats = shard_in(self.cfg.write.path, shard).stats
        if exists(stats):  # a retry, or a build redoing a shard its later stages never finished
            FileSystems.delete([stats])
        if shard in self.retry_shards:
            return None
        drafts = committed_drafts(self.cfg.write.path, shard, digest)  # read one by one, until one is usable
        draft = next((d for d in drafts if not all_not_final(r.status for r in d.rows)), None)
        if draft is None:
            return None
        log.info(
            "shard %s: reusing its download staged by an earlier run (%d rows)",
            shard_name(shard),
            len(draft.rows),
        )
        self.reused.inc(len(draft.rows))
        return draft

    def digest(self, rows: list) -> str:
        """What a draft of ``rows`` depends on (:func:`~visinstruct.transforms.staging.input_digest`)."""
        return input_digest(rows, self.cfg, self.takedown_digest)

    def previous(self, shard: int) -> Previous | None:
        """What a complete shard ``write.retry_failed`` redoes already holds (None for any other shard)."""
        return load_previous(self.cfg.write.path, shard) if shard in self.retry_shards else None

    def build(self, shard: int, rows: list, digest: str, prefetched: dict[str, Outcome] | None = None) -> ShardDraft:
        """Build the shard's draft (:func:`build_draft`; ``prefetched``: the routed path's outcomes) and commit it
        to staging under ``digest`` (:meth:`digest` of ``rows``): from then on a kill does not cost this shard's
        download. Rows already counted where they were fetched are not counted again."""
        fetched = len({r.key for r in rows} & prefetched.keys()) if prefetched else 0
        progress = ShardProgress(shard, len(rows) - fetched, self.cfg.download.progress_interval)
        out, attempt = self.cfg.write.path, new_attempt()
        draft = build_draft(
            shard,
            rows,
            self.fetcher,
            self.cfg,
            staging_tar(out, shard, attempt),
            self.previous(shard),
            self.takedown,
            progress,
            prefetched,
        )
        draft.digest, draft.attempt = digest, attempt
        commit_draft(out, draft)
        add_busy("ingest", draft.duration_s)
        return draft

    @staticmethod
    def done(draft: ShardDraft) -> ShardDraft:
        """``draft``, after the shard's closing log line."""
        ok = sum(r.status == "success" for r in draft.rows)  # rows_ok / rows_rejected: counted by the progress
        log.info(
            "shard %s downloaded: %d ok, %d rejected in %.1fs",
            shard_name(draft.shard),
            ok,
            len(draft.rows) - ok,
            draft.duration_s,
        )
        return draft


class DownloadShard(_ShardStep):
    """``(shard, [ImageTextPair | Rejection])`` -> :class:`ShardDraft`; images go to a staging tar.

    The direct path (``download.per_host_rps: null``): the shard's worker fetches its URLs itself.

    A draft committed to staging by an earlier (killed) run from the same inputs is reused, not downloaded
    again; so is one committed by an earlier attempt of this bundle, so a retried bundle neither loses nor
    duplicates rows. A committed draft whose rows all failed for reasons a rerun may fix is downloaded again, and
    so is every shard of ``retry_shards``: a draft left behind by a run killed after finalizing such a shard (same
    inputs, same digest) holds the very failures ``write.retry_failed`` is meant to try again.
    """

    def process(self, element):
        shard, rows = element
        rows = list(rows)
        digest = self.digest(rows)
        draft = self.committed(shard, digest)
        yield self.done(draft if draft is not None else self.build(shard, rows, digest))
