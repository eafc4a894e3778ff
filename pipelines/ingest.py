"""``visinstruct ingest``: image-text pairs in, deduplicated, resized WebDataset shards out.

Graph (element shapes in comments)::

    ReadPairs -> rows
    (rows -> SkipCompleteShards, rows -> FindDuplicateUrls) -> CoGroupByKey(shard) -> DropDuplicateUrls
      -> Download -> drafts
    drafts -> (key, sha256, phash, phashes) -> FindDuplicateImages -> losers
    (drafts by reference (shard, (digest, attempt)), losers) -> CoGroupByKey(shard) -> FinalizeShard -> ShardStats

``Download`` is one of two paths (:class:`PoliteDownload`):

- ``download.per_host_rps: null``: ``DownloadShard``, each shard's worker fetches its own URLs (no limit to keep);
- ``per_host_rps`` set (the default), so that the budget holds per host for the whole job::

      (shard, rows) -> PlanShard -> drafts (reused, or built: nothing to fetch) | pending | requests (pair)
      requests -> CountPerHost -> host table {host: k} (side input; only hosts split over k > 1 partitions)
      host table -> origins of split hosts -> FetchRobots -> {origin: robots verdict} (side input)
      requests -> RouteToPartition -> GroupByKey(partition) -> FetchPartition -> (shard, (key, outcome))
      (pending (shard, (digest, rows)), fetched) -> CoGroupByKey(shard) -> BuildShard -> drafts

URL dedup shuffles ``(url hash, key)`` records only: a pair crosses one shuffle before it is downloaded, the shard
grouping, where the URL losers meet their rows. On the direct path only pairs and small hash records are
shuffled; image bytes stay with the worker that downloaded them (in the shard's staging tar) until that shard is
finalized. The routed path shuffles the processed images once more, from the fetch partitions to the shard
builders (ARCHITECTURE.md, "Politeness"), and builds a shard with URLs only after every fetch partition has
finished (a batch ``CoGroupByKey`` is a barrier): a run killed while fetching redoes its fetching; shards that need
no network are built at once by ``PlanShard``.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import apache_beam as beam

from visinstruct.configs import ConfigError, IngestConfig, ReadConfig
from visinstruct.pipelines.options import pipeline_options
from visinstruct.pipelines.report import summarize, write_report
from visinstruct.schemas import (
    Decision,
    ImageTextPair,
    IndexRow,
    Rejection,
    from_table,
    key_for_row,
    parse_key,
    shard_name,
)
from visinstruct.transforms import worker
from visinstruct.transforms.dedup import FindDuplicateImages, FindDuplicateUrls, drop_url_losers, hash_record
from visinstruct.transforms.download import NOT_FINAL_REASONS, DownloadShard, all_not_final
from visinstruct.transforms.fetch import Fetcher, origin_of
from visinstruct.transforms.guard import INTERNAL_ERROR, count_internal_error, guarded, internal_error
from visinstruct.transforms.hosts import fetch_partition, first_url, host_of, split_count
from visinstruct.transforms.images import process_image
from visinstruct.transforms.layout import read_stats, shard_in, shard_stem, staging_dir, stats_pattern
from visinstruct.transforms.read import plan_units, read_unit
from visinstruct.transforms.read_bounds import InputError, bad_row
from visinstruct.transforms.routed import FETCHED, BuildShard, FetchPartition, FetchRobots, PlanShard
from visinstruct.transforms.shards import match, read_table
from visinstruct.transforms.staging import remove_staging
from visinstruct.transforms.takedown import TakedownError, load_takedown_lists
from visinstruct.transforms.write import FinalizeShard

log = logging.getLogger(__name__)


class _ReadUnit(beam.DoFn):
    """``(unit, (format, [paths]))`` -> ``(unit, position, ImageTextPair | Decision)``.

    An input found unreadable only now (:class:`InputError`: a COCO or LLaVA JSON that does not parse) becomes one
    ``unreadable_file`` row with its message. Readers already turn a file damaged midway into such a row; any
    other exception is a bug of ours, and the last resort: the rows so far are kept and the failure becomes one
    more row, an ``internal_error`` naming where reading stopped. Either way no bundle fails (Beam would retry it
    until the job fails).
    """

    def __init__(self, cfg: ReadConfig):
        self.cfg = cfg

    def process(self, element):
        unit, (fmt, paths) = element
        position = 0
        try:
            for item in read_unit(fmt, paths, self.cfg):
                yield unit, position, item
                position += 1
        except InputError as e:  # the input's fault, not ours
            log.warning("cannot read %s: %s", paths[0], e)
            yield unit, position, bad_row("unreadable_file", str(e), url=paths[0])
        except Exception as e:  # see the class docstring; the guard's row, for a whole file
            rejection = internal_error("read", e, url=paths[0])
            log.warning("reading %s stopped after %d rows: %s", paths[0], position, rejection.message)
            count_internal_error("read")
            message = f"reading stopped after {position} rows of {', '.join(paths)[:200]}: {rejection.message}"
            yield unit, position, bad_row(INTERNAL_ERROR, message, url=paths[0])


class _NumberRows(beam.DoFn):
    """Give each row its global key from per-unit row counts (a side input): unit order, then position."""

    def __init__(self, shard_size: int):
        self.shard_size = shard_size
        self.rows_read = beam.metrics.Metrics.counter("ingest", "rows_read")

    def setup(self):
        worker.settle()
        self._offsets = None

    def process(self, element, counts):
        if self._offsets is None:
            offsets, total = {}, 0
            for unit in sorted(counts):
                offsets[unit], total = total, total + counts[unit]
            self._offsets = offsets
        unit, position, item = element
        key = key_for_row(self._offsets[unit] + position, self.shard_size)
        self.rows_read.inc()
        yield guarded("read", lambda: _keyed(item, key), key, getattr(item, "url", None))


def _keyed(item, key: str) -> ImageTextPair | Rejection:
    if isinstance(item, Decision):
        return item.rejection("read", key, item.index.get("url"))
    return replace(item, key=key)


class ReadPairs(beam.PTransform):
    """Input files -> keyed ``ImageTextPair`` and ``Rejection`` (malformed rows), keys from the input order."""

    def __init__(self, cfg: ReadConfig, shard_size: int):
        super().__init__()
        self.cfg, self.shard_size = cfg, shard_size

    def expand(self, pbegin):
        units = plan_units(self.cfg)  # at construction: a bad path fails before anything runs
        rows = (
            pbegin
            | "Units" >> beam.Create(list(enumerate(units)))
            | "SpreadUnits" >> beam.Reshuffle()
            | "ReadUnits" >> beam.ParDo(_ReadUnit(self.cfg))
        )  # (unit, position, pair | Decision)
        counts = (
            rows | "UnitOf" >> beam.Map(lambda r: (r[0], 1)) | "CountPerUnit" >> beam.CombinePerKey(sum)
        )  # (unit, rows)
        return rows | "NumberRows" >> beam.ParDo(_NumberRows(self.shard_size), counts=beam.pvalue.AsDict(counts))


def complete_shards(out_dir: str, stages: set[str] | None = None) -> set[int]:
    """Shards of ``out_dir`` whose ``_stats.json`` exists and reads (and names one of ``stages``, when given).

    A stats file that cannot be read (cut short, damaged) does not mark its shard complete: the shard is done again.

    A shard whose rows ALL failed for reasons a rerun may fix (``NOT_FINAL_REASONS``: retryable, or caused by
    the settings, such as ``blocked_address`` when loopback was not allowed) is not complete: it says what went
    wrong with the run, not with its images, so a rerun (with corrected settings) does it again, and says so.
    """
    complete = set()
    for path in sorted(info.path for info in match(stats_pattern(out_dir))):  # none when there is no folder yet
        stem = shard_stem(path)
        if stem is None:
            continue
        try:
            stats = read_stats(path)
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:  # JSON errors are ValueErrors
            log.warning(
                "shard %s: its stats cannot be read (%s: %s); doing it again", stem, type(e).__name__, str(e)[:200]
            )
            continue
        if stages is not None and stats.stage not in stages:
            continue
        if stats.written == 0 and all_not_final(stats.rejected_by_reason):
            reasons = ", ".join(f"{r} {n}" for r, n in sorted(stats.rejected_by_reason.items()))
            log.info(
                "shard %s: doing it again: all %d rows failed for reasons a rerun may fix (%s)",
                shard_name(int(stem)),
                stats.inputs,
                reasons,
            )
            continue
        complete.add(int(stem))
    return complete


def _index_hashes(out_dir: str, shard: int):
    """The dedup records of the written samples of a complete shard (resume keeps dedup global)."""
    columns = ["key", "status", "sha256", "phash", "image_phashes", "turns", "conversation_kind"]  # not embeddings
    for row in from_table(IndexRow, read_table(shard_in(out_dir, shard).index, IndexRow, columns)):
        if row.status == "success":
            yield hash_record(row)


def has_retryable_failures(out_dir: str, shard: int) -> bool:
    """Whether a complete shard has rows that another attempt (or corrected settings) may fix."""
    statuses = read_table(shard_in(out_dir, shard).index, IndexRow).column("status").to_pylist()
    return any(status in NOT_FINAL_REASONS for status in statuses)


def reference_hashes(folder: str | None, cfg: IngestConfig) -> list[tuple[str, str]]:
    """``(file name, phash)`` of each image in a reference folder, processed like the samples."""
    if not folder:
        return []
    from visinstruct.schemas import Dropped
    from visinstruct.transforms.read_sources import folder_pairs

    out = []
    for pair in folder_pairs(folder):
        with open(pair.path, "rb") as f:
            try:
                out.append((pair.path, process_image(f.read(), cfg.resize).phash))
            except Dropped as e:
                log.warning("reference image %s skipped: %s", pair.path, e)
    return out


class Ingest(beam.PTransform):
    """The whole ingest stage as one composable transform: ``PBegin`` -> ``ShardStats`` per shard written."""

    def __init__(self, cfg: IngestConfig, complete_at: set[str] | None = None, fetcher_factory=Fetcher):
        """``complete_at``: the stages whose stats mark a shard complete (a build: only its last stage).
        ``fetcher_factory``: makes each worker's fetcher (see :class:`DownloadShard`).

        ``write.path`` is optional in a config (a build sets it): without one, one line here, not an error in Beam.
        """
        if not cfg.write.path:
            raise ConfigError("ingest needs write.path (the output folder)")
        super().__init__()
        self.cfg, self.complete_at, self.fetcher_factory = cfg, complete_at, fetcher_factory

    def expand(self, pbegin):
        cfg, out = self.cfg, self.cfg.write.path
        try:  # at construction: a missing or malformed list fails before anything runs (workers load it again)
            load_takedown_lists(cfg.dedup.takedown_lists)
        except TakedownError as e:
            raise ConfigError(f"dedup.takedown_lists: {e}") from None
        rows = pbegin | "ReadPairs" >> ReadPairs(cfg.read, cfg.write.shard_size)
        complete = complete_shards(out, self.complete_at) if cfg.write.resume else set()
        retry = frozenset(s for s in complete if cfg.write.retry_failed and has_retryable_failures(out, s))
        done = sorted(complete - retry)
        by_shard = (
            rows
            | "SkipCompleteShards" >> beam.Filter(lambda r, done: parse_key(r.key)[0] not in done, set(done))
            | "KeyByShard" >> beam.Map(lambda r: (parse_key(r.key)[0], r))  # (shard, pair | rejection)
        )
        if cfg.dedup.urls:  # over every row, those of complete shards too: a winner there still wins
            url_losers = (
                rows
                | "FindDuplicateUrls" >> FindDuplicateUrls()  # (key, winner)
                | "UrlLoserByShard" >> beam.Map(lambda x: (parse_key(x[0])[0], x))
            )
            shards = (
                {"rows": by_shard, "url_losers": url_losers}
                | "GroupByShard" >> beam.CoGroupByKey()  # (shard, {"rows": [..], "url_losers": [..]})
                | "DropDuplicateUrls" >> beam.FlatMap(_without_url_losers)
            )
        else:
            shards = by_shard | "GroupByShard" >> beam.GroupByKey()
        drafts = shards | "Download" >> PoliteDownload(cfg, retry, self.fetcher_factory)  # ShardDraft
        new_hashes = drafts | "SuccessHashes" >> beam.FlatMap(
            lambda d: [hash_record(r) for r in d.rows if r.status == "success"]
        )
        complete_done = pbegin | "CompleteShards" >> beam.Create(done)  # shard
        old_hashes = complete_done | "CompleteShardHashes" >> beam.FlatMap(lambda s: _index_hashes(out, s))
        # a run killed between a shard's stats and its staging cleanup left staging files nothing else removes
        _ = complete_done | "RemoveStaleStaging" >> beam.Map(lambda s: remove_staging(out, s))
        losers = (
            (new_hashes, old_hashes)
            | "AllHashes" >> beam.Flatten()  # (key, sha256, phash)
            | "FindDuplicateImages"
            >> FindDuplicateImages(
                cfg.dedup.phash_max_distance, reference_hashes(cfg.dedup.reference_dir, cfg), exact=cfg.dedup.sha256
            )
        )  # (key, reason, winner)
        return (
            {
                # drafts by reference: the finalize reads the one its attempt committed
                "draft": drafts | "DraftByShard" >> beam.Map(lambda d: (d.shard, (d.digest, d.attempt))),
                "losers": losers | "LoserByShard" >> beam.Map(lambda x: (parse_key(x[0])[0], x)),
            }
            | "JoinByShard" >> beam.CoGroupByKey()  # (shard, {"draft": [..], "losers": [..]})
            | "FinalizeShard" >> beam.ParDo(FinalizeShard(out))
        )  # ShardStats


def _without_url_losers(element) -> list:
    """``(shard, {"rows", "url_losers"})`` -> ``[(shard, [pair | rejection])]``: URL losers rejected; nothing for a
    shard with no rows to do (a complete shard's losers)."""
    shard, groups = element
    rows = list(groups["rows"])
    return [(shard, drop_url_losers(rows, dict(groups["url_losers"])))] if rows else []


class PoliteDownload(beam.PTransform):
    """``(shard, [pair | rejection])`` -> :class:`ShardDraft`, keeping ``download.per_host_rps`` per host for the
    whole job (see the module docstring; without a limit, ``DownloadShard`` as it always was)."""

    def __init__(self, cfg: IngestConfig, retry: frozenset[int], fetcher_factory=Fetcher):
        super().__init__()
        self.cfg, self.retry, self.fetcher_factory = cfg, retry, fetcher_factory

    def expand(self, shards):
        cfg, factory = self.cfg, self.fetcher_factory
        if cfg.download.per_host_rps is None:
            return shards | "DownloadShard" >> beam.ParDo(DownloadShard(cfg, self.retry, factory))
        dl = cfg.download
        planned = shards | "PlanShard" >> beam.ParDo(PlanShard(cfg, self.retry, factory)).with_outputs(
            PlanShard.PENDING, PlanShard.REQUESTS, main="reused"
        )
        requests = planned[PlanShard.REQUESTS]  # pair
        by_origin = (
            requests
            | "HostAndOrigin" >> beam.Map(lambda p: ((host_of(first_url(p)), origin_of(first_url(p))), 1))
            | "CountPerOrigin" >> beam.CombinePerKey(sum)
        )  # ((host, origin), urls)
        shares = beam.pvalue.AsDict(
            by_origin
            | "HostOf" >> beam.Map(lambda x: (x[0][0], x[1]))
            | "CountPerHost" >> beam.CombinePerKey(sum)  # (host, urls)
            | "SplitCount" >> beam.Map(lambda x: (x[0], split_count(x[1], dl.large_host_urls, dl.fetch_partitions)))
            | "LargeHosts" >> beam.Filter(lambda x: x[1] > 1)
        )  # the host table: {host: k}, split hosts only
        robots = beam.pvalue.AsDict(
            by_origin
            | "SplitHostOrigins" >> beam.FlatMap(lambda x, table: [x[0][1]] if x[0][0] in table else [], shares)
            | "FetchRobots" >> beam.ParDo(FetchRobots(dl, factory))
        )  # {origin: RobotsRecord}
        fetched = (
            requests
            | "RouteToPartition"
            >> beam.Map(
                lambda p, table: (fetch_partition(host_of(first_url(p)), p.key, table, dl.fetch_partitions), p),
                shares,
            )  # (partition, pair)
            | "GroupByPartition" >> beam.GroupByKey()  # (partition, [pair])
            | "FetchPartition" >> beam.ParDo(FetchPartition(cfg, factory), shares, robots)
        )  # (shard, (key, outcome))
        built = (
            {PlanShard.PENDING: planned[PlanShard.PENDING], FETCHED: fetched}
            | "JoinFetched"
            >> beam.CoGroupByKey()  # (shard, {"pending": [(digest, rows)], "fetched": [(key, outcome)]})
            | "BuildShard" >> beam.ParDo(BuildShard(cfg, self.retry, factory))
        )  # ShardDraft
        return (planned.reused, built) | "Drafts" >> beam.Flatten()


def remove_empty_staging(out_dir: str) -> None:
    """Drop the staging folder once every shard is final (local output; remote stores have no folders)."""
    import os

    folder = staging_dir(out_dir)
    if "://" not in out_dir and os.path.isdir(folder) and not os.listdir(folder):
        os.rmdir(folder)


def run(cfg: IngestConfig, beam_args: list[str] | None = None, pipeline: beam.Pipeline | None = None) -> dict:
    """Run ingest and return the report (counts per shard and reason); tests pass their own pipeline."""
    p = pipeline or beam.Pipeline(options=pipeline_options(beam_args))
    _ = p | "Ingest" >> Ingest(cfg)
    result = p.run()
    result.wait_until_finish()
    remove_empty_staging(cfg.write.path)
    report = summarize(cfg.write.path, stage="ingest", result=result)
    write_report(cfg.write.path, report)
    return report
