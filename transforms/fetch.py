"""Fetch image bytes over HTTP(S), safely and politely: plain classes, no Beam.

What a crawler fed arbitrary URLs needs, and img2dataset users asked for:

- IP literals in every form (decimal, octal, hex, IPv6 carrying IPv4) and loopback names are refused before
  anything is sent, and every resolved address is checked before connecting, on every redirect hop too
  (``addresses.py``): loopback, private, link-local (cloud metadata at 169.254.169.254), shared, reserved and
  multicast addresses are refused unless the config allows them; the socket connects to the address that was
  checked, so DNS cannot change its answer in between;
- a total time limit per attempt (a server that drips bytes forever is cut off), a body size cap checked
  against Content-Length and while reading, a redirect cap with loop detection;
- retries with exponential backoff and jitter for retryable failures only (timeouts, connection errors,
  5xx, 429 honouring Retry-After);
- a per-host request rate limit, on by default, and connection reuse per host;
- opt-outs honoured: ``X-Robots-Tag`` directives (noai, noimageai, noindex, noml) addressed to everyone or
  to us, and each host's robots.txt (on by default; fetched once per origin and cached; RFC 9309: a 4xx answer
  allows everything, a 5xx or no answer disallows everything, reason ``robots_unreachable``). A verdict read
  from a robots.txt is kept for the fetcher's life; a failed one (unreachable, DNS error...) for
  :data:`ROBOTS_FAILURE_TTL_S` seconds, then the next URL of that origin asks again, so a transient outage does
  not block a host for a worker's lifetime; a bug while loading it is not kept at all.

Every failure becomes a :class:`FetchResult` with a stable reason code, never an exception.
"""

from __future__ import annotations

import random
import re
import socket
import threading
import time
import urllib.robotparser
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urljoin, urlsplit

import idna
import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import NewConnectionError

from visinstruct.configs import DownloadConfig
from visinstruct.schemas import Rejection
from visinstruct.transforms.addresses import address_allowed, host_refusal
from visinstruct.transforms.guard import MESSAGE_LIMIT, guarded

__all__ = ["Fetcher", "FetchResult", "address_allowed", "optout_directive", "parse_retry_after"]

REDIRECTS = {301, 302, 303, 307, 308}
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})  # also for LLM servers (llm_openai)
CHUNK = 64 * 1024
UNREACHABLE_ROBOTS = {"timeout", "connection_error", "truncated"}  # RFC 9309 2.3.1.4: read as complete disallow
ROBOTS_FAILURE_TTL_S = 120.0  # how long a failed robots.txt verdict stands before the origin's next URL asks again
MAX_URL_CHARS = 8192  # what browsers and CDNs accept; longer (in a list, or a redirect's Location) is junk or attack
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")  # CR/LF in a URL would inject headers; NUL truncates in C code


@dataclass(frozen=True)
class FetchResult:
    """The outcome of fetching one URL: ``data`` on success, else a reason code and message."""

    url: str
    data: bytes | None = None
    reason: str | None = None
    message: str | None = None
    attempts: int = 1
    final_url: str | None = None

    @property
    def ok(self) -> bool:
        return self.data is not None


class FetchError(Exception):
    """A failed attempt; ``retryable`` says whether another attempt may succeed."""

    def __init__(self, reason: str, message: str, retryable: bool = False, retry_after: float | None = None):
        super().__init__(message)
        self.reason, self.retryable, self.retry_after = reason, retryable, retry_after


class BlockedAddress(NewConnectionError):
    """Raised at connect time for an address the policy refuses."""


def _connect_checked(conn: HTTPConnection, allow_loopback: bool, allow_private: bool) -> socket.socket:
    """Resolve, check every address, and connect to a checked one (no second DNS lookup)."""
    try:
        infos = socket.getaddrinfo(conn._dns_host, conn.port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise NewConnectionError(conn, f"cannot resolve {conn.host}: {e}") from e
    addresses = [info[4][0] for info in infos]
    refused = [a for a in addresses if not address_allowed(a, allow_loopback, allow_private)]
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
    raise NewConnectionError(conn, f"cannot connect to {conn.host}: {last}")


def _pool_classes(allow_loopback: bool, allow_private: bool) -> dict[str, type]:
    class CheckedHTTPConnection(HTTPConnection):
        def _new_conn(self) -> socket.socket:
            return _connect_checked(self, allow_loopback, allow_private)

    class CheckedHTTPSConnection(HTTPSConnection):
        def _new_conn(self) -> socket.socket:
            return _connect_checked(self, allow_loopback, allow_private)

    class CheckedHTTPPool(HTTPConnectionPool):
        ConnectionCls = CheckedHTTPConnection

    class CheckedHTTPSPool(HTTPSConnectionPool):
        ConnectionCls = CheckedHTTPSConnection

    return {"http": CheckedHTTPPool, "https": CheckedHTTPSPool}


class HostRateLimiter:
    """Spaces requests to one host at least ``1/rps`` seconds apart, across all threads."""

    def __init__(self, rps: float | None):
        self.interval = 0.0 if not rps else 1.0 / rps
        self._next: dict[str, float] = {}
        self._lock = threading.Lock()

    def wait(self, host: str) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next.get(host, now))
            self._next[host] = slot + self.interval
        if slot > now:
            time.sleep(slot - now)


def optout_directive(header_values: list[str], agents: set[str], optouts: set[str]) -> str | None:
    """The first X-Robots-Tag directive that opts the image out for us, or ``None``.

    A value is a comma-separated list; ``name: directive`` starts a part addressed to one crawler, which
    applies to us only when the name is one of ``agents`` (``*`` included).
    """
    for value in header_values:
        agent = None
        for token in (t.strip().lower() for t in value.split(",")):
            if ":" in token:
                agent, token = (s.strip() for s in token.split(":", 1))
            if (agent is None or agent in agents) and token in optouts:
                return token
    return None


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


class Fetcher:
    """Thread-safe HTTP(S) image fetcher; create one per worker (it holds connection pools and a thread pool)."""

    def __init__(self, cfg: DownloadConfig, seed: int = 0, clock: Callable[[], float] = time.monotonic):
        """``clock`` (seconds) times how long a failed robots.txt verdict is kept; tests pass their own."""
        self.cfg, self._clock = cfg, clock
        self.pool = urllib3.PoolManager(
            num_pools=256,
            maxsize=max(4, cfg.threads),
            block=False,
            headers={"User-Agent": cfg.user_agent, "Accept": "image/*,*/*;q=0.5"},
        )
        self.pool.pool_classes_by_scheme = _pool_classes(cfg.allow_loopback, cfg.allow_private)
        self.limiter = HostRateLimiter(cfg.per_host_rps)
        agent = cfg.user_agent.split("/", 1)[0].strip().lower()
        self.agents = {"*", agent, "img2dataset"}  # img2dataset's opt-outs are meant for tools like us
        self.optouts = {v.lower() for v in cfg.optout_values}
        self.agent = cfg.user_agent.split("/", 1)[0]
        self._robots: dict[str, tuple[Future, float]] = {}  # origin -> (verdict, when it expires)
        self._robots_lock = threading.Lock()
        self._rng = random.Random(seed)
        self._executor = ThreadPoolExecutor(max_workers=cfg.threads, thread_name_prefix="fetch")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.pool.clear()

    def fetch_all(self, urls: list[str]) -> list[FetchResult]:
        """Fetch many URLs concurrently; results in the order of ``urls``."""
        return self.map(self.fetch, urls)

    def map(self, fn, items: list) -> list:
        """``[fn(item) for item in items]`` on the fetch threads (fetch, decode and resize overlap there)."""
        return list(self._executor.map(fn, items))

    def fetch(self, url: str) -> FetchResult:
        """Fetch one URL with retries; never raises: a bug or an undocumented library error is this URL's
        ``internal_error`` (the guard logs it; its counter is counted where the result reaches the DoFn thread)."""
        outcome = guarded("download", lambda: self._fetch(url, image=True), url=url)
        if isinstance(outcome, Rejection):
            return FetchResult(url, reason=outcome.reason, message=outcome.message)
        return outcome

    def _fetch(self, url: str, image: bool) -> FetchResult:
        """``fetch`` without its last-resort guard; ``image=False`` skips robots.txt and opt-outs (robots.txt)."""
        attempt = 0
        while True:
            attempt += 1
            try:
                data, final_url = self._attempt(url, image)
                return FetchResult(url, data=data, attempts=attempt, final_url=final_url)
            except FetchError as e:
                if not e.retryable or attempt > self.cfg.retries:
                    return FetchResult(url, reason=e.reason, message=str(e), attempts=attempt)
                delay = min(self.cfg.max_backoff, self.cfg.backoff * 2 ** (attempt - 1))
                delay *= 0.5 + self._rng.random() / 2  # jitter: retries from many workers do not align
                if e.retry_after is not None:
                    if e.retry_after > self.cfg.max_backoff:
                        return FetchResult(
                            url,
                            reason=e.reason,
                            attempts=attempt,
                            message=f"{e} (Retry-After {e.retry_after:.0f}s exceeds max_backoff)",
                        )
                    delay = max(delay, e.retry_after)
                time.sleep(delay)

    def _attempt(self, url: str, image: bool = True) -> tuple[bytes, str]:
        deadline = time.monotonic() + self.cfg.timeout
        seen = {url}
        for _ in range(self.cfg.max_redirects + 1):
            parts = self._checked_parts(url)
            if image and self.cfg.check_robots_txt:
                self._check_robots(url, parts)
            self.limiter.wait(parts.hostname)
            location = self._request(url, deadline, image)
            if isinstance(location, bytes):
                return location, url
            try:
                url = urljoin(url, location)
            except ValueError:
                raise FetchError("bad_redirect", f"Location is not a URL: {location[:200]!r}") from None
            if url in seen:
                raise FetchError("redirect_loop", f"redirect loop back to {url[:200]}")
            seen.add(url)
        raise FetchError("too_many_redirects", f"more than {self.cfg.max_redirects} redirects")

    def _checked_parts(self, url: str):
        """``urlsplit(url)`` of a well-formed http(s) URL whose host may be contacted, else a FetchError.

        IP literals in any form and loopback names are refused here, before robots.txt or a resolver sees them;
        every resolved address is checked again at connect time (``_connect_checked``).
        """
        if len(url) > MAX_URL_CHARS or CONTROL_CHARS.search(url):
            why = "is longer than 8192 characters" if len(url) > MAX_URL_CHARS else "holds a control character"
            raise FetchError("invalid_url", f"the URL {why}: {url[:200]!r}")
        try:
            parts = urlsplit(url)
            host, _ = parts.hostname, parts.port  # both raise ValueError on a malformed authority
            if host and not host.isascii():
                host = idna.encode(host.lower(), strict=True, std3_rules=True).decode("ascii")  # as urllib3 does
        except (ValueError, UnicodeError, idna.IDNAError) as e:
            raise FetchError("invalid_url", f"not a valid URL ({e}): {url[:200]!r}") from None
        if parts.scheme not in ("http", "https") or not host:
            raise FetchError("invalid_url", f"not an http(s) URL: {url[:200]!r}")
        refusal = host_refusal(host, self.cfg.allow_loopback, self.cfg.allow_private)
        if refusal:
            raise FetchError("blocked_address", refusal)
        return parts

    def _request(self, url: str, deadline: float, image: bool = True) -> bytes | str:
        """One HTTP exchange: the body, or the Location of a redirect."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchError("timeout", f"no answer within {self.cfg.timeout}s", retryable=True)
        try:
            resp = self.pool.request(
                "GET",
                url,
                redirect=False,
                retries=False,
                preload_content=False,
                timeout=urllib3.Timeout(connect=remaining, read=remaining),
            )
        except urllib3.exceptions.HTTPError as e:
            raise _classify(e) from None
        except (ValueError, UnicodeError) as e:  # http.client refuses some URLs urllib3 let through
            raise FetchError("invalid_url", f"{type(e).__name__}: {e}"[:MESSAGE_LIMIT]) from None
        try:
            if resp.status in REDIRECTS:
                location = resp.headers.get("Location")
                if not location:
                    raise FetchError("bad_redirect", f"HTTP {resp.status} without Location")
                _discard(resp)
                return location
            if resp.status != 200:
                retryable = resp.status in RETRYABLE_STATUS
                raise FetchError(
                    f"http_{resp.status}",
                    f"HTTP {resp.status} {resp.reason or ''}".strip(),
                    retryable,
                    parse_retry_after(resp.headers.get("Retry-After")),
                )
            if image and self.cfg.respect_optout:
                directive = optout_directive(resp.headers.getlist("X-Robots-Tag"), self.agents, self.optouts)
                if directive:
                    raise FetchError("optout", f"X-Robots-Tag opts out: {directive}")
            return self._read_body(resp, deadline)
        except FetchError:
            _discard(resp)
            raise
        finally:
            resp.release_conn()

    def _read_body(self, resp: urllib3.BaseHTTPResponse, deadline: float) -> bytes:
        cap = self.cfg.max_bytes
        length = resp.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > cap:
            resp.close()
            raise FetchError("too_large", f"Content-Length {length} exceeds max_bytes={cap}")
        chunks, size = [], 0
        try:
            while True:
                if time.monotonic() > deadline:
                    resp.close()
                    raise FetchError("timeout", f"body not complete within {self.cfg.timeout}s", retryable=True)
                chunk = resp.read1(CHUNK)  # at most one recv: the deadline is checked between pieces
                if not chunk:
                    break
                size += len(chunk)
                if size > cap:
                    resp.close()
                    raise FetchError("too_large", f"body exceeds max_bytes={cap}")
                chunks.append(chunk)
        except urllib3.exceptions.HTTPError as e:
            resp.close()
            raise _classify(e) from None
        if not size:
            raise FetchError("empty_body", "the response body is empty")
        return b"".join(chunks)

    def _check_robots(self, url: str, parts) -> None:
        """Raise unless the host's robots.txt (fetched once per origin, cached) lets us fetch ``url``."""
        verdict = self._robots_verdict(f"{parts.scheme}://{parts.netloc}")
        if isinstance(verdict, FetchError):
            raise FetchError(verdict.reason, str(verdict))  # a fresh exception: threads share the cached one
        if verdict is not None and not verdict.can_fetch(self.agent, url):
            raise FetchError("robots_txt", f"robots.txt of {parts.hostname} disallows {parts.path or '/'}")

    def _robots_verdict(self, origin: str) -> urllib.robotparser.RobotFileParser | FetchError | None:
        """The origin's rules, ``None`` for allow-all, or the error every URL of the origin fails with.

        Concurrent threads asking for the same new origin wait for one fetch instead of each sending their own.
        A failed verdict expires after :data:`ROBOTS_FAILURE_TTL_S`; an exception while loading is not kept (the
        threads waiting for it raise it, the next URL of the origin loads robots.txt again).
        """
        with self._robots_lock:
            future, expires = self._robots.get(origin, (None, 0.0))
            owner = future is None or expires <= self._clock()
            if owner:
                future = Future()
                self._robots[origin] = (future, float("inf"))
        if owner:
            try:
                verdict = self._load_robots(origin)
            except BaseException as e:
                self._set_robots_expiry(origin, future, None)
                future.set_exception(e)
                raise
            if isinstance(verdict, FetchError):
                self._set_robots_expiry(origin, future, self._clock() + ROBOTS_FAILURE_TTL_S)
            future.set_result(verdict)
        return future.result()

    def _set_robots_expiry(self, origin: str, future: Future, expires: float | None) -> None:
        """When ``future`` (still the origin's entry) expires; ``None`` forgets it now."""
        with self._robots_lock:
            if self._robots.get(origin, (None,))[0] is future:
                if expires is None:
                    del self._robots[origin]
                else:
                    self._robots[origin] = (future, expires)

    def _load_robots(self, origin: str) -> urllib.robotparser.RobotFileParser | FetchError | None:
        """Fetch and read robots.txt as RFC 9309 says: 4xx allows all; 5xx or no answer disallows all."""
        result = self._fetch(origin + "/robots.txt", image=False)
        if result.ok:
            parser = urllib.robotparser.RobotFileParser()
            parser.parse(result.data.decode("utf-8", "replace").splitlines())
            return parser
        reason = result.reason or ""
        if reason in ("blocked_address", "dns_error", "invalid_url"):  # the image would fail the same way
            return FetchError(reason, result.message or reason)
        status = int(reason[5:]) if reason.startswith("http_") and reason[5:].isdigit() else None
        if reason in UNREACHABLE_ROBOTS or (status is not None and (status >= 500 or status == 429)):
            return FetchError(
                "robots_unreachable",
                f"robots.txt of {origin} is unreachable ({result.message}); RFC 9309 says to treat that as disallow",
            )
        return None  # 4xx, an empty body, too many redirects...: no usable robots.txt, everything is allowed


def _discard(resp: urllib3.BaseHTTPResponse) -> None:
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


def _classify(e: Exception) -> FetchError:
    """A urllib3 exception as a FetchError with a stable reason code."""
    text = re.sub(r"^\w*Connection\w*\(host=[^)]*\): ", "", str(e))  # urllib3 prefixes its connection repr
    inner = getattr(e, "reason", None)  # MaxRetryError and friends wrap the real error
    if isinstance(inner, Exception):
        e = inner
    if isinstance(e, BlockedAddress):
        return FetchError("blocked_address", text)
    if isinstance(e, urllib3.exceptions.NameResolutionError) or "cannot resolve" in text:
        return FetchError("dns_error", text)
    # NewConnectionError subclasses ConnectTimeoutError in urllib3 2.x: test it before the timeouts.
    if isinstance(e, NewConnectionError):
        return FetchError("connection_error", text, retryable=True)
    if isinstance(e, urllib3.exceptions.TimeoutError) or "timed out" in text.lower():
        return FetchError("timeout", text, retryable=True)
    if isinstance(e, urllib3.exceptions.ProtocolError) and "IncompleteRead" in text:
        return FetchError("truncated", text, retryable=True)
    if isinstance(e, urllib3.exceptions.LocationParseError):
        return FetchError("invalid_url", text)
    return FetchError("connection_error", text, retryable=True)
