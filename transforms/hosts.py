"""Job-wide politeness: which fetch partition fetches a URL, so that ``download.per_host_rps`` holds per job.

A limiter in each worker holds a host to ``per_host_rps`` only within that worker: rows are grouped by *shard*,
and one host's URLs are spread over every shard, so on 100 workers a host would get 100 times the budget. When
``per_host_rps`` is set, ingest therefore fetches by *host*:

- every host goes to one **fetch partition**, ``stable_hash(host) % fetch_partitions``: one place in the job
  paces it, at ``per_host_rps``, and asks for each of its origins' robots.txt once (again if that partition is
  retried, and again when a failed verdict expires, as the fetcher's cache says);
- a **large host** (more URLs in the job than ``download.large_host_urls``) is split over
  ``k = min(fetch_partitions, ceil(urls / large_host_urls))`` partitions (a URL's sub-partition comes from a stable
  hash of its row key), each pacing it at ``per_host_rps / k``: :func:`split_count`, :func:`fetch_partition`;
  its robots.txt is asked once per origin by a step of its own and handed to its partitions;
- a row is routed by its **first URL's host** (:func:`first_url`). The other images of a multi-image row, and
  redirect targets, are fetched within that partition, each at its host's own interval (``k / per_host_rps``
  when the host is split), but their hosts may be fetched in other partitions too: for them the budget is per
  partition, not per job. So the limit holds per job for every request to the host a row is routed by: the
  image of a one-image row (nearly all rows), unless a redirect takes it to another host.

Host names are compared as the fetcher paces them (:func:`~visinstruct.transforms.fetch.host_name`): lowercase,
IDNA A-labels, no trailing dot, so ``Example.COM.`` and ``example.com``, or a Unicode name and its IDNA form, are one
host with one budget; origins (robots.txt) also leave out user info and the scheme's default port. Two names of
one server (``www.`` and not, an IP and its name) are still two hosts: telling them apart would need DNS.

The functions here are plain; the Beam steps that use them are in :mod:`visinstruct.transforms.routed`
(``PlanShard``, ``FetchRobots``, ``FetchPartition``, ``BuildShard``) and the graph in ``pipelines/ingest.py``.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import math
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from visinstruct.schemas import ImageTextPair, is_url
from visinstruct.transforms.fetch import host_name
from visinstruct.transforms.progress import ShardProgress

log = logging.getLogger(__name__)


def stable_hash(text: str) -> int:
    """A hash of ``text`` that every process and every run agrees on (Python's ``hash`` is salted per process)."""
    return zlib.crc32(text.encode("utf-8", "surrogatepass"))


def host_of(url: str) -> str:
    """The host a URL's requests go to, as the fetcher's limiter names it (:func:`host_name`); ``""`` when
    unparsable."""
    try:
        return host_name(urlsplit(url).hostname)
    except ValueError:
        return ""


def network_urls(pair: ImageTextPair) -> list[str]:
    """The URLs the fetcher would request for ``pair`` (before redirects), in its order: none for a text-only row
    or one whose images are bytes or paths (those are read where the shard is written)."""
    if pair.text_only:
        return []
    if pair.images:
        return [i.location for i in pair.images if i.data is None and i.location and is_url(i.location)]
    if pair.image is None and pair.url is not None:
        return [pair.url]
    return []


def first_url(pair: ImageTextPair) -> str | None:
    """The URL a row is routed by (its first), or ``None`` when it needs no network."""
    urls = network_urls(pair)
    return urls[0] if urls else None


def split_count(urls: int, large_host_urls: int, fetch_partitions: int) -> int:
    """How many fetch partitions share a host with ``urls`` URLs in the job: 1 up to ``large_host_urls``, else
    ``ceil(urls / large_host_urls)``, at most ``fetch_partitions``."""
    if urls <= large_host_urls:
        return 1
    return min(fetch_partitions, math.ceil(urls / large_host_urls))


def fetch_partition(host: str, key: str, shares: dict[str, int], fetch_partitions: int) -> int:
    """The fetch partition of a row whose first URL is on ``host``.

    A host not in ``shares`` (the host table: split hosts and their ``k``) has one partition; a split host's
    rows go to ``k`` consecutive partitions (distinct, since ``k <= fetch_partitions``), by a stable hash of the
    row's key: deterministic, and balanced however the host's URLs are laid out in the input.
    """
    k = shares.get(host, 1)
    sub = stable_hash(key) % k if k > 1 else 0
    return (stable_hash(host) + sub) % fetch_partitions


_PRUNE_MIN = 4096  # hosts whose due times a schedule keeps before it first forgets those that have passed
_LIVE: weakref.WeakSet = weakref.WeakSet()  # every schedule not yet collected (see _discard_all)


def _discard_all() -> None:
    """At exit, before ``concurrent.futures`` joins its threads: a schedule whose partition stopped feeding it (a
    later step of its bundle failed) must not keep its fetch threads waiting for pairs, and the process alive."""
    for schedule in list(_LIVE):
        schedule.close(discard=True)


threading._register_atexit(_discard_all)  # runs before the executors' join (registered after theirs)


class HostSchedule:
    r"""The pairs of one fetch partition in the order their hosts' slots come due: an iterator for the fetch threads.

    Pairs wait in a queue per host (the host of their first URL), in the order they were added. A host is *due*
    when its next request may leave: its previous dispatch plus ``interval_of(host)`` (the limiter's spacing,
    ``k`` times longer for a host split over ``k`` partitions). ``next()`` gives the pair of the host due earliest
    (ties: the host that has waited longer), so while one host waits for its slot the threads serve others,
    instead of all sleeping on one host's slot as a fixed order does once the pairs at hand hold nothing else.
    When no host is due yet, ``next()`` waits until the earliest is, or until pairs are added (a new host is due at
    once); when none is waiting it waits for more, until :meth:`close`. The caller takes pairs one thread at a time
    (``completed`` holds a lock around ``next``), so no thread commits to a slot far ahead while a pair added later
    could go sooner.

    The partition's own thread :meth:`add`\ s pairs as the waiting drain (Beam's iterables are read on the thread of
    the bundle) and closes the schedule when its input ends or it stops. The limiter still paces every request
    (and the other images and redirects of a row, which this does not schedule); the schedule only decides which
    pair a free thread takes. ``clock`` and ``sleep`` are for tests (``sleep`` replaces the wait for a due time).
    """

    def __init__(
        self,
        interval_of: Callable[[str], float],
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
    ):
        _LIVE.add(self)
        self._interval_of, self._clock = interval_of, clock
        self._cond = threading.Condition()
        self._sleep = sleep or (lambda seconds: self._cond.wait(seconds))
        self._queues: dict[str, collections.deque] = {}
        self._heap: list[tuple[float, int, str]] = []  # (due, order pushed, host) of every host with pairs waiting
        # when each host met is next due; kept once its queue empties while that time is still ahead (a pair added
        # later must wait for it), pruned of the hosts whose time has passed once it doubles (many hosts, one each)
        self._due: dict[str, float] = {}
        self._prune_at = _PRUNE_MIN
        self._order = itertools.count()
        self._waiting, self._closed = 0, False

    @property
    def waiting(self) -> int:
        """Pairs added and not yet taken."""
        return self._waiting

    def due_in(self) -> float:
        """Seconds until the earliest waiting host is due: 0 when one is due now, ``inf`` when none is waiting."""
        with self._cond:
            return max(0.0, self._heap[0][0] - self._clock()) if self._heap else math.inf

    def add(self, pairs: Iterable[ImageTextPair]) -> None:
        """Queue ``pairs`` behind their hosts' (a host not met before is due at once)."""
        with self._cond:
            for pair in pairs:
                host = host_of(first_url(pair) or "")
                queue = self._queues.get(host)
                if queue is None:
                    queue = self._queues[host] = collections.deque()
                    heapq.heappush(self._heap, (self._due.get(host, 0.0), next(self._order), host))
                queue.append(pair)
                self._waiting += 1
            self._cond.notify_all()

    def close(self, discard: bool = False) -> None:
        """No more pairs: ``next()`` ends once the waiting ones are taken (at once, for threads already waiting).

        ``discard``: drop the waiting pairs too, so that ``next()`` ends at once (a failed partition sends no
        further request; the retry of its bundle asks again).
        """
        with self._cond:
            self._closed = True
            if discard:
                self._queues.clear()
                self._heap.clear()
                self._waiting = 0
            self._cond.notify_all()

    def __iter__(self) -> HostSchedule:
        return self

    def __next__(self) -> ImageTextPair:
        with self._cond:
            while True:
                if not self._heap:
                    if self._closed:
                        raise StopIteration
                    self._cond.wait()
                    continue
                due, _, host = self._heap[0]
                now = self._clock()
                if due <= now:
                    break
                self._sleep(due - now)  # woken early by add(): a new host may be due sooner
            heapq.heappop(self._heap)
            queue = self._queues[host]
            pair = queue.popleft()
            self._waiting -= 1
            self._due[host] = max(due, now) + self._interval_of(host)
            if queue:
                heapq.heappush(self._heap, (self._due[host], next(self._order), host))
            else:
                del self._queues[host]
                if len(self._due) >= self._prune_at:
                    self._prune(now)
            return pair

    def _prune(self, now: float) -> None:
        """Forget the due times that have passed of hosts with nothing waiting: such a host is due at once anyway."""
        self._due = {h: due for h, due in self._due.items() if due > now}  # a waiting host's is set when taken
        self._prune_at = max(_PRUNE_MIN, 2 * len(self._due))


class PartitionProgress(ShardProgress):
    """:class:`ShardProgress` of one fetch partition: the same counters (``ingest/rows_done``, ``rows_ok``,
    ``rows_rejected``), log lines that name the partition. ``total``: the rows read so far (a partition reads its
    rows a window at a time)."""

    def log(self) -> None:
        rate = self.done / max(time.monotonic() - self._start, 1e-9)
        log.info(
            "fetch partition %d: %d of %d rows read so far done, %d ok, %d rejected, %.1f rows/s",
            self.shard,
            self.done,
            self.total,
            self.ok,
            self.rejected,
            rate,
        )
