"""Fuzz: no bytes make an image decoder raise; every damaged sample ends processed or rejected with a reason.

Small JPEG, PNG, GIF, WebP, TIFF and BMP files made here with Pillow are cut at seeded offsets and have seeded bytes
overwritten (half of them inside the first 128 bytes, where the headers Pillow parses in Python live), then go
through ingest's ``process_image`` and through the filter's decoder on a real Beam runner.
"""

import io
import random
from collections import Counter

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image, ImageDraw

from visinstruct.configs import ResizeConfig
from visinstruct.schemas import Dropped
from visinstruct.testing.tars import write_tar
from visinstruct.transforms.filter_stages import DecodeForClip, ReadShardSamples, decode_for_clip
from visinstruct.transforms.images import process_image
from visinstruct.transforms.layout import shard_in

# Pillow warns about odd EXIF and palettes in damaged files; only exceptions matter here.
pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore::UserWarning")]
REASONS = {
    "not_an_image",
    "truncated",
    "decode_error",
    "decompression_bomb",
    "unsupported_format",
    "too_small",
    "too_large",
    "bad_aspect_ratio",
}
# Small enough that a flipped header claiming a big image is refused before it costs a big decode.
CFG = ResizeConfig(image_size=32, min_image_size=8, max_aspect_ratio=None, max_pixels=1_000_000)
FORMATS = {  # name -> (Pillow format, save options); GIF and TIFF with two frames
    "jpeg": ("JPEG", {"quality": 85}),
    "progressive-jpeg": ("JPEG", {"progressive": True}),
    "png": ("PNG", {}),
    "palette-png": ("PNG", {"palette": True, "transparency": 3}),
    "gif": ("GIF", {"save_all": True}),
    "webp": ("WEBP", {"quality": 80}),
    "tiff": ("TIFF", {"compression": "tiff_lzw", "save_all": True}),
    "bmp": ("BMP", {}),
}
CASES_PER_FORMAT = 64


def picture(size=(48, 40)) -> Image.Image:
    img = Image.new("RGB", size, (30, 60, 90))
    draw = ImageDraw.Draw(img)
    draw.ellipse((4, 4, size[0] // 2, size[1] // 2), fill=(250, 200, 10))
    draw.line((0, size[1] - 1, size[0] - 1, 0), fill=(255, 0, 0), width=3)
    return img


def encoded(name: str) -> bytes:
    fmt, options = FORMATS[name]
    options = dict(options)
    img = picture()
    if options.pop("palette", False):
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    if options.get("save_all"):
        options["append_images"] = [img.transpose(Image.Transpose.ROTATE_180)]
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def damaged(data: bytes, seed: int, n: int) -> list[tuple[str, bytes]]:
    """``n`` seeded variants: half truncations at spread offsets, half with 1-3 bytes overwritten."""
    rng = random.Random(seed)
    cases = [(f"cut at {cut}", data[:cut]) for cut in sorted(rng.sample(range(len(data)), n // 2))]
    for i in range(n - n // 2):
        b = bytearray(data)
        span = 128 if i % 2 == 0 else len(b)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(min(span, len(b)))] = rng.randrange(256)
        cases.append((f"flip {i}", bytes(b)))
    return cases


def outcome(fn) -> str:
    """``ok``, or the reason of the drop; any other exception propagates out of the test with its case named."""
    try:
        fn()
        return "ok"
    except Dropped as e:
        assert e.reason in REASONS, e
        return e.reason


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_damaged_image_is_processed_or_rejected_never_raised(name):
    data = encoded(name)
    assert process_image(data, CFG).width == 32  # the intact file is fine
    seen, escaped = Counter(), []
    for label, case in damaged(data, seed=len(name), n=CASES_PER_FORMAT):
        try:
            seen[outcome(lambda: process_image(case, CFG))] += 1  # noqa: B023 - called now
        except Exception as e:  # noqa: BLE001 - collected so the report names every escaping case
            escaped.append(f"{name} {label}: {type(e).__name__}: {e}")
    assert escaped == []
    assert sum(seen.values()) == CASES_PER_FORMAT and set(seen) - {"ok"}, seen  # damage was seen and rejected


@pytest.mark.parametrize("cut", [0, 1, 2, 8, 16, 24, 33, 60])
def test_cut_headers_are_damaged_images_once_the_signature_is_whole(cut):
    """What ``Image.open`` raised before: OSError "Truncated File Read", ValueError "Truncated IHDR chunk"; the
    PNG cuts end inside its signature, its IHDR chunk and after it."""
    for name, signature in (("jpeg", 3), ("png", 8)):
        data = encoded(name)[:cut]
        reason = outcome(lambda: process_image(data, CFG))  # noqa: B023 - called now
        assert reason == "not_an_image" if cut < signature else reason in {"truncated", "decode_error"}, reason


def test_the_filters_decoder_survives_the_same_damage():
    seen, escaped = Counter(), []
    for name in FORMATS:
        for label, case in damaged(encoded(name), seed=100 + len(name), n=24):
            try:
                seen[outcome(lambda: decode_for_clip(case, thumbnail))] += 1  # noqa: B023 - called now
            except Exception as e:  # noqa: BLE001 - collected so the report names every escaping case
                escaped.append(f"{name} {label}: {type(e).__name__}: {e}")
    assert escaped == [] and seen["ok"] and set(seen) - {"ok"}, seen


def thumbnail(image: Image.Image) -> np.ndarray:
    """A stand-in for a CLIP preprocess: CHW float32."""
    return np.asarray(image.resize((8, 8)), dtype=np.float32).transpose(2, 0, 1) / 255.0


def test_decode_for_clip_sends_every_damaged_sample_to_scoring_or_the_dead_letters():
    cases = [
        (f"k{i:03d}", data)
        for i, (_, data) in enumerate(damaged(encoded("jpeg"), seed=5, n=24) + damaged(encoded("png"), seed=6, n=24))
    ]
    expected = {key: outcome(lambda: decode_for_clip(data, thumbnail)) for key, data in cases}  # noqa: B023
    with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
        out = (
            p
            | beam.Create([(("shard.tar", key), (data, "a caption")) for key, data in cases])
            | beam.ParDo(DecodeForClip(thumbnail, threads=2)).with_outputs("rejected", main="images")
        )
        assert_that(
            out.images | "ScoredKeys" >> beam.Map(lambda e: e[0][1]),
            equal_to([k for k, v in expected.items() if v == "ok"]),
            label="Scored",
        )
        assert_that(
            out.rejected | "Reasons" >> beam.Map(lambda e: (e[1].key, e[1].reason)),
            equal_to([(k, v) for k, v in expected.items() if v != "ok"]),
            label="Rejected",
        )
    assert set(expected.values()) - {"ok"} and "ok" in expected.values()


def test_samples_with_broken_metadata_or_no_image_are_dead_lettered_and_the_rest_read(tmp_path):
    good = encoded("jpeg")
    samples = {
        "000000000": {"jpg": good, "txt": b"a good sample"},
        "000000001": {"jpg": good, "json": b"[1, 2]"},  # JSON, but not an object
        "000000002": {"jpg": good, "json": b"\xff\xfe"},  # not UTF-8
        "000000003": {"jpg": good, "json": b'{"key": "000000003", "caption": 7}'},
        "000000004": {"txt": b"a caption and no image"},
        "000000005": {"png": encoded("png"), "txt": "ünïcödé".encode()},
    }
    path = write_tar(shard_in(str(tmp_path), 0).tar, samples)
    with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
        out = p | beam.Create([path]) | beam.ParDo(ReadShardSamples()).with_outputs("rejected", main="samples")
        assert_that(
            out.samples | "Captions" >> beam.Map(lambda e: (e[0][1], e[1][1])),
            equal_to([("000000000", "a good sample"), ("000000005", "ünïcödé")]),
            label="Read",
        )
        assert_that(
            out.rejected | "Reasons" >> beam.Map(lambda e: (e[1].key, e[1].reason)),
            equal_to(
                [
                    ("000000001", "bad_metadata"),
                    ("000000002", "bad_metadata"),
                    ("000000003", "bad_metadata"),
                    ("000000004", "no_image"),
                ]
            ),
            label="Rejected",
        )
