"""Grounded generation end to end: the real pipeline (Beam DirectRunner) asks a loopback OpenAI-protocol server that
records every request, so each test checks what a vision model was really shown (the sample's own image, at the
size and in the format configured), and what came of its replies: faults, the cache, several kinds per image,
two passes (re-caption first), and a build whose stage counts add up.

The scripted model (:class:`Model`) answers by the kind its system prompt names and tells samples apart by the
image it receives, so a test can make one sample's reply bad without touching the prompts.
"""

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml
from PIL import Image

from visinstruct.cli.main import main
from visinstruct.configs import BuildConfig, GenerateConfig, IngestConfig, from_dict
from visinstruct.pipelines import build, generate
from visinstruct.pipelines.ingest import run as ingest
from visinstruct.schemas import SampleMeta
from visinstruct.testing.openai_server import OpenAIServer, image_urls, last_user_text, request_images
from visinstruct.testing.sample_data import shapes_dataset
from visinstruct.testing.tars import write_tar
from visinstruct.transforms.prompts import load_templates

pytestmark = pytest.mark.timeout(300)
RUNNER = ["--runner=DirectRunner"]
SIZE = (96, 64)  # not square, so "ratio kept" can fail
WORDS = ["calm", "neat", "tidy", "crisp"]  # one per sample: each sample's re-caption is its own
GOOD_QA = (
    "Question: What colours are the shapes?\nAnswer: They are bright.\n"
    "Question: Is the background plain?\nAnswer: Yes, it is plain white."
)
UNPARSEABLE = "The picture is nice."
KIND_OF_SYSTEM = {t.system: name for name, t in load_templates().kinds.items()}
TEMPLATES = Path(__file__).parents[1] / "configs" / "prompts" / "llava.yaml"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rgb(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def pixels_sha(data: bytes) -> str:
    img = rgb(data)
    return sha(f"{img.size}".encode() + img.tobytes())


@dataclass(frozen=True)
class Sample:
    """What a test knows of one input sample: its image member's bytes and its web caption."""

    key: str
    image: bytes
    caption: str
    word: str

    @property
    def recaption(self) -> str:
        """The re-caption the scripted model gives this sample's image (it names no object, copies no caption)."""
        return f"The shapes look {self.word} and bright, spread out over a plain light background."


class Model:
    """A scripted vision model: the reply of the kind the system prompt names, per the image received.

    ``unparseable``: keys whose grounded_qa reply reads as no question-answer pair; ``copies``: keys whose
    re-caption is the web caption word for word.
    """

    def __init__(self, samples: dict[str, Sample], unparseable=(), copies=()):
        self.by_image = {sha(s.image): s for s in samples.values()}
        self.unparseable, self.copies = set(unparseable), set(copies)

    def __call__(self, request: dict) -> str:
        kind = KIND_OF_SYSTEM[request["messages"][0]["content"]]
        images = request_images(request)
        sample = self.by_image.get(sha(images[0][1])) if images else None
        if kind == "recaption":
            if sample is None:  # a re-encoded image: any sample's description will do
                return "Flat bright shapes are spread out over a plain light background."
            return sample.caption if sample.key in self.copies else sample.recaption
        if kind == "grounded_qa" and sample is not None and sample.key in self.unparseable:
            return UNPARSEABLE
        return GOOD_QA


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    """4 shapes images of 96x64 (JPEG, as ingest writes them) in 2 shards."""
    root = tmp_path_factory.mktemp("grounded")
    coco = shapes_dataset(root / "shapes", n=len(WORDS), seed=5, size=SIZE)
    cfg = from_dict(
        IngestConfig,
        {
            "read": {
                "path": str(coco / "annotations" / "*.json"),
                "format": "coco",
                "image_root": str(coco / "images"),
            },
            "write": {"path": str(root / "in"), "shard_size": 2},
            "resize": {"image_size": SIZE[1], "resize_mode": "keep_ratio"},
        },
    )
    assert ingest(cfg, RUNNER)["written"] == len(WORDS)
    return sorted(str(p) for p in (root / "in").glob("*.tar"))


@pytest.fixture(scope="module")
def inputs(shards) -> dict[str, Sample]:
    rows = list(wds.WebDataset(shards, shardshuffle=False))
    assert all(Image.open(io.BytesIO(s["jpg"])).size == SIZE for s in rows)
    return {
        s["__key__"]: Sample(s["__key__"], s["jpg"], SampleMeta.from_json(s["json"]).caption, word)
        for s, word in zip(rows, WORDS)
    }


def settings(srv: OpenAIServer, out: Path, openai: dict | None = None, **keys) -> GenerateConfig:
    base = srv.generate_settings(**(openai or {})) | {"temperature": 0.0, "write": {"path": str(out)}}
    return from_dict(GenerateConfig, base | keys)


def written(out: Path) -> dict[str, SampleMeta]:
    tars = [str(p) for p in sorted(out.glob("*.tar"))]
    return {s["__key__"]: SampleMeta.from_json(s["json"]) for s in wds.WebDataset(tars, shardshuffle=False)}


def dead_letters(out: Path) -> dict[str, dict]:
    return {r["key"]: r for r in pq.read_table(out / "rejected").to_pylist()}


def tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def index_rows(out: Path) -> list[dict]:
    return [row for p in sorted(out.glob("*.parquet")) for row in pq.read_table(p).to_pylist()]


def the_image(record) -> tuple[str, bytes]:
    """The one image a request carries (fails on none or several)."""
    (image,) = record.images
    return image


# ---------------------------------------------------------------------------------------------------------------
# What the model is shown


def test_each_request_carries_the_samples_own_image_its_bytes_untouched_when_they_fit(inputs, shards, tmp_path):
    with OpenAIServer(responder=Model(inputs)) as srv:
        image = {"format": "keep", "max_side": 672, "detail": "low"}
        kinds = {"recaption": 1.0, "grounded_qa": 1.0}
        report = generate.run(settings(srv, tmp_path, kinds=kinds, image=image), shards, RUNNER)
        seen = srv.requests
    assert report["written"] == len(inputs) == len(seen) and report["accounted"]
    received = {}
    for record in seen:
        mime, data = the_image(record)
        assert mime == "image/jpeg" and [u["detail"] for u in image_urls(record.json)] == ["low"]
        received[sha(data)] = data
    assert sorted(received) == sorted(sha(s.image) for s in inputs.values())  # every sample's image, once each
    for key, meta in written(tmp_path).items():
        data = received[sha(inputs[key].image)]
        assert pixels_sha(data) == pixels_sha(inputs[key].image)
        assert meta.generation.image == {
            "sha256": sha(data),
            "source_sha256": sha(inputs[key].image),
            "format": "jpeg",
            "width": SIZE[0],
            "height": SIZE[1],
            "bytes": len(data),
            "reencoded": False,
        }


def test_a_smaller_max_side_sends_the_image_resized_with_its_ratio_in_the_format_asked(inputs, shards, tmp_path):
    with OpenAIServer(responder=Model(inputs)) as srv:
        cfg = settings(srv, tmp_path, kinds={"grounded_qa": 1.0}, image={"format": "png", "max_side": 32})
        report = generate.run(cfg, shards, RUNNER)
        received = {sha(data): (mime, data) for mime, data in map(the_image, srv.requests)}
    assert report["written"] == len(received) == len(inputs)
    for key, meta in written(tmp_path).items():
        info = meta.generation.image
        mime, data = received[info["sha256"]]
        img = Image.open(io.BytesIO(data))
        assert mime == "image/png" and img.format == "PNG" and info["format"] == "png" and info["reencoded"]
        assert max(img.size) == 32 and img.size == (info["width"], info["height"])
        assert abs(img.width / img.height - SIZE[0] / SIZE[1]) < 1 / img.height  # the ratio, to a pixel
        assert info["source_sha256"] == sha(inputs[key].image)
        own = rgb(inputs[key].image).resize(img.size, Image.Resampling.LANCZOS)
        errors = {
            k: np.abs(np.asarray(img.convert("RGB"), float) - np.asarray(rgb(s.image).resize(img.size), float)).mean()
            for k, s in inputs.items()
        }
        assert min(errors, key=errors.get) == key  # this sample's picture, not another's
        assert np.abs(np.asarray(img.convert("RGB"), float) - np.asarray(own, float)).mean() < 4


# ---------------------------------------------------------------------------------------------------------------
# Faults, the cache


def test_image_requests_that_fail_end_written_after_a_retry_or_dead_lettered_and_validate_clean(
    inputs, tmp_path, monkeypatch
):
    """A template that shows the caption puts a fault marker in the request each sample's caption names."""
    markers = ["[[fault:429:1:0.1]]", "[[fault:500]]", "[[fault:hang]]", ""]
    samples = {}
    for (key, s), marker in zip(inputs.items(), markers):
        caption = f"{s.caption} {marker}".strip()
        samples[key] = {
            "jpg": s.image,
            "txt": caption.encode(),
            "json": json.dumps({"key": key, "caption": caption}).encode(),
        }
    tar = write_tar(tmp_path / "in" / "00000.tar", samples)
    templates = yaml.safe_load(TEMPLATES.read_text())
    templates["kinds"]["grounded_qa"] |= {"context": "captions", "user": "{context}"}
    (tmp_path / "templates.yaml").write_text(yaml.safe_dump(templates))
    out = tmp_path / "out"
    with OpenAIServer(responder=Model(inputs)) as srv:
        cfg = settings(
            srv,
            out,
            {"retries": 1, "timeout": 1.0},
            kinds={"grounded_qa": 1.0},
            templates=str(tmp_path / "templates.yaml"),
        )
        report = generate.run(cfg, [tar], RUNNER)
        seen = srv.requests
    asked = {m: sum(m in last_user_text(r.json) for r in seen) for m in markers[:3]}
    assert asked == dict.fromkeys(markers[:3], 2)  # each failure asked twice (retries: 1)
    assert all(len(r.images) == 1 for r in seen) and len(seen) == 7
    keys = list(inputs)
    assert sorted(written(out)) == [keys[0], keys[3]]  # the 429 ended written after its retry
    assert {k: r["reason"] for k, r in dead_letters(out).items()} == {keys[1]: "http_500", keys[2]: "timeout"}
    assert report["rejected_by_reason"] == {"http_500": 1, "timeout": 1} and report["accounted"]
    assert report["written"] + report["rejected"] == report["inputs"] == len(inputs)
    assert main(["validate", str(out)]) == 0


def test_a_rerun_with_the_cache_asks_nothing_and_writes_the_same_shards_until_the_image_settings_change(
    inputs, shards, tmp_path
):
    kinds = {"recaption": 1.0, "grounded_qa": 1.0}
    with OpenAIServer(responder=Model(inputs)) as srv:

        def run(out: str, **image) -> int:
            srv.reset()
            cfg = settings(srv, tmp_path / out, kinds=kinds, cache_dir=str(tmp_path / "cache"), image=image)
            assert generate.run(cfg, shards, RUNNER)["written"] == len(inputs)
            return srv.calls

        assert run("first") == len(inputs)
        assert run("again") == 0
        assert run("smaller", max_side=32) == len(inputs)  # other bytes sent: another cache key
    assert tars(tmp_path / "again") == tars(tmp_path / "first") and len(tars(tmp_path / "first")) == len(shards)
    assert index_rows(tmp_path / "again") == index_rows(tmp_path / "first") != []


# ---------------------------------------------------------------------------------------------------------------
# Several kinds per image, two passes


def test_two_kinds_per_image_join_into_one_conversation_and_a_bad_part_leaves_the_other(inputs, shards, tmp_path):
    bad = list(inputs)[1]
    with OpenAIServer(responder=Model(inputs, unparseable=[bad])) as srv:
        cfg = settings(srv, tmp_path, kinds={"recaption": 1.0, "grounded_qa": 1.0}, per_image=2)
        report = generate.run(cfg, shards, RUNNER)
        assert srv.calls == 2 * len(inputs) and all(len(r.images) == 1 for r in srv.requests)
    out = written(tmp_path)
    assert sorted(out) == sorted(inputs) and report["accounted"]
    assert report["parts_rejected"] == {"unparseable": 1}
    for key, meta in out.items():
        turns, info = meta.conversations, meta.generation
        assert turns[0].role == "human" and turns[0].value.startswith("<image>\n")
        assert not any("<image>" in t.value for t in turns[1:])
        assert sorted(p["kind"] for p in info.parts) == ["grounded_qa", "recaption"]
        answers = [t.value for t in turns if t.role == "gpt"]
        assert inputs[key].recaption in answers
        if key == bad:
            assert info.kind == "recaption" and len(turns) == 2
            assert {p["kind"]: p.get("reason") for p in info.parts} == {
                "recaption": None,
                "grounded_qa": "unparseable",
            }
        else:
            assert sorted(info.kind.split("+")) == ["grounded_qa", "recaption"] and len(turns) == 6
            assert "They are bright." in answers and not any("reason" in p for p in info.parts)


def test_two_passes_re_caption_the_image_then_ask_the_text_kind_about_that_re_caption(inputs, shards, tmp_path):
    copier = list(inputs)[2]
    with OpenAIServer(responder=Model(inputs, copies=[copier])) as srv:
        cfg = settings(srv, tmp_path, kinds={"conversation": 1.0}, recaption_first=True, recaption_caption="replace")
        report = generate.run(cfg, shards, RUNNER)
        seen = srv.requests
    assert len(seen) == 2 * len(inputs) - 1  # the copier's conversation is never asked
    for key, s in inputs.items():
        firsts = [i for i, r in enumerate(seen) if r.images and sha(r.images[0][1]) == sha(s.image)]
        seconds = [i for i, r in enumerate(seen) if s.recaption in last_user_text(r.json)]
        assert len(firsts) == 1 and KIND_OF_SYSTEM[seen[firsts[0]].json["messages"][0]["content"]] == "recaption"
        if key == copier:
            assert seconds == []
            continue
        (second,) = seconds
        assert firsts[0] < second and seen[second].images == [] and image_urls(seen[second].json) == []
        assert s.caption not in json.dumps(seen[second].json)  # the web caption is not what the text kind reads
    out = written(tmp_path)
    assert sorted(out) == sorted(k for k in inputs if k != copier)
    for key, meta in out.items():
        s = inputs[key]
        assert meta.generation.kind == "conversation" and meta.generation.recaption == s.recaption
        assert s.recaption not in [t.value for t in meta.conversations]  # the helper re-caption is not a turn
        assert meta.caption == s.recaption and s.caption in meta.captions
    txt = {
        s["__key__"]: s["txt"].decode()
        for s in wds.WebDataset([str(p) for p in sorted(tmp_path.glob("*.tar"))], shardshuffle=False)
    }
    assert {k: txt[k] for k in out} == {k: inputs[k].recaption for k in out}  # .txt is the caption (FORMAT.md)
    dead = dead_letters(tmp_path)[copier]
    assert dead["reason"] == "copies_caption"
    parts = json.loads(dead["detail"])["parts"]
    assert [(p["kind"], p["reason"]) for p in parts] == [
        ("recaption", "copies_caption"),
        ("conversation", "recaption_rejected"),
    ]
    assert report["parts_rejected"] == {"copies_caption": 1, "recaption_rejected": 1} and report["accounted"]


# ---------------------------------------------------------------------------------------------------------------
# A build


def test_a_build_from_shards_with_grounded_kinds_counts_add_up_stage_by_stage(inputs, shards, tmp_path):
    bad = list(inputs)[0]
    with OpenAIServer(responder=Model(inputs, unparseable=[bad])) as srv:
        generate_keys = srv.generate_settings() | {"temperature": 0.0, "kinds": {"grounded_qa": 1.0}}
        cfg = from_dict(
            BuildConfig,
            {"out": str(tmp_path / "out"), "input": str(Path(shards[0]).parent), "generate": generate_keys},
        )
        report = build.run(cfg, RUNNER, inputs=shards)
    assert report["stages_add_up"] and report["accounted"]
    (stage,) = report["stages"]
    assert (stage["stage"], stage["in"], stage["out"]) == ("generate", len(inputs), len(inputs) - 1)
    assert stage["dropped_by_reason"] == {"unparseable": 1} == report["parts_rejected"]
    assert report["written"] == len(inputs) - 1 and sorted(written(tmp_path / "out")) == sorted(set(inputs) - {bad})


# ---------------------------------------------------------------------------------------------------------------
# The grounding check


@pytest.mark.parametrize("threshold", [-1.0, 1.0])
def test_the_grounding_check_scores_kept_image_replies_with_clip_and_drops_those_under_the_threshold(
    inputs, shards, tmp_path, tiny_checkpoint, threshold
):
    from visinstruct.configs import GroundingConfig
    from visinstruct.testing.tiny_models import TINY_OPEN_CLIP_NAME
    from visinstruct.transforms.grounding import GroundingScorer
    from visinstruct.transforms.llm import grounding_text
    from visinstruct.transforms.vision import prepare_image

    model = {
        "name": TINY_OPEN_CLIP_NAME,
        "pretrained": str(tiny_checkpoint / "tiny.pt"),
        "config_file": str(tiny_checkpoint / f"{TINY_OPEN_CLIP_NAME}.json"),
    }
    with OpenAIServer(responder=Model(inputs)) as srv:
        kinds = {"recaption": 1.0, "grounded_qa": 1.0}
        grounding = {"threshold": threshold, "model": model}
        cfg = settings(srv, tmp_path, kinds=kinds, per_image=2, grounding=grounding)
        report = generate.run(cfg, shards, RUNNER)
    assert report["accounted"]
    if threshold > 0:  # no cosine reaches 1: every part is scored and dropped
        assert report["written"] == 0 and report["parts_rejected"] == {"low_grounding": 2 * len(inputs)}
        details = [json.loads(r["detail"]) for r in dead_letters(tmp_path).values()]
        assert all(isinstance(p["grounding"], float) for d in details for p in d["parts"])
        return
    out = written(tmp_path)
    assert sorted(out) == sorted(inputs) and report["parts_rejected"] == {}
    scorer = GroundingScorer(from_dict(GroundingConfig, grounding))
    scorer.load()
    for key, meta in out.items():  # each part's score is the scorer's on the image sent and the reply's text
        image = prepare_image(inputs[key].image, cfg.image)
        turns = meta.conversations
        texts = {"recaption": None, "grounded_qa": None}
        start = 0
        for part in meta.generation.parts:
            size = 2 if part["kind"] == "recaption" else len(turns) - 2
            chunk = turns[start : start + size]
            fmt = "description" if part["kind"] == "recaption" else "qa"
            texts[part["kind"]] = grounding_text(chunk, fmt)
            start += size
        expected = dict(zip(texts, scorer.scores([(image, texts[k]) for k in texts])))
        for part in meta.generation.parts:
            assert part["grounding"] == pytest.approx(expected[part["kind"]], abs=1e-4)
        assert meta.generation.grounding == min(p["grounding"] for p in meta.generation.parts)
