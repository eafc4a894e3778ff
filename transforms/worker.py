"""Once per worker process: take what every worker keeps for its whole life out of the cyclic collector's sight.

A Beam worker imports Beam, pandas, Arrow, Pillow and our modules before its first bundle: hundreds of thousands of
objects that live until the process ends. Python's collector walks all of them on every full collection and once
more at exit, when a worker of the local runner spends about 0.5 s tearing them down (measured on this machine: a
process that imported Beam took 0.52 s to exit, 0.04 s after ``gc.freeze()``). The FnApiRunner stops its workers
one after another, so that is 0.5 s of every local run's wall time per worker.

:func:`settle` freezes them (``gc.freeze()``: moved to a generation the collector never scans, never freed) the
first time a step's ``setup`` calls it in a process. Objects made later are collected as usual; what was already
garbage at that moment is kept, which is why it runs once per process, at set-up, not per bundle.
"""

from __future__ import annotations

import gc
import threading

_lock = threading.Lock()
_settled = False


def settle() -> bool:
    """Freeze every object the collector tracks now, once per process; True when this call did it."""
    global _settled
    with _lock:
        if _settled:
            return False
        gc.freeze()
        _settled = True
        return True
