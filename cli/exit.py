"""End the ``visinstruct`` process once a command has returned, without the interpreter's native teardown.

After a command has printed a correct result, the interpreter's final teardown destroys native libraries' static
objects while their worker threads are still alive (at the end of ``visinstruct stats``: Arrow's CPU pool threads
and jemalloc's background thread), and the process aborts with ``terminate called without an active exception``
(SIGABRT, exit status 134): 2 runs of 30 of ``visinstruct stats`` on a one-shard dataset on this machine, which
breaks ``visinstruct validate && train`` scripts. The bug is Arrow's (apache/arrow#34314, open) and Arrow has no
call that stops and joins its pools.

So :func:`exit_process` ends the process once the command has returned: it flushes what Python buffers, joins
Python's non-daemon threads and runs the ``atexit`` handlers (logging's flush, temporary-folder clean-up, Beam's)
as a normal exit does, flushes again, then leaves with ``os._exit(status)``, skipping only the native teardown
where the abort happens. Nothing we write depends on that teardown: every file is closed and atomically renamed
before a command returns. With it, 30 runs of 30 exited 0.
Only the console entry point calls it; a command called as a function (tests, notebooks) returns normally.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None and not stream.closed:
                stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`): nothing more can reach the reader
            pass


def exit_process(status: int | None) -> NoReturn:
    """Exit with ``status`` (``None`` is 0) after flushing output and running ``atexit`` handlers.

    Example, as the last line of a console entry point::

        exit_process(main())
    """
    _flush()
    shutdown = getattr(threading, "_shutdown", None)  # what a normal exit runs first: join non-daemon threads
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()  # then the atexit handlers; the native teardown after them is what we skip
    _flush()
    os._exit(status or 0)
