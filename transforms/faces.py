"""Find faces in an image, record their boxes, and blur them in the written image: plain functions, no Beam.

The curate judge calls :func:`curate_faces` once per sample: it decodes the image member, finds the faces
(:func:`detect_faces`) and, when blurring is on and a face was found, returns the member re-encoded in its own format
with every face blurred (:func:`blur_faces`, :func:`encode_like`); otherwise the member stays byte for byte as it was.

Why a Haar cascade: OpenCV ships its trained cascades inside the ``opencv-python-headless`` wheel (``cv2.data``), so
nothing is downloaded at run time and workers need no model files; the library is Apache-2.0 and the cascade files
carry Intel's 3-clause BSD-style licence (in each XML file's header). We use ``haarcascade_frontalface_alt2.xml``
with ``scaleFactor=1.1`` and ``minNeighbors=5``: on the twelve scikit-image photographs it finds the astronaut's face
once and nothing else, and nothing in synthetic shapes or easy-VQA images, whereas
``haarcascade_frontalface_default.xml`` with the same parameters also finds three "faces" among the coins.

Known limits, honestly: a Haar cascade finds upright, roughly frontal faces. It misses profiles and strongly turned
heads (the scikit-image cameraman, seen from the side, is not found), faces tilted by more than 10-15 degrees (the
astronaut rotated by 15-20 degrees is lost), faces smaller than its 20x20 pixel window or than ``min_size``, and many
partly hidden or badly lit faces; it can fire on face-like textures. Blurring is therefore a best effort against
casual identification, not a guarantee.

Cost: detection dominates (decoding, blurring and encoding take a few ms); on a shared 2-core machine it took about
80-150 ms for a 512x512 image and 220-310 ms for 1024x768, and larger images cost no more than 1024 pixels on their
longer side (:data:`MAX_DETECT_SIDE`).

Boxes are in the stored image's pixel frame (EXIF orientation is not applied, as in the rest of the pipeline), so the
written image keeps the original's orientation tag.
"""

from __future__ import annotations

import io
import math
import os
import threading
from functools import lru_cache

import cv2
import numpy as np
from PIL import Image, ImageFilter, JpegImagePlugin

from visinstruct.schemas import Box
from visinstruct.transforms.images import PILLOW_ERRORS, decode_rgb, open_image

CASCADE = "haarcascade_frontalface_alt2.xml"
SCALE_FACTOR = 1.1  # the image pyramid's step: 1.05 finds more false faces on the scikit-image photos, 1.2 no more
MIN_NEIGHBORS = 5  # overlapping hits a face needs; 1.1/5 leaves a margin (3 gave the same results on our photos)
MAX_DETECT_SIDE = 1024  # faces are searched on a copy whose longer side is at most this: bounded cost per image
BLUR_PADDING = 0.10  # the blurred region is the face box grown by this fraction of its width/height on each side
BLUR_RADIUS = 1 / 3  # Gaussian radius as a fraction of the blurred region's longer side
JPEG_QUALITY = 95  # when a JPEG member's original quantisation tables cannot be reused
WEBP_QUALITY = 90  # when the original WebP is lossy; a lossless original stays lossless
PNG_COMPRESS_LEVEL = 6
ORIENTATION = 0x0112  # the EXIF tag kept in a re-encoded image (every other EXIF field is dropped)
_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}

_THREAD = threading.local()  # one classifier per thread: a CascadeClassifier is not safe to share across threads


def thread_cascade() -> cv2.CascadeClassifier:
    """This thread's own copy of the cascade (opencv/opencv#4287: one classifier used by two threads at once is not
    safe; Beam runs several threads per worker), loaded once per thread (about 10 ms)."""
    cascade = getattr(_THREAD, "cascade", None)
    if cascade is None:
        cascade = _THREAD.cascade = load_cascade.__wrapped__()
    return cascade


@lru_cache(maxsize=None)
def load_cascade(name: str = CASCADE) -> cv2.CascadeClassifier:
    """OpenCV's bundled cascade ``name``, loaded once per process (checks the file; :func:`thread_cascade` is what
    detection uses).

    Raises:
        FileNotFoundError: the cascade file is not in this OpenCV install (a broken or foreign build): a run error.
    """
    folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
    path = os.path.join(folder, name) if folder else name
    if not folder or not os.path.isfile(path):
        raise FileNotFoundError(
            f"OpenCV's Haar cascade {path!r} is missing: faces need the cascades bundled with the "
            "opencv-python-headless wheel (pip install 'opencv-python-headless>=4.8')"
        )
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise FileNotFoundError(f"OpenCV could not load the Haar cascade {path!r}")
    return cascade


def detection_size(width: int, height: int) -> tuple[int, int]:
    """The size faces are searched at: the image's own, or scaled so its longer side is :data:`MAX_DETECT_SIDE`."""
    scale = MAX_DETECT_SIDE / max(width, height)
    if scale >= 1:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def detect_faces(image: Image.Image, min_size: float = 0.05) -> list[Box]:
    """Frontal faces in an image, as ``Box("face", [x1, y1, x2, y2])`` normalised to 0-1.

    Faces are searched in the grey image with an equalised histogram, on a copy no larger than
    :data:`MAX_DETECT_SIDE`; boxes are normalised (so they fit the full-size image), clamped, rounded to 4 decimals
    and sorted by top edge, then left edge.

    Args:
        image: any mode (converted to grey).
        min_size: the smallest face searched for, as a fraction of the image's shorter side (0 < min_size <= 1).
    """
    if not 0 < min_size <= 1:
        raise ValueError(f"min_size must be within (0, 1], got {min_size}")
    cascade = thread_cascade()
    size = detection_size(*image.size)
    grey = image.convert("L")
    if grey.size != size:
        grey = grey.resize(size, Image.Resampling.BOX)
    width, height = size
    smallest = max(math.ceil(min_size * min(width, height)), *cascade.getOriginalWindowSize())
    if smallest > min(width, height):
        return []  # no face of the asked size fits (tiny images, extreme aspect ratios)
    pixels = cv2.equalizeHist(np.asarray(grey))
    found = cascade.detectMultiScale(
        pixels, scaleFactor=SCALE_FACTOR, minNeighbors=MIN_NEIGHBORS, minSize=(smallest, smallest)
    )
    boxes = [
        Box("face", [_unit(x / width), _unit(y / height), _unit((x + w) / width), _unit((y + h) / height)])
        for x, y, w, h in np.asarray(found, dtype=np.int64).reshape(-1, 4).tolist()
    ]
    return sorted(boxes, key=lambda box: (box.bbox[1], box.bbox[0], box.bbox[3], box.bbox[2]))


def _unit(value: float) -> float:
    return min(1.0, max(0.0, round(value, 4)))


def blur_region(box: Box, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The pixels :func:`blur_faces` replaces for ``box`` in an image of ``size``: ``(left, top, right, bottom)``,
    right and bottom exclusive; the box grown by :data:`BLUR_PADDING` of its size on each side, clamped."""
    width, height = size
    x1, y1, x2, y2 = box.bbox
    pad_x, pad_y = BLUR_PADDING * (x2 - x1), BLUR_PADDING * (y2 - y1)
    left, top = max(0, math.floor((x1 - pad_x) * width)), max(0, math.floor((y1 - pad_y) * height))
    right, bottom = min(width, math.ceil((x2 + pad_x) * width)), min(height, math.ceil((y2 + pad_y) * height))
    return left, top, max(left, right), max(top, bottom)


def blur_faces(image: Image.Image, faces: list[Box]) -> Image.Image:
    """A copy of ``image`` with every face blurred beyond recognition.

    The recorded box is the detected one; the blurred region is that box padded (:func:`blur_region`), so the face's
    edges are covered too. Each region is replaced by a Gaussian blur of itself with a radius of a third of the
    region's longer side, which leaves little more than its mean colour (on the astronaut the pixel variance inside
    the face box drops by about 90%). Every pixel outside the regions is the input's. Regions are blurred in the
    order of ``faces``, so overlapping faces give the same result every time.
    """
    out = image.copy()
    for face in faces:
        left, top, right, bottom = blur_region(face, image.size)
        if right <= left or bottom <= top:
            continue
        region = out.crop((left, top, right, bottom))
        radius = BLUR_RADIUS * max(right - left, bottom - top)
        out.paste(region.filter(ImageFilter.GaussianBlur(radius)), (left, top))
    return out


def encode_like(image: Image.Image, ext: str, original: bytes) -> bytes:
    """``image`` encoded as the member ``ext`` (``jpg``/``jpeg``, ``png``, ``webp``), close to ``original``.

    Deterministic (same input, same bytes) and free of metadata except the original's colour profile and EXIF
    orientation. A greyscale original stays greyscale. JPEG reuses the original JPEG's quantisation tables and
    chroma subsampling (what Pillow's ``quality="keep"`` does), so unchanged regions barely move, else quality
    :data:`JPEG_QUALITY`; PNG is lossless; WebP is lossless unless the original WebP is lossy, then quality
    :data:`WEBP_QUALITY`.

    Raises:
        ValueError: ``ext`` is not an image member format.
        Dropped: ``original`` is not an image Pillow can open.
    """
    fmt = _FORMATS.get(ext.lower())
    if fmt is None:
        raise ValueError(f"cannot encode an image member {ext!r}: expected one of {sorted(_FORMATS)}")
    source = open_image(original)
    image = image.convert("L" if source.mode == "L" else "RGB")
    options = _metadata(source)
    if fmt == "JPEG":
        options.update(_jpeg_options(source))
    elif fmt == "PNG":
        options.update(compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    elif _lossy_webp(original):
        options.update(quality=WEBP_QUALITY, method=4)
    else:
        options.update(lossless=True, quality=80, method=4)  # for lossless WebP, quality is compression effort
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _metadata(source: Image.Image) -> dict:
    """The colour profile and EXIF orientation of the original (the rest, GPS included, is dropped)."""
    options = {}
    if source.info.get("icc_profile"):
        options["icc_profile"] = source.info["icc_profile"]
    try:
        orientation = source.getexif().get(ORIENTATION)
    except PILLOW_ERRORS:  # a damaged EXIF block is dropped with the rest of the metadata
        orientation = None
    if isinstance(orientation, int) and orientation != 1:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        options["exif"] = exif.tobytes()
    return options


def _jpeg_options(source: Image.Image) -> dict:
    """The original's quantisation tables and subsampling when it is a JPEG with 1 or 3 components."""
    if isinstance(source, JpegImagePlugin.JpegImageFile) and source.mode in ("L", "RGB") and source.quantization:
        tables = [source.quantization[i] for i in sorted(source.quantization)]
        if len(tables) <= 4 and all(max(table) <= 255 for table in tables):  # 8-bit baseline tables only
            sampling = JpegImagePlugin.get_sampling(source) if source.mode == "RGB" else 0
            return {"qtables": tables, "subsampling": max(sampling, 0)}
    return {"quality": JPEG_QUALITY}


def _lossy_webp(data: bytes) -> bool:
    """Whether ``data`` is a WebP whose image is a lossy (``VP8 ``) bitstream; walks the RIFF chunks."""
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return False
    offset = 12
    while offset + 8 <= len(data):
        fourcc, size = data[offset : offset + 4], int.from_bytes(data[offset + 4 : offset + 8], "little")
        if fourcc in (b"VP8 ", b"VP8L"):
            return fourcc == b"VP8 "
        offset += 8 + size + (size & 1)
    return False


def curate_faces(data: bytes, ext: str, min_size: float, blur: bool) -> tuple[list[Box], bytes | None]:
    """The faces in one image member, and its re-encoded bytes with the faces blurred when ``blur`` and any were
    found (else ``None``: the member stays byte for byte as it was).

    Raises:
        Dropped: the bytes are not a readable image (the reason from
            :func:`~visinstruct.transforms.images.decode_rgb`).
    """
    image = decode_rgb(data)
    faces = detect_faces(image, min_size)
    if not (blur and faces):
        return faces, None
    return faces, encode_like(blur_faces(image, faces), ext, data)
