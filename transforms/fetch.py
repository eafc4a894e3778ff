"""Fetch image bytes over HTTP(S), safely and politely: plain classes, no Beam.

What a crawler fed arbitrary URLs needs, and img2dataset users asked for:

- every resolved address is checked before connecting, on every redirect hop too: loopback, private,
  link-local (cloud metadata at 169.254.169.254), shared, reserved and multicast addresses are refused unless
  the config allows them; the socket connects to the address that was checked, so DNS cannot change its
  answer in between;
- a total time limit per attempt (a server that drips bytes forever is cut off), a body size cap checked
  against Content-Length and while reading, a redirect cap with loop detection;
- retries with exponential backoff and jitter for retryable failures only (timeouts, connection errors,
  5xx, 429 honouring Retry-After);
- a per-host request rate limit, on by default, and connection reuse per host;
- opt-outs honoured: ``X-Robots-Tag`` directives (noai, noimageai, noindex, noml) addressed to everyone or
  to us, and optionally each host's robots.txt (fetched once per host, cached).

Every failure becomes a :class:`FetchResult` with a stable reason code, never an exception.
"""

from __future__ import annotations

import ipaddress
import random
import re
import socket
import threading
import time
import urllib.robotparser
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import NewConnectionError

from visinstruct.configs import DownloadConfig

REDIRECTS = {301, 302, 303, 307, 308}
RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}
CHUNK = 64 * 1024


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


def address_allowed(ip: str, allow_loopback: bool, allow_private: bool) -> bool:
    """Whether an IP address may be contacted: public ones always; loopback and the rest only when allowed."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_loopback:
        return allow_loopback
    if addr.is_global and not addr.is_multicast:
        return True
    return allow_private


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

    def __init__(self, cfg: DownloadConfig, seed: int = 0):
        self.cfg = cfg
        self.pool = urllib3.PoolManager(num_pools=256, maxsize=max(4, cfg.threads), block=False,
                                        headers={"User-Agent": cfg.user_agent, "Accept": "image/*,*/*;q=0.5"})
        self.pool.pool_classes_by_scheme = _pool_classes(cfg.allow_loopback, cfg.allow_private)
        self.limiter = HostRateLimiter(cfg.per_host_rps)
        agent = cfg.user_agent.split("/", 1)[0].strip().lower()
        self.agents = {"*", agent, "img2dataset"}  # img2dataset's opt-outs are meant for tools like us
        self.optouts = {v.lower() for v in cfg.optout_values}
        self._robots: dict[str, urllib.robotparser.RobotFileParser | None] = {}
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
        """Fetch one URL with retries; never raises."""
        attempt = 0
        while True:
            attempt += 1
            try:
                data, final_url = self._attempt(url)
                return FetchResult(url, data=data, attempts=attempt, final_url=final_url)
            except FetchError as e:
                if not e.retryable or attempt > self.cfg.retries:
                    return FetchResult(url, reason=e.reason, message=str(e), attempts=attempt)
                delay = min(self.cfg.max_backoff, self.cfg.backoff * 2 ** (attempt - 1))
                delay *= 0.5 + self._rng.random() / 2  # jitter: retries from many workers do not align
                if e.retry_after is not None:
                    if e.retry_after > self.cfg.max_backoff:
                        return FetchResult(url, reason=e.reason, attempts=attempt,
                                           message=f"{e} (Retry-After {e.retry_after:.0f}s exceeds max_backoff)")
                    delay = max(delay, e.retry_after)
                time.sleep(delay)

    def _attempt(self, url: str) -> tuple[bytes, str]:
        deadline = time.monotonic() + self.cfg.timeout
        seen = {url}
        for _ in range(self.cfg.max_redirects + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise FetchError("invalid_url", f"not an http(s) URL: {url[:200]!r}")
            if self.cfg.check_robots_txt and not self._robots_allow(url):
                raise FetchError("robots_txt", f"robots.txt of {parts.hostname} disallows {parts.path}")
            self.limiter.wait(parts.hostname)
            location = self._request(url, deadline)
            if isinstance(location, bytes):
                return location, url
            url = urljoin(url, location)
            if url in seen:
                raise FetchError("redirect_loop", f"redirect loop back to {url[:200]}")
            seen.add(url)
        raise FetchError("too_many_redirects", f"more than {self.cfg.max_redirects} redirects")

    def _request(self, url: str, deadline: float) -> bytes | str:
        """One HTTP exchange: the body, or the Location of a redirect."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchError("timeout", f"no answer within {self.cfg.timeout}s", retryable=True)
        try:
            resp = self.pool.request("GET", url, redirect=False, retries=False, preload_content=False,
                                     timeout=urllib3.Timeout(connect=remaining, read=remaining))
        except urllib3.exceptions.HTTPError as e:
            raise _classify(e) from None
        try:
            if resp.status in REDIRECTS:
                location = resp.headers.get("Location")
                if not location:
                    raise FetchError("bad_redirect", f"HTTP {resp.status} without Location")
                _discard(resp)
                return location
            if resp.status != 200:
                retryable = resp.status in RETRYABLE_STATUS
                raise FetchError(f"http_{resp.status}", f"HTTP {resp.status} {resp.reason or ''}".strip(),
                                 retryable, parse_retry_after(resp.headers.get("Retry-After")))
            if self.cfg.respect_optout:
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

    def _robots_allow(self, url: str) -> bool:
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        with self._robots_lock:
            known = origin in self._robots
        if not known:
            parser = urllib.robotparser.RobotFileParser()
            try:
                text, _ = self._attempt_plain(origin + "/robots.txt")
                parser.parse(text.decode("utf-8", "replace").splitlines())
            except FetchError:
                parser = None  # no robots.txt (or unreachable): everything is allowed
            with self._robots_lock:
                self._robots.setdefault(origin, parser)
        parser = self._robots[origin]
        agent = self.cfg.user_agent.split("/", 1)[0]
        return parser is None or parser.can_fetch(agent, url)

    def _attempt_plain(self, url: str) -> tuple[bytes, str]:
        """One attempt without the robots check (used to fetch robots.txt itself)."""
        deadline = time.monotonic() + self.cfg.timeout
        body = self._request(url, deadline)
        if not isinstance(body, bytes):
            raise FetchError("robots_redirect", "robots.txt redirects")
        return body, url


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
