"""Faces: found with OpenCV's frontal-face Haar cascade, recorded as normalised boxes, blurred in the written image."""

import io

import numpy as np
import pytest
import skimage.data
from PIL import Image

from visinstruct.schemas import Box, Dropped
from visinstruct.testing.sample_data import easy_vqa_samples, photo_samples, shapes_samples
from visinstruct.transforms.faces import (
    MAX_DETECT_SIDE,
    ORIENTATION,
    blur_faces,
    blur_region,
    curate_faces,
    detect_faces,
    detection_size,
    encode_like,
    load_cascade,
)
from visinstruct.transforms.images import decode_rgb

# Where the astronaut's face is in the 512x512 photograph, read off the image: eyes at about (202, 101) and
# (246, 104), mouth at (224, 145); the skin spans about x 182-267, y 77-165. A face box must hold these points and
# stay within this area widened by about 15 pixels (not the hair, the suit's collar or the flag).
ASTRONAUT_LANDMARKS = [(202, 101), (246, 104), (224, 145)]
ASTRONAUT_FACE_AREA = (165, 55, 285, 180)  # left, top, right, bottom
JPEG_MEAN_CHANGE_OUTSIDE = 1.0  # grey levels; measured 0.05-0.4 for originals at quality 75-95, 4:4:4 and 4:2:0
PHOTOS_WITHOUT_FACES = [
    "cat",  # chelsea
    "coffee",
    "coins",
    "rocket",
    "stereo_motorcycle",
    "hubble_deep_field",
    "retina",  # 1411x1411: searched downscaled
    "immunohistochemistry",
    "page",
    "brick",
]


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def pixels(data_or_image) -> np.ndarray:
    image = Image.open(io.BytesIO(data_or_image)) if isinstance(data_or_image, bytes) else data_or_image
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def pixel_box(box: Box, size: tuple[int, int]) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = box.bbox
    return round(x1 * size[0]), round(y1 * size[1]), round(x2 * size[0]), round(y2 * size[1])


def variance_ratio(before: np.ndarray, after: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Per channel: pixel variance inside ``box`` after blurring over before."""
    left, top, right, bottom = box
    inside = (slice(top, bottom), slice(left, right))
    return after[inside].var(axis=(0, 1)) / before[inside].var(axis=(0, 1))


def outside(region: tuple[int, int, int, int], shape: tuple[int, ...]) -> np.ndarray:
    left, top, right, bottom = region
    mask = np.ones(shape[:2], dtype=bool)
    mask[top:bottom, left:right] = False
    return mask


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skimage.data.astronaut())


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    return {sample["name"]: sample["image"] for sample in photo_samples()}


# ---------------------------------------------------------------------------------------------------------------------
# Detection


def test_the_astronaut_has_one_face_inside_the_known_face_area(astronaut):
    faces = detect_faces(astronaut)

    assert len(faces) == 1 and faces[0].category == "face"
    left, top, right, bottom = pixel_box(faces[0], astronaut.size)
    area_left, area_top, area_right, area_bottom = ASTRONAUT_FACE_AREA
    assert area_left <= left < right <= area_right and area_top <= top < bottom <= area_bottom
    assert all(left <= x <= right and top <= y <= bottom for x, y in ASTRONAUT_LANDMARKS)


def test_boxes_are_normalised_and_rounded_to_four_decimals(astronaut):
    (face,) = detect_faces(astronaut)

    assert all(0 <= v <= 1 and round(v, 4) == v for v in face.bbox)


def test_faces_are_sorted_top_to_bottom_then_left_to_right(astronaut):
    canvas = Image.new("RGB", (1024, 1024), "white")
    canvas.paste(astronaut, (512, 0))  # upper right
    canvas.paste(astronaut, (0, 512))  # lower left

    faces = detect_faces(canvas)

    assert len(faces) == 2
    assert faces[0].bbox[0] > 0.5 and faces[0].bbox[1] < 0.5  # the upper face first although it is further right
    assert faces[1].bbox[0] < 0.5 and faces[1].bbox[1] > 0.5


def test_a_big_image_is_searched_downscaled_and_its_box_fits_the_full_size(astronaut):
    big = astronaut.resize((2048, 2048), Image.Resampling.LANCZOS)

    (face,) = detect_faces(big)
    (small_face,) = detect_faces(astronaut)

    assert detection_size(2048, 2048) == (MAX_DETECT_SIDE, MAX_DETECT_SIDE)
    assert detection_size(4000, 3000) == (1024, 768) and detection_size(512, 300) == (512, 300)
    assert np.abs(np.array(face.bbox) - np.array(small_face.bbox)).max() < 0.02


def test_faces_smaller_than_min_size_are_not_searched(astronaut):
    assert len(detect_faces(astronaut, min_size=0.1)) == 1  # the face is about 0.18 of the shorter side
    assert detect_faces(astronaut, min_size=0.3) == []
    with pytest.raises(ValueError, match="min_size"):
        detect_faces(astronaut, min_size=0)


@pytest.mark.parametrize("name", PHOTOS_WITHOUT_FACES)
def test_photos_without_people_have_no_faces(photos, name):
    assert detect_faces(photos[name]) == []


def test_synthetic_shapes_and_easy_vqa_images_have_no_faces():
    images = [sample["image"] for sample in shapes_samples(16)]
    images += [Image.open(sample["image_path"]).convert("RGB") for sample in easy_vqa_samples(limit=100)]

    assert [i for i, image in enumerate(images) if detect_faces(image)] == []


@pytest.mark.parametrize("size", [(8, 8), (1, 1), (4000, 3), (3, 4000), (2000, 25)])
def test_tiny_and_extreme_aspect_ratio_images_have_no_faces(size):
    data = encoded(Image.new("RGB", size, (120, 90, 60)), "PNG")

    assert curate_faces(data, "png", 0.05, blur=True) == ([], None)


def test_a_missing_cascade_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="haarcascade_nonexistent.xml.*opencv-python-headless"):
        load_cascade("haarcascade_nonexistent.xml")


# ---------------------------------------------------------------------------------------------------------------------
# Blurring and re-encoding


def test_blurring_the_astronaut_stored_as_png_changes_only_the_padded_face_box(astronaut):
    original = encoded(astronaut, "PNG")

    faces, blurred = curate_faces(original, "png", 0.05, blur=True)

    before, after = pixels(original), pixels(blurred)
    (face,) = faces
    region = blur_region(face, astronaut.size)
    assert (variance_ratio(before, after, pixel_box(face, astronaut.size)) < 0.2).all()
    assert np.array_equal(before[outside(region, before.shape)], after[outside(region, after.shape)])
    # the blurred region is the face box padded by about 10% of its size on every side, and the padding is blurred
    left, top, right, bottom = region
    face_left, face_top, face_right, face_bottom = pixel_box(face, astronaut.size)
    pad = 0.09 * (face_right - face_left)
    assert (
        left <= face_left - pad and top <= face_top - pad and right >= face_right + pad and bottom >= face_bottom + pad
    )
    ring = outside((face_left, face_top, face_right, face_bottom), before.shape) & ~outside(region, before.shape)
    assert np.abs(before[ring] - after[ring]).mean() > 10


def test_blurring_the_astronaut_stored_as_jpeg_keeps_its_tables_and_barely_moves_the_rest(astronaut):
    original = encoded(astronaut, "JPEG", quality=90, subsampling=2)

    faces, blurred = curate_faces(original, "jpg", 0.05, blur=True)

    before, after = pixels(original), pixels(blurred)
    (face,) = faces
    rest = outside(blur_region(face, astronaut.size), before.shape)
    assert (variance_ratio(before, after, pixel_box(face, astronaut.size)) < 0.2).all()
    assert np.abs(before[rest] - after[rest]).mean() < JPEG_MEAN_CHANGE_OUTSIDE
    source, written = Image.open(io.BytesIO(original)), Image.open(io.BytesIO(blurred))
    assert written.format == "JPEG" and written.quantization == source.quantization
    assert written.layer == source.layer  # same chroma subsampling (4:2:0)


def test_blurring_keeps_a_lossless_webp_lossless_and_a_lossy_one_lossy(astronaut):
    lossless = encoded(astronaut, "WEBP", lossless=True)
    lossy = encoded(astronaut, "WEBP", quality=80)

    _, from_lossless = curate_faces(lossless, "webp", 0.05, blur=True)
    (face,), from_lossy = curate_faces(lossy, "webp", 0.05, blur=True)

    rest = outside(blur_region(face, astronaut.size), (512, 512))
    assert b"VP8L" in from_lossless[:40] and b"VP8 " in from_lossy[:40]
    assert np.array_equal(pixels(lossless)[rest], pixels(from_lossless)[rest])


def test_blur_off_records_the_faces_and_leaves_the_member_as_it_was(astronaut):
    faces, blurred = curate_faces(encoded(astronaut, "PNG"), "png", 0.05, blur=False)

    assert len(faces) == 1 and blurred is None


@pytest.mark.parametrize("name", ["coffee", "cat", "rocket"])
def test_an_image_without_faces_is_left_as_it_was(photos, name):
    assert curate_faces(encoded(photos[name], "JPEG", quality=90), "jpg", 0.05, blur=True) == ([], None)


def test_shapes_images_are_left_as_they_were():
    for sample in shapes_samples(4):
        assert curate_faces(encoded(sample["image"], "PNG"), "png", 0.05, blur=True) == ([], None)


@pytest.mark.parametrize(
    "ext, fmt, options", [("jpg", "JPEG", {"quality": 85}), ("png", "PNG", {}), ("webp", "WEBP", {})]
)
def test_the_same_member_gives_the_same_bytes(astronaut, ext, fmt, options):
    original = encoded(astronaut, fmt, **options)

    first, second = curate_faces(original, ext, 0.05, True), curate_faces(original, ext, 0.05, True)

    assert first[1] is not None and first == second


def test_overlapping_faces_blur_the_same_way_every_time(astronaut):
    faces = [Box("face", [0.3, 0.1, 0.5, 0.3]), Box("face", [0.4, 0.2, 0.6, 0.4])]

    assert blur_faces(astronaut, faces).tobytes() == blur_faces(astronaut, faces).tobytes()
    assert blur_faces(astronaut, faces).tobytes() != blur_faces(astronaut, faces[:1]).tobytes()


def test_a_greyscale_jpeg_stays_greyscale_and_keeps_only_its_orientation():
    grey = Image.fromarray(skimage.data.camera())
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    exif[0x010F] = "ACME camera"  # Make: metadata that is not needed to show the image
    original = encoded(grey, "JPEG", quality=90, exif=exif.tobytes())

    written = Image.open(io.BytesIO(encode_like(decode_rgb(original), "jpg", original)))

    assert written.mode == "L"
    assert dict(written.getexif()) == {ORIENTATION: 6}


def test_an_unknown_member_format_is_refused(astronaut):
    with pytest.raises(ValueError, match="gif"):
        encode_like(astronaut, "gif", encoded(astronaut, "PNG"))


# ---------------------------------------------------------------------------------------------------------------------
# Damaged bytes


@pytest.mark.parametrize("cut", ["half", "header", "garbage"])
def test_damaged_bytes_are_dropped_with_the_decoders_reason(astronaut, cut):
    whole = encoded(astronaut, "JPEG", quality=90)
    data = {"half": whole[: len(whole) // 2], "header": whole[:40], "garbage": b"not an image at all"}[cut]
    with pytest.raises(Dropped) as decoding:
        decode_rgb(data)

    with pytest.raises(Dropped) as curating:
        curate_faces(data, "jpg", 0.05, blur=True)

    assert curating.value.reason == decoding.value.reason
    assert curating.value.reason in {"truncated", "decode_error", "not_an_image"}
