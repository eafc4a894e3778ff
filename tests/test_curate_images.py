"""Curation of images, through the real pipeline on DirectRunner: the NSFW score of every image (open_nsfw on
onnxruntime) with its threshold, faces found and blurred in the written image, and benchmark decontamination of
images (pHash) and conversations (n-grams), each drop with its reason and every row accounted for."""

import glob
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from visinstruct.configs import CurateConfig, IngestConfig, from_dict
from visinstruct.pipelines import curate
from visinstruct.pipelines.ingest import run as ingest
from visinstruct.schemas import SampleMeta
from visinstruct.testing.sample_data import photo_samples, write_images
from visinstruct.transforms.layout import index_pattern, rejected_pattern, rejected_shard, resolve_shards

pytestmark = pytest.mark.timeout(600)
RUNNER = ["--runner=DirectRunner"]
TWO_WORKERS = [*RUNNER, "--direct_num_workers=2", "--direct_running_mode=multi_threading"]
EASY_VQA_TEST = Path(__import__("easy_vqa").__file__).parent / "data" / "test"


def ingest_folder(folder: Path, out: Path, shard_size: int = 4) -> Path:
    """Ingest a folder of images with sibling ``.txt`` captions, kept at their size as PNG (lossless)."""
    cfg = {
        "read": {"path": str(folder), "format": "folder"},
        "write": {"path": str(out), "shard_size": shard_size},
        "resize": {"resize_mode": "no", "encode_format": "png"},
    }
    report = ingest(from_dict(IngestConfig, cfg), RUNNER)
    assert report["rejected"] == 0
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """scikit-image's twelve photographs (the astronaut has a face), as shards of four PNG samples."""
    root = tmp_path_factory.mktemp("photos")
    samples = photo_samples()
    write_images(samples, root / "folder", "png")
    for sample in samples:
        (root / "folder" / f"{sample['name']}.txt").write_text(sample["caption"])
    return ingest_folder(root / "folder", root / "in")


def samples(folder: Path) -> dict[str, dict]:
    return {s["__key__"]: s for s in wds.WebDataset(resolve_shards(str(folder)), shardshuffle=False)}


def by_name(folder: Path) -> dict[str, dict]:
    """Written samples by their source file's stem (``astronaut``...)."""
    return {Path(SampleMeta.from_json(s["json"]).path).stem: s for s in samples(folder).values()}


def dead_letters(out: Path, stage: str = "curate") -> dict[str, dict]:
    rows = [
        r
        for p in sorted(glob.glob(rejected_pattern(str(out))))
        if rejected_shard(p)[0] == stage
        for r in pq.read_table(p).to_pylist()
    ]
    return {r["key"]: r for r in rows}


def index_rows(out: Path) -> dict[str, dict]:
    return {r["key"]: r for p in sorted(glob.glob(index_pattern(str(out)))) for r in pq.read_table(p).to_pylist()}


def run_curate(shards: Path, out: Path, settings: dict, args=RUNNER) -> dict:
    cfg = from_dict(CurateConfig, {**settings, "write": {"path": str(out)}})
    return curate.run(cfg, resolve_shards(str(shards)), args)


# --- faces ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blurred(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("blurred")
    report = run_curate(photos, out, {"text": None, "safety": {"blur_faces": True}})
    return out, report


def pixels(sample: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"), dtype=np.float64)


def test_the_astronauts_face_is_found_recorded_and_blurred_and_nothing_else_changes(photos, blurred):
    out, report = blurred
    before, after = by_name(photos)["astronaut"], by_name(out)["astronaut"]
    meta = SampleMeta.from_json(after["json"])
    assert len(meta.curation.faces) == 1 and meta.curation.faces_blurred is True
    x1, y1, x2, y2 = meta.curation.faces[0].bbox
    original, written = pixels(before), pixels(after)
    h, w, _ = original.shape
    box = (slice(round(y1 * h), round(y2 * h)), slice(round(x1 * w), round(x2 * w)))
    assert written[box].var(axis=(0, 1)).max() < 0.2 * original[box].var(axis=(0, 1)).min()
    changed = np.argwhere((written != original).any(axis=2))
    pad_y, pad_x = 0.1 * (y2 - y1) * h + 1, 0.1 * (x2 - x1) * w + 1  # the blurred region: the box padded by 10%
    assert changed[:, 0].min() >= y1 * h - pad_y and changed[:, 0].max() <= y2 * h + pad_y
    assert changed[:, 1].min() >= x1 * w - pad_x and changed[:, 1].max() <= x2 * w + pad_x
    row = index_rows(out)[after["__key__"]]
    assert row["faces"] == 1 and row["nsfw_score"] == meta.curation.nsfw
    assert report["faces"]["images_with_faces"] >= 1 and report["faces_blurred"] >= 1


def test_without_blurring_the_face_is_recorded_and_the_image_bytes_stay_the_same(photos, tmp_path):
    run_curate(photos, tmp_path, {"text": None})
    before, after = by_name(photos)["astronaut"], by_name(tmp_path)["astronaut"]
    meta = SampleMeta.from_json(after["json"])
    assert len(meta.curation.faces) == 1 and meta.curation.faces_blurred is False
    assert after["png"] == before["png"]
    assert SampleMeta.from_json(by_name(tmp_path)["coffee"]["json"]).curation.faces == []


# --- NSFW ----------------------------------------------------------------------------------------------------------


def nsfw_outcome(out: Path) -> tuple[dict, dict]:
    """(reason by key of the curate dead letters, NSFW score by key of every index row)."""
    letters = {k: r["reason"] for k, r in dead_letters(out).items()}
    return letters, {k: r["nsfw_score"] for k, r in index_rows(out).items()}


def test_an_nsfw_threshold_of_0_drops_every_row_and_1_none_the_same_on_one_and_two_workers(photos, tmp_path):
    keys = set(samples(photos))
    outcomes = {}
    for threshold in (0, 1):
        for name, args in (("one", RUNNER), ("two", TWO_WORKERS)):
            out = tmp_path / f"{threshold}-{name}"
            report = run_curate(photos, out, {"text": None, "safety": {"nsfw_threshold": threshold}}, args)
            assert report["accounted"] and report["inputs"] == len(keys)
            assert report["nsfw"]["count"] == len(keys) and 0 <= report["nsfw"]["min"] <= report["nsfw"]["max"] <= 1
            outcomes[threshold, name] = nsfw_outcome(out)
    letters, scores = outcomes[0, "one"]
    assert letters == dict.fromkeys(keys, "nsfw") and set(scores) == keys
    assert all(s is not None and 0 <= s <= 1 for s in scores.values())
    assert outcomes[1, "one"][0] == {} and outcomes[1, "one"][1] == scores
    assert outcomes[0, "two"] == outcomes[0, "one"] and outcomes[1, "two"] == outcomes[1, "one"]
    assert max(scores.values()) < 0.5  # scikit-image's photographs are safe for work


# --- decontamination -----------------------------------------------------------------------------------------------


def easy_vqa_test_question() -> str:
    return json.loads((EASY_VQA_TEST / "questions.json").read_text())[0][0]


@pytest.fixture(scope="module")
def conversations(tmp_path_factory) -> Path:
    """Shards of four samples: two conversations copy an easy-VQA test question (cased and punctuated their own
    way), two ask something else; their images are photographs."""
    root = tmp_path_factory.mktemp("conversations")
    photos = photo_samples()[1:5]
    write_images(photos, root / "images", "png")
    question = easy_vqa_test_question()
    asked = [question.upper(), f"{question.rstrip('?')} ?!", "What is on the table?", "Describe the picture."]
    entries = [
        {
            "id": f"c{i}",
            "image": f"{photo['name']}.png",
            "conversations": [
                {"from": "human", "value": f"<image>\n{text}"},
                {"from": "gpt", "value": "Something."},
            ],
        }
        for i, (photo, text) in enumerate(zip(photos, asked))
    ]
    (root / "llava.json").write_text(json.dumps(entries))
    cfg = {
        "read": {"path": str(root / "llava.json"), "image_root": str(root / "images")},
        "write": {"path": str(root / "in"), "shard_size": 2},
        "resize": {"encode_format": "png"},
    }
    assert ingest(from_dict(IngestConfig, cfg), RUNNER)["written"] == 4
    return root / "in"


def test_a_conversation_copying_an_easy_vqa_test_question_is_dropped_as_benchmark_overlap(conversations, tmp_path):
    benchmark = {"name": "easy-vqa-test", "questions": str(EASY_VQA_TEST / "questions.json")}
    settings = {"text": None, "safety": None, "decontaminate": {"benchmarks": [benchmark]}}
    report = run_curate(conversations, tmp_path, settings)
    letters = dead_letters(tmp_path)
    assert {r["reason"] for r in letters.values()} == {"benchmark_overlap"} and len(letters) == 2
    assert all(json.loads(r["detail"])["benchmark"] == "easy-vqa-test" for r in letters.values())
    kept = [SampleMeta.from_json(s["json"]).conversations[0].value for s in samples(tmp_path).values()]
    assert sorted(kept) == ["<image>\nDescribe the picture.", "<image>\nWhat is on the table?"]
    assert report["accounted"] and report["rate_by_reason"] == {"benchmark_overlap": 0.5}


def test_an_easy_vqa_test_image_recompressed_is_dropped_as_benchmark_overlap_by_its_phash(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("0", "1"):  # two test images, re-encoded as JPEG
        Image.open(EASY_VQA_TEST / "images" / f"{name}.png").convert("RGB").save(folder / f"{name}.jpg", quality=80)
    photo = photo_samples()[3]
    write_images([photo], folder, "png")
    for path in folder.iterdir():
        path.with_suffix(".txt").write_text("a picture of something on a table")
    shards = ingest_folder(folder, tmp_path / "in")
    benchmark = {"name": "easy-vqa-test", "images": str(EASY_VQA_TEST / "images")}
    decontaminate = {"benchmarks": [benchmark], "embedding_threshold": None}
    settings = {"text": None, "safety": None, "decontaminate": decontaminate}
    report = run_curate(shards, tmp_path / "out", settings)
    letters = dead_letters(tmp_path / "out")
    assert sorted(Path(SampleMeta.from_json(s["json"]).path).stem for s in samples(tmp_path / "out").values()) == [
        photo["name"]
    ]
    assert [r["reason"] for r in letters.values()] == ["benchmark_overlap"] * 2
    assert {json.loads(r["detail"])["method"] for r in letters.values()} == {"phash"}
    assert report["accounted"]


# --- semantic dedup ------------------------------------------------------------------------------------------------


def recompressed(img: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=95)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def cropped(img: Image.Image) -> Image.Image:
    """10% cropped off (5% each side), scaled back up."""
    w, h = img.size
    dx, dy = round(w * 0.05), round(h * 0.05)
    return img.crop((dx, dy, w - dx, h - dy)).resize((w, h), Image.Resampling.BICUBIC)


def flipped(img: Image.Image) -> Image.Image:
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def jittered(img: Image.Image) -> Image.Image:
    from PIL import ImageEnhance

    img = ImageEnhance.Brightness(img).enhance(1.05)
    return ImageEnhance.Contrast(ImageEnhance.Color(img).enhance(0.95)).enhance(1.05)


COPIES = {"recompressed": recompressed, "cropped": cropped, "flipped": flipped, "jittered": jittered}


@pytest.fixture(scope="module")
def near_copies(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """One easy-VQA test image of each (colour, shape) - semantically distinct originals - and, for each, a
    recompressed, cropped, flipped or colour-jittered copy, ingested with pHash dedup at distance 4.

    Returns the shards and, by file stem, the stem of the original each copy was made from.
    """
    from visinstruct.testing.sample_data import easy_vqa_samples

    root = tmp_path_factory.mktemp("near-copies")
    folder = root / "folder"
    folder.mkdir()
    firsts = {}
    for sample in easy_vqa_samples("test", 400):
        firsts.setdefault(sample["caption"], sample)
    firsts.pop(None, None)
    origin = {}
    for i, (caption, sample) in enumerate(sorted(firsts.items())):
        original = Image.open(sample["image_path"]).convert("RGB")
        kind = list(COPIES)[i % len(COPIES)]
        # copies are named so that some sort before their original and some after: the smallest key is kept
        stems = {f"{i:02d}b-original": original, f"{i:02d}{'a' if i % 2 else 'c'}-{kind}": COPIES[kind](original)}
        for stem, img in stems.items():
            img.save(folder / f"{stem}.png")
            (folder / f"{stem}.txt").write_text(caption)
            origin[stem] = f"{i:02d}b-original"
    cfg = {
        "read": {"path": str(folder), "format": "folder"},
        "write": {"path": str(root / "in"), "shard_size": 16},
        "resize": {"resize_mode": "no", "encode_format": "png"},
        "dedup": {"phash_max_distance": 4},
    }
    assert ingest(from_dict(IngestConfig, cfg), RUNNER)["accounted"]
    return root / "in", origin


def stems_by_key(shards: Path) -> dict[str, str]:
    """Every input row's file stem by key, from the index (written or not)."""
    return {key: Path(row["path"]).stem for key, row in index_rows(shards).items()}


def test_semantic_dedup_removes_the_near_copies_phash_misses_and_keeps_every_distinct_original(near_copies, tmp_path):
    shards, origin = near_copies
    stems = stems_by_key(shards)
    survived_phash = set(stems[k] for k in samples(shards))
    missed_by_phash = {stem.split("-")[1] for stem in survived_phash if not stem.endswith("original")}
    assert {"cropped", "flipped"} <= missed_by_phash  # pHash at distance 4 sees neither a flip nor a 10% crop
    settings = {"text": None, "safety": {"faces": False}, "semdedup": {"embedding": "open_nsfw", "threshold": 0.965}}
    report = run_curate(shards, tmp_path, settings)
    kept = sorted(stems[k] for k in samples(tmp_path))
    groups = sorted(set(origin.values()))
    assert sorted(origin[stem] for stem in kept) == groups  # one image of each original: none lost, no copy left
    for stem in kept:  # and it is the smallest key of its group among those pHash left
        assert stem == min(s for s in survived_phash if origin[s] == origin[stem])
    letters = dead_letters(tmp_path)
    assert {r["reason"] for r in letters.values()} == {"near_duplicate"}
    assert len(letters) == len(survived_phash) - len(groups)
    for key, row in letters.items():
        kept_key = json.loads(row["detail"])["kept"]
        assert origin[stems[kept_key]] == origin[stems[key]] and kept_key < key
    assert report["accounted"] and report["semdedup_comparisons"] > 0


def test_a_flipped_benchmark_photo_is_caught_by_its_embedding_where_phash_misses_it(photos, tmp_path):
    references = tmp_path / "benchmark"
    references.mkdir()
    for sample in photo_samples():
        if sample["name"] in ("astronaut", "coffee"):
            flipped(sample["image"]).save(references / f"{sample['name']}-flipped.png")
    benchmark = {"name": "photo-bench", "images": str(references)}
    settings = {"text": None, "safety": {"faces": False}, "decontaminate": {"benchmarks": [benchmark]}}
    settings["decontaminate"]["embedding_threshold"] = 0.9
    report = run_curate(photos, tmp_path / "out", settings)
    letters = {Path(r["url"] or "").stem: json.loads(r["detail"]) for r in dead_letters(tmp_path / "out").values()}
    assert set(letters) == {"astronaut", "coffee"} and report["accounted"]
    assert {d["method"] for d in letters.values()} == {"embedding"}  # a mirror image is 30+ bits away in pHash
    assert letters["astronaut"]["reference"].endswith("astronaut-flipped.png") and letters["coffee"]["cosine"] >= 0.9


def test_curating_its_own_output_again_keeps_the_blurred_faces_recorded_and_the_bytes(blurred, tmp_path):
    import shutil

    out, _ = blurred
    again = tmp_path / "again"
    shutil.copytree(out, again)
    run_curate(again, again, {"text": None, "safety": {"blur_faces": True}})  # in place, as a rerun of a build
    before, after = by_name(out)["astronaut"], by_name(again)["astronaut"]
    assert after["png"] == before["png"]  # not blurred twice
    first, second = (SampleMeta.from_json(s["json"]).curation for s in (before, after))
    assert second.faces == first.faces and len(first.faces) == 1 and second.faces_blurred is True


def test_a_benchmark_file_that_does_not_exist_is_one_line_before_the_run(photos, tmp_path, capsys):
    from visinstruct.cli.main import main

    config = tmp_path / "curate.yaml"
    config.write_text(
        "decontaminate:\n  benchmarks:\n    - {name: vqav2, questions: " + str(tmp_path / "missing.json") + "}\n"
    )
    args = ["curate", "--config", str(config), "--input", str(photos), "--out", str(tmp_path / "out"), *RUNNER]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "decontaminate.benchmarks[0] (vqav2)" in err[0] and "missing.json" in err[0]
    assert not (tmp_path / "out").exists()
