"""Benchmark decontamination (``transforms/decontam.py``): copied questions and images are dropped
``benchmark_overlap`` with the benchmark named; everything else is kept."""

from __future__ import annotations

import io
import json
import logging
import random
import re
from pathlib import Path

import easy_vqa
import numpy as np
import pytest
from PIL import Image

from visinstruct.configs.curate import BenchmarkConfig, DecontaminateConfig
from visinstruct.schemas import Turn
from visinstruct.testing.sample_data import photo_samples
from visinstruct.transforms.decontam import (
    PhashIndex,
    QuestionIndex,
    ReferenceEmbeddings,
    conversation_overlap,
    embedding_overlap,
    embedding_overlaps,
    load_questions,
    phash_overlap,
    question_index,
    reference_files,
    reference_images,
    reference_phashes,
    words,
)
from visinstruct.transforms.images import decode_rgb, hamming, phash
from visinstruct.transforms.shards import TarShardWriter

EASY_VQA = Path(easy_vqa.__file__).parent / "data"
TEST_QUESTIONS = str(EASY_VQA / "test" / "questions.json")
TEST_IMAGES = str(EASY_VQA / "test" / "images")
LONG_QUESTION = "In the chart above, which of the four regions saw the largest rise in average rainfall since 1990?"


def conversation(*values: str) -> list[Turn]:
    """Alternating human and gpt turns."""
    return [Turn("human" if i % 2 == 0 else "gpt", v) for i, v in enumerate(values)]


@pytest.fixture(scope="module")
def easy_vqa_index() -> QuestionIndex:
    return QuestionIndex({"easy-vqa-test": load_questions(TEST_QUESTIONS)}, 13)


# ---------------------------------------------------------------------------------------------------------------------
# words


def test_words_ignore_case_punctuation_width_and_the_image_token():
    assert words("<image>\nWhat's the COLOUR of the shape?!") == ["whats", "the", "colour", "of", "the", "shape"]
    assert words("Ｗｈａｔ　ｉｓ ｉｔ？") == ["what", "is", "it"]  # full-width forms (NFKC)
    assert words("snake_case, co-op; 3.5") == ["snake", "case", "co", "op", "3", "5"]
    assert words("") == []


# ---------------------------------------------------------------------------------------------------------------------
# Questions


def test_easy_vqa_test_questions_load_from_the_package_data():
    questions = load_questions(TEST_QUESTIONS)
    assert len(questions) == 9673  # [[question, answer, image_id], ...]: one per (image, question)
    assert questions[0] == "what is the red shape?"
    assert len(set(questions)) == 107  # templated: 107 distinct questions


def test_a_copied_easy_vqa_question_is_dropped_naming_the_benchmark(easy_vqa_index):
    turns = conversation("<image>\nWHAT is the Color of the Shape", "It is red.")
    decision = conversation_overlap(turns, easy_vqa_index, 13)
    assert decision.reason == "benchmark_overlap"
    assert decision.message == "question copies easy-vqa-test: 'what is the color of the shape?'"
    assert decision.detail == {
        "benchmark": "easy-vqa-test",
        "question": "what is the color of the shape?",
        "method": "ngram",
        "ngram": 13,
        "turn": 0,
    }


def test_a_conversation_about_something_else_is_kept(easy_vqa_index):
    turns = conversation("<image>\nWhat is the dog doing?", "The dog is catching a red frisbee on the beach.")
    assert conversation_overlap(turns, easy_vqa_index, 13).kept


def test_an_answer_that_leaks_a_question_is_dropped_too(easy_vqa_index):
    turns = conversation("<image>\nDescribe the picture.", "Someone might ask: does the image contain a circle? Yes.")
    decision = conversation_overlap(turns, easy_vqa_index)
    assert decision.reason == "benchmark_overlap"
    assert decision.message.startswith("answer copies easy-vqa-test")
    assert decision.detail["turn"] == 1


def test_a_long_question_is_caught_by_one_shared_13_gram_but_not_by_12_words():
    index = QuestionIndex({"chart-qa": [LONG_QUESTION]}, 13)
    tokens = words(LONG_QUESTION)
    assert len(tokens) == 18
    thirteen, twelve = " ".join(tokens[3:16]), " ".join(tokens[3:15])
    caught = f"Look closely. {thirteen.upper()}, and explain why."
    assert conversation_overlap(conversation("<image>\n" + caught), index, 13).detail["question"] == LONG_QUESTION
    assert conversation_overlap(conversation(f"Look closely. {twelve}, and explain why."), index, 13).kept
    # a run never spans two turns
    split = conversation(" ".join(tokens[3:9]), " ".join(tokens[9:16]))
    assert conversation_overlap(split, index, 13).kept


def test_questions_under_three_words_are_ignored_and_counted():
    index = QuestionIndex({"tiny": ["What is this?", "Why?", "Is it red?"]}, 13)
    assert index.ignored == {"tiny": 1}
    assert index.match("why would anyone do that") is None
    assert index.match("so what is this thing") == ("tiny", "What is this?")


def test_the_smallest_benchmark_and_question_win_whatever_the_order():
    shared = "how many people are standing on the bridge?"
    a = QuestionIndex({"vqa-b": [shared, "are there any boats on the river?"], "vqa-a": [shared]}, 13)
    b = QuestionIndex({"vqa-a": [shared], "vqa-b": ["are there any boats on the river?", shared]}, 13)
    text = "Are there any boats on the river? How many people are standing on the bridge?"
    assert a.match(text) == b.match(text) == ("vqa-a", shared)
    turns = conversation("how many people are standing on the bridge", "are there any boats on the river")
    assert conversation_overlap(turns, a).detail == conversation_overlap(turns, b).detail
    assert conversation_overlap(turns, a).detail["benchmark"] == "vqa-a"


def test_all_easy_vqa_train_questions_are_test_templates(easy_vqa_index):
    """easy-VQA's splits share their 107 question templates: a question check flags every train question, so for
    templated benchmarks only images tell a copy from a new sample."""
    train = load_questions(str(EASY_VQA / "train" / "questions.json"))
    assert sum(easy_vqa_index.match(q) is not None for q in train) == len(train) == 38575


def test_question_index_from_config_loads_each_benchmark(tmp_path):
    (tmp_path / "q.txt").write_text("how many boats are on the river\n")
    cfg = DecontaminateConfig(
        [BenchmarkConfig("river", questions=str(tmp_path / "q.txt")), BenchmarkConfig("imgs", images=TEST_IMAGES)]
    )
    index = question_index(cfg)
    assert index.match("tell me how many boats are on the river please") == (
        "river",
        "how many boats are on the river",
    )
    assert question_index(DecontaminateConfig([BenchmarkConfig("imgs", images=TEST_IMAGES)])) is None


FORMATS = {
    "strings.json": json.dumps(["What colour is the car?", "Where is the cat sitting?"]),
    "lists.json": json.dumps([["What colour is the car?", "red", 1], ["Where is the cat sitting?", "mat", 2]]),
    "objects.json": json.dumps([{"question": "What colour is the car?"}, {"text": "Where is the cat sitting?"}]),
    "prompts.json": json.dumps(
        [{"prompt": "What colour is the car?", "id": 1}, {"prompt": "Where is the cat sitting?"}]
    ),
    "llava.json": json.dumps(
        [
            {
                "id": "1",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is the car?"},
                    {"from": "gpt", "value": "Red."},
                    {"from": "human", "value": "Where is the cat sitting?"},
                    {"from": "gpt", "value": "On the mat."},
                ],
            }
        ]
    ),
    "vqav2.json": json.dumps(
        {
            "info": {},
            "questions": [
                {"question": "What colour is the car?", "question_id": 1},
                {"question": "Where is the cat sitting?", "question_id": 2},
            ],
        }
    ),
    "lines.jsonl": '{"question": "What colour is the car?"}\n\n{"question": "Where is the cat sitting?"}\n',
    "lines-named.json": '{"question": "What colour is the car?"}\n{"question": "Where is the cat sitting?"}\n',
    "plain.txt": "What colour is the car?\n\n  Where is the cat sitting?  \n",
    "no-suffix": "What colour is the car?\nWhere is the cat sitting?\n",
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_question_file_format_loads(tmp_path, name):
    (tmp_path / name).write_text(FORMATS[name])
    assert load_questions(str(tmp_path / name)) == ["What colour is the car?", "Where is the cat sitting?"]


def test_globs_and_braces_load_every_matching_file_in_order(tmp_path):
    (tmp_path / "b.txt").write_text("second question here\n")
    (tmp_path / "a.json").write_text(json.dumps(["first question here"]))
    assert load_questions(str(tmp_path / "*")) == ["first question here", "second question here"]
    assert load_questions(str(tmp_path / "{b.txt,a.json}")) == ["first question here", "second question here"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[{"question": "What colour', "neither JSON nor JSON lines"),
        ("[1, 2, 3]", "item 0 is int, not a question"),
        ('[{"answer": "red"}]', "item 0 is an object with keys ['answer'], not a question"),
        ('{"answers": []}', "expected a JSON list of questions"),
        ("[]", "holds no questions"),
    ],
)
def test_a_malformed_question_file_raises_one_line_naming_it(tmp_path, content, message):
    path = tmp_path / "bench.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(message)) as raised:
        load_questions(str(path))
    assert "\n" not in str(raised.value)
    assert "bench.json" in str(raised.value)


def test_binary_folders_missing_files_and_oversized_files_are_refused(tmp_path):
    (tmp_path / "pic.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff")
    with pytest.raises(ValueError, match="pic.txt: not UTF-8"):
        load_questions(str(tmp_path / "pic.txt"))
    with pytest.raises(ValueError, match="nothing matches .*missing-\\*.json"):
        load_questions(str(tmp_path / "missing-*.json"))
    with pytest.raises(ValueError, match="is a folder"):
        load_questions(str(tmp_path))
    (tmp_path / "big.txt").write_text("what colour is the car\n" * 10)
    with pytest.raises(ValueError, match="big.txt: 230 bytes is over the question file cap of 100 bytes"):
        load_questions(str(tmp_path / "big.txt"), max_bytes=100)


# ---------------------------------------------------------------------------------------------------------------------
# Images: pHash


@pytest.fixture(scope="module")
def easy_vqa_phashes() -> list[tuple[str, str, str]]:
    return reference_phashes([BenchmarkConfig("easy-vqa-test", images=TEST_IMAGES)])


@pytest.fixture(scope="module")
def photos() -> list[dict]:
    return photo_samples()[:2]


def jpeg(img: Image.Image, quality: int = 80) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()


def test_reference_phashes_cover_the_folder_and_equal_ingests_phash(easy_vqa_phashes):
    assert len(easy_vqa_phashes) == 1000
    benchmark, name, h = next(r for r in easy_vqa_phashes if r[1].endswith("/7.png"))
    assert (benchmark, name) == ("easy-vqa-test", f"{TEST_IMAGES}/7.png")
    assert h == phash(decode_rgb((EASY_VQA / "test" / "images" / "7.png").read_bytes()))


def test_a_reencoded_benchmark_image_matches_and_a_photo_does_not(easy_vqa_phashes, photos):
    index = PhashIndex(easy_vqa_phashes, 4)
    original = decode_rgb((EASY_VQA / "test" / "images" / "0.png").read_bytes())
    copy = phash(decode_rgb(jpeg(original)))
    decision = phash_overlap(copy, index, 4)
    assert decision.reason == "benchmark_overlap"
    assert decision.detail["benchmark"] == "easy-vqa-test" and decision.detail["method"] == "phash"
    assert decision.detail["distance"] == min(hamming(copy, h) for _, _, h in easy_vqa_phashes) <= 4
    assert "easy-vqa-test" in decision.message
    photo = phash(decode_rgb(jpeg(photos[0]["image"])))
    assert phash_overlap(photo, index, 4).kept
    assert phash_overlap(photo, easy_vqa_phashes, 4).kept  # rows work too (indexed per call)


def test_the_band_index_finds_exactly_what_a_full_scan_finds():
    rng = random.Random(0)
    base = [rng.getrandbits(64) for _ in range(200)]
    refs = [("bench", f"r{i:03d}", f"{v:016x}") for i, v in enumerate(base)]
    probes = [v ^ sum(1 << b for b in rng.sample(range(64), rng.randrange(0, 8))) for v in base[:100]]
    probes += [rng.getrandbits(64) for _ in range(100)]
    for distance in (0, 2, 4, 6):
        index = PhashIndex(refs, distance)
        for probe in probes:
            h = f"{probe:016x}"
            near = [(b, n, hamming(h, r)) for b, n, r in refs if hamming(h, r) <= distance]
            assert index.match(h) == (min(near) if near else None)
    hits = sum(PhashIndex(refs, 4).match(f"{p:016x}") is not None for p in probes)
    assert 0 < hits < len(probes)


def test_a_missing_or_malformed_phash_is_dropped_as_uncheckable(easy_vqa_phashes):
    for bad in ("", "xyz", "07f80707f807f8f", None):
        assert phash_overlap(bad, easy_vqa_phashes[:5], 4).reason == "bad_phash"


def test_shards_and_image_files_are_references_and_damaged_ones_are_skipped(tmp_path, caplog, photos):
    writer = TarShardWriter()
    writer.add("000000000", [("jpg", jpeg(photos[0]["image"])), ("json", b"{}")])
    writer.add("000000001", [("txt", b"no image here")])
    writer.add("000000002", [("png", b"\x89PNG\r\n\x1a\n damaged")])
    writer.finish(str(tmp_path / "00000.tar"))
    (tmp_path / "photo.jpg").write_bytes(jpeg(photos[1]["image"]))
    (tmp_path / "notes.md").write_text("not a reference")
    bench = BenchmarkConfig("mixed", images=str(tmp_path))
    assert reference_files(bench.images) == [str(tmp_path / "00000.tar"), str(tmp_path / "photo.jpg")]
    assert [name for name, _ in reference_images(bench)] == [
        f"{tmp_path}/00000.tar/000000000",
        f"{tmp_path}/00000.tar/000000002",
        f"{tmp_path}/photo.jpg",
    ]
    with caplog.at_level(logging.WARNING, logger="visinstruct.transforms.decontam"):
        rows = reference_phashes([bench])
    assert [name for _, name, _ in rows] == [f"{tmp_path}/00000.tar/000000000", f"{tmp_path}/photo.jpg"]
    assert "00000.tar/000000002 skipped" in caplog.text
    assert "1 of 3 images skipped" in caplog.text


def test_reference_specs_that_name_no_images_fail_clearly(tmp_path):
    (tmp_path / "notes.md").write_text("no images")
    with pytest.raises(ValueError, match="names 1 files but no images or shards"):
        reference_files(str(tmp_path))
    with pytest.raises(ValueError, match="nothing matches .*nope"):
        reference_files(str(tmp_path / "nope"))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="benchmark 'broken': no image of .* could be read"):
        reference_phashes([BenchmarkConfig("broken", images=str(tmp_path / "*.png"))])


# ---------------------------------------------------------------------------------------------------------------------
# Images: embeddings


def unit(*values: float) -> np.ndarray:
    v = np.array(values, dtype=np.float64)
    return v / np.linalg.norm(v)


@pytest.fixture
def refs() -> ReferenceEmbeddings:
    return ReferenceEmbeddings.from_rows(
        [("vqa-b", "b.png", np.array([0.0, 3.0, 0.0])), ("vqa-a", "a.png", np.array([2.0, 0.0, 0.0]))]
    )


def test_reference_embeddings_are_sorted_and_normalised(refs):
    assert refs.benchmarks == ("vqa-a", "vqa-b") and refs.references == ("a.png", "b.png")
    assert refs.matrix.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(refs.matrix, axis=1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="vqa/z.png is zero or not finite"):
        ReferenceEmbeddings.from_rows([("vqa", "z.png", np.zeros(3))])


def test_an_embedding_near_a_reference_is_dropped_and_a_far_one_kept(refs):
    near = embedding_overlap(unit(1.0, 0.1, 0.0), refs, 0.95)  # cosine 0.995 with a.png
    assert near.reason == "benchmark_overlap"
    assert near.detail["benchmark"] == "vqa-a" and near.detail["reference"] == "a.png"
    assert near.detail["method"] == "embedding" and near.detail["cosine"] > 0.99
    assert embedding_overlap(unit(1.0, 1.0, 0.0), refs, 0.95).kept  # cosine 0.707 with both
    assert embedding_overlap(unit(0.0, 0.0, 1.0), refs, 0.95).kept


def test_several_hits_report_the_smallest_reference_and_batches_change_nothing(refs):
    both = unit(1.0, 1.0, 0.0)  # 0.707 with each: a hit for both at threshold 0.5
    assert embedding_overlap(both, refs, 0.5).detail["reference"] == "a.png"
    batch = np.stack([unit(0.1, 1.0, 0.0), both, unit(0.0, 0.0, 1.0)])
    one_by_one = [embedding_overlap(v, refs, 0.5) for v in batch]
    together = embedding_overlaps(batch, refs, 0.5)
    assert [d.detail for d in together] == [d.detail for d in one_by_one]
    assert [d.reason for d in together] == ["benchmark_overlap", "benchmark_overlap", None]
    with pytest.raises(ValueError, match="do not match references of 3"):
        embedding_overlap(np.ones(4), refs, 0.5)
