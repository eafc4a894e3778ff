"""A loopback HTTP server that serves real image bytes and real network faults, for tests, benchmarks and the demo.

Every fault happens at the socket level (statuses, headers, delays, short bodies, closed connections), so a
downloader is tested against what the internet really does, not against mocks. Standard library plus Pillow.

Usage::

    with ImageServer(latency=0.05) as srv:
        srv.add_image("/cat.jpg", jpeg_bytes)
        urls = [srv.url("/cat.jpg"), srv.fault_url("flaky", n=2), srv.fault_url("hang")]

Routes (GET; HEAD gives the same status and headers without a body):

Registered resources (``add``/``add_image``; they win over every route below):
  ``/image.jpg`` ``/image.png`` ``/image.webp``   the default 64x48 test image (``encode_test_image``)
  ``/private/image.jpg``       the default JPEG under the prefix that the default robots.txt disallows
  ``/optout/noai``             default JPEG with ``X-Robots-Tag: noai``
  ``/optout/noimageai``        default JPEG with ``X-Robots-Tag: googlebot: noimageai``
  ``/optout/noindex``          default JPEG with ``X-Robots-Tag: noindex``
  ``/corrupt/garbled``         ``image/jpeg``: the default JPEG with the middle of its scan garbled (``corrupt_jpeg``)
  ``/corrupt/random``          ``image/jpeg``: 2048 random bytes
  ``/html``                    ``text/html`` page instead of an image
  ``/wrongtype/text``          default JPEG bytes served as ``text/plain``
  ``/wrongtype/octet``         default JPEG bytes served as ``application/octet-stream``

Dynamic routes:
  ``/robots.txt``              ``srv.robots_txt`` (default ``DEFAULT_ROBOTS_TXT``: disallow ``/private/``); None: 404;
                               ``srv.robots_status`` (default None) answers that status instead (503: unreachable);
                               ``srv.robots_gate`` (default None): an Event the answer waits for (slow robots.txt)
  ``/status/<code>``           that status with a short text body (404, 500, 503, ...)
  ``/flaky/<n>/<token>``       first n requests per token get 503 (``?status=500`` to change), then the default JPEG
  ``/ratelimit/<n>/<token>``   first n requests per token get 429 with ``Retry-After: <s>`` (``?retry_after=<s>``,
                               default 1), then the default JPEG
  ``/slow/<seconds>``          headers at once, then the default JPEG in ``?pieces=<k>`` pieces (default 10), each
                               after a delay of seconds/k, so the body takes at least <seconds>
  ``/hang``                    reads the request and never answers, until ``stop()``
  ``/truncated``               Content-Length of the full default JPEG, only the first half sent (``?keep=<bytes>``),
                               then the connection closes
  ``/redirect/<n>``            302 chain of n hops ending at ``/image.jpg`` (``/redirect/0`` is the image itself;
                               ``?status=301|303|307|308`` to change the code)
  ``/loop/a`` ``/loop/b``      302 to each other, forever
  ``/redirect-to?url=<abs>``   302 to any absolute URL (another host or port)
  ``/huge/<megabytes>``        that many MiB (fractions allowed) of JPEG headers then zero filler, with Content-Length
  ``/huge-stream/<megabytes>`` the same with no Content-Length: ``Connection: close`` and streamed
  anything else              404

``fault_url(name, **params)`` builds these URLs by name; see ``FAULT_PATHS``.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import random
import re
import threading
import time
import uuid
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from PIL import Image, ImageDraw

from visinstruct.testing.loopback import LoopbackService, QuietHandler

DEFAULT_SIZE = (64, 48)
DEFAULT_ROBOTS_TXT = "User-agent: *\nDisallow: /private/\n"
HTML_PAGE = b"<!doctype html>\n<html><head><title>Not an image</title></head><body><p>Hello</p></body></html>\n"

# Fault names for ``ImageServer.fault_url``: a path template whose ``{fields}`` come from params (defaults in
# ``_FAULT_DEFAULTS``); any other params become query parameters (``status``, ``retry_after``, ``pieces``, ``keep``).
FAULT_PATHS = {
    "404": "/status/404",
    "500": "/status/500",
    "503": "/status/503",
    "flaky": "/flaky/{n}/{token}",
    "429": "/ratelimit/{n}/{token}",
    "slow": "/slow/{seconds}",
    "hang": "/hang",
    "truncated": "/truncated",
    "corrupt": "/corrupt/garbled",
    "random": "/corrupt/random",
    "html": "/html",
    "text_plain": "/wrongtype/text",
    "octet_stream": "/wrongtype/octet",
    "redirect": "/redirect/{n}",
    "redirect_loop": "/loop/a",
    "redirect_to": "/redirect-to",
    "huge": "/huge/{megabytes}",
    "huge_stream": "/huge-stream/{megabytes}",
    "noai": "/optout/noai",
    "noimageai": "/optout/noimageai",
    "noindex": "/optout/noindex",
    "private": "/private/image.jpg",
    "robots": "/robots.txt",
}
_FAULT_DEFAULTS = {"n": 2, "seconds": 1.0, "megabytes": 1}

_PIL_FORMATS = {"jpeg": "JPEG", "jpg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF"}
_CHUNK = 64 * 1024


@functools.lru_cache(maxsize=32)
def encode_test_image(fmt: str, size: tuple[int, int] = DEFAULT_SIZE) -> bytes:
    """Encodes a deterministic test picture: an RGB gradient with an ellipse, a box and a diagonal line.

    Args:
        fmt: ``"jpeg"`` (or ``"jpg"``), ``"png"``, ``"webp"`` or ``"gif"``, any case.
        size: ``(width, height)`` in pixels.

    Returns:
        The encoded bytes; the same arguments always give the same bytes on one Pillow build.
    """
    pil_format = _PIL_FORMATS[fmt.lower()]
    w, h = size
    ramp = Image.linear_gradient("L")
    image = Image.merge("RGB", (ramp.rotate(90).resize(size), ramp.resize(size), Image.new("L", size, 128)))
    draw = ImageDraw.Draw(image)
    draw.ellipse((w // 8, h // 8, w // 2, h * 5 // 8), fill=(255, 255, 255))
    draw.rectangle((w // 2, h // 2, w * 7 // 8, h * 7 // 8), fill=(20, 20, 20))
    draw.line((0, h - 1, w - 1, 0), fill=(255, 0, 0), width=max(1, min(w, h) // 24))
    out = io.BytesIO()
    image.save(out, format=pil_format, **({"quality": 90} if pil_format in ("JPEG", "WEBP") else {}))
    return out.getvalue()


def sniff_content_type(data: bytes) -> str | None:
    """Returns the image MIME type that ``data``'s magic bytes announce (JPEG, PNG, WebP, GIF), else None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return None


def _scan_start(jpeg: bytes) -> int:
    """Returns the offset of the first entropy-coded byte: just after the start-of-scan (SOS) header."""
    sos = jpeg.index(b"\xff\xda")
    return sos + 2 + int.from_bytes(jpeg[sos + 2 : sos + 4], "big")


def corrupt_jpeg(jpeg: bytes, seed: int = 0) -> bytes:
    """Overwrites the middle half of a JPEG's scan with garbage; headers stay intact, so it still opens as JPEG.

    The garbage starts with a stray SOI marker: random bytes alone sometimes decode (libjpeg only warns about bad
    entropy data), while a second SOI inside the scan is a fatal libjpeg error, so ``Image.load()`` always raises.
    """
    start, end = _scan_start(jpeg), len(jpeg) - 2  # keep the EOI marker
    lo, hi = start + (end - start) // 4, start + 3 * (end - start) // 4
    garbage = b"\xff\xd8" + random.Random(seed).randbytes(max(hi - lo - 2, 0))
    return jpeg[:lo] + garbage + jpeg[lo + len(garbage) :]


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    """One request as the server saw it.

    Attributes:
        path: The request target, query string included (``/flaky/2/ab?status=500``).
        method: ``GET`` or ``HEAD``.
        headers: Request headers (a later duplicate replaces an earlier one).
        time: ``time.monotonic()`` when the request line and headers had arrived.
        client: The client's ``(host, port)``.
    """

    path: str
    method: str
    headers: dict[str, str]
    time: float
    client: tuple[str, int]


@dataclasses.dataclass(frozen=True)
class _Resource:
    body: bytes
    content_type: str
    headers: dict[str, str]


class _Handler(QuietHandler):
    """Serves registered resources first, then the dynamic fault routes in ``_ROUTES``."""

    def do_GET(self) -> None:  # http.server's naming
        app = self.server.app
        split = urlsplit(self.path)
        headers = dict(self.headers.items())
        app._record(RequestRecord(self.path, self.command, headers, time.monotonic(), self.client_address))
        if app.latency > 0 and app._stopping.wait(app.latency):
            self.close_connection = True
            return
        resource = app._resources.get(split.path)
        if resource is not None:
            return self._send(200, resource.body, resource.content_type, resource.headers)
        query = {key: values[-1] for key, values in parse_qs(split.query).items()}
        for pattern, method in _ROUTES:
            match = pattern.fullmatch(split.path)
            if match:
                try:
                    return getattr(self, method)(query, *match.groups())
                except ValueError:  # every route parses its numbers before it sends anything
                    return self._text(400, "400 Bad Request: a number in the path or query is not one\n")
        self._text(404, "404 Not Found\n")

    do_HEAD = do_GET  # _write drops the body for HEAD

    # -- plumbing --------------------------------------------------------------------------------------------------

    def _start(self, status: int, content_type: str | None, length: int | None, headers: dict | None = None) -> None:
        """Sends the status line and headers; no length means the body ends when the connection closes."""
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        if length is None:
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(length))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()

    def _write(self, data: bytes) -> None:
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send(self, status: int, body: bytes, content_type: str | None, headers: dict | None = None) -> None:
        self._start(status, content_type, len(body), headers)
        self._write(body)

    def _send_image(self) -> None:
        self._send(200, self.server.app.images["jpeg"], "image/jpeg")

    def _text(self, status: int, text: str, headers: dict | None = None) -> None:
        self._send(status, text.encode(), "text/plain; charset=utf-8", headers)

    def _redirect_to_url(self, url: str, query: dict) -> None:
        self._send(int(query.get("status", 302)), b"", None, {"Location": url})

    # -- routes: each takes the query dict and the regex groups ----------------------------------------------------

    def _robots(self, query: dict) -> None:
        gate, stopping = self.server.app.robots_gate, self.server.app._stopping
        while gate is not None and not gate.wait(0.05):
            if stopping.is_set():
                self.close_connection = True
                return
        if self.server.app.robots_status is not None:
            return self._status(query, str(self.server.app.robots_status))
        text = self.server.app.robots_txt
        if text is None:
            return self._text(404, "404 Not Found\n")
        self._text(200, text)

    def _status(self, query: dict, code: str) -> None:
        self._text(int(code), f"{code} {self.responses.get(int(code), ('Status',))[0]}\n")

    def _flaky(self, query: dict, n: str, token: str) -> None:
        if self.server.app._count("flaky", token) <= int(n):
            return self._text(int(query.get("status", 503)), "temporarily unavailable, try again\n")
        self._send_image()

    def _ratelimit(self, query: dict, n: str, token: str) -> None:
        if self.server.app._count("ratelimit", token) <= int(n):
            return self._text(429, "429 Too Many Requests\n", {"Retry-After": query.get("retry_after", "1")})
        self._send_image()

    def _slow(self, query: dict, seconds: str) -> None:
        body, stopping, total = self.server.app.images["jpeg"], self.server.app._stopping, float(seconds)
        step = -(-len(body) // max(1, int(query.get("pieces", 10))))
        pieces = [body[i : i + step] for i in range(0, len(body), step)]
        self._start(200, "image/jpeg", len(body))
        for piece in pieces:
            if stopping.wait(total / len(pieces)):
                self.close_connection = True
                return
            self._write(piece)

    def _hang(self, query: dict) -> None:
        self.server.app._stopping.wait()
        self.close_connection = True

    def _truncated(self, query: dict) -> None:
        body = self.server.app.images["jpeg"]
        keep = int(query.get("keep", len(body) // 2))
        self._start(200, "image/jpeg", len(body))
        self._write(body[:keep])
        self.close_connection = True  # the client sees EOF before Content-Length bytes

    def _redirect(self, query: dict, n: str) -> None:
        hops = int(n)
        if hops == 0:
            return self._send_image()
        self._redirect_to_url(self.server.app.url(f"/redirect/{hops - 1}" if hops > 1 else "/image.jpg"), query)

    def _loop(self, query: dict, side: str) -> None:
        self._redirect_to_url(self.server.app.url("/loop/b" if side == "a" else "/loop/a"), query)

    def _redirect_anywhere(self, query: dict) -> None:
        if "url" not in query:
            return self._text(400, "400 Bad Request: missing ?url=\n")
        self._redirect_to_url(query["url"], query)

    def _huge(self, query: dict, megabytes: str, stream: bool = False) -> None:
        total = int(float(megabytes) * 2**20)
        jpeg = self.server.app.images["jpeg"]
        prefix = jpeg[: _scan_start(jpeg)][:total]  # real JPEG headers, so sniffing and Image.open accept it
        self._start(200, "image/jpeg", None if stream else total)
        if self.command == "HEAD":
            return
        self._write(prefix)
        sent, filler = len(prefix), bytes(_CHUNK)
        while sent < total and not self.server.app._stopping.is_set():
            piece = filler[: total - sent]
            self._write(piece)
            sent += len(piece)
        self.close_connection = self.close_connection or sent < total

    def _huge_stream(self, query: dict, megabytes: str) -> None:
        self._huge(query, megabytes, stream=True)


_ROUTES = [
    (re.compile(pattern), method)
    for pattern, method in [
        (r"/robots\.txt", "_robots"),
        (r"/status/(\d{3})", "_status"),
        (r"/flaky/(\d+)/([^/]+)", "_flaky"),
        (r"/ratelimit/(\d+)/([^/]+)", "_ratelimit"),
        (r"/slow/(\d+(?:\.\d+)?)", "_slow"),
        (r"/hang", "_hang"),
        (r"/truncated", "_truncated"),
        (r"/redirect/(\d+)", "_redirect"),
        (r"/loop/(a|b)", "_loop"),
        (r"/redirect-to", "_redirect_anywhere"),
        (r"/huge/(\d+(?:\.\d+)?)", "_huge"),
        (r"/huge-stream/(\d+(?:\.\d+)?)", "_huge_stream"),
    ]
]


class ImageServer(LoopbackService):
    """A threaded HTTP server on an ephemeral loopback port; see the module docstring for its routes.

    Attributes:
        latency: Seconds every response waits before it starts (simulates a far-away host); may change while running.
        robots_txt: Body of ``/robots.txt``, or None for a 404; may change while running.
        robots_status: A status ``/robots.txt`` answers instead of its body (e.g. 503), or None; may change.
        robots_gate: A ``threading.Event`` that ``/robots.txt`` waits for before it answers, or None; a test holds
            robots.txt with it to make requests overlap without depending on timing.
        images: The default test image by format, ``{"jpeg": ..., "png": ..., "webp": ...}``.
        port: The bound port, once started.
    """

    handler = _Handler

    def __init__(self, latency: float = 0.0, host: str = "127.0.0.1"):
        """Prepares the server; ``start()`` (or ``with``) binds it.

        Args:
            latency: Seconds added before every response.
            host: An IPv4 loopback address: the server never listens anywhere a stranger could reach.

        Raises:
            ValueError: If ``host`` is not an IPv4 loopback address.
        """
        super().__init__(host)
        self.latency, self.robots_txt = latency, DEFAULT_ROBOTS_TXT
        self.robots_status: int | None = None
        self.robots_gate: threading.Event | None = None
        self.images = {fmt: encode_test_image(fmt) for fmt in ("jpeg", "png", "webp")}
        self._resources: dict[str, _Resource] = {}
        self._log: list[RequestRecord] = []
        self._counts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self._add_builtin_resources()

    def _add_builtin_resources(self) -> None:
        jpeg = self.images["jpeg"]
        for fmt, path in (("jpeg", "/image.jpg"), ("png", "/image.png"), ("webp", "/image.webp")):
            self.add_image(path, self.images[fmt])
        self.add_image("/private/image.jpg", jpeg)
        for path, tag in (("noai", "noai"), ("noimageai", "googlebot: noimageai"), ("noindex", "noindex")):
            self.add(f"/optout/{path}", jpeg, "image/jpeg", {"X-Robots-Tag": tag})
        self.add("/corrupt/garbled", corrupt_jpeg(jpeg), "image/jpeg")
        self.add("/corrupt/random", random.Random(1).randbytes(2048), "image/jpeg")
        self.add("/html", HTML_PAGE, "text/html; charset=utf-8")
        self.add("/wrongtype/text", jpeg, "text/plain")
        self.add("/wrongtype/octet", jpeg, "application/octet-stream")

    # -- lifecycle -------------------------------------------------------------------------------------------------

    # -- resources and URLs ----------------------------------------------------------------------------------------

    def url(self, path: str = "/") -> str:
        """Returns ``http://127.0.0.1:PORT/path`` for a path (the leading slash is optional)."""
        if self.port is None:
            raise RuntimeError("ImageServer has no port before start()")
        return f"http://{self.host}:{self.port}/{path.lstrip('/')}"

    def fault_url(self, name: str, **params: Any) -> str:
        """Returns the full URL of a fault route by its name in ``FAULT_PATHS``.

        Args:
            name: A key of ``FAULT_PATHS``, e.g. ``"404"``, ``"flaky"``, ``"429"``, ``"slow"``, ``"redirect_to"``.
            **params: Path fields (``n`` = 2, ``seconds`` = 1.0, ``megabytes`` = 1, ``token`` = a fresh one on every
                call, so each call gets its own counter); the rest become query parameters, e.g.
                ``fault_url("429", n=1, retry_after=3)``, ``fault_url("redirect_to", url=other.url("/x.png"))``.
        """
        template = FAULT_PATHS[name]
        fields = set(re.findall(r"{(\w+)}", template))
        values = {**_FAULT_DEFAULTS, "token": uuid.uuid4().hex[:12], **params}
        if name == "redirect_to" and "url" not in params:
            raise ValueError("fault_url('redirect_to') needs url=<absolute URL>")
        path = template.format(**{key: values[key] for key in fields})
        query = urlencode({key: value for key, value in params.items() if key not in fields})
        return self.url(path + (f"?{query}" if query else ""))

    def add(self, path: str, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> str:
        """Registers (or replaces) a 200 response at ``path``; returns its URL once started, else the path."""
        path = "/" + path.lstrip("/")
        with self._lock:
            self._resources[path] = _Resource(bytes(body), content_type, dict(headers or {}))
        return self.url(path) if self.port is not None else path

    def add_image(self, path: str, image_bytes: bytes, headers: dict[str, str] | None = None) -> str:
        """Registers image bytes with the content type their magic bytes announce (JPEG, PNG, WebP, GIF).

        Raises:
            ValueError: If the bytes are none of those formats (use ``add`` to serve anything else).
        """
        content_type = sniff_content_type(image_bytes)
        if content_type is None:
            raise ValueError(f"add_image({path!r}): bytes are not JPEG, PNG, WebP or GIF; use add() with a type")
        return self.add(path, image_bytes, content_type, headers)

    # -- request log -----------------------------------------------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot of every request since start or ``reset_log()``, in arrival order."""
        with self._lock:
            return list(self._log)

    def hits(self, path: str) -> int:
        """Counts requests for a path or full URL; without a query string, any query matches."""
        if path.startswith(("http://", "https://")):
            split = urlsplit(path)
            path = split.path + (f"?{split.query}" if split.query else "")
        with_query = "?" in path
        return sum(1 for r in self.requests if (r.path if with_query else r.path.split("?", 1)[0]) == path)

    def reset_log(self) -> None:
        """Forgets logged requests and the flaky/429 counters."""
        with self._lock:
            self._log.clear()
            self._counts.clear()

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self._log.append(record)

    def _count(self, kind: str, token: str) -> int:
        """Counts one more request for a stateful route's token and returns the new count."""
        with self._lock:
            count = self._counts[kind, token] = self._counts.get((kind, token), 0) + 1
            return count
