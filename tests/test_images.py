"""Validation, resizing (img2dataset's modes), deterministic encoding and hashing of single images."""

import hashlib
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

from visinstruct.configs import ConfigError, ResizeConfig, from_dict
from visinstruct.schemas import Dropped
from visinstruct.transforms.images import FILTERS, hamming, phash, process_image, resize, target_size


def photo(size=(400, 300), fmt="JPEG", mode="RGB") -> bytes:
    img = Image.new(mode, size, (30, 60, 90) if mode == "RGB" else (30, 60, 90, 0))
    draw = ImageDraw.Draw(img)
    alpha = () if mode == "RGB" else (255,)
    draw.ellipse((size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2), fill=(250, 200, 10) + alpha)
    draw.rectangle((size[0] // 2, size[1] // 2, size[0] - 10, size[1] - 10), fill=(200, 20, 40) + alpha)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("no", (400, 300)),
        ("keep_ratio", (341, 256)),
        ("keep_ratio_largest", (256, 192)),
        ("center_crop", (256, 256)),
        ("border", (256, 256)),
    ],
)
def test_resize_modes_give_img2dataset_sizes(mode, expected):
    out = process_image(photo(), ResizeConfig(image_size=256, resize_mode=mode))
    assert (out.width, out.height) == expected == decoded(out.data).size
    assert (out.original_width, out.original_height) == (400, 300)


def test_border_pads_with_white_like_img2dataset_and_centres_the_image():
    out = decoded(process_image(photo(), ResizeConfig(image_size=256, resize_mode="border")).data).convert("RGB")
    assert min(out.getpixel((128, 5))) > 240  # top border (image is 256x192 inside)
    assert min(out.getpixel((128, 250))) > 240
    assert max(out.getpixel((128, 40))) < 100  # the photo's dark background starts where the border ends


@pytest.mark.parametrize(
    "color, rgb", [("black", (0, 0, 0)), ("#1e90ff", (30, 144, 255)), ("rgb(200, 30, 40)", (200, 30, 40))]
)
def test_border_color_is_configurable(color, rgb):
    cfg = from_dict(
        ResizeConfig, {"image_size": 64, "resize_mode": "border", "border_color": color, "encode_format": "png"}
    )
    out = decoded(process_image(photo(), cfg).data).convert("RGB")
    assert out.getpixel((32, 1)) == out.getpixel((32, 62)) == rgb


def test_a_border_color_that_is_no_colour_is_a_config_error():
    with pytest.raises(ConfigError, match="border_color"):
        from_dict(ResizeConfig, {"border_color": "not-a-colour"})


@pytest.mark.parametrize(
    "size, reason",
    [
        ((1, 1), "too_small"),
        ((4000, 2), "too_small"),
        ((16, 16), "too_small"),
        ((400, 100), "bad_aspect_ratio"),
        ((90, 600), "bad_aspect_ratio"),
    ],
)
def test_default_bounds_reject_icons_and_strips_instead_of_upscaling_them(size, reason):
    with pytest.raises(Dropped) as err:
        process_image(saved(Image.new("RGB", size, (30, 60, 90)), "PNG"), ResizeConfig())
    assert err.value.reason == reason


@pytest.mark.parametrize("size", [(64, 64), (64, 48), (32, 32), (300, 100)])
def test_default_bounds_keep_the_small_images_of_our_samples_and_demo(size):
    """easy-VQA's 64x64, the test server's 64x48, 32 px LLaVA test images; 3:1 is the widest kept."""
    assert process_image(saved(Image.new("RGB", size, (30, 60, 90)), "PNG"), ResizeConfig()).width == 256


def test_resize_only_if_bigger_never_upscales():
    cfg = ResizeConfig(image_size=1024, resize_mode="keep_ratio", resize_only_if_bigger=True)
    assert target_size(400, 300, cfg) == (400, 300)
    assert target_size(400, 300, ResizeConfig(image_size=600, resize_mode="keep_ratio")) == (800, 600)


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_shrinking_averages_areas_as_img2dataset_does_and_enlarging_uses_lanczos():
    import cv2

    cfg = ResizeConfig(image_size=100, resize_mode="keep_ratio_largest")
    img = noise((400, 300))
    small = resize(img, cfg, img.size)
    assert small.tobytes() == img.resize((100, 75), Image.Resampling.BOX).tobytes()  # default: area
    theirs = cv2.resize(np.asarray(img), (100, 75), interpolation=cv2.INTER_AREA)  # img2dataset's default
    assert np.abs(np.asarray(small, dtype=np.int16) - theirs).max() <= 1  # the same averaging, rounding aside
    tiny = noise((40, 30))
    big = resize(tiny, cfg, tiny.size)
    assert big.tobytes() == tiny.resize((100, 75), Image.Resampling.LANCZOS).tobytes()


@pytest.mark.parametrize("name", sorted(FILTERS))
def test_interpolation_is_configurable_both_ways_with_img2datasets_names(name):
    down = ResizeConfig(image_size=50, resize_mode="keep_ratio_largest", downscale_interpolation=name)
    up = ResizeConfig(image_size=50, resize_mode="keep_ratio_largest", upscale_interpolation=name)
    img, tiny = noise((200, 100)), noise((20, 10))
    assert resize(img, down, img.size).tobytes() == img.resize((50, 25), FILTERS[name]).tobytes()
    assert resize(tiny, up, tiny.size).tobytes() == tiny.resize((50, 25), FILTERS[name]).tobytes()


def test_an_unknown_interpolation_is_a_config_error():
    with pytest.raises(ConfigError, match="downscale_interpolation"):
        from_dict(ResizeConfig, {"downscale_interpolation": "lanczos"})


def test_the_perceptual_hash_is_skipped_when_not_asked_for():
    cfg = ResizeConfig(image_size=64)
    with_hash, without = process_image(photo(), cfg), process_image(photo(), cfg, with_phash=False)
    assert without.phash is None and len(with_hash.phash) == 16
    assert without.data == with_hash.data and without.sha256 == with_hash.sha256


def test_big_jpeg_downscale_uses_draft_and_keeps_original_size():
    out = process_image(photo((4000, 3000)), ResizeConfig(image_size=256, resize_mode="keep_ratio"))
    assert (out.width, out.height, out.original_width, out.original_height) == (341, 256, 4000, 3000)


@pytest.mark.parametrize("fmt", ["jpg", "png", "webp"])
def test_output_formats_decode_and_encoding_is_deterministic(fmt):
    cfg = ResizeConfig(image_size=64, encode_format=fmt)
    a, b = process_image(photo(fmt="PNG"), cfg), process_image(photo(fmt="PNG"), cfg)
    assert a.data == b.data and a.format == fmt
    assert decoded(a.data).format == {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]


def test_transparent_png_is_composited_on_white():
    out = process_image(
        photo(fmt="PNG", mode="RGBA"), ResizeConfig(image_size=64, resize_mode="no", encode_format="png")
    )
    assert decoded(out.data).convert("RGB").getpixel((1, 1)) == (255, 255, 255)


def test_sha256_is_of_the_original_bytes():
    data = photo()
    assert process_image(data, ResizeConfig(image_size=64)).sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"<html><body>not an image</body></html>", "not_an_image"),
        (b"", "not_an_image"),
        (photo()[:2000], "truncated"),
    ],
)
def test_broken_inputs_are_rejected_with_a_reason(data, reason):
    with pytest.raises(Dropped) as err:
        process_image(data, ResizeConfig())
    assert err.value.reason == reason


def png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG header claiming a huge image: decoding it would need width*height bytes."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    raw = zlib.compress(b"\x00" * (width + 1) * 16)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", raw)
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_rejected_before_decoding():
    with pytest.raises(Dropped) as err:
        process_image(png_bomb(50_000, 50_000), ResizeConfig())
    assert err.value.reason == "decompression_bomb"
    with pytest.raises(Dropped) as err:
        process_image(photo((400, 300)), ResizeConfig(max_pixels=100 * 100))
    assert err.value.reason == "decompression_bomb"


@pytest.mark.parametrize(
    "cfg, reason",
    [
        (ResizeConfig(min_image_size=301), "too_small"),
        (ResizeConfig(max_aspect_ratio=1.2), "bad_aspect_ratio"),
        (ResizeConfig(max_image_area=400 * 300 - 1), "too_large"),
    ],
)
def test_size_bounds(cfg, reason):
    with pytest.raises(Dropped) as err:
        process_image(photo((400, 300)), cfg)
    assert err.value.reason == reason
    process_image(photo((400, 300)), ResizeConfig(min_image_size=300, max_aspect_ratio=1.34))


def test_phash_is_stable_under_resizing_and_differs_between_images():
    a = Image.open(io.BytesIO(photo((400, 300))))
    b = a.resize((200, 150))
    other = Image.open(io.BytesIO(photo((400, 300)))).transpose(Image.Transpose.ROTATE_180)
    assert len(phash(a)) == 16
    assert hamming(phash(a), phash(b)) <= 4
    assert hamming(phash(a), phash(other)) > 10


def saved(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def grey16(value: int) -> Image.Image:
    return Image.fromarray(np.full((40, 48), value, dtype=np.uint16), "I;16")


def two_frames(fmt: str) -> bytes:
    first, second = Image.new("RGB", (48, 40), (200, 30, 40)), Image.new("RGB", (48, 40), (20, 30, 200))
    return saved(first, fmt, save_all=True, append_images=[second])


def short_palette() -> bytes:
    img = Image.new("P", (48, 40), 1)
    img.putpalette([0, 0, 0, 200, 30, 40])  # two colours where 256 are usual
    return saved(img, "PNG")


@pytest.mark.parametrize(
    "name, data, rgb",
    [
        ("16-bit grey PNG", lambda: saved(grey16(32896), "PNG"), (128, 128, 128)),  # Pillow's convert gives white
        ("16-bit grey TIFF", lambda: saved(grey16(65535), "TIFF"), (255, 255, 255)),
        ("32-bit int TIFF", lambda: saved(Image.new("I", (48, 40), 32896), "TIFF"), (128, 128, 128)),
        ("float TIFF in [0, 1]", lambda: saved(Image.new("F", (48, 40), 0.5), "TIFF"), (128, 128, 128)),
        ("CMYK JPEG", lambda: saved(Image.new("CMYK", (48, 40), (0, 255, 255, 0)), "JPEG", quality=100), (255, 0, 0)),
        ("CMYK TIFF", lambda: saved(Image.new("CMYK", (48, 40), (0, 255, 255, 0)), "TIFF"), (255, 0, 0)),
        ("transparent LA PNG", lambda: saved(Image.new("LA", (48, 40), (0, 0)), "PNG"), (255, 255, 255)),
        ("1-bit BMP", lambda: saved(Image.new("1", (48, 40), 1), "BMP"), (255, 255, 255)),
        ("short palette PNG", short_palette, (200, 30, 40)),
        ("two-frame GIF", lambda: two_frames("GIF"), (200, 30, 40)),  # the first frame
        ("two-frame TIFF", lambda: two_frames("TIFF"), (200, 30, 40)),
    ],
)
def test_every_mode_becomes_rgb_deterministically(name, data, rgb):
    cfg = ResizeConfig(image_size=32, resize_mode="keep_ratio", encode_format="png")
    out = process_image(data(), cfg)
    assert out.data == process_image(data(), cfg).data
    pixel = decoded(out.data).getpixel((16, 16))
    assert decoded(out.data).mode == "RGB" and max(abs(a - b) for a, b in zip(pixel, rgb)) <= 3, pixel
