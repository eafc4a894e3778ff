"""The CLIP filter: scores equal a direct computation, selection keeps exactly the right keys, nothing is lost."""

import io
import json
import math
import random

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from visinstruct.configs import FilterConfig, IngestConfig, from_dict
from visinstruct.pipelines import filter as clip_filter
from visinstruct.pipelines.ingest import run as ingest
from visinstruct.schemas import ClipScore, Rejection, SampleMeta
from visinstruct.testing import sample_data
from visinstruct.testing.tars import write_tar
from visinstruct.testing.tiny_models import TINY_OPEN_CLIP_CONFIG, TINY_OPEN_CLIP_NAME, tiny_hf_clip, tiny_open_clip
from visinstruct.transforms import filter_stages
from visinstruct.transforms.clip import ClipOutput, OpenClipHandler, make_handler
from visinstruct.transforms.filter_stages import STAGE, decode_for_clip, score_decision, shard_judge
from visinstruct.transforms.rewrite_stage import RewriteShard
from visinstruct.transforms.select import TopFractionCut, ranks_within, top_count

pytestmark = pytest.mark.timeout(600)
RUNNER = ["--runner=FnApiRunner"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Ingested shards of shapes and photos (14 samples, 3 shards) plus a hand-made shard with a corrupt image."""
    root = tmp_path_factory.mktemp("filter")
    images = root / "images"
    samples = sample_data.shapes_samples(8, seed=1) + sample_data.photo_samples()[:6]
    for i, s in enumerate(samples):
        s["image"].save(images / f"{i:02d}.png" if images.exists() else _mkdir(images) / f"{i:02d}.png")
        (images / f"{i:02d}.txt").write_text(s["caption"])
    cfg = from_dict(
        IngestConfig,
        {
            "read": {"path": str(images)},
            "write": {"path": str(root / "in"), "shard_size": 5},
            "resize": {"image_size": 96},
        },
    )
    assert ingest(cfg, RUNNER)["written"] == 14
    corrupt = _jpeg()[:300] + b"\x00" * 500
    write_tar(  # one good sample, one corrupt image
        root / "in" / "00007.tar",
        {key: {"jpg": jpg, "txt": b"a test card"} for key, jpg in (("000070000", _jpeg()), ("000070001", corrupt))},
    )
    return root


def _mkdir(path):
    path.mkdir()
    return path


def _jpeg():
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


def open_clip_cfg(checkpoint, out, **selection) -> FilterConfig:
    return from_dict(
        FilterConfig,
        {
            "model": {
                "name": TINY_OPEN_CLIP_NAME,
                "pretrained": str(checkpoint / "tiny.pt"),
                "config_file": str(checkpoint / f"{TINY_OPEN_CLIP_NAME}.json"),
                "max_batch_size": 4,
                "decode_threads": 2,
            },
            "write": {"path": str(out)},
            **selection,
        },
    )


def input_samples(shards):
    tars = [str(p) for p in sorted((shards / "in").glob("*.tar"))]
    return tars, [s for s in wds.WebDataset(tars, shardshuffle=False) if s["__key__"] != "000070001"]


def direct_open_clip_scores(shards) -> dict[str, float]:
    model, preprocess, tokenizer = tiny_open_clip(seed=7)
    _, samples = input_samples(shards)
    scores = {}
    with torch.no_grad():
        for s in samples:
            image = preprocess(Image.open(io.BytesIO(s["jpg"])).convert("RGB")).unsqueeze(0)
            a = torch.nn.functional.normalize(model.encode_image(image), dim=-1)
            b = torch.nn.functional.normalize(model.encode_text(tokenizer([s["txt"].decode()])), dim=-1)
            scores[s["__key__"]] = float((a * b).sum())
    return scores


def written(out) -> dict[str, SampleMeta]:
    metas = [
        SampleMeta.from_json(s["json"])
        for s in wds.WebDataset([str(p) for p in sorted(out.glob("*.tar"))], shardshuffle=False)
    ]
    return {m.key: m for m in metas}


def threshold_in_a_gap(scores, margin: float = 1e-3) -> float:
    """A threshold near the median score with no score within ``margin`` of it: batched scoring moves scores by
    about 1e-7 (more on some CPUs), so a threshold equal to a score would test one machine's rounding."""
    ranked = sorted(scores)
    middle = len(ranked) // 2
    for i in sorted(range(len(ranked) - 1), key=lambda i: abs(i - middle)):
        if ranked[i + 1] - ranked[i] > 2 * margin:
            return (ranked[i] + ranked[i + 1]) / 2
    raise AssertionError(f"no gap of {2 * margin} between the scores {ranked}")


def test_threshold_keeps_exactly_the_pairs_scoring_at_least_it(shards, tiny_checkpoint, tmp_path):
    direct = direct_open_clip_scores(shards)
    threshold = threshold_in_a_gap(direct.values())
    assert 0 < sum(s >= threshold for s in direct.values()) < len(direct)
    tars, _ = input_samples(shards)
    report = clip_filter.run(open_clip_cfg(tiny_checkpoint, tmp_path, threshold=threshold), tars, RUNNER)
    kept = written(tmp_path)
    assert set(kept) == {k for k, s in direct.items() if s >= threshold}
    for key, meta in kept.items():
        assert abs(meta.clip.score - direct[key]) < 1e-5
        assert meta.clip.model == TINY_OPEN_CLIP_NAME and meta.clip.pretrained.endswith("tiny.pt")
    index = pq.read_table(sorted(tmp_path.glob("*.parquet"))).to_pylist()
    assert {r["key"]: r["clip_score"] for r in index if r["clip_score"] is not None}.keys() == direct.keys()
    for row in index:
        if row["key"] in direct:
            assert abs(row["clip_score"] - direct[row["key"]]) < 1e-5
    # kept + dropped = input, the corrupt image is dead-lettered, not fatal
    assert report["inputs"] == report["rows_read"] == 16 and report["accounted"]
    assert report["written"] == len(kept)
    assert report["rejected_by_reason"] == {"clip_below_threshold": 15 - len(kept), "decode_error": 1}
    rejected = pq.read_table(tmp_path / "rejected").to_pylist()
    assert {r["key"] for r in rejected if r["reason"] == "decode_error"} == {"000070001"}
    assert all(json.loads(r["detail"])["score"] < threshold for r in rejected if r["reason"] == "clip_below_threshold")


def test_a_jpeg_member_is_scored_and_written_back_under_its_name(tiny_checkpoint, tmp_path):
    """Other tools name JPEGs ``KEY.jpeg``: the filter scores them as it scores ``.jpg`` and keeps the name."""
    pictures = [s["image"] for s in sample_data.shapes_samples(3, seed=2)]
    captions = ["a red circle", "two blue squares", "a green triangle"]
    members = {}
    for i, (image, caption) in enumerate(zip(pictures, captions)):
        buf = io.BytesIO()
        image.convert("RGB").save(buf, "JPEG")
        members[f"00000000{i}"] = {"jpeg": buf.getvalue(), "txt": caption.encode()}
    tar = write_tar(tmp_path / "in" / "00000.tar", members)
    report = clip_filter.run(open_clip_cfg(tiny_checkpoint, tmp_path / "out", threshold=-1.0), [tar], RUNNER)
    assert (report["written"], report["rejected"]) == (3, 0) and report["accounted"]
    model, preprocess, tokenizer = tiny_open_clip(seed=7)
    out = list(wds.WebDataset(str(tmp_path / "out" / "00000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in out] == sorted(members)
    for sample in out:
        assert sample["jpeg"] == members[sample["__key__"]]["jpeg"] and "jpg" not in sample
        with torch.no_grad():
            image = preprocess(Image.open(io.BytesIO(sample["jpeg"])).convert("RGB")).unsqueeze(0)
            a = torch.nn.functional.normalize(model.encode_image(image), dim=-1)
            b = torch.nn.functional.normalize(model.encode_text(tokenizer([sample["txt"].decode()])), dim=-1)
        assert abs(SampleMeta.from_json(sample["json"]).clip.score - float((a * b).sum())) < 1e-5


def test_the_filter_judge_through_rewrite_shard_keeps_drops_and_accounts_every_sample(tmp_path):
    """The filter's judge of one shard, fed decisions and rejections as the pipeline groups them: a kept pair
    carries its score in its JSON, a dropped one its score in the index and detail, an unscored one its reason."""
    keys = [f"00000000{i}" for i in range(4)]
    tar = write_tar(tmp_path / "in" / "00000.tar", {k: {"jpg": _jpeg(), "txt": b"a red card"} for k in keys})
    clip = ClipScore(0.0, "tiny", None)
    embedding = np.ones(4, np.float16)
    groups = {
        "decisions": [
            (keys[0], score_decision(keys[0], ClipOutput(0.31, embedding), 0.2, None, None, clip)),
            (keys[1], score_decision(keys[1], ClipOutput(0.12), 0.2, None, None, clip)),
        ],
        "rejections": [Rejection(STAGE, "decode_error", "truncated", keys[2], tar)],
        "paths": [tar],
    }
    with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
        stats = (
            p
            | beam.Create([(tar, groups)])
            | beam.ParDo(RewriteShard(STAGE, str(tmp_path / "out"), {}, shard_judge))
            | beam.Map(lambda s: (s.inputs, s.written, dict(s.rejected_by_reason)))
        )
        assert_that(stats, equal_to([(4, 1, {"clip_below_threshold": 1, "decode_error": 1, "not_scored": 1})]))
    assert written(tmp_path / "out")[keys[0]].clip == ClipScore(0.31, "tiny", None)
    index = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "00000.parquet").to_pylist()}
    assert [index[k]["status"] for k in keys] == ["success", "clip_below_threshold", "decode_error", "not_scored"]
    assert (index[keys[0]]["clip_score"], index[keys[1]]["clip_score"]) == (0.31, 0.12)
    assert np.frombuffer(index[keys[0]]["clip_image_embedding"], np.float16).tolist() == [1.0] * 4
    dead = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "rejected").to_pylist()}
    assert json.loads(dead[keys[1]]["detail"]) == {"score": 0.12, "model": "tiny"}
    assert dead[keys[2]]["message"] == "truncated" and dead[keys[3]]["message"] == "no score reached the writer"


def test_scores_do_not_depend_on_batch_size_or_order(shards, tiny_checkpoint, tmp_path):
    handler = make_handler(open_clip_cfg(tiny_checkpoint, tmp_path).model)
    model, preprocess = handler.load_model(), handler.preprocessor()
    _, samples = input_samples(shards)
    examples = [(decode_for_clip(s["jpg"], preprocess), s["txt"].decode()) for s in samples]

    def scores(batch_size: int, order: list[int]) -> dict[int, float]:
        out = {}
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            for i, result in zip(chunk, handler.run_inference([examples[i] for i in chunk], model)):
                out[i] = result.inference.score
        return out

    n = len(examples)
    alone = scores(1, list(range(n)))
    for batch_size, order in [
        (4, list(range(n))),
        (n, list(range(n))),
        (3, list(reversed(range(n)))),
        (5, random.Random(0).sample(range(n), n)),
    ]:
        batched = scores(batch_size, order)
        assert max(abs(batched[i] - alone[i]) for i in range(n)) <= 1e-6, (batch_size, order)


def test_a_bug_on_one_sample_dead_letters_it_and_the_others_are_scored(shards, tiny_checkpoint, tmp_path, monkeypatch):
    """Bugs planted in the decoder (one image) and in the model (one caption raises inside a batch of four,
    another gets a NaN score, which would reach the top fraction's histogram)."""
    tars, samples = input_samples(shards)
    captions = [s["txt"] for s in samples]
    unique = [s for s in samples[3:] if captions.count(s["txt"]) == 1]
    victim, choker, nan = samples[2], unique[0], unique[-1]
    real_decode, real_encode = filter_stages.decode_for_clip, OpenClipHandler._encode

    def decode(data, preprocess):
        if data == victim["jpg"]:
            raise RuntimeError("planted decoder bug")
        return real_decode(data, preprocess)

    def encode(self, model, images, texts):
        if choker["txt"].decode() in texts:
            raise RuntimeError("planted model bug")
        image, text = real_encode(self, model, images, texts)
        return image.masked_fill(torch.tensor([t == nan["txt"].decode() for t in texts])[:, None], math.nan), text

    monkeypatch.setattr(filter_stages, "decode_for_clip", decode)
    monkeypatch.setattr(OpenClipHandler, "_encode", encode)
    report = clip_filter.run(open_clip_cfg(tiny_checkpoint, tmp_path, top_fraction=1.0), tars, RUNNER)
    failed = {
        victim["__key__"]: "internal_error",
        choker["__key__"]: "inference_error",
        nan["__key__"]: "inference_error",
    }
    assert set(written(tmp_path)) == {s["__key__"] for s in samples} - set(failed)
    rejected = {r["key"]: r for r in pq.read_table(tmp_path / "rejected").to_pylist()}
    assert {key: rejected[key]["reason"] for key in failed} == failed
    assert "RuntimeError: planted decoder bug" in rejected[victim["__key__"]]["message"]
    assert "planted model bug" in rejected[choker["__key__"]]["message"]
    assert report["accounted"] and report["inputs"] == 16 and report["written"] == 12
    assert report["rejected_by_reason"] == {"internal_error": 1, "inference_error": 2, "decode_error": 1}


def test_top_fraction_keeps_the_best_ranked_keys(shards, tiny_checkpoint, tmp_path):
    direct = direct_open_clip_scores(shards)
    tars, _ = input_samples(shards)
    clip_filter.run(open_clip_cfg(tiny_checkpoint, tmp_path, top_fraction=0.3, store_embeddings=True), tars, RUNNER)
    ranked = sorted(direct, key=lambda k: (-direct[k], k))
    kept = math.ceil(0.3 * len(ranked))
    assert direct[ranked[kept - 1]] - direct[ranked[kept]] > 1e-4  # the cut sits on no near-tie
    assert set(written(tmp_path)) == set(ranked[:kept])
    row = next(r for r in pq.read_table(sorted(tmp_path.glob("*.parquet"))).to_pylist() if r["clip_score"])
    embedding = np.frombuffer(row["clip_image_embedding"], np.float16)
    assert embedding.shape == (TINY_OPEN_CLIP_CONFIG["embed_dim"],) and abs(np.linalg.norm(embedding) - 1) < 1e-2


def test_dry_run_reports_the_distribution_and_writes_no_shards(shards, tiny_checkpoint, tmp_path):
    direct = direct_open_clip_scores(shards)
    tars, _ = input_samples(shards)
    report = clip_filter.run(open_clip_cfg(tiny_checkpoint, tmp_path), tars, RUNNER, dry_run=True)
    assert report["pairs"] == len(direct) and report["unscored"] == {"decode_error": 1}
    assert abs(report["min"] - min(direct.values())) < 1e-3 and abs(report["max"] - max(direct.values())) < 1e-3
    kept = list(report["kept_by_threshold"].values())
    assert kept == sorted(kept, reverse=True)
    assert not list(tmp_path.glob("*.tar"))


def test_transformers_clip_scores_equal_a_direct_computation(shards, tmp_path):
    model, processor = tiny_hf_clip(save_dir=tmp_path / "hf-clip", seed=3)
    tars, samples = input_samples(shards)
    cfg = from_dict(
        FilterConfig,
        {
            "model": {"backend": "transformers", "name": str(tmp_path / "hf-clip")},
            "threshold": -1.0,
            "write": {"path": str(tmp_path / "out")},
        },
    )
    clip_filter.run(cfg, tars, RUNNER)
    kept = written(tmp_path / "out")
    assert len(kept) == 15
    with torch.no_grad():
        for s in samples[:5]:
            pixels = processor(images=Image.open(io.BytesIO(s["jpg"])).convert("RGB"), return_tensors="pt")
            tokens = processor.tokenizer(
                [s["txt"].decode()], padding="max_length", truncation=True, return_tensors="pt"
            )
            a = model.get_image_features(**pixels)
            b = model.get_text_features(**tokens)
            a = a if torch.is_tensor(a) else a.pooler_output
            b = b if torch.is_tensor(b) else b.pooler_output
            score = float(torch.nn.functional.cosine_similarity(a, b))
            assert abs(kept[s["__key__"]].clip.score - score) < 1e-5


@pytest.mark.parametrize(
    "fraction, expected",
    [
        (0.5, ["a", "b", "c"]),  # b and c tie at 0.5 with d: the smaller keys win
        (0.25, ["a", "b"]),
        (1.0, ["a", "b", "c", "d", "e", "f"]),
        (0.01, ["a"]),
    ],
)
def test_top_fraction_is_exact_and_breaks_ties_by_key(fraction, expected):
    scores = [("d", 0.5), ("a", 0.9), ("f", -0.2), ("c", 0.5), ("b", 0.5), ("e", 0.1)]
    with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
        pairs = p | beam.Create(scores)
        cut = pairs | TopFractionCut(fraction)
        kept = pairs | beam.Filter(lambda ks, c: ranks_within(ks[1], ks[0], c), c=beam.pvalue.AsSingleton(cut))
        assert_that(kept | beam.Map(lambda ks: ks[0]), equal_to(expected))
    assert top_count(0.3, 10) == 3 and top_count(0.25, 6) == 2


def test_cli_filters_img2dataset_shards_keeping_their_fields(tiny_checkpoint, tmp_path, capsys):
    from visinstruct.cli.main import main

    shards = tmp_path / "i2d"
    shards.mkdir()
    samples = {}
    for i in range(4):  # img2dataset's layout and JSON fields
        key = f"00000000{i}"
        meta = {
            "url": f"http://x/{i}.jpg",
            "key": key,
            "status": "success",
            "error_message": None,
            "width": 40,
            "height": 30,
            "original_width": 400,
            "original_height": 300,
            "exif": "{}",
            "sha256": "ab" * 32,
            "caption": f"picture {i}",
        }
        samples[key] = {"jpg": _jpeg(), "txt": meta["caption"].encode(), "json": json.dumps(meta).encode()}
    write_tar(shards / "00000.tar", samples)
    config = tmp_path / "filter.yaml"
    config.write_text(
        f"model:\n  name: {TINY_OPEN_CLIP_NAME}\n  pretrained: {tiny_checkpoint / 'tiny.pt'}\n"
        f"  config_file: {tiny_checkpoint / (TINY_OPEN_CLIP_NAME + '.json')}\ntop_fraction: 0.5\n"
    )
    args = [
        "filter",
        "--config",
        str(config),
        "--input",
        str(shards),
        "--out",
        str(tmp_path / "out"),
        "--runner=FnApiRunner",
    ]
    assert main(args + ["--dry-run"]) == 0
    assert "4 pairs scored" in capsys.readouterr().out
    assert main(args) == 0
    assert "filter: 4 rows in 1 shards -> 2 written, 2 rejected" in capsys.readouterr().out
    kept = written(tmp_path / "out")
    assert len(kept) == 2
    for meta in kept.values():
        assert meta.extra["status"] == "success" and meta.extra["exif"] == "{}" and meta.clip is not None
    assert main(["filter", "--config", str(config), "--input", str(tmp_path / "nothing"), "--out", "x"]) == 2


def test_earlier_rejections_stay_in_the_index_and_inputs_are_accounted(tiny_checkpoint, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (50, 40), (60 * i, 90, 200)).save(images / f"{i}.png")
    (images / "3.jpg").write_bytes(b"not an image at all")  # ingest rejects it: decode, not_an_image
    assert (
        ingest(
            from_dict(IngestConfig, {"read": {"path": str(images)}, "write": {"path": str(tmp_path / "in")}}), RUNNER
        )["rejected"]
        == 1
    )
    tars = [str(tmp_path / "in" / "00000.tar")]
    report = clip_filter.run(open_clip_cfg(tiny_checkpoint, tmp_path / "out", threshold=-1.0), tars, RUNNER)
    assert report["inputs_before"] == report["inputs"] == 4 and report["accounted"]
    rows = pq.read_table(tmp_path / "out" / "00000.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["success", "success", "success", "not_an_image"]
    assert report["rejected_by_reason"] == {"not_an_image": 1}


def test_each_model_copy_goes_to_the_gpu_with_the_most_free_memory(monkeypatch):
    """Device choice on machines this suite never runs on: torch's CUDA queries answer as on a 3-GPU worker."""
    import torch

    from visinstruct.transforms.devices import device_type, pick_device, pick_dtype

    free = {0: 2 << 30, 1: 30 << 30, 2: 30 << 30}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(free))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (free[i], 80 << 30))
    assert pick_device("auto") == pick_device("cuda") == "cuda:1"  # most free; a tie goes to the first
    assert pick_device("cuda:2") == "cuda:2" and pick_device("cpu") == "cpu"
    assert device_type("cuda:1") == "cuda" and pick_dtype("auto", "cuda:1") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == "cpu" and pick_dtype("auto", "cpu") == torch.float32
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        pick_device("cuda")


def test_text_only_and_multi_image_samples_pass_the_filter_unscored(tiny_checkpoint, tmp_path):
    """A LLaVA mix's text-only and multi-image samples have no single image to score: kept as they are, while its
    single-image samples are scored and selected (here: the top half of them)."""
    path, root, rows = sample_data.llava_mix_dataset(tmp_path / "src", groups=2)
    cfg = from_dict(
        IngestConfig,
        {
            "read": {"path": str(path), "format": "llava", "image_root": str(root)},
            "write": {"path": str(tmp_path / "in"), "shard_size": 6},
            "resize": {"image_size": 64},
        },
    )
    assert ingest(cfg, RUNNER)["written"] == 12
    tars = sorted(str(p) for p in (tmp_path / "in").glob("*.tar"))
    report = clip_filter.run(open_clip_cfg(tiny_checkpoint, tmp_path / "out", top_fraction=0.5), tars, RUNNER)
    kept = written(tmp_path / "out")
    single = {m.key for m in written(tmp_path / "in").values() if m.n_images == 1}
    carried = {k for k, m in kept.items() if m.n_images != 1}
    assert carried == {m.key for m in written(tmp_path / "in").values() if m.n_images != 1} and len(carried) == 6
    assert all(kept[k].clip is None for k in carried)
    assert len(set(kept) & single) == 3 and all(kept[k].clip is not None for k in set(kept) & single)
    assert report["accounted"] and (report["written"], report["rejected"]) == (9, 3)
    assert set(report["rejected_by_reason"]) == {"clip_not_top_fraction"}
