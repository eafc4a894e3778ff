"""Bundled sample data for tests and demos: real VQA images, real photos, and synthetic shapes with exact labels.

Everything here works offline and is deterministic:

- :func:`easy_vqa_samples`: the easy-VQA dataset (64x64 PNGs of one coloured shape, with questions and answers),
  read from the ``easy-vqa`` package.
- :func:`photo_samples`: a dozen real photographs bundled with scikit-image, with captions written for them.
- :func:`shapes_samples` / :func:`shapes_dataset`: images of coloured shapes whose captions and boxes are exact
  by construction, in memory or written to disk in COCO's layout.

``easy-vqa`` and ``scikit-image`` are in the ``dev`` extra; they are imported only by the functions that need them.
"""

from __future__ import annotations

import importlib
import json
import random
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from visinstruct.schemas import Box
from visinstruct.testing.server import encode_test_image

YES_NO = ("yes", "no")
EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")

SHAPES = ("circle", "square", "triangle")
# Saturated, far-apart colours so that a test can tell them apart exactly; none is the background.
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
}
BACKGROUND = (255, 255, 255)
# One COCO category per (colour, shape), named "red circle"; ids are 1-based as in COCO, colour-major.
SHAPE_CATEGORIES = [f"{color} {shape}" for color in COLORS for shape in SHAPES]

# (skimage.data function, caption). Only real photographs that ship inside scikit-image (no pooch download).
_PHOTOS = [
    ("astronaut", "a smiling astronaut in an orange spacesuit beside an American flag and a model space shuttle"),
    ("camera", "a black and white photo of a man in a dark coat looking through a camera on a tripod"),
    ("cat", "a close-up of a tabby cat's face with green eyes"),
    ("coffee", "a cup of coffee on a red saucer with a spoon, on a wooden table"),
    ("coins", "rows of old silver coins on a dark background"),
    ("rocket", "a rocket standing on a launch pad between tall towers at dusk"),
    ("stereo_motorcycle", "a red motorcycle parked in a garage next to shelves of boxes"),
    ("hubble_deep_field", "hundreds of small distant galaxies scattered across a black sky"),
    ("retina", "a photograph of the back of a human eye, with red blood vessels spreading over the retina"),
    ("immunohistochemistry", "a microscope view of tissue stained brown and blue"),
    ("page", "a printed page of a book about region-based image segmentation"),
    ("brick", "a grey wall of long bricks laid in staggered rows"),
]


def _require(module: str, pip_name: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{module} is needed for this sample data: pip install '{pip_name}' "
            "(or the dev extra: pip install -e '.[dev]')"
        ) from e


# ---------------------------------------------------------------------------------------------------------------------
# easy-VQA


def easy_vqa_answers() -> list[str]:
    """The 13 possible answers of easy-VQA (shapes, colours, yes and no), in the package's order."""
    return list(_require("easy_vqa", "easy-vqa").get_answers())


def _question_type(answer: str) -> str:
    if answer in YES_NO:
        return "yes/no"
    return "shape" if answer in EASY_VQA_SHAPES else "color"


def easy_vqa_samples(split: str = "train", limit: int | None = None) -> list[dict[str, Any]]:
    """easy-VQA images with their questions, sorted by image id.

    Args:
        split: ``"train"`` (4,000 images) or ``"test"`` (1,000 images).
        limit: keep only the first ``limit`` images (by id); ``None`` keeps all.

    Returns:
        One dict per image: ``image_path`` (a 64x64 RGB PNG), ``image_id`` (int), ``questions`` (a list of
        ``(question, answer, type)`` in the file's order, ``type`` being ``"shape"``, ``"color"`` or ``"yes/no"``,
        derived from the answer since the dataset stores none) and ``caption`` (:func:`easy_vqa_caption`, or
        ``None`` when the questions do not pin both the colour and the shape).
    """
    easy_vqa = _require("easy_vqa", "easy-vqa")
    if split == "train":
        texts, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        texts, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    questions: dict[int, list[tuple[str, str, str]]] = {image_id: [] for image_id in paths}
    for text, answer, image_id in zip(texts, answers, image_ids):
        questions[image_id].append((text, answer, _question_type(answer)))
    ids = sorted(paths)[:limit]
    return [
        {
            "image_path": str(paths[i]),
            "image_id": i,
            "questions": questions[i],
            "caption": easy_vqa_caption(questions[i]),
        }
        for i in ids
    ]


# What the questions of one image say about its single shape. A negated question answered "no" asserts presence.
_WHAT_COLOR_OF = re.compile(r"what (?:color is|is the color of) the (\w+)\?")
_WHAT_IS_THE_COLOR_SHAPE = re.compile(r"what is the (\w+) shape\?")
_PRESENCE = re.compile(
    r"(?:is there|is|does the image)( not| no)? (?:contain )?(?:an? )?(\w+)(?: shape)?(?: in the image| present)?\?"
)


def _facts(question: str, answer: str) -> list[str]:
    """Words (colours or shapes) that a question and its answer say are in the image."""
    if answer not in YES_NO:
        found = [answer]
        for pattern in (_WHAT_COLOR_OF, _WHAT_IS_THE_COLOR_SHAPE):
            m = pattern.fullmatch(question)
            if m and m.group(1) != "shape":
                found.append(m.group(1))
        return found
    m = _PRESENCE.fullmatch(question)
    if not m:
        return []
    negated, word = bool(m.group(1)), m.group(2)
    return [word] if (answer == "yes") != negated else []


def easy_vqa_llava_json(split: str, limit: int, path: Path, questions_per_image: int) -> str:
    """easy-VQA as LLaVA's training JSON at ``path``: one entry per image, its first ``questions_per_image``
    questions and answers as turns (``<image>`` in the first); returns the image folder (``read.image_root``)."""
    entries = []
    for s in easy_vqa_samples(split, limit):
        turns = []
        for i, (question, answer, _) in enumerate(s["questions"][:questions_per_image]):
            turns += [
                {"from": "human", "value": ("<image>\n" if i == 0 else "") + question},
                {"from": "gpt", "value": answer},
            ]
        entries.append({"id": str(s["image_id"]), "image": Path(s["image_path"]).name, "conversations": turns})
    Path(path).write_text(json.dumps(entries))
    return str(Path(s["image_path"]).parent)


def write_caption_folder(samples: Iterable[dict[str, Any]], folder: Path) -> Path:
    """A folder of images with ``.txt`` captions, as a user hands it to ingest: each easy-VQA sample's PNG as
    ``NNNNN.png`` beside its ``caption`` as ``NNNNN.txt``; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for s in samples:
        shutil.copy(s["image_path"], folder / f"{s['image_id']:05d}.png")
        (folder / f"{s['image_id']:05d}.txt").write_text(s["caption"])
    return folder


def easy_vqa_caption(questions: Iterable[Sequence[str]]) -> str | None:
    """A caption such as ``"a blue circle"`` for an easy-VQA image, derived from its questions and answers.

    Every easy-VQA image holds exactly one shape, so the colour and the shape can be read off the answers to
    "what shape/color..." questions, the object named in them ("what color is the triangle?" names the shape) and
    yes/no questions answered so as to assert presence ("is there a red shape?" -> yes).

    Args:
        questions: ``(question, answer, ...)`` tuples of one image (extra items such as the type are ignored).

    Returns:
        ``"a <color> <shape>"``, or ``None`` when the questions do not pin down both (or contradict each other).
    """
    words = {w for q in questions for w in _facts(q[0], q[1])}
    shapes = words & set(EASY_VQA_SHAPES)
    colors = words - shapes - set(YES_NO)
    if len(shapes) != 1 or len(colors) != 1:
        return None
    return f"a {colors.pop()} {shapes.pop()}"  # easy-VQA has no colour starting with a vowel


# ---------------------------------------------------------------------------------------------------------------------
# Real photographs


def photo_samples() -> list[dict[str, Any]]:
    """Twelve real photographs bundled with scikit-image, as RGB images with short captions.

    Returns:
        Dicts ``{"name": str, "image": PIL.Image.Image (RGB), "caption": str}``, in a fixed order; ``name`` is the
        ``skimage.data`` function the photo comes from. Grayscale photos are converted to RGB.
    """
    data = _require("skimage.data", "scikit-image")
    samples = []
    for name, caption in _PHOTOS:
        array = getattr(data, name)()
        if isinstance(array, tuple):  # stereo_motorcycle returns (left, right, disparity)
            array = array[0]
        samples.append({"name": name, "image": Image.fromarray(array).convert("RGB"), "caption": caption})
    return samples


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic shapes


def _shape_mask(shape: str, size: tuple[int, int], x: int, y: int, side: int) -> Image.Image:
    """A binary mask of one shape filling the square ``[x, x + side) x [y, y + side)`` (no anti-aliasing)."""
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    right, bottom = x + side - 1, y + side - 1
    if shape == "circle":
        draw.ellipse([x, y, right, bottom], fill=255)
    elif shape == "square":
        draw.rectangle([x, y, right, bottom], fill=255)
    else:  # an upright isosceles triangle: the centre of its box is inside it
        draw.polygon([(x, bottom), (right, bottom), (x + (side - 1) // 2, y)], fill=255)
    return mask


def _place(
    rng: random.Random, size: tuple[int, int], taken: list[tuple[int, int, int, int]], gap: int = 4
) -> tuple[int, int, int] | None:
    """A square ``(x, y, side)`` that keeps ``gap`` pixels away from every taken box, or ``None`` after 100 tries."""
    width, height = size
    low, high = max(8, min(size) // 6), max(9, min(size) // 3)
    for _ in range(100):
        side = rng.randint(low, high)
        x, y = rng.randint(gap, width - side - gap), rng.randint(gap, height - side - gap)
        if all(
            x + side + gap <= left or right + gap <= x or y + side + gap <= top or bottom + gap <= y
            for left, top, right, bottom in taken
        ):
            return x, y, side
    return None


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _shapes_sample(seed: int, index: int, size: tuple[int, int]) -> dict[str, Any]:
    # One generator per image, seeded by a string (hashed with SHA-512, stable across runs and Python versions),
    # so image i is the same whatever n is.
    rng = random.Random(f"visinstruct-shapes:{seed}:{index}")
    kinds = rng.sample([(c, s) for c in COLORS for s in SHAPES], rng.randint(1, 3))
    image = Image.new("RGB", size, BACKGROUND)
    objects, taken = [], []
    for color, shape in kinds:
        spot = _place(rng, size, taken)
        if spot is None:
            continue
        mask = _shape_mask(shape, size, *spot)
        left, top, right, bottom = mask.getbbox()  # the exact pixel extent; right and bottom exclusive
        taken.append((left, top, right, bottom))
        image.paste(COLORS[color], mask=mask)
        area = mask.histogram()[255]  # the mask holds only 0 and 255
        objects.append({"category": f"{color} {shape}", "pixels": (left, top, right, bottom), "area": area})
    objects.sort(key=lambda o: o["pixels"])  # left to right: the order the caption names them in
    width, height = size
    boxes = [
        Box(
            o["category"],
            [o["pixels"][0] / width, o["pixels"][1] / height, o["pixels"][2] / width, o["pixels"][3] / height],
        )
        for o in objects
    ]
    return {
        "image": image,
        "caption": _join([_a(o["category"]) for o in objects]),
        "boxes": boxes,
        "_objects": objects,
    }


def shapes_samples(n: int = 16, seed: int = 0, size: tuple[int, int] = (256, 256)) -> list[dict[str, Any]]:
    """Images of 1-3 non-overlapping coloured shapes with exact captions and boxes.

    Shapes are circles, squares and upright triangles in one of the :data:`COLORS`, on a white background, drawn
    without anti-aliasing, so every shape pixel has exactly its colour. No (colour, shape) repeats in an image.

    Args:
        n: number of images.
        seed: image ``i`` depends only on ``(seed, i)``: the first images of a longer run are the same images.
        size: ``(width, height)`` in pixels.

    Returns:
        Dicts ``{"image": PIL RGB image, "caption": "a red circle and a blue square", "boxes": [Box, ...]}``;
        the caption names the shapes left to right, in the same order as ``boxes``; each box is the shape's exact
        normalised pixel extent ``[left / W, top / H, right / W, bottom / H]`` (right and bottom exclusive) and its
        category is ``"<colour> <shape>"``.
    """
    samples = [_shapes_sample(seed, i, size) for i in range(n)]
    for sample in samples:
        del sample["_objects"]
    return samples


def write_images(
    samples: Iterable[dict[str, Any]], out_dir: str | Path, fmt: str = "jpg", names: Sequence[str] | None = None
) -> list[Path]:
    """Write each sample's ``image`` to ``out_dir``, deterministically (same image, same bytes).

    Args:
        samples: dicts with an ``image`` (PIL).
        out_dir: created if missing.
        fmt: ``jpg`` (quality 95), ``png`` or ``webp`` (lossless).
        names: file stems; by default each sample's ``name``, else its zero-padded position (``000000``).

    Returns:
        The written paths, in the samples' order.
    """
    options = {"jpg": ("JPEG", {"quality": 95}), "png": ("PNG", {}), "webp": ("WEBP", {"lossless": True})}
    if fmt not in options:
        raise ValueError(f"fmt must be one of {sorted(options)}, got {fmt!r}")
    pil_format, kwargs = options[fmt]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, sample in enumerate(samples):
        stem = names[i] if names is not None else sample.get("name") or f"{i:06d}"
        path = out / f"{stem}.{fmt}"
        sample["image"].convert("RGB").save(path, pil_format, **kwargs)
        paths.append(path)
    return paths


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def shapes_dataset(
    out_dir: str | Path, n: int = 16, seed: int = 0, size: tuple[int, int] = (256, 256), fmt: str = "png"
) -> Path:
    """Write :func:`shapes_samples` to disk in COCO's layout; the same arguments give byte-identical files.

    Layout (mirrors COCO's ``train2017/`` + ``annotations/instances_*.json`` + ``annotations/captions_*.json``)::

        out_dir/images/000001.png          image id 1 (ids are 1-based, as in COCO)
        out_dir/annotations/instances.json COCO detection: images, annotations, categories
        out_dir/annotations/captions.json  COCO captions: images, annotations of {id, image_id, caption}

    ``file_name`` is relative to ``out_dir/images`` (COCO's convention; pass that folder as the image root).
    Each instance has ``bbox`` in COCO pixels ``[x, y, width, height]`` (the exact extent of the shape),
    ``area`` (its pixel count) and ``iscrowd: 0``. There is one category per colour and shape, named
    ``"red circle"`` with ``supercategory`` the shape, so the category name alone says what a box holds.
    One caption per image, naming the shapes left to right.

    Args:
        out_dir: created if missing.
        n: number of images.
        seed: see :func:`shapes_samples`.
        size: ``(width, height)``.
        fmt: image format; ``png`` (default) keeps the colours exact, ``jpg`` does not.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    out = Path(out_dir)
    samples = [_shapes_sample(seed, i, size) for i in range(n)]
    file_names = write_images(samples, out / "images", fmt, names=[f"{i + 1:06d}" for i in range(n)])
    images = [
        {"id": i + 1, "file_name": p.name, "width": size[0], "height": size[1]} for i, p in enumerate(file_names)
    ]
    category_ids = {name: i + 1 for i, name in enumerate(SHAPE_CATEGORIES)}
    instances, captions = [], []
    for image_id, sample in enumerate(samples, start=1):
        captions.append({"id": image_id, "image_id": image_id, "caption": sample["caption"]})
        for obj in sample["_objects"]:
            left, top, right, bottom = obj["pixels"]
            instances.append(
                {
                    "id": len(instances) + 1,
                    "image_id": image_id,
                    "category_id": category_ids[obj["category"]],
                    "bbox": [left, top, right - left, bottom - top],
                    "area": obj["area"],
                    "iscrowd": 0,
                }
            )
    info = {"description": f"visinstruct synthetic shapes (seed {seed})", "version": "1.0"}
    categories = [
        {"id": category_ids[name], "name": name, "supercategory": name.split(" ")[1]} for name in SHAPE_CATEGORIES
    ]
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    _write_json(
        out / "annotations" / "instances.json",
        {"info": info, "licenses": [], "images": images, "annotations": instances, "categories": categories},
    )
    _write_json(
        out / "annotations" / "captions.json",
        {"info": info, "licenses": [], "images": images, "annotations": captions},
    )
    return out


# The conversation of every sample :func:`llava_json_dataset` writes.
LLAVA_CONVERSATION = [
    {"from": "human", "value": "<image>\nWhat shape is this?"},
    {"from": "gpt", "value": "A square."},
]


def llava_json_dataset(root: Path, entries: int, images: int, shard_size: int) -> dict[str, Any]:
    """A LLaVA JSON dataset in ``root`` and the ingest settings that turn it into shards in ``root/out``.

    ``root/llava.json`` holds ``entries`` samples asking what shape the picture is, over PNGs ``root/images/I.png``
    (48 + 16 I by 40 pixels) of which only the first ``images`` exist: an entry past them names a missing image,
    which ingest dead-letters. Shards hold ``shard_size`` samples, resized to 32-pixel PNGs.
    """
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        (root / "images" / f"{i}.png").write_bytes(encode_test_image("png", (48 + 16 * i, 40)))
    samples = [{"id": f"s{i}", "image": f"{i}.png", "conversations": LLAVA_CONVERSATION} for i in range(entries)]
    (root / "llava.json").write_text(json.dumps(samples))
    return {
        "read": {"path": str(root / "llava.json"), "image_root": str(root / "images")},
        "write": {"path": str(root / "out"), "shard_size": shard_size},
        "resize": {"image_size": 32, "resize_mode": "border", "encode_format": "png"},
    }


def llava_mix_dataset(out_dir: str | Path, groups: int = 2, seed: int = 0) -> tuple[Path, Path, list[dict[str, Any]]]:
    """A LLaVA JSON shaped like LLaVA-1.5's mix665k, over :func:`shapes_samples` images; same arguments, same bytes.

    Each group of six rows has: a single-image row (``"image": "coco/..."``, an integer id), a second row about the
    same image (a VQA-style question with ``<image>`` after it), a multi-turn row whose image is a one-element
    list, a two-image row, a three-image row whose placeholders span two human turns, and a text-only row (no
    ``image``, an extra ``model`` key, as mix665k's ShareGPT rows). Answers come from the shapes' exact captions.

    Returns:
        ``(json path, image root, rows)``: the rows as written, image names relative to the root.
    """
    out = Path(out_dir)
    samples = shapes_samples(4 * groups, seed=seed, size=(96, 96))
    names = []
    for i, sample in enumerate(samples):
        folder = "gqa" if i % 4 == 3 else "coco"
        write_images([sample], out / "images" / folder, names=[f"{i:06d}"])
        names.append(f"{folder}/{i:06d}.jpg")

    def turns(*values: str) -> list[dict[str, str]]:
        return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]

    rows: list[dict[str, Any]] = []
    for g in range(groups):
        i0, i1, i2, i3 = (4 * g + k for k in range(4))
        cap = [samples[i]["caption"] for i in (i0, i1, i2, i3)]
        count = len(samples[i0]["boxes"])
        rows += [
            {"id": 100 * g, "image": names[i0], "conversations": turns("<image>\nDescribe the image.", cap[0])},
            {
                "id": f"vqa-{g}",
                "image": names[i0],
                "conversations": turns(
                    "How many shapes are there?\n<image>\nAnswer the question using a single word or phrase.",
                    str(count),
                ),
            },
            {
                "id": f"list-{g}",
                "image": [names[i1]],
                "conversations": turns(
                    "<image>\nWhat do you see?", cap[1], "Name the first shape.", cap[1].split(" and ")[0]
                ),
            },
            {
                "id": f"pair-{g}",
                "image": [names[i2], names[i3]],
                "conversations": turns(
                    "<image>\n<image>\nWhat is in each image?", f"First {cap[2]}; second {cap[3]}."
                ),
            },
            {
                "id": f"triple-{g}",
                "image": [names[i0], names[i1], names[i2]],
                "conversations": turns(
                    "<image>\n<image>\nDescribe both images.",
                    f"{cap[0]}; then {cap[1]}.",
                    "And this one? <image>",
                    cap[2],
                ),
            },
            {
                "id": f"sharegpt-{g}",
                "model": "",
                "conversations": turns(
                    f"What is {g} plus two?", f"{g} plus two is {g + 2}.", "And times two?", f"{2 * g}."
                ),
            },
        ]
    path = out / "mix665k.json"
    path.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path, out / "images", rows
