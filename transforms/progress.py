"""Progress of one shard while it downloads: Beam counters as rows complete, and a log line now and then.

A shard of 10,000 rows at 10 requests/s takes 17 minutes; without this, nothing shows for that long. Counters
(``ingest/rows_done``, ``ingest/rows_ok``, ``ingest/rows_rejected``) are what Dataflow's console shows; the log
line (``shard 00003: 2500/10000 rows, 2391 ok, 109 rejected, 9.8 rows/s``) is what a local run prints on stderr
through the ``visinstruct`` logger (the CLI shows INFO unless ``--quiet``).

Beam's metrics containers are per thread, so counters only count when incremented on the thread running the
DoFn: :func:`map_with_progress` runs the work on the fetch threads and reports each result on the caller's.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import apache_beam as beam

from visinstruct.schemas import Rejection, shard_name
from visinstruct.transforms.guard import INTERNAL_ERROR, count_internal_error

log = logging.getLogger(__name__)
_DONE = object()


class ShardProgress:
    """Counts one shard's finished rows; logs every ``every_s`` seconds (0: every row), and once more when the
    shard's last row finishes (so each shard that downloads anything ends with its totals and rate)."""

    def __init__(self, shard: int, total: int, every_s: float = 30.0, namespace: str = "ingest"):
        self.shard, self.total, self.every_s = shard, total, every_s
        self.done = self.ok = self.rejected = 0
        self._start = self._last = time.monotonic()
        counter = beam.metrics.Metrics.counter
        self._done_c, self._ok_c = counter(namespace, "rows_done"), counter(namespace, "rows_ok")
        self._rejected_c = counter(namespace, "rows_rejected")

    def row(self, outcome: object) -> None:
        """One row finished: ``outcome`` is a :class:`Rejection` or anything else for a kept row."""
        self.done += 1
        self._done_c.inc()
        if isinstance(outcome, Rejection):
            self.rejected += 1
            self._rejected_c.inc()
        else:
            self.ok += 1
            self._ok_c.inc()
        now = time.monotonic()
        if self.done == self.total or now - self._last >= self.every_s:
            self._last = now
            self.log()

    def log(self) -> None:
        rate = self.done / max(time.monotonic() - self._start, 1e-9)
        log.info(
            "shard %s: %d/%d rows, %d ok, %d rejected, %.1f rows/s",
            shard_name(self.shard),
            self.done,
            self.total,
            self.ok,
            self.rejected,
            rate,
        )


def map_with_progress(
    run_map: Callable[[Callable, list], list], fn: Callable, items: list, progress: ShardProgress
) -> list:
    """``run_map(fn, items)`` (e.g. a fetcher's thread pool), reporting each result to ``progress`` on this
    thread as it completes. ``fn`` must not raise (wrap it in the guard); results come back in input order.

    Internal errors among the results are counted here, since the guard's own counter is lost on a fetch thread.
    """
    finished: queue.SimpleQueue = queue.SimpleQueue()
    box: dict = {}

    def work(item):
        result = fn(item)
        finished.put(result)
        return result

    def run():
        try:
            box["results"] = run_map(work, items)
        except BaseException as e:  # handed to the calling thread, which raises it
            box["error"] = e
        finally:
            finished.put(_DONE)

    thread = threading.Thread(target=run, name=f"shard-{progress.shard}-map", daemon=True)
    thread.start()
    while (result := finished.get()) is not _DONE:
        if isinstance(result, Rejection) and result.reason == INTERNAL_ERROR:
            count_internal_error(result.stage)  # the guard ran on a fetch thread, where it cannot count
        progress.row(result)
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["results"]
