"""The one guard every per-record step uses: what one record can raise becomes that record's dead-letter row.

A Beam bundle that raises is retried, and a bundle retried four times on one bad record fails a Dataflow job. So a
per-record step calls its plain function through :func:`guarded`: expected failures are already decisions with
their own reasons; anything else (a bug, a library raising something undocumented on odd input) is dropped with
reason ``internal_error``, the exception's class name and message (a :class:`Rejection`, the dead-letter row), and
counted as the Beam counter ``<stage>/internal_error``, and the bundle goes on with the next record.

Never wrap a whole shard or bundle in it: one record's failure must cost that record only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from visinstruct.schemas import Decision, Rejection

INTERNAL_ERROR = "internal_error"

log = logging.getLogger(__name__)
T = TypeVar("T")


def internal_error(stage: str, exc: BaseException, key: str = "", url: str | None = None) -> Rejection:
    """The dead-letter row for an unexpected exception, with its class name and message (bounded, as every
    decision's message is)."""
    kind = type(exc).__name__
    return Decision.drop(INTERNAL_ERROR, f"{kind}: {exc}", {"exception": kind}).rejection(stage, key, url)


def count_internal_error(stage: str) -> None:
    """Count one internal error as ``<stage>/internal_error`` (Beam's counter; a no-op outside a pipeline)."""
    import apache_beam as beam  # lazy: plain callers (CLI tools) need not import Beam

    beam.metrics.Metrics.counter(stage, INTERNAL_ERROR).inc()


def guarded(stage: str, fn: Callable[[], T], key: str = "", url: str | None = None) -> T | Rejection:
    """``fn()``, or an ``internal_error`` rejection when it raises anything but an interrupt or exit.

    Example::

        outcome = guarded("decode", lambda: process_image(data, cfg), pair.key, pair.url)
    """
    try:
        return fn()
    except Exception as e:  # the point: one record's failure becomes its dead-letter row
        log.warning("%s: internal error on %s: %s: %s", stage, key or url or "a record", type(e).__name__, e)
        count_internal_error(stage)
        return internal_error(stage, e, key, url)
