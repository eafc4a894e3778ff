"""Validate, resize, re-encode and hash one image: plain functions, no Beam.

Whatever the bytes hold, a function here returns or raises :class:`~visinstruct.schemas.Dropped` with a reason code
(``not_an_image``, ``truncated``, ``decode_error``, ``decompression_bomb``, ``too_small``...), never anything else:
the calling step turns the drop into that record's dead-letter row.

Resize modes follow img2dataset's resizer (same names and meaning), implemented with Pillow so that big JPEG
downscales can decode at a reduced DCT scale (``Image.draft``), which measured about 1.5x cheaper than a full
decode plus resize:

- ``no``: keep the size (still validated and re-encoded);
- ``keep_ratio``: the smaller side becomes ``image_size``;
- ``keep_ratio_largest``: the larger side becomes ``image_size``;
- ``center_crop``: the smaller side becomes ``image_size``, then the centre square is kept;
- ``border``: the larger side becomes ``image_size``, then borders of ``border_color`` (white, as img2dataset's)
  pad it to a square.
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageColor, UnidentifiedImageError

from visinstruct.configs import ResizeConfig
from visinstruct.schemas import Dropped

ACCEPTED_FORMATS = {"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"}
_SAVE = {"jpg": ("JPEG", "image/jpeg"), "png": ("PNG", "image/png"), "webp": ("WEBP", "image/webp")}


@dataclass(frozen=True)
class ProcessedImage:
    """The re-encoded image and what we learnt about it."""

    data: bytes
    format: str  # member extension: jpg, png or webp
    width: int
    height: int
    original_width: int
    original_height: int
    sha256: str  # of the original bytes (img2dataset's compute_hash), so takedown lists match
    phash: str | None  # None when not asked for (no step of the run compares images by their looks)


def check_size(width: int, height: int, cfg: ResizeConfig) -> None:
    """Raise :class:`Dropped` when the original size breaks a configured bound."""
    if width * height > cfg.max_pixels:
        raise Dropped("decompression_bomb", f"{width}x{height} exceeds max_pixels={cfg.max_pixels}")
    if min(width, height) < max(cfg.min_image_size, 1):
        raise Dropped("too_small", f"{width}x{height} is smaller than min_image_size={cfg.min_image_size}")
    if cfg.max_image_area is not None and width * height > cfg.max_image_area:
        raise Dropped("too_large", f"{width}x{height} exceeds max_image_area={cfg.max_image_area}")
    ratio = max(width, height) / min(width, height)
    if cfg.max_aspect_ratio is not None and ratio > cfg.max_aspect_ratio:
        raise Dropped("bad_aspect_ratio", f"aspect ratio {ratio:.2f} exceeds {cfg.max_aspect_ratio}")


def target_size(width: int, height: int, cfg: ResizeConfig) -> tuple[int, int]:
    """The size the image is scaled to before any crop or border (equal to the input for ``no``)."""
    mode, size = cfg.resize_mode, cfg.image_size
    if mode == "no":
        return width, height
    side = max(width, height) if mode in ("keep_ratio_largest", "border") else min(width, height)
    if cfg.resize_only_if_bigger and side <= size:
        return width, height
    scale = size / side
    return max(1, round(width * scale)), max(1, round(height * scale))


# What Pillow and its format plugins raise on damaged or hostile bytes, at open, load or convert time: OSError
# ("Truncated File Read", "broken data stream", libtiff and libwebp failures), ValueError ("Truncated IHDR chunk",
# "Invalid dimensions"), SyntaxError (malformed headers), EOFError, struct.error (short header fields), and the
# lookup and arithmetic errors that header fields making no sense cause in the plugins' Python code; and the
# DecompressionBombError Image.open raises past twice Pillow's own pixel limit.
PILLOW_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    OverflowError,
    Image.DecompressionBombError,
)
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}  # "I" holds 16-bit PNG/TIFF/PGM samples in practice


# Signatures of the formats we accept: bytes that start with one are a damaged image, not some other file.
_SIGNATURES = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"BM": "BMP",
}


def signature(data: bytes) -> str | None:
    """The image format ``data``'s first bytes announce, if any."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _SIGNATURES.items() if data.startswith(magic)), None)


def _dropped(error: BaseException, action: str = "decode", data: bytes = b"") -> Dropped:
    """The drop for an exception Pillow raised: ``not_an_image``, ``truncated``, ``decode_error`` or
    ``decompression_bomb``; ``data`` tells a damaged image header from bytes that are no image at all."""
    if isinstance(error, UnidentifiedImageError):
        fmt = signature(data)
        if fmt is None:
            return Dropped("not_an_image", "the bytes are not an image Pillow can read")
        return Dropped("decode_error", f"a damaged {fmt} header Pillow cannot read")
    if isinstance(error, Image.DecompressionBombError):
        return Dropped("decompression_bomb", str(error))
    text = f"{type(error).__name__}: {error}"
    truncated = isinstance(error, EOFError) or "truncat" in text.lower()
    return Dropped("truncated" if truncated else "decode_error", f"cannot {action} image: {text}")


def _eight_bit(img: Image.Image) -> Image.Image:
    """16-bit and float greyscale as 8-bit ``L``, scaled (Pillow's own convert clips, turning most pixels white)."""
    a = np.asarray(img)
    if img.mode == "F":
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        a = a * 255.0 if a.size and a.max() <= 1.0 else a  # floats in [0, 1] are intensities, else 8-bit values
    else:
        a = a.astype(np.float64) / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB from any mode, deterministically: transparent pixels composited on white (dropping alpha would
    expose arbitrary colours), 16-bit and float greyscale scaled to 8 bits, everything else by Pillow's convert."""
    if img.mode in _SIXTEEN_BIT or img.mode == "F":
        img = _eight_bit(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA") if img.mode != "La" else img.convert("LA").convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def open_image(data: bytes) -> Image.Image:
    """Read the header of ``data`` (no pixels yet); raises :class:`Dropped` for anything Pillow rejects."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # callers check sizes themselves
            return Image.open(io.BytesIO(data))
    except PILLOW_ERRORS as e:
        raise _dropped(e, "open", data) from None


def load_rgb(img: Image.Image, max_pixels: int, size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an opened image's first frame to RGB, refusing more than ``max_pixels``.

    Args:
        img: from :func:`open_image`.
        max_pixels: the decompression-bomb guard, checked before a pixel is decoded.
        size: for JPEGs, decode at the smallest DCT scale still at least this size (``Image.draft``).

    Raises:
        Dropped: ``decompression_bomb``, ``truncated`` or ``decode_error``.
    """
    if img.width * img.height > max_pixels:
        raise Dropped("decompression_bomb", f"{img.width}x{img.height} exceeds max_pixels={max_pixels}")
    try:
        if size is not None and img.format in ("JPEG", "MPO") and size != img.size:
            img.draft("RGB", size)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
        return to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Dropped("decompression_bomb", str(e)) from None
    except PILLOW_ERRORS as e:
        raise _dropped(e) from None


def decode_rgb(data: bytes, max_pixels: int = ResizeConfig.max_pixels) -> Image.Image:
    """The whole image as RGB at its own size (what the filter scores); raises only :class:`Dropped`."""
    img = open_image(data)
    if img.width < 1 or img.height < 1:
        raise Dropped("too_small", f"{img.width}x{img.height} has no pixels")
    return load_rgb(img, max_pixels)


def decode(data: bytes, cfg: ResizeConfig) -> tuple[Image.Image, int, int]:
    """Decode ``data`` into an RGB image sized for ``cfg``; returns ``(image, original_w, original_h)``."""
    img = open_image(data)
    if img.format not in ACCEPTED_FORMATS:
        raise Dropped("unsupported_format", f"image format {img.format} is not accepted")
    width, height = img.size
    check_size(width, height, cfg)  # before decoding a single pixel
    return load_rgb(img, cfg.max_pixels, target_size(width, height, cfg)), width, height


def border_rgb(color: str) -> tuple[int, int, int]:
    """``resize.border_color`` as RGB (a CSS colour name, ``#rgb``, ``#rrggbb`` or ``rgb(r, g, b)``)."""
    return ImageColor.getrgb(color)[:3]


# img2dataset's interpolation names (OpenCV's) as Pillow filters. Pillow's filters antialias when shrinking (their
# support widens with the scale), so BOX averages whole source areas as OpenCV's INTER_AREA does; Pillow's LANCZOS
# is a 3-lobe window where OpenCV's LANCZOS4 has 4.
FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "linear": Image.Resampling.BILINEAR,
    "cubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
    "lanczos4": Image.Resampling.LANCZOS,
}


def resize(img: Image.Image, cfg: ResizeConfig, original: tuple[int, int]) -> Image.Image:
    """Apply ``cfg.resize_mode`` to a decoded image (which may already be draft-reduced).

    Shrinking uses ``cfg.downscale_interpolation`` and enlarging ``cfg.upscale_interpolation`` (by area: a draft
    decode leaves at least the target size, so what remains of a big JPEG's resize is a shrink). ``area`` (box
    averaging, img2dataset's default, as OpenCV's INTER_AREA) costs about a third of Lanczos.
    """
    tw, th = target_size(*original, cfg)
    if img.size != (tw, th):
        shrink = tw * th < img.width * img.height
        name = cfg.downscale_interpolation if shrink else cfg.upscale_interpolation
        img = img.resize((tw, th), FILTERS[name])
    size = cfg.image_size
    if cfg.resize_mode == "center_crop" and (tw > size or th > size):
        left, top = (tw - min(tw, size)) // 2, (th - min(th, size)) // 2
        img = img.crop((left, top, left + min(tw, size), top + min(th, size)))
    elif cfg.resize_mode == "border" and (tw, th) != (size, size) and max(tw, th) <= size:
        canvas = Image.new("RGB", (size, size), border_rgb(cfg.border_color))
        canvas.paste(img, ((size - tw) // 2, (size - th) // 2))
        img = canvas
    return img


def encode(img: Image.Image, cfg: ResizeConfig) -> bytes:
    """Encode deterministically (no timestamps or EXIF), so the same input gives the same bytes."""
    fmt, _ = _SAVE[cfg.encode_format]
    buf = io.BytesIO()
    if fmt == "PNG":
        img.save(buf, fmt, compress_level=min(9, cfg.encode_quality // 10), optimize=False)
    else:
        img.save(buf, fmt, quality=cfg.encode_quality)
    return buf.getvalue()


_DCT_CACHE: dict[int, np.ndarray] = {}


def _dct_matrix(n: int) -> np.ndarray:
    if n not in _DCT_CACHE:
        k = np.arange(n)[:, None]
        i = np.arange(n)[None, :]
        m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
        m[0] /= np.sqrt(2.0)
        _DCT_CACHE[n] = m
    return _DCT_CACHE[n]


def phash(img: Image.Image) -> str:
    """64-bit perceptual hash (DCT of a 32x32 grey thumbnail, 8x8 low frequencies vs. their median), as hex."""
    grey = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    d = _dct_matrix(32)
    low = (d @ grey @ d.T)[:8, :8].flatten()
    bits = low[1:] > np.median(low[1:])  # skip the DC term: it says only how bright the image is
    value = 0
    for b in np.concatenate([[False], bits]):
        value = (value << 1) | int(b)
    return f"{value:016x}"


def hamming(a: str, b: str) -> int:
    """Bits that differ between two hex perceptual hashes."""
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def process_image(data: bytes, cfg: ResizeConfig, with_phash: bool = True) -> ProcessedImage:
    """Validate, resize, re-encode and hash one image; raises only :class:`Dropped`, with a reason code.

    ``with_phash=False`` skips the perceptual hash (about a tenth of the work on a small image) when nothing of
    the run uses it; later stages compute it from the stored image when they need one (curate's decontamination).
    """
    img, width, height = decode(data, cfg)
    out = resize(img, cfg, (width, height))
    return ProcessedImage(
        data=encode(out, cfg),
        format=cfg.encode_format,
        width=out.width,
        height=out.height,
        original_width=width,
        original_height=height,
        sha256=hashlib.sha256(data).hexdigest(),
        phash=phash(out) if with_phash else None,
    )
