"""Busy time per stage: the seconds of work a stage did, as the Beam counter ``<stage>/busy_us`` (microseconds).

Stages of one graph run at the same time (fused, on many workers and threads), so a stage has no wall time of its
own. What a build report can say is how long each stage kept a worker busy: summed over workers, these add up to
more than the wall time when stages overlap, and their ratio shows which stage binds. Counters are per DoFn
invocation: increment them from the thread that runs ``process`` (Beam's metrics container is thread-local).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import apache_beam as beam

BUSY_US = "busy_us"


def add_busy(stage: str, seconds: float) -> None:
    beam.metrics.Metrics.counter(stage, BUSY_US).inc(round(seconds * 1e6))


@contextmanager
def busy(stage: str) -> Iterator[None]:
    """Count the time the block takes as ``stage``'s work (also when it raises)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        add_busy(stage, time.perf_counter() - start)
