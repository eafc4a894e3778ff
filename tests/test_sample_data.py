"""Bundled sample data: real easy-VQA images and questions, real photos, and synthetic shapes with exact labels."""

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"

from visinstruct.schemas import Box  # noqa: E402
from visinstruct.testing.sample_data import (  # noqa: E402
    COLORS,
    SHAPE_CATEGORIES,
    SHAPES,
    easy_vqa_answers,
    easy_vqa_caption,
    easy_vqa_samples,
    photo_samples,
    shapes_dataset,
    shapes_samples,
    write_images,
)

# ---------------------------------------------------------------------------------------------------------------------
# easy-VQA


@pytest.mark.parametrize("split", ["train", "test"])
def test_easy_vqa_images_decode_and_answers_are_known(split):
    samples = easy_vqa_samples(split, limit=25)
    answers = set(easy_vqa_answers())
    assert len(answers) == 13 and {"yes", "no", "circle", "blue"} <= answers
    assert [s["image_id"] for s in samples] == list(range(25))
    for sample in samples:
        with Image.open(sample["image_path"]) as image:
            image.load()
            assert image.mode == "RGB" and image.size == (64, 64)
            assert len(np.unique(np.asarray(image).reshape(-1, 3), axis=0)) > 1  # a shape on a background
        assert sample["questions"]
        for question, answer, kind in sample["questions"]:
            assert question.endswith("?") and answer in answers
            assert kind == (
                "yes/no"
                if answer in ("yes", "no")
                else "shape"
                if answer in ("circle", "rectangle", "triangle")
                else "color"
            )


def test_easy_vqa_full_splits_and_bad_split():
    assert len(easy_vqa_samples("train")) == 4000
    assert len(easy_vqa_samples("test")) == 1000
    with pytest.raises(ValueError, match="split"):
        easy_vqa_samples("validation")


def test_easy_vqa_caption_on_a_real_sample():
    first = easy_vqa_samples("train", limit=1)[0]
    # Image 0 is asked "what is the blue shape?" -> "rectangle".
    assert easy_vqa_caption(first["questions"]) == "a blue rectangle" == first["caption"]
    # Its shape really is blue: the most common non-background colour is blue-ish.
    pixels = np.asarray(Image.open(first["image_path"]).convert("RGB")).reshape(-1, 3).astype(int)
    background = np.bincount(pixels @ [65536, 256, 1]).argmax()
    shape = pixels[(pixels @ [65536, 256, 1]) != background]
    r, g, b = shape.mean(axis=0)
    assert b > r and b > g


def test_easy_vqa_captions_agree_with_every_answer():
    samples = easy_vqa_samples("train")
    captioned = [s for s in samples if s["caption"] is not None]
    assert len(captioned) > 0.8 * len(samples)
    for sample in captioned:
        _, color, shape = sample["caption"].split(" ")
        for _, answer, kind in sample["questions"]:
            if kind == "color":
                assert answer == color, sample
            elif kind == "shape":
                assert answer == shape, sample


def test_easy_vqa_caption_reads_yes_no_questions():
    qs = [("is there not a red shape?", "no"), ("is a circle present?", "yes"), ("is there a triangle?", "no")]
    assert easy_vqa_caption(qs) == "a red circle"
    negated = [("is no teal shape present?", "no"), ("does the image not contain a triangle?", "no")]
    assert easy_vqa_caption(negated) == "a teal triangle"
    assert easy_vqa_caption([("what shape is present?", "circle")]) is None  # no colour
    assert (
        easy_vqa_caption(
            [
                ("what color is the shape?", "red"),
                ("is there a blue shape?", "yes"),
                ("what shape is present?", "circle"),
            ]
        )
        is None
    )  # contradictory


# ---------------------------------------------------------------------------------------------------------------------
# Photos


def test_photo_samples_are_a_dozen_distinct_rgb_photos():
    photos = photo_samples()
    assert len(photos) == 12
    digests = set()
    for photo in photos:
        image = photo["image"]
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        assert min(image.size) >= 128
        assert np.asarray(image).std() > 10  # a photo, not a flat image
        digests.add(hashlib.sha256(image.tobytes()).hexdigest())
    assert len(digests) == 12
    captions = [p["caption"] for p in photos]
    assert all(c.strip() for c in captions) and len(set(captions)) == 12
    assert len({p["name"] for p in photos}) == 12


def test_write_images_writes_decodable_files(tmp_path):
    photos = photo_samples()[:2]
    paths = write_images(photos, tmp_path / "photos", fmt="jpg")
    assert [p.name for p in paths] == ["astronaut.jpg", "camera.jpg"]
    for path, photo in zip(paths, photos):
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.size == photo["image"].size
    with pytest.raises(ValueError, match="fmt"):
        write_images(photos, tmp_path, fmt="gif")


# ---------------------------------------------------------------------------------------------------------------------
# Shapes


def _tree_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_shapes_dataset_is_byte_identical_for_a_seed(tmp_path):
    a = _tree_bytes(shapes_dataset(tmp_path / "a", n=6, seed=3))
    b = _tree_bytes(shapes_dataset(tmp_path / "b", n=6, seed=3))
    c = _tree_bytes(shapes_dataset(tmp_path / "c", n=6, seed=4))
    assert len(a) == 6 + 2 and a == b
    assert a["images/000001.png"] != c["images/000001.png"]


def test_shapes_samples_prefix_stable_and_boxes_disjoint():
    samples = shapes_samples(20, seed=1)
    assert [s["caption"] for s in samples[:5]] == [s["caption"] for s in shapes_samples(5, seed=1)]
    counts = set()
    for sample in samples:
        boxes = sample["boxes"]
        counts.add(len(boxes))
        # The caption names the boxes left to right, with the right article.
        phrases = [("an " if b.category.startswith("orange") else "a ") + b.category for b in boxes]
        expected = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        assert sample["caption"] == expected
        assert [b.bbox[0] for b in boxes] == sorted(b.bbox[0] for b in boxes)
        assert all(isinstance(b, Box) and b.category in SHAPE_CATEGORIES for b in boxes)
        assert len({b.category for b in boxes}) == len(boxes)
        for i, p in enumerate(boxes):
            for q in boxes[i + 1 :]:
                (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = p.bbox, q.bbox
                assert ax2 <= bx1 or bx2 <= ax1 or ay2 <= by1 or by2 <= ay1, (p, q)
    assert counts == {1, 2, 3}
    assert any("an orange" in s["caption"] for s in samples)


def test_shapes_coco_boxes_are_exact_and_captions_list_the_shapes(tmp_path):
    n, width, height = 12, 200, 160
    root = shapes_dataset(tmp_path / "shapes", n=n, seed=0, size=(width, height))
    instances = json.loads((root / "annotations" / "instances.json").read_text())
    captions = json.loads((root / "annotations" / "captions.json").read_text())
    categories = {c["id"]: c for c in instances["categories"]}
    assert [c["name"] for c in categories.values()] == SHAPE_CATEGORIES == [f"{c} {s}" for c in COLORS for s in SHAPES]
    assert len(instances["images"]) == len(captions["annotations"]) == n
    caption_of = {c["image_id"]: c["caption"] for c in captions["annotations"]}
    memory = shapes_samples(n, seed=0, size=(width, height))
    for image_info, sample in zip(instances["images"], memory):
        image = np.asarray(Image.open(root / "images" / image_info["file_name"]).convert("RGB"))
        assert image.shape == (height, width, 3) == (image_info["height"], image_info["width"], 3)
        anns = [a for a in instances["annotations"] if a["image_id"] == image_info["id"]]
        assert len(anns) == len(sample["boxes"]) >= 1
        assert caption_of[image_info["id"]] == sample["caption"]
        assert sample["caption"].count(" and ") == (len(anns) > 1)
        for ann, box in zip(anns, sample["boxes"]):
            name = categories[ann["category_id"]]["name"]
            color = np.array(COLORS[name.split(" ")[0]])
            x, y, w, h = ann["bbox"]
            assert name == box.category and name in sample["caption"]
            assert 0 <= x and 0 <= y and x + w <= width and y + h <= height and w > 0 and h > 0
            assert box.bbox == pytest.approx([x / width, y / height, (x + w) / width, (y + h) / height])
            assert (image[y + h // 2, x + w // 2] == color).all()
            # Tight: the shape's colour reaches all four edges of the box, and the area is its pixel count.
            inside = (image[y : y + h, x : x + w] == color).all(axis=-1)
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            assert inside.sum() == ann["area"]
    total = sum(
        (np.asarray(Image.open(root / "images" / i["file_name"])) != 255).any(axis=-1).sum()
        for i in instances["images"]
    )
    assert total == sum(a["area"] for a in instances["annotations"])  # nothing drawn outside the boxes
