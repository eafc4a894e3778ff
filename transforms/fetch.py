"""Fetch image bytes over HTTP(S), safely and politely: plain classes, no Beam.

What a crawler fed arbitrary URLs needs, and img2dataset users asked for:

- IP literals in every form (decimal, octal, hex, IPv6 carrying IPv4) and loopback names are refused before
  anything is sent, and every resolved address is checked before connecting, on every redirect hop too
  (``addresses.py``): loopback, private, link-local (cloud metadata at 169.254.169.254), shared, reserved and
  multicast addresses are refused unless the config allows them; the socket connects to the address that was
  checked, so DNS cannot change its answer in between;
- a body size cap (``max_bytes``, reason ``too_large``), a redirect cap with loop detection;
- a per-host request rate limit, on by default, and connection reuse per host; a caller may pass the limiter a
  fetch uses (ingest's fetch partitions each pace their hosts with their own, so the limit holds per job);
- opt-outs honoured: ``X-Robots-Tag`` directives (noai, noimageai, noindex, noml) addressed to everyone or
  to us (our agent name, img2dataset, or ``download.user_agent_token`` as img2dataset does), and each host's
  robots.txt (on by default; fetched once per origin and cached, or seeded from a verdict fetched elsewhere:
  :meth:`Fetcher.robots_record`, :meth:`Fetcher.seed_robots`; RFC 9309: a 4xx answer allows everything, a
  5xx or no answer disallows everything, reason ``robots_unreachable``; a file over 500 KiB is cut there, as
  RFC 9309 allows). A verdict read from a robots.txt is kept for the fetcher's life; a failed one (unreachable,
  DNS error...) for :data:`ROBOTS_FAILURE_TTL_S` seconds, then the next URL of that origin asks again, so a
  transient outage does not block a host for a worker's lifetime; a bug while loading it is not kept at all.

Connections, the time limit per attempt, retries (backoff, Retry-After) and reason codes come from the HTTP core
(``http.py``). Every URL ends as a
:class:`~visinstruct.schemas.Decision`: kept with :class:`Fetched`, or dropped with a stable reason code and
``{"attempts": n}`` as detail; never an exception.
"""

from __future__ import annotations

import functools
import random
import re
import threading
import time
import urllib.parse
import urllib.robotparser
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import SplitResult, urljoin, urlsplit

import idna

from visinstruct.configs import DownloadConfig
from visinstruct.schemas import Decision, Rejection
from visinstruct.transforms.addresses import address_allowed, host_refusal
from visinstruct.transforms.guard import guarded
from visinstruct.transforms.http import (
    HttpError,
    RetryPolicy,
    attempt_deadline,
    discard,
    pool_manager,
    read_capped,
    retrying,
    send,
    status_error,
)

REDIRECTS = {301, 302, 303, 307, 308}
DEFAULT_PORTS = {"http": 80, "https": 443}
# RFC 9309 2.3.1.4: a robots.txt that cannot be reached reads as complete disallow
UNREACHABLE_ROBOTS = {"timeout", "connection_error", "truncated"}
ROBOTS_MAX_BYTES = 500 * 1024  # RFC 9309 2.5: parsers must read at least 500 KiB; a longer file is cut there
ROBOTS_FAILURE_TTL_S = 120.0  # how long a failed robots.txt verdict stands before the origin's next URL asks again
MAX_URL_CHARS = 8192  # what browsers and CDNs accept; longer (in a list, or a redirect's Location) is junk or attack
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")  # CR/LF in a URL would inject headers; NUL truncates in C code


@dataclass(frozen=True)
class Fetched:
    """What a kept fetch carries: the body, the URL it came from after redirects, and the attempts it took."""

    data: bytes
    url: str
    attempts: int


class HostRateLimiter:
    """Spaces requests to one host at least ``1/rps`` seconds apart, across all threads.

    ``shares`` divides the budget of some hosts: a host fetched from ``k`` places at once (a large host split over
    ``k`` fetch partitions, :mod:`visinstruct.transforms.hosts`) is spaced ``k/rps`` apart here, so the ``k``
    limiters together keep it to ``rps``.

    The spacing is measured from when each request was let go, not from when it was scheduled: the threads
    waiting for one host queue on that host's lock, and the next one's time is set only once the previous one
    has woken. Scheduling slots in advance would let a thread that wakes late (a busy machine) go at almost the
    same moment as the next one, so a host would see bursts above its budget.
    """

    def __init__(
        self,
        rps: float | None,
        shares: dict[str, int] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        """``clock`` and ``sleep`` are the real ones but for tests, which pass a fake clock and its sleep."""
        self.interval = 0.0 if not rps else 1.0 / rps
        self.shares = dict(shares or {})
        self._clock, self._sleep = clock, sleep
        self._hosts: dict[str, _HostSlot] = {}
        self._prune_at = _LIMITER_PRUNE_MIN
        self._lock = threading.Lock()

    def interval_of(self, host: str) -> float:
        """Seconds between two requests to ``host`` through this limiter."""
        return self.interval * self.shares.get(host, 1)

    def wait(self, host: str) -> None:
        if not self.interval:
            return
        with self._lock:
            slot = self._hosts.get(host)
            if slot is None:
                slot = self._hosts[host] = _HostSlot()
            slot.users += 1  # kept while in use
        try:
            with slot.lock:  # one thread of this host at a time: the others queue behind it
                delay = slot.next - self._clock()
                if delay > 0:
                    self._sleep(delay)
                slot.next = self._clock() + self.interval_of(host)
        finally:
            with self._lock:
                slot.users -= 1
                if len(self._hosts) >= self._prune_at:
                    self._prune()

    def _prune(self) -> None:
        """Forget the hosts no thread is waiting for whose next slot has passed: a request to one goes at once
        anyway (a partition meets many hosts of a few URLs each; each would otherwise be kept for its life)."""
        now = self._clock()
        self._hosts = {h: slot for h, slot in self._hosts.items() if slot.users or slot.next > now}
        self._prune_at = max(_LIMITER_PRUNE_MIN, 2 * len(self._hosts))

    def next_slot(self, host: str) -> float:
        """The time on the limiter's clock before which no further request to ``host`` goes (0 when none is due)."""
        slot = self._hosts.get(host)
        return slot.next if slot else 0.0


class _HostSlot:
    """One host's place in a :class:`HostRateLimiter`: its lock, when its next request may go, threads using it."""

    __slots__ = ("lock", "next", "users")

    def __init__(self):
        self.lock, self.next, self.users = threading.Lock(), 0.0, 0


_LIMITER_PRUNE_MIN = 4096  # hosts a limiter keeps before it first forgets those whose slot has passed


def host_name(host: str | None) -> str:
    """The name requests to ``host`` are paced and counted under, everywhere in a job: lowercase, IDNA A-labels, no
    trailing dot. ``Example.COM.`` and ``example.com`` are one host, as are ``bücher.example`` and
    ``xn--bcher-kva.example``. A name IDNA refuses stays as lowercase text (its URL is refused as ``invalid_url``)."""
    name = (host or "").lower().rstrip(".")
    if name and not name.isascii():
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError):
            pass
    return name


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of a URL: the host as :func:`host_name` names it, no user info, the scheme's default
    port left out. The fetcher's robots.txt cache is keyed by it (and robots.txt asked there); ``""`` when the URL
    has no scheme or host, or an authority that does not parse."""
    try:
        parts = urlsplit(url)
        host, port = host_name(parts.hostname), parts.port
    except ValueError:
        return ""
    scheme = parts.scheme.lower()
    if not scheme or not host:
        return ""
    host = f"[{host}]" if ":" in host else host  # an IPv6 literal
    return f"{scheme}://{host}" + (f":{port}" if port is not None and port != DEFAULT_PORTS.get(scheme) else "")


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


class Fetcher:
    """Thread-safe HTTP(S) image fetcher; create one per worker (it holds connection pools and a thread pool)."""

    def __init__(self, cfg: DownloadConfig, seed: int = 0, clock: Callable[[], float] = time.monotonic):
        """``clock`` (seconds) times how long a failed robots.txt verdict is kept; tests pass their own."""
        self.cfg, self._clock = cfg, clock
        token = cfg.user_agent_token
        user_agent = f"{cfg.user_agent} (compatible; {token})" if token else cfg.user_agent
        self.pool = pool_manager(
            maxsize=max(4, cfg.threads),
            num_pools=256,
            headers={"User-Agent": user_agent, "Accept": "image/*,*/*;q=0.5"},
            address_allowed=functools.partial(
                address_allowed, allow_loopback=cfg.allow_loopback, allow_private=cfg.allow_private
            ),
        )
        self.policy = RetryPolicy(cfg.retries, cfg.backoff, cfg.max_backoff)
        self.limiter = HostRateLimiter(cfg.per_host_rps)
        # X-Robots-Tag parts addressed to these apply to us: our agent name (the User-Agent's first word),
        # img2dataset (its opt-outs are meant for tools like us) and, as img2dataset does, the user_agent_token
        agent = cfg.user_agent.split("/", 1)[0].strip().lower()
        self.agents = {"*", agent, "img2dataset"} | ({token.strip().lower()} if token else set())
        self.optouts = {v.lower() for v in cfg.optout_values}
        self.agent = cfg.user_agent.split("/", 1)[0]
        self._robots: dict[str, tuple[Future, float]] = {}  # origin -> (verdict, when it expires)
        self._robots_lock = threading.Lock()
        self._rng = random.Random(seed)
        self._executor = ThreadPoolExecutor(max_workers=cfg.threads, thread_name_prefix="fetch")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.pool.clear()

    def map(self, fn, items: list) -> list:
        """``[fn(item) for item in items]`` on the fetch threads (fetch, decode and resize overlap there)."""
        return list(self._executor.map(fn, items))

    def fetch(self, url: str, limiter: HostRateLimiter | None = None) -> Decision[Fetched]:
        """Fetch one URL with retries; never raises: a bug or an undocumented library error is this URL's
        ``internal_error`` (the guard logs it; its counter is counted where the result reaches the DoFn thread).

        ``limiter`` paces this URL's requests (robots.txt and redirect hops included) instead of the fetcher's own:
        a fetch partition passes its own (:mod:`visinstruct.transforms.hosts`).
        """
        limiter = limiter or self.limiter  # resolved here once: the methods below take the one to use
        outcome = guarded("download", lambda: self._fetch(url, image=True, limiter=limiter), url=url)
        return Decision.from_rejection(outcome) if isinstance(outcome, Rejection) else outcome

    def _fetch(self, url: str, image: bool, limiter: HostRateLimiter) -> Decision[Fetched]:
        """``fetch`` without its last-resort guard; ``image=False`` skips robots.txt and opt-outs (robots.txt)."""
        try:
            attempts, (data, final_url) = retrying(
                lambda n: (n, self._attempt(url, image, limiter)), self.policy, self._rng
            )
        except HttpError as e:
            return Decision.drop(e.reason, str(e), {"attempts": e.attempts})
        return Decision.keep(Fetched(data, final_url, attempts))

    def _attempt(self, url: str, image: bool, limiter: HostRateLimiter) -> tuple[bytes, str]:
        """One attempt, redirects included, within ``timeout``: the body and the URL it came from.

        A timeout's message names the key to raise (``download.timeout``), as ``too_large``'s does.
        """
        try:
            return self._redirects(url, image, limiter)
        except HttpError as e:
            if e.reason != "timeout":
                raise
            raise e.with_message(f"no complete answer within download.timeout={self.cfg.timeout:g}s ({e})") from None

    def _redirects(self, url: str, image: bool, limiter: HostRateLimiter) -> tuple[bytes, str]:
        """Follow redirects up to ``max_redirects`` within the attempt's deadline, each hop paced by ``limiter``."""
        seen = {url}
        with attempt_deadline(self.cfg.timeout):
            for _ in range(self.cfg.max_redirects + 1):
                parts = self._checked_parts(url)
                if image and self.cfg.check_robots_txt:
                    self._check_robots(url, parts, limiter)
                limiter.wait(host_name(parts.hostname))
                location = self._request(url, image)
                if isinstance(location, bytes):
                    return location, url
                try:
                    url = urljoin(url, location)
                except ValueError:
                    raise HttpError("bad_redirect", f"Location is not a URL: {location[:200]!r}") from None
                if url in seen:
                    raise HttpError("redirect_loop", f"redirect loop back to {url[:200]}")
                seen.add(url)
        raise HttpError("too_many_redirects", f"more than {self.cfg.max_redirects} redirects")

    def _checked_parts(self, url: str) -> SplitResult:
        """``urlsplit(url)`` of a well-formed http(s) URL whose host may be contacted, else an HttpError.

        IP literals in any form and loopback names are refused here, before robots.txt or a resolver sees them;
        every resolved address is checked again at connect time (the pool's ``address_allowed``).
        """
        if len(url) > MAX_URL_CHARS or CONTROL_CHARS.search(url):
            why = "is longer than 8192 characters" if len(url) > MAX_URL_CHARS else "holds a control character"
            raise HttpError("invalid_url", f"the URL {why}: {url[:200]!r}")
        try:
            parts = urlsplit(url)
            host, _ = parts.hostname, parts.port  # both raise ValueError on a malformed authority
            if host and not host.isascii():
                host = idna.encode(host.lower(), strict=True, std3_rules=True).decode("ascii")  # as urllib3 does
        except (ValueError, UnicodeError, idna.IDNAError) as e:
            raise HttpError("invalid_url", f"not a valid URL ({e}): {url[:200]!r}") from None
        if parts.scheme not in ("http", "https") or not host:
            raise HttpError("invalid_url", f"not an http(s) URL: {url[:200]!r}")
        refusal = host_refusal(host, self.cfg.allow_loopback, self.cfg.allow_private)
        if refusal:
            raise HttpError("blocked_address", refusal)
        return parts

    def _request(self, url: str, image: bool = True) -> bytes | str:
        """One HTTP exchange: the body, or the Location of a redirect."""
        resp = send(self.pool, "GET", url)
        try:
            if resp.status in REDIRECTS:
                location = resp.headers.get("Location")
                if not location:
                    raise HttpError("bad_redirect", f"HTTP {resp.status} without Location")
                discard(resp)
                return location
            if resp.status != 200:
                raise status_error(resp.status, resp.headers, resp.reason or "")
            if image and self.cfg.respect_optout:
                directive = optout_directive(resp.headers.getlist("X-Robots-Tag"), self.agents, self.optouts)
                if directive:
                    raise HttpError("optout", f"X-Robots-Tag opts out: {directive}")
            data = read_capped(resp, self.cfg.max_bytes, setting="download.max_bytes")
            if not data:
                raise HttpError("empty_body", "the response body is empty")
            return data
        except HttpError:
            discard(resp)
            raise
        finally:
            resp.release_conn()

    def _check_robots(self, url: str, parts, limiter: HostRateLimiter) -> None:
        """Raise unless the host's robots.txt (fetched once per origin, cached) lets us fetch ``url``."""
        verdict = self._robots_verdict(origin_of(url), limiter)
        if isinstance(verdict, HttpError):
            raise HttpError(verdict.reason, str(verdict))  # a fresh exception: threads share the cached one
        if verdict is not None and not verdict.can_fetch(self.agent, url):
            raise HttpError("robots_txt", f"robots.txt of {parts.hostname} disallows {parts.path or '/'}")

    def _robots_verdict(
        self, origin: str, limiter: HostRateLimiter
    ) -> urllib.robotparser.RobotFileParser | HttpError | None:
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
                verdict = self._load_robots(origin, limiter)
            except BaseException as e:
                self._set_robots_expiry(origin, future, None)
                future.set_exception(e)
                raise
            if isinstance(verdict, HttpError):
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

    def seed_robots(self, records: dict[str, RobotsRecord]) -> int:
        """Take verdicts fetched elsewhere (:meth:`robots_record`, once per origin of a split host) into the cache.

        Origins whose verdict in the cache has not expired keep it (an expired failure is replaced); a failure
        seeded here expires after :data:`ROBOTS_FAILURE_TTL_S` from now, as one fetched here would. A record that
        does not parse is skipped (the origin's URLs then load robots.txt here, as if never seeded). Returns how
        many origins were added.
        """
        added = 0
        for origin, record in records.items():
            try:
                verdict = robots_verdict(record)
            except Exception:  # a hostile robots.txt that urllib's parser cannot read: not seeded
                continue
            with self._robots_lock:
                if origin in self._robots and self._robots[origin][1] > self._clock():
                    continue
                future: Future = Future()
                future.set_result(verdict)
                failed = isinstance(verdict, HttpError)
                self._robots[origin] = (future, self._clock() + ROBOTS_FAILURE_TTL_S if failed else float("inf"))
                added += 1
        return added

    def robots_record(self, origin: str, limiter: HostRateLimiter | None = None) -> RobotsRecord:
        """Fetch ``origin``'s robots.txt and judge the answer as RFC 9309 says (4xx allows all; 5xx or no answer
        disallows all), as plain data a step can hand on; :func:`robots_verdict` parses it. A body over
        :data:`ROBOTS_MAX_BYTES` is cut at the last line end before that size. ``limiter``: as in :meth:`fetch`."""
        result = self._fetch(origin + "/robots.txt", image=False, limiter=limiter or self.limiter)
        if result.kept:
            return ("rules", capped_robots(result.value.data).decode("utf-8", "replace"), "")
        reason = result.reason
        if reason in ("blocked_address", "dns_error", "ssl_error", "invalid_url"):  # the image would fail the same way
            return ("error", reason, result.message)
        status = int(reason[5:]) if reason.startswith("http_") and reason[5:].isdigit() else None
        if reason in UNREACHABLE_ROBOTS or (status is not None and (status >= 500 or status == 429)):
            message = (
                f"robots.txt of {origin} is unreachable ({result.message}); RFC 9309 says to treat that as disallow"
            )
            return ("error", "robots_unreachable", message)
        return ("allow", "", "")  # 4xx, an empty body, too many redirects...: no usable robots.txt, all allowed

    def _load_robots(
        self, origin: str, limiter: HostRateLimiter
    ) -> urllib.robotparser.RobotFileParser | HttpError | None:
        """Fetch and read robots.txt (:meth:`robots_record`), then parse it (:func:`robots_verdict`)."""
        return robots_verdict(self.robots_record(origin, limiter))


# A robots.txt verdict as plain data (it crosses Beam steps): ("rules", text, ""), ("allow", "", "") or
# ("error", reason, message).
RobotsRecord = tuple[str, str, str]


def capped_robots(data: bytes) -> bytes:
    """``data`` cut to :data:`ROBOTS_MAX_BYTES`, at the last line end before it (no rule is read half cut)."""
    if len(data) <= ROBOTS_MAX_BYTES:
        return data
    return data[:ROBOTS_MAX_BYTES].rsplit(b"\n", 1)[0]


def readable_robots_lines(lines: list[str]) -> list[str]:
    """``lines`` without the Allow/Disallow rules whose path urllib cannot parse (it raises on them)."""
    kept = []
    for line in lines:
        field, _, value = line.partition("#")[0].partition(":")
        if field.strip().lower() in ("allow", "disallow"):
            try:
                urllib.parse.urlunparse(urllib.parse.urlparse(urllib.parse.unquote(value.strip())))
            except ValueError:
                continue
        kept.append(line)
    return kept


def robots_verdict(record: RobotsRecord) -> urllib.robotparser.RobotFileParser | HttpError | None:
    """The cached form of a :data:`RobotsRecord`: parsed rules, ``None`` (allow all) or the error to fail with.

    urllib's parser raises on some hostile files (``ValueError`` for a rule such as ``Disallow: //[x``): the lines
    it cannot read are left out (:func:`readable_robots_lines`), as RFC 9309 has parsers ignore malformed lines."""
    kind, first, second = record
    if kind == "rules":
        parser = urllib.robotparser.RobotFileParser()
        lines = first.splitlines()
        try:
            parser.parse(lines)
        except ValueError:
            parser = urllib.robotparser.RobotFileParser()
            parser.parse(readable_robots_lines(lines))
        return parser
    if kind == "error":
        return HttpError(first, second)
    return None
