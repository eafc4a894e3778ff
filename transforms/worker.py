"""Once per Beam worker process: take what the worker keeps for its whole life out of the cyclic collector's sight.

A Beam worker imports Beam, pandas, Arrow, Pillow and our modules before its first bundle: hundreds of thousands of
objects that live until the process ends. Python's collector walks all of them on every full collection and once
more at exit, when a worker of the local runner spends about 0.5 s tearing them down (measured on this machine: a
process that imported Beam took 0.52 s to exit, 0.04 s after ``gc.freeze()``). The FnApiRunner stops its workers
one after another, so that is 0.5 s of every local run's wall time per worker.

:func:`settle` freezes them (``gc.freeze()``: moved to a generation the collector never scans, never freed) the
first time a step's ``setup`` calls it in an SDK worker process. Objects made later are collected as usual. What is
already garbage at that moment is kept for good (60 objects in a fresh worker here; a ``gc.collect()`` first would
cost 0.17 s of every worker's start), which is why it runs once per process, at set-up, and only in SDK workers:
a driver or a test run that runs steps in its own process (the in-memory runner) holds graphs, models and fixtures
that must stay collectable.
"""

from __future__ import annotations

import gc
import sys
import threading

SDK_WORKER_MAIN = "apache_beam.runners.worker.sdk_worker_main"  # python -m ...: local worker processes, Dataflow's
_lock = threading.Lock()
_frozen = False


def in_sdk_worker() -> bool:
    """Whether this process is a Beam SDK worker (its main module is Beam's ``sdk_worker_main``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == SDK_WORKER_MAIN


def freeze_once() -> bool:
    """Freeze every object the collector tracks now, once per process; True when this call did it."""
    global _frozen
    with _lock:
        if _frozen:
            return False
        gc.freeze()
        _frozen = True
        return True


def settle() -> bool:
    """In an SDK worker, :func:`freeze_once`; elsewhere nothing. True when this call froze the process."""
    return in_sdk_worker() and freeze_once()
