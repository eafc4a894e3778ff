"""The routed download path: with ``download.per_host_rps`` set, URLs are fetched by host so that the limit holds
for the whole job (the plain functions: :mod:`.hosts`; the graph: ``pipelines/ingest.py`` ``PoliteDownload``).

:class:`PlanShard` reuses a committed draft, builds at once a shard with nothing to fetch, and otherwise sends its
URL rows to fetch partitions; :class:`FetchRobots` asks a split host's robots.txt once; :class:`FetchPartition`
fetches a partition's URLs; :class:`BuildShard` writes the shard from the outcomes. They share the shard steps'
code with the direct path (:class:`~visinstruct.transforms.download.DownloadShard`): one way to reuse, build and
commit a draft.

Resume granularity: a shard with URLs to fetch is built (and committed to staging) only after every fetch
partition has finished, since its outcomes cross a batch ``CoGroupByKey`` (a barrier); a run killed while fetching
redoes its fetching. Shards that need no network are built by :class:`PlanShard` at once.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator

import apache_beam as beam

from visinstruct.configs import IngestConfig
from visinstruct.schemas import ImageTextPair, Rejection, parse_key, shard_name
from visinstruct.transforms.download import (
    FetcherStep,
    Outcome,
    Previous,
    _ShardStep,
    entering,
    fetch_and_process,
)
from visinstruct.transforms.fetch import Fetcher, HostRateLimiter, RobotsRecord, origin_of, robots_verdict
from visinstruct.transforms.guard import INTERNAL_ERROR, count_internal_error, guarded
from visinstruct.transforms.hosts import HostSchedule, PartitionProgress, first_url, network_urls
from visinstruct.transforms.takedown import Takedown
from visinstruct.transforms.timing import add_busy

log = logging.getLogger(__name__)
WINDOW_PAIRS = 10_000  # a fetch partition keeps about this many pairs read and waiting (never all in memory)
READ_AHEAD_PAIRS = 4 * WINDOW_PAIRS  # and reads on up to this many while no waiting host is due
FETCHED = "fetched"  # the outcomes' tag in BuildShard's CoGroupByKey
_END = object()


def network_pairs(rows: list, previous: Previous | None = None, takedown: Takedown | None = None) -> list:
    """The pairs of a shard that a fetch partition fetches: URL rows not rejected, taken down or kept in
    ``previous`` (paths, bytes and text-only rows are read where the shard is built)."""
    previous, takedown = previous or {}, takedown or Takedown()
    return [
        r
        for r in entering(rows, previous, takedown)
        if isinstance(r, ImageTextPair) and r.key not in previous and first_url(r) is not None
    ]


class _Failed:
    """An exception raised on a worker thread, handed to the consuming thread."""

    def __init__(self, error: BaseException):
        self.error = error


def completed(run_map: Callable[[Callable, list], list], fn: Callable, items: list, workers: int) -> Iterator:
    """``(item, fn(item))`` for each of ``items`` as each completes, not in input order.

    ``workers`` loops run on ``run_map``'s threads (a fetcher's ``map``), each taking the next item once its last
    is done: at most ``workers`` items are in flight, and a slow one holds up no other. ``fn`` should not raise
    (wrap it in the guard); if it does, the loops stop after their current item and the error is raised here.
    Closing the generator early stops them the same way.
    """
    source, lock, stop = iter(items), threading.Lock(), threading.Event()
    finished: queue.SimpleQueue = queue.SimpleQueue()

    def loop(_) -> None:
        while not stop.is_set():
            with lock:
                item = next(source, _END)
            if item is _END:
                return
            try:
                finished.put((item, fn(item)))
            except BaseException:
                stop.set()
                raise

    def run() -> None:
        try:
            run_map(loop, list(range(max(1, workers))))
        except BaseException as e:  # handed to the consuming thread, which raises it
            finished.put(_Failed(e))
        finally:
            finished.put(_END)

    threading.Thread(target=run, name="fetch-partition-map", daemon=True).start()
    try:
        while (got := finished.get()) is not _END:
            if isinstance(got, _Failed):
                raise got.error
            yield got
    finally:
        stop.set()


class PlanShard(_ShardStep):
    """``(shard, [ImageTextPair | Rejection])`` -> a :class:`ShardDraft` (reused, or built here when the shard
    needs no network), or else the shard's rows as ``pending`` ``(shard, (digest, rows))`` and its
    :func:`network_pairs` as ``requests``.

    A committed draft is reused as ``DownloadShard`` reuses it (the same code); nothing of that shard is fetched
    then. A shard with nothing to fetch (paths, bytes, text-only rows, rejections, takedowns) is built and committed
    here, as ``DownloadShard`` builds it, with no shuffle and no wait for the fetch partitions. The draft digest is
    computed once, here, and travels with the pending rows.
    """

    PENDING, REQUESTS = "pending", "requests"

    def process(self, element):
        shard, rows = element
        rows = list(rows)
        digest = self.digest(rows)
        draft = self.committed(shard, digest)
        if draft is not None:
            yield self.done(draft)
            return
        requests = network_pairs(rows, self.previous(shard), self.takedown)
        if not requests:
            yield self.done(self.build(shard, rows, digest))
            return
        yield beam.pvalue.TaggedOutput(self.PENDING, (shard, (digest, rows)))
        for pair in requests:
            yield beam.pvalue.TaggedOutput(self.REQUESTS, pair)


class FetchRobots(FetcherStep):
    """``origin`` -> ``(origin, RobotsRecord)``: robots.txt of a split host, once per origin (``FetchPartition``
    seeds each fetcher's cache with it, so none of the host's partitions asks again).

    The record is parsed here too: one that does not parse (a hostile file), or a fetch that fails in a way the
    fetcher does not turn into a record, emits nothing; the host's partitions then ask for it themselves (paced
    by their limiters), as for a host that is not split.
    """

    def process(self, origin: str):
        if not self.download.check_robots_txt:
            return
        try:
            record = self.fetcher.robots_record(origin)
            robots_verdict(record)
        except Exception as e:  # the last resort: no verdict handed on, never a failed job
            message = f"{type(e).__name__}: {e}"[:300]
            log.warning("robots.txt of %s not handed to its fetch partitions (%s); they ask for it", origin, message)
            return
        yield origin, record


class FetchPartition(FetcherStep):
    """``(partition, [ImageTextPair])`` -> ``(shard, (key, Outcome))`` for each pair: one fetch partition.

    A fresh limiter per partition paces each host at ``per_host_rps`` (``k / per_host_rps`` apart for a host split
    over ``k`` partitions: the side input ``shares``). The fetcher's threads, ``download.threads`` in flight, take
    the pairs in the order their hosts' slots come due (:class:`~visinstruct.transforms.hosts.HostSchedule`; about
    :data:`WINDOW_PAIRS` read and waiting, up to :data:`READ_AHEAD_PAIRS` while no waiting host is due), fetch and
    process them, and each outcome is emitted as it completes (:func:`completed`; its counters counted on this
    thread). ``robots`` (side input): verdicts of split hosts' robots.txt; only the origins of the pairs read seed
    the worker's fetcher's cache, before any of them is fetched, once per worker (a verdict depends on its origin
    only; a seeded failure then expires as a fetched one does); the limiter never outlives its partition.
    """

    def __init__(self, cfg: IngestConfig, fetcher_factory=Fetcher):
        super().__init__(cfg.download, fetcher_factory)
        self.cfg = cfg

    def setup(self):
        super().setup()
        self.seeded: set[str] = set()
        self.schedule: HostSchedule | None = None

    def teardown(self):
        # A later step of the bundle may fail while this generator waits at its ``yield``: Beam then never resumes
        # it, and its fetch threads would take every pair waiting, then wait for more for good. Beam tears the
        # steps of a failed bundle down: the schedule is discarded here (and at exit, see ``HostSchedule``).
        if getattr(self, "schedule", None) is not None:
            self.schedule.close(discard=True)
        super().teardown()

    def seed(self, pairs: list[ImageTextPair], robots: dict[str, RobotsRecord]) -> None:
        """Seed the fetcher with the verdicts of the origins ``pairs`` will ask, not seeded before here."""
        if not robots:
            return
        met = {origin_of(url) for pair in pairs for url in network_urls(pair)}
        fresh = (met & robots.keys()) - self.seeded
        if fresh:
            self.fetcher.seed_robots({origin: robots[origin] for origin in fresh})
            self.seeded |= fresh

    def process(self, element, shares: dict[str, int], robots: dict[str, RobotsRecord]):
        partition, pairs = element
        start, cfg = time.monotonic(), self.cfg
        limiter = HostRateLimiter(cfg.download.per_host_rps, shares)
        progress = PartitionProgress(partition, 0, cfg.download.progress_interval)

        def one(pair: ImageTextPair) -> Outcome:
            return guarded(
                "download", lambda: fetch_and_process(pair, self.fetcher, cfg, limiter), pair.key, pair.location
            )

        source = iter(pairs)
        schedule = self.schedule = HostSchedule(limiter.interval_of)

        def top_up() -> None:  # on this thread (Beam's iterables are read where the bundle runs)
            # a window waiting, and more while every waiting host waits for its slot (a host read later may be due)
            while schedule.waiting < WINDOW_PAIRS or (schedule.waiting < READ_AHEAD_PAIRS and schedule.due_in() > 0):
                batch = list(itertools.islice(source, WINDOW_PAIRS // 10))
                if not batch:
                    schedule.close()
                    return
                progress.total += len(batch)
                self.seed(batch, robots)  # before any pair of the batch can be fetched
                schedule.add(batch)

        outcomes = completed(self.fetcher.map, one, schedule, cfg.download.threads)
        try:
            top_up()
            for pair, outcome in outcomes:
                if isinstance(outcome, Rejection) and outcome.reason == INTERNAL_ERROR:
                    count_internal_error(outcome.stage)  # the guard ran on a fetch thread, where it cannot count
                progress.row(outcome)
                yield parse_key(pair.key)[0], (pair.key, outcome)
                top_up()  # a pair taken is an outcome to come: the schedule never waits with nothing in flight
        except BaseException:
            # a failed bundle sends no further request: its retry asks again, and both together would double the pace
            schedule.close(discard=True)
            raise
        finally:
            schedule.close()  # threads waiting for pairs end
            outcomes.close()  # and the fetch loops stop after their current pair
        add_busy("ingest", time.monotonic() - start)


class BuildShard(_ShardStep):
    """``(shard, {"pending": [(digest, rows)], "fetched": [(key, Outcome)]})`` -> :class:`ShardDraft`.

    The shard's draft built and committed as ``DownloadShard`` builds it (the same method), with the fetch
    partitions' outcomes in place of fetching (paths and bytes are read here). The draft's ``duration_s`` is
    this step's time.
    """

    def process(self, element):
        shard, groups = element
        pending, fetched = list(groups[PlanShard.PENDING]), dict(groups[FETCHED])
        if not pending:  # outcomes without their shard's rows: only a bug of ours could send them
            log.warning("shard %s: %d fetched rows without the shard's rows; ignored", shard_name(shard), len(fetched))
            return
        digest, rows = pending[0]
        yield self.done(self.build(shard, rows, digest, prefetched=fetched))
