"""The image a vision model is shown, and chat messages that carry it: plain functions, no Beam.

A request of a kind that sees the image holds an image *placeholder* in its user message (``{"type": "image"}``,
the parts form transformers' processors use) and the image itself beside the messages, as a
:class:`PreparedImage`. Each backend renders the placeholder its own way:

- ``openai``: :func:`openai_messages`, an ``image_url`` part holding a base64 data URI of the bytes;
- ``transformers``: the parts as they are (a processor's chat template), or :func:`text_messages` (the image token
  in the text, for chat templates that only read strings, as the checkpoints ``visinstruct train`` writes);
- ``vllm``: the OpenAI form, which ``LLM.chat`` reads.

Keeping the placeholder (not the bytes) in the messages keeps a request's cache fingerprint small: the image enters
it as its sha256 and the settings it was prepared with (:func:`image_fingerprint`).

:func:`prepare_image` sends the shard's own bytes when they already fit (``image.max_side``, and ``format: keep`` or
the same format): no decode, no re-encode. Otherwise it decodes once, resizes (keeping the ratio) and encodes
deterministically.
"""

from __future__ import annotations

import base64
import hashlib
import io
from dataclasses import dataclass

from PIL import Image

from visinstruct.configs import ImageConfig
from visinstruct.schemas import Dropped
from visinstruct.transforms.images import decode_rgb, load_rgb, open_image

IMAGE_PART = {"type": "image"}
_FORMATS = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "WEBP": "webp"}  # Pillow's name -> ours
_MIME = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


@dataclass(frozen=True)
class PreparedImage:
    """The bytes a backend is given for one sample's image.

    Attributes:
        data: The encoded image.
        format: ``jpeg``, ``png`` or ``webp``.
        width: Its width in pixels.
        height: Its height in pixels.
        sha256: Of ``data``.
        source_sha256: Of the shard's image member (the sample's image as stored).
        reencoded: Whether ``data`` was decoded and encoded again (False: the shard's bytes as they are).
    """

    data: bytes
    format: str
    width: int
    height: int
    sha256: str
    source_sha256: str
    reencoded: bool

    @property
    def mime(self) -> str:
        return _MIME[self.format]

    def data_uri(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"

    def pil(self) -> Image.Image:
        """The image decoded to RGB (for local processors); raises :class:`Dropped` for bytes that do not decode."""
        return decode_rgb(self.data)

    def provenance(self) -> dict:
        """What a sample records of the image its model saw (no bytes)."""
        return {
            "sha256": self.sha256,
            "source_sha256": self.source_sha256,
            "format": self.format,
            "width": self.width,
            "height": self.height,
            "bytes": len(self.data),
            "reencoded": self.reencoded,
        }


def fitted_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """``(width, height)`` scaled down (ratio kept, at least 1 pixel) so that the longer side is ``max_side``."""
    if max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def sendable_as_is(header: Image.Image) -> bool:
    """Whether a model can be given these bytes unchanged: 8-bit RGB or grey with no transparency, in a format every
    backend reads. Anything else (CMYK, 16-bit, alpha, palettes) is converted the one way CLIP's input is
    (:func:`~visinstruct.transforms.images.to_rgb`), so the model and the grounding check see the same pixels."""
    return header.format in _FORMATS and header.mode in ("RGB", "L") and "transparency" not in header.info


def prepare_image(data: bytes, cfg: ImageConfig) -> PreparedImage:
    """The image to send for a shard member's bytes ``data``.

    The bytes go as they are when they fit (size, format, mode: :func:`sendable_as_is`): only the header is read.
    Shards written by ingest hold images it decoded; bytes from elsewhere that are cut past their header reach the
    backend, which rejects them as that sample's failure. Otherwise the image is decoded once (JPEGs at the
    smallest DCT scale still at least the target size, no more than ``image.max_pixels``), resized and encoded.

    Raises:
        Dropped: for bytes that do not open or decode (``decode_error``, ``truncated``, ``decompression_bomb``...).
    """
    header = open_image(data)  # the header only: format and size, no pixels
    source_format = _FORMATS.get(header.format or "")
    width, height = header.size
    if width < 1 or height < 1:
        raise Dropped("too_small", f"{width}x{height} has no pixels")
    target = fitted_size(width, height, cfg.max_side)
    fmt = source_format if cfg.format == "keep" else cfg.format
    source_sha = hashlib.sha256(data).hexdigest()
    if target == (width, height) and fmt == source_format and sendable_as_is(header):
        return PreparedImage(data, fmt, width, height, source_sha, source_sha, reencoded=False)
    img = load_rgb(header, cfg.max_pixels, target)
    if img.size != target:
        img = img.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
    fmt = fmt or "png"  # keep, for a format no backend takes (GIF, BMP...): lossless
    out = encode(img, fmt, cfg.quality)
    return PreparedImage(out, fmt, img.width, img.height, hashlib.sha256(out).hexdigest(), source_sha, True)


def encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    """Deterministic bytes (no EXIF, no timestamps) of ``img`` as ``fmt``."""
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, "PNG", compress_level=6, optimize=False)
    elif fmt == "webp":
        img.save(buf, "WEBP", quality=quality, method=4)
    else:
        img.save(buf, "JPEG", quality=quality, optimize=False)
    return buf.getvalue()


def image_fingerprint(image: PreparedImage | None, cfg: ImageConfig, detail: bool = True) -> dict | None:
    """What of the image enters a request's cache key: the bytes sent (by sha256) and the settings that made them;
    ``detail`` only where the backend sends it (openai)."""
    if image is None:
        return None
    key = {
        "sha256": image.sha256,
        "size": [image.width, image.height],
        "max_side": cfg.max_side,
        "format": cfg.format,
        "quality": cfg.quality,
    }
    return key | {"detail": cfg.detail} if detail else key


def user_parts(text: str) -> list[dict]:
    """A user message's content with the image first, then the text."""
    return [dict(IMAGE_PART), {"type": "text", "text": text}]


def count_images(messages: list[dict]) -> int:
    """How many image placeholders ``messages`` hold."""
    return sum(
        1
        for m in messages
        if isinstance(m.get("content"), list)
        for p in m["content"]
        if isinstance(p, dict) and p.get("type") == "image"
    )


def openai_messages(messages: list[dict], image: PreparedImage | None, detail: str = "auto") -> list[dict]:
    """The messages as an OpenAI-compatible server takes them: each placeholder an ``image_url`` data URI."""
    if image is None:
        return messages
    url = {"url": image.data_uri(), "detail": detail}
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = [{"type": "image_url", "image_url": dict(url)} if p == IMAGE_PART else p for p in content]
        out.append({**m, "content": content})
    return out


def text_messages(messages: list[dict], image_token: str) -> list[dict]:
    """The messages with string contents only: each placeholder becomes ``image_token`` on its own line."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            pieces = [image_token if p.get("type") == "image" else p.get("text", "") for p in content]
            content = "\n".join(p for p in pieces if p)
        out.append({**m, "content": content})
    return out
