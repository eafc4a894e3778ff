"""The one HTTP core of the image fetcher (``fetch.py``) and the LLM client (``llm_openai.py``): plain code, no Beam.

What both need from a connection, and what neither should write twice:

- :func:`pool_manager`: a urllib3 pool whose connections stop reading at the calling thread's attempt deadline
  (:func:`attempt_deadline`), so a server that drips bytes, in the headers or the body, is cut off at the limit;
  with ``address_allowed`` (the SSRF policy of ``addresses.py``), every address a host resolves to is judged before
  connecting, and the socket connects to the address that was judged (DNS cannot change its answer in between);
- :func:`send`, :func:`read_capped` and :func:`discard`: one exchange within the deadline, a body read up to a
  byte cap, a connection left safe to reuse;
- :class:`HttpError` and :func:`classify`: every failure as one stable reason code (``timeout``,
  ``connection_error``, ``dns_error``, ``ssl_error``, ``blocked_address``, ``truncated``, ``too_large``,
  ``http_<status>``...) and whether another attempt may succeed;
- :func:`retrying`: retries with exponential backoff and jitter for retryable failures only, honouring Retry-After
  up to ``max_backoff`` (asking for more ends the request at once), within an optional overall deadline.
"""

from __future__ import annotations

import functools
import logging
import random
import re
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import TypeVar

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
# The core's failures another attempt, or a rerun, may fix; each client adds its own (``empty_body``...).
RETRYABLE_REASONS = frozenset(
    {"timeout", "connection_error", "ssl_error", "truncated", *(f"http_{s}" for s in RETRYABLE_STATUS)}
)
CHUNK = 64 * 1024
AddressCheck = Callable[[str], bool]  # an IP address as text -> may it be contacted?
_LOCAL = threading.local()  # .deadline: the monotonic time the running attempt of this thread must end by
_CONNECTION_REPR = re.compile(r"\w*(?:Connection|Pool)\w*\(host=[^)]*\): ")  # urllib3 prefixes errors with it


class HttpError(Exception):
    """A failed attempt: a stable ``reason`` code; ``retryable`` says whether another attempt may succeed.

    ``retry_after`` is the server's Retry-After in seconds; ``attempts`` is set by :func:`retrying` when it gives up.
    """

    def __init__(self, reason: str, message: str, retryable: bool = False, retry_after: float | None = None):
        super().__init__(message)
        self.reason, self.retryable, self.retry_after = reason, retryable, retry_after
        self.attempts = 1

    def with_message(self, message: str) -> HttpError:
        """The same failure with another message (a longer account, or one with secrets scrubbed)."""
        copy = HttpError(self.reason, message, self.retryable, self.retry_after)
        copy.attempts = self.attempts
        return copy


class BlockedAddress(NewConnectionError):
    """Raised at connect time for an address the ``address_allowed`` policy refuses."""


# -- the per-attempt deadline ----------------------------------------------------------------------------------------


@contextmanager
def attempt_deadline(seconds: float) -> Iterator[None]:
    """Every socket read of this thread inside the block ends ``seconds`` from now at the latest.

    Blocks nest (robots.txt is fetched inside an image's attempt): the inner one has its own limit, and the outer
    one's comes back when it ends.
    """
    outer = getattr(_LOCAL, "deadline", None)
    _LOCAL.deadline = time.monotonic() + seconds
    try:
        yield
    finally:
        _LOCAL.deadline = outer


def time_left() -> float | None:
    """Seconds left before this thread's attempt deadline (None outside :func:`attempt_deadline`)."""
    deadline = getattr(_LOCAL, "deadline", None)
    return None if deadline is None else deadline - time.monotonic()


@functools.cache
def _deadline_socket_class(cls: type) -> type:
    """A subclass of a socket class whose reads stop at the calling thread's attempt deadline.

    A socket timeout bounds each read, not the whole answer: a server sending a byte every few seconds would
    never trip it. Setting the timeout to the time left before every read bounds the total, for the status
    line and headers as well as the body (http.client reads through ``recv_into``).
    """

    def recv_into(self, buffer, *args):
        left = time_left()
        if left is not None:
            if left <= 0:
                raise TimeoutError("the attempt's time limit has passed")
            self.settimeout(left)
        return cls.recv_into(self, buffer, *args)

    # No new slots: the layout stays the same, so an existing socket object can take this class.
    return type(f"Deadline{cls.__name__}", (cls,), {"__slots__": (), "recv_into": recv_into})


def _checked_connect(conn: HTTPConnection, address_allowed: AddressCheck) -> socket.socket:
    """Resolve, check every address, and connect to a checked one (no second DNS lookup)."""
    try:
        infos = socket.getaddrinfo(conn._dns_host, conn.port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise NameResolutionError(conn.host, conn, e) from e
    refused = [info[4][0] for info in infos if not address_allowed(info[4][0])]
    if refused:  # one bad answer is enough: a mixed answer is how DNS rebinding attacks start
        raise BlockedAddress(conn, f"{conn.host} resolves to a non-public address ({refused[0]})")
    last: OSError | None = None
    for family, socktype, proto, _, sockaddr in infos:
        sock = socket.socket(family, socktype, proto)
        try:
            for opt in conn.socket_options or []:
                sock.setsockopt(*opt)
            sock.settimeout(conn.timeout if isinstance(conn.timeout, (int, float)) else None)
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            sock.close()
            last = e
    if isinstance(last, TimeoutError):
        raise ConnectTimeoutError(conn, f"connecting to {conn.host} timed out")
    raise NewConnectionError(conn, f"cannot connect to {conn.host}: {last}")


class _DeadlineConnection:
    """Mixin for urllib3 connections: the checked connect when a policy is set, and deadline-bound reads."""

    address_allowed: AddressCheck | None = None

    def _new_conn(self) -> socket.socket:
        check = type(self).address_allowed
        return _checked_connect(self, check) if check else super()._new_conn()

    def connect(self) -> None:
        super().connect()  # for HTTPS the socket is the TLS one by now
        # urllib3's SSLTransport (TLS inside a TLS proxy) is not a socket: it keeps the plain per-read timeout.
        if isinstance(self.sock, socket.socket):
            self.sock.__class__ = _deadline_socket_class(type(self.sock))


def pool_manager(
    maxsize: int,
    num_pools: int = 4,
    headers: Mapping[str, str] | None = None,
    address_allowed: AddressCheck | None = None,
) -> urllib3.PoolManager:
    """A pool manager with deadline-bound connections, ``maxsize`` kept per host.

    Args:
        maxsize: Connections kept per host (more may open; ``block=False``).
        num_pools: Hosts whose pools are kept.
        headers: Headers of every request.
        address_allowed: The connection policy: when given, every resolved address must pass it (``BlockedAddress``
            otherwise). The fetcher of untrusted URLs sets it; a client of a configured server need not.
    """
    check = {"address_allowed": staticmethod(address_allowed)} if address_allowed else {}
    http = type("DeadlineHTTPConnection", (_DeadlineConnection, HTTPConnection), check)
    https = type("DeadlineHTTPSConnection", (_DeadlineConnection, HTTPSConnection), check)
    pool = urllib3.PoolManager(num_pools=num_pools, maxsize=maxsize, block=False, headers=dict(headers or {}))
    pool.pool_classes_by_scheme = {
        "http": type("DeadlineHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http}),
        "https": type("DeadlineHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https}),
    }
    return pool


# -- one exchange -----------------------------------------------------------------------------------------------------


def send(
    pool: urllib3.PoolManager, method: str, url: str, body: bytes | None = None, headers: Mapping | None = None
) -> urllib3.BaseHTTPResponse:
    """Send one request (no redirects, no urllib3 retries) within the attempt deadline; the body is not read yet."""
    left = time_left()
    if left is not None and left <= 0:
        raise HttpError("timeout", "the attempt's time limit passed before the request", retryable=True)
    try:
        return pool.request(
            method,
            url,
            body=body,
            headers=dict(headers) if headers else None,
            redirect=False,
            retries=False,
            preload_content=False,
            timeout=urllib3.Timeout(connect=left, read=left),
        )
    except (urllib3.exceptions.HTTPError, OSError, ValueError, UnicodeError) as e:
        raise classify(e) from None


def read_capped(resp: urllib3.BaseHTTPResponse, max_bytes: int, reason: str = "too_large", setting: str = "") -> bytes:
    """The whole body, or ``HttpError(reason)`` once Content-Length or the bytes read exceed ``max_bytes``.

    ``setting`` names the config key that holds ``max_bytes`` (``download.max_bytes``): the message then says
    which key to raise.
    """
    limit = f"{setting}={max_bytes}" if setting else f"the limit of {max_bytes} bytes"
    length = resp.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > max_bytes:
        resp.close()
        raise HttpError(reason, f"Content-Length {length} exceeds {limit}")
    chunks, size = [], 0
    try:
        while chunk := resp.read1(CHUNK):  # at most one recv: the deadline is checked between pieces
            size += len(chunk)
            if size > max_bytes:
                resp.close()
                raise HttpError(reason, f"the body exceeds {limit}")
            chunks.append(chunk)
    except (urllib3.exceptions.HTTPError, OSError) as e:
        resp.close()
        raise classify(e) from None
    return b"".join(chunks)


def discard(resp: urllib3.BaseHTTPResponse) -> None:
    """Make a connection whose body we will not read safe to reuse: drain a small body, else close it.

    Returning it to the pool with unread bytes would make the next request read them as its status line.
    """
    length = resp.headers.get("Content-Length", "")
    try:
        if length.isdigit() and int(length) <= CHUNK:
            resp.drain_conn()
        else:
            resp.close()
    except (urllib3.exceptions.HTTPError, OSError):
        resp.close()


def status_error(status: int, headers: Mapping[str, str], detail: str = "") -> HttpError:
    """An HTTP status that is not an answer, as ``http_<status>``; retryable ones carry their Retry-After."""
    retryable = status in RETRYABLE_STATUS
    retry_after = parse_retry_after(headers.get("Retry-After")) if retryable else None
    return HttpError(f"http_{status}", f"HTTP {status}" + (f": {detail}" if detail else ""), retryable, retry_after)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def classify(e: Exception) -> HttpError:
    """A urllib3, socket or TLS exception as an :class:`HttpError` with a stable reason code.

    The message names host and port at most (urllib3's connection repr is cut), never request headers.
    """
    inner = getattr(e, "reason", None)  # MaxRetryError and friends wrap the real error
    cause = inner if isinstance(inner, Exception) else e
    text = _CONNECTION_REPR.sub("", str(cause)) or type(cause).__name__
    if isinstance(cause, BlockedAddress):
        return HttpError("blocked_address", text)
    if isinstance(cause, NameResolutionError):
        return HttpError("dns_error", text)
    # NewConnectionError subclasses ConnectTimeoutError in urllib3 2.x: test it before the timeouts.
    if isinstance(cause, NewConnectionError):
        return HttpError("connection_error", text, retryable=True)
    # urllib3 wraps a timeout while sending the request as ProtocolError("Connection aborted.", TimeoutError()).
    if isinstance(cause, (urllib3.exceptions.TimeoutError, TimeoutError)) or "timed out" in text.lower():
        return HttpError("timeout", text, retryable=True)
    if isinstance(cause, (urllib3.exceptions.SSLError, ssl.SSLError)):
        # A certificate that does not verify will not verify in a second; a handshake cut short might.
        verify = isinstance(cause, ssl.SSLCertVerificationError) or "certificate" in text.lower()
        return HttpError("ssl_error", text, retryable=not verify)
    if isinstance(cause, urllib3.exceptions.ProtocolError) and "IncompleteRead" in text:
        return HttpError("truncated", text, retryable=True)
    if isinstance(cause, (urllib3.exceptions.LocationParseError, ValueError, UnicodeError)):
        return HttpError("invalid_url", text)  # http.client refuses some URLs urllib3 let through
    return HttpError("connection_error", f"{type(cause).__name__}: {text}", retryable=True)


# -- retries ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """When to try again, and how long to wait first.

    Attributes:
        retries: Further attempts after a retryable failure (at most ``retries + 1`` attempts).
        backoff: The first retry's base delay in seconds; it doubles with every retry, with jitter (x0.5 to x1).
        max_backoff: The longest delay; a Retry-After asking for more ends the request at once.
        deadline_s: Seconds from the first attempt after which no retry starts (None: no overall limit).
        reason_retries: Retries allowed for particular reasons, fewer than ``retries``.
    """

    retries: int
    backoff: float
    max_backoff: float
    deadline_s: float | None = None
    reason_retries: Mapping[str, int] = field(default_factory=dict)

    def delay(self, attempt: int, error: HttpError, rng: random.Random) -> float:
        """The wait before attempt ``attempt + 1``: backoff with jitter, or the server's Retry-After if longer."""
        delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        delay *= 0.5 + rng.random() / 2  # jitter: retries from many workers do not arrive together
        return delay if error.retry_after is None else max(delay, error.retry_after)


def retrying(
    attempt: Callable[[int], T],
    policy: RetryPolicy,
    rng: random.Random,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """``attempt(n)`` for n = 1, 2, ... until it returns, or raises a final :class:`HttpError`.

    The final error carries ``attempts``; its message says why no further attempt was made when the failure itself
    was retryable (Retry-After too long, the deadline). ``sleep`` and ``clock`` are for tests.
    """
    start, failures = clock(), Counter()
    n = 0
    while True:
        n += 1
        try:
            return attempt(n)
        except HttpError as e:
            failures[e.reason] += 1
            note = _final(policy, n, e, failures[e.reason])
            delay = policy.delay(n, e, rng) if note is None else 0.0
            if note is None and policy.deadline_s is not None and clock() + delay - start > policy.deadline_s:
                note = f" (no further attempt: the {policy.deadline_s:g}s deadline would pass first)"
            if note is not None:
                final = e.with_message(str(e) + note)
                final.attempts = n
                raise final from None
            log.debug("attempt %d: %s: %s; retrying in %.2fs", n, e.reason, e, delay)
        sleep(delay)


def _final(policy: RetryPolicy, n: int, error: HttpError, times: int) -> str | None:
    """None when attempt ``n``'s failure (its reason's ``times``-th) is worth another attempt; else a note (or "")."""
    if not error.retryable or n > policy.retries or times > policy.reason_retries.get(error.reason, times):
        return ""
    if error.retry_after is not None and error.retry_after > policy.max_backoff:
        return f" (Retry-After {error.retry_after:.0f}s exceeds max_backoff={policy.max_backoff:g}s)"
    return None
