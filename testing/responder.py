"""A test-only fetcher that answers from memory: the ingest graph at scale with no network and no sockets.

``Ingest(cfg, fetcher_factory=...)`` and ``DownloadShard(..., fetcher_factory=...)`` take it in place of the real
``Fetcher`` (``transforms/fetch.py``); it has the same interface (``transforms.download.FetcherLike``:
``fetch(url, limiter=None)``, ``map(fn, items)``, ``robots_record(origin, limiter=None)``, ``seed_robots(records)``,
``close()``), so it serves both download paths (``download.per_host_rps`` null or set), and ``fetch`` returns
what the real one does: a ``Decision`` kept with a value carrying ``data``, ``url`` and ``attempts``
(:class:`Response`, the fields of ``transforms.fetch.Fetched``; ``testing/`` may not import ``transforms/``, and
``tests/test_responder.py`` checks the fields stay the same), or dropped with a reason, a message and
``{"attempts": 1}``. Modes:

- ``"image"``: a small deterministic JPEG per URL (:func:`image_for`): a flat colour picked by the URL's digest,
  with the digest in a JPEG comment, so every URL gets bytes of its own sha256 and decoding costs little;
- ``"refuse"``: every URL dropped ``blocked_address``, with the message the real connect-time address check gives
  for a name resolving to a private address; nothing is decoded (pure bookkeeping).

Usage::

    Ingest(cfg, fetcher_factory=functools.partial(Responder, mode="refuse"))
"""

from __future__ import annotations

import functools
import hashlib
import io
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

from PIL import Image

from visinstruct.configs import DownloadConfig
from visinstruct.schemas import Decision

MODES = ("image", "refuse")
SIZE = 32  # the default min_image_size keeps 32x32
PALETTE = 64  # distinct base pictures, each encoded once (the cache stays this small however many URLs come)
REFUSED_ADDRESS = "10.0.0.1"


@dataclass(frozen=True)
class Response:
    """What a kept fetch carries, field for field as ``transforms.fetch.Fetched``."""

    data: bytes
    url: str
    attempts: int


@functools.lru_cache(maxsize=PALETTE)
def _base_jpeg(colour: int) -> bytes:
    """A flat ``SIZE`` x ``SIZE`` JPEG of one of ``PALETTE`` colours."""
    rgb = ((colour * 37) % 256, (colour * 91) % 256, (colour * 151) % 256)
    out = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), rgb).save(out, format="JPEG", quality=90)
    return out.getvalue()


def image_for(url: str) -> bytes:
    """The JPEG answered for ``url``: its digest picks the colour and is written as a comment (COM segment) right
    after the start-of-image marker, so two URLs never share bytes (nor a sha256) and the image decodes as usual."""
    digest = hashlib.sha256(url.encode("utf-8", "surrogatepass")).digest()
    base = _base_jpeg(digest[0] % PALETTE)
    comment = digest.hex().encode("ascii")
    segment = b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment
    return base[:2] + segment + base[2:]


class Responder:
    """Answers every URL from memory (see the module docstring); one per worker, thread-safe."""

    def __init__(self, cfg: DownloadConfig, mode: str = "image"):
        """``cfg``: the run's download settings (``threads`` sizes the pool ``map`` runs on, as in the real one)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.cfg, self.mode = cfg, mode
        self._executor = ThreadPoolExecutor(max_workers=cfg.threads, thread_name_prefix="respond")

    def fetch(self, url: str, limiter=None) -> Decision[Response]:
        """The answer for ``url``: a kept :class:`Response`, or ``blocked_address`` in refuse mode. ``limiter``
        (a fetch partition's rate limiter) is not used: nothing here is a host to be polite to."""
        if self.mode == "refuse":
            host = urlsplit(url).hostname or url
            message = f"{host} resolves to a non-public address ({REFUSED_ADDRESS})"
            return Decision.drop("blocked_address", message, {"attempts": 1})
        return Decision.keep(Response(image_for(url), url, 1))

    def map(self, fn: Callable, items: list) -> list:
        """``[fn(item) for item in items]`` on the pool's threads, in input order."""
        return list(self._executor.map(fn, items))

    def robots_record(self, origin: str, limiter=None) -> tuple[str, str, str]:
        """No robots.txt anywhere: the record that allows everything (``("allow", "", "")``)."""
        return ("allow", "", "")

    def seed_robots(self, records: dict) -> int:
        """Nothing to seed (no robots.txt is ever asked): none added."""
        return 0

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
