"""Every LLaVA row shape (issue 18): single-image, several rows about one image, multi-image and text-only rows of a
mix665k-shaped JSON ingest with zero rejections into the shard format FORMAT.md describes."""

import hashlib
import json
import os
from dataclasses import replace

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from visinstruct.configs import IngestConfig, from_dict
from visinstruct.pipelines.ingest import run
from visinstruct.schemas import SampleMeta, Turn
from visinstruct.testing.sample_data import llava_mix_dataset
from visinstruct.transforms.layout import image_members, shard_in

pytestmark = pytest.mark.timeout(600)
RUNNER = ["--runner=FnApiRunner"]


def ingest_mix(tmp_path, groups=2, out="out", **dedup):
    path, root, rows = llava_mix_dataset(tmp_path / "src", groups=groups)
    cfg = from_dict(
        IngestConfig,
        {
            "read": {"path": str(path), "format": "llava", "image_root": str(root)},
            "write": {"path": str(tmp_path / out), "shard_size": 5},
            "resize": {"image_size": 64, "resize_mode": "border", "encode_format": "jpg"},
            "dedup": {"phash_max_distance": 4, **dedup},
        },
    )
    return run(cfg, RUNNER), rows, root


def samples(out):
    return list(wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False, empty_check=False))


def test_a_mix665k_shaped_json_ingests_with_zero_rejections(tmp_path):
    report, rows, root = ingest_mix(tmp_path)
    assert report["inputs"] == len(rows) == 12 and report["written"] == 12 and report["rejected"] == 0
    assert report["accounted"]
    got = samples(tmp_path / "out")
    assert len(got) == 12
    for sample, row in zip(got, rows):  # keys follow the input order
        meta = SampleMeta.from_json(sample["json"])
        assert meta.conversations == [Turn(t["from"], t["value"]) for t in row["conversations"]]
        assert meta.source["llava_id"] == row["id"]
        names = row.get("image")
        names = [] if names is None else [names] if isinstance(names, str) else names
        members = image_members(sample)
        assert len(members) == len(names) == meta.n_images
        if len(names) == 1:  # single image: the plain member and the top-level sizes, as before
            assert members == ["jpg"] and meta.image_count is None and meta.path == str(root / names[0])
            assert meta.source.get("llava_image_list", False) == isinstance(row["image"], list)
        elif names:  # several: numbered members in placeholder order, each described in `images`
            assert members == [f"{i}.jpg" for i in range(len(names))]
            assert [i.member for i in meta.images] == members
            assert [i.path for i in meta.images] == [str(root / n) for n in names]
            for info, name in zip(meta.images, names):
                assert info.sha256 == hashlib.sha256((root / name).read_bytes()).hexdigest()
            assert meta.sha256 is None and meta.width is None
        else:  # text-only: no image member at all
            assert meta.image_count == 0 and not any(k.endswith(("jpg", "png", "webp")) for k in sample)
            assert meta.source["llava_fields"] == {"model": ""}
    index = pq.read_table(sorted((tmp_path / "out").glob("*.parquet"))).to_pylist()
    assert [r["image_count"] for r in index] == [1, 1, 1, 2, 3, 0] * 2
    assert [r["turns"] for r in index] == [2, 2, 4, 2, 4, 4] * 2
    assert all(len(r["image_sha256s"]) == r["image_count"] for r in index if r["image_count"] > 1)


def test_rows_sharing_an_image_are_not_deduplicated_but_reference_images_still_leak_nowhere(tmp_path):
    # rows 0, 1 and 4 of each group use the same image file; a caption row would lose to the smallest key
    report, rows, root = ingest_mix(tmp_path, reference_dir=str(root_of(tmp_path)))
    by_reason = report["rejected_by_reason"]
    # every row showing a reference image (the first group's second image, in rows 2 and 4) is dropped, whether
    # its image is the only one or one of three
    assert by_reason == {"near_reference": 2} and report["written"] == 10


def root_of(tmp_path):
    _, root, _ = llava_mix_dataset(tmp_path / "ref-src", groups=2)
    ref = tmp_path / "refs"
    ref.mkdir()
    (ref / "ref.jpg").write_bytes((root / "coco" / "000001.jpg").read_bytes())
    return ref


def test_rows_asking_about_one_image_url_download_it_each_and_a_failing_image_names_its_place(tmp_path):
    """LLaVA rows may name images by URL: rows sharing a URL are not URL-deduplicated (each is its own sample),
    and a multi-image row whose second image fails is rejected saying which image."""
    from visinstruct.testing.server import ImageServer, encode_test_image

    ask = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A card."}]
    two = [{"from": "human", "value": "<image> and <image>?"}, {"from": "gpt", "value": "Two cards."}]
    with ImageServer() as srv:
        a = srv.add_image("/a.jpg", encode_test_image("jpeg", (80, 60)))
        b = srv.add_image("/b.jpg", encode_test_image("jpeg", (90, 70)))
        rows = [
            {"id": 1, "image": a, "conversations": ask},
            {"id": 2, "image": a, "conversations": ask[:1] + [{"from": "gpt", "value": "A test card."}]},
            {"id": 3, "image": [a, b], "conversations": two},
            {"id": 4, "image": [b, srv.url("/missing.jpg")], "conversations": two},
        ]
        (tmp_path / "rows.json").write_text(json.dumps(rows))
        cfg = from_dict(
            IngestConfig,
            {
                "read": {"path": str(tmp_path / "rows.json"), "format": "llava"},
                "write": {"path": str(tmp_path / "out"), "shard_size": 8},
                "download": {"allow_loopback": True, "retries": 0, "timeout": 2.0, "per_host_rps": None},
                "resize": {"image_size": 64},
            },
        )
        report = run(cfg, RUNNER)
    assert (report["written"], report["rejected_by_reason"]) == (3, {"http_404": 1}) and report["accounted"]
    dead = pq.read_table(tmp_path / "out" / "rejected").to_pylist()
    assert dead[0]["message"].startswith("image 2 of 2: ") and dead[0]["url"].endswith("/missing.jpg")
    metas = [SampleMeta.from_json(s["json"]) for s in samples(tmp_path / "out")]
    assert [m.source["llava_id"] for m in metas] == [1, 2, 3]
    assert metas[0].sha256 == metas[1].sha256 == metas[2].images[0].sha256 and metas[0].url == a
    assert [i.url for i in metas[2].images] == [a, b]


def test_every_shape_is_byte_identical_on_rerun_and_a_resumed_run_redoes_only_what_is_missing(tmp_path):
    ingest_mix(tmp_path, out="a")
    ingest_mix(tmp_path, out="b")
    tars = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert tars == sorted(p.name for p in (tmp_path / "b").glob("*.tar")) and len(tars) == 3
    for name in tars:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # a killed run: the last shard's stats never landed; the rerun redoes it and loses nothing to dedup
    out = tmp_path / "a"
    before = (out / tars[-1]).read_bytes()
    os.unlink(shard_in(str(out), len(tars) - 1).stats)
    resumed, _, _ = ingest_mix(tmp_path, out="a")
    assert (resumed["written"], resumed["rejected"]) == (12, 0) and (out / tars[-1]).read_bytes() == before


def test_the_ingested_mix_validates_exports_back_to_its_json_and_the_tiny_llava_trains_on_it(tmp_path):
    """Issue 18's whole path: a mix665k-shaped JSON -> shards (zero rejections) -> validate -> LLaVA JSON equal to
    the input but for image paths -> the tiny LLaVA trains on the shards, every shape used, none skipped."""
    from visinstruct.cli.main import main
    from visinstruct.configs import CONFIG_DIR, LlavaTrainConfig, load
    from visinstruct.trainer import llava_train

    report, rows, _ = ingest_mix(tmp_path, groups=8)
    assert (report["written"], report["rejected"]) == (48, 0)
    out = tmp_path / "out"
    assert main(["validate", str(out)]) == 0
    assert main(["export", str(out), "--out", str(tmp_path / "llava"), "--format", "llava"]) == 0
    exported = json.loads((tmp_path / "llava" / "llava.json").read_text())
    assert [{k: v for k, v in r.items() if k != "image"} for r in exported] == [
        {k: v for k, v in r.items() if k != "image"} for r in rows
    ]
    assert [type(r.get("image")) for r in exported] == [type(r.get("image")) for r in rows]

    steps = 24
    cfg = load(
        LlavaTrainConfig,
        CONFIG_DIR / "train" / "llava_tiny.yaml",
        [f"data.shards={out}", f"out={tmp_path / 'model'}", f"steps={steps}", "log_every=1", "data.num_workers=1"],
    )
    summary = llava_train.train(cfg)
    assert summary["step"] == steps and summary["skipped"] == {}
    records = [json.loads(line) for line in (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == steps and sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses


def test_only_conversations_the_input_came_with_exempt_a_row_from_image_dedup():
    from visinstruct.schemas import IndexRow
    from visinstruct.transforms.dedup import hash_record

    row = IndexRow("000000000", "success", sha256="ab" * 32, phash="0f" * 8, image_count=1)
    assert hash_record(row) == (row.key, row.sha256, row.phash, (row.phash,))
    ingested = replace(row, turns=2)  # a LLaVA row's own conversation: checked against references only
    assert hash_record(ingested) == (row.key, None, None, (row.phash,))
    generated = replace(row, turns=4, conversation_kind="detail")  # a build's generate rewrote the index since
    assert hash_record(generated) == hash_record(row)
    multi = IndexRow("000000001", "success", image_count=2, image_phashes=["01" * 8, "02" * 8], turns=2)
    assert hash_record(multi) == (multi.key, None, None, ("01" * 8, "02" * 8))


def test_hostile_multi_image_rows_cost_themselves_only_and_takedowns_reach_every_image(tmp_path):
    """A multi-image row's image names are held to a row's bounds; a takedown of any one of its images, by URL or
    path at ingest or by `remove` later, takes the sample out, and a rebuild from the removal's index keeps it out."""
    from visinstruct.cli.main import main

    _, root, rows = llava_mix_dataset(tmp_path / "src", groups=1)
    two = rows[3]["conversations"]  # the two-image row's conversation
    hostile = [
        {"id": "bad-name", "image": [rows[3]["image"][0], "\udc80.jpg"], "conversations": two},
        {
            "id": "too-many",
            "image": [rows[3]["image"][0]] * 300,
            "conversations": [{"from": "human", "value": "<image>" * 300}, {"from": "gpt", "value": "Many."}],
        },
    ]
    path = tmp_path / "rows.json"
    path.write_bytes(json.dumps(rows + hostile, ensure_ascii=False).encode("utf-8", "surrogateescape"))
    second = str(root / rows[3]["image"][1])  # the two-image row's second image, by path
    (tmp_path / "takedown.txt").write_text(second + "\n")

    def run_ingest(out, takedown):
        cfg = {
            "read": {"path": str(path), "format": "llava", "image_root": str(root)},
            "write": {"path": str(tmp_path / out), "shard_size": 4},
            "resize": {"image_size": 64},
            "dedup": {"takedown_lists": takedown},
        }
        return run(from_dict(IngestConfig, cfg), RUNNER)

    report = run_ingest("taken", [str(tmp_path / "takedown.txt")])
    assert report["rejected_by_reason"] == {"bad_encoding": 1, "too_many_images": 1, "takedown": 1}
    assert report["written"] == 5 and report["accounted"]

    report = run_ingest("out", [])
    assert report["written"] == 6 and report["accounted"]
    assert main(["remove", str(tmp_path / "out"), "--urls", str(tmp_path / "takedown.txt"), "--json"]) == 0
    index = pq.read_table(sorted((tmp_path / "out").glob("*.parquet"))).to_pylist()
    gone = [r for r in index if r["status"] == "takedown"]
    assert len(gone) == 1 and gone[0]["image_locations"] == [second]  # the image taken down, not its companion
    # a rebuild honouring the removal keeps out that sample, and not the three-image one sharing its first image
    again = run_ingest("rebuilt", [str(tmp_path / "out" / "0*.parquet")])
    assert again["rejected_by_reason"]["takedown"] == 1 and again["written"] == 5


def test_image_names_that_leave_the_image_root_are_unsafe_paths_not_reads(tmp_path):
    """A downloaded LLaVA JSON must not make ingest read the user's own files: with read.image_root set, a name that
    climbs out of it or points elsewhere is dead-lettered `unsafe_path`, in single- and multi-image rows alike."""
    _, root, rows = llava_mix_dataset(tmp_path / "src", groups=1)
    secret = tmp_path / "secret.jpg"
    secret.write_bytes((root / rows[0]["image"]).read_bytes())  # an image the user never meant to share
    ask = rows[0]["conversations"]
    entries = [
        {"id": "inside", "image": str(root / rows[0]["image"]), "conversations": ask},  # absolute, but inside
        {"id": "climbs", "image": "../secret.jpg", "conversations": ask},
        {"id": "elsewhere", "image": str(secret), "conversations": ask},
        {
            "id": "second-climbs",
            "image": [rows[3]["image"][0], "coco/../../secret.jpg"],
            "conversations": rows[3]["conversations"],
        },
    ]
    (tmp_path / "rows.json").write_text(json.dumps(entries))
    cfg = {
        "read": {"path": str(tmp_path / "rows.json"), "format": "llava", "image_root": str(root)},
        "write": {"path": str(tmp_path / "out"), "shard_size": 4},
        "resize": {"image_size": 64},
    }
    report = run(from_dict(IngestConfig, cfg), RUNNER)
    assert (report["written"], report["rejected_by_reason"]) == (1, {"unsafe_path": 3}) and report["accounted"]
    dead = pq.read_table(tmp_path / "out" / "rejected").to_pylist()
    assert all("is not inside read.image_root" in r["message"] for r in dead)
