"""Input readers: URL lists in every format with img2dataset's column options, folders, COCO and LLaVA JSON."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from visinstruct.configs import IngestConfig, ReadConfig, from_dict
from visinstruct.pipelines.ingest import run
from visinstruct.schemas import Box, SampleMeta, Turn
from visinstruct.testing.sample_data import shapes_dataset
from visinstruct.testing.server import encode_test_image
from visinstruct.transforms.read import BadRow, InputError, plan_units, read_unit

pytestmark = pytest.mark.timeout(300)


def rows(path, **cfg):
    read = ReadConfig(path=str(path), **cfg)
    return [row for fmt, paths in plan_units(read) for row in read_unit(fmt, paths, read)]


def test_csv_tsv_jsonl_txt_parquet_give_the_same_pairs(tmp_path):
    (tmp_path / "a.csv").write_text("url,caption,license\nhttp://x/1.jpg,one,cc\nhttp://x/2.jpg,two,pd\n")
    (tmp_path / "a.tsv").write_text("url\tcaption\tlicense\nhttp://x/1.jpg\tone\tcc\nhttp://x/2.jpg\ttwo\tpd\n")
    (tmp_path / "a.jsonl").write_text('{"url": "http://x/1.jpg", "caption": "one", "license": "cc"}\n\n'
                                      '{"url": "http://x/2.jpg", "caption": "two", "license": "pd"}\n')
    pq.write_table(pa.table({"url": ["http://x/1.jpg", "http://x/2.jpg"], "caption": ["one", "two"],
                             "license": ["cc", "pd"]}), tmp_path / "a.parquet")
    expected = None
    for ext in ("csv", "tsv", "jsonl", "parquet"):
        got = [(p.url, p.caption, p.source) for p in rows(tmp_path / f"a.{ext}", save_additional_columns=["license"])]
        expected = expected or got
        assert got == expected == [("http://x/1.jpg", "one", {"license": "cc"}), ("http://x/2.jpg", "two",
                                                                                 {"license": "pd"})]
    (tmp_path / "a.txt").write_text("http://x/1.jpg\n\nhttp://x/2.jpg\n")
    got = [(p.url, p.caption) for p in rows(tmp_path / "a.txt")]
    assert got == [("http://x/1.jpg", None), ("http://x/2.jpg", None)]


def test_custom_column_names_and_globs_in_name_order(tmp_path):
    for name in ("part-2.csv", "part-1.csv"):
        (tmp_path / name).write_text(f"IMG,TEXT\nhttp://x/{name}.jpg,{name}\n")
    pairs = rows(tmp_path / "part-*.csv", url_col="IMG", caption_col="TEXT")
    assert [p.caption for p in pairs] == ["part-1.csv", "part-2.csv"]


def test_malformed_rows_become_bad_rows_not_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"url": "http://x/1.jpg"}\nnot json\n[1, 2]\n{"caption": "no url"}\n'
                                        '{"url": "  "}\n{"url": "http://x/2.jpg", "caption": 5}\n')
    got = rows(tmp_path / "bad.jsonl")
    assert [r.reason if isinstance(r, BadRow) else "ok" for r in got] == [
        "ok", "malformed_row", "malformed_row", "missing_url", "missing_url", "bad_caption"]
    (tmp_path / "bad.csv").write_text("url,caption\nhttp://x/1.jpg,a\nhttp://x/2.jpg,b,extra\n")
    assert [type(r).__name__ for r in rows(tmp_path / "bad.csv")] == ["ImageTextPair", "BadRow"]


def test_boxes_and_tags_columns_as_lists_or_json_text(tmp_path):
    boxes = [{"category": "dog", "bbox": [0.1, 0.2, 0.5, 0.9]}]
    pq.write_table(pa.table({"url": ["http://x/1.jpg"], "boxes": [boxes], "tags": [["animal"]]}),
                   tmp_path / "b.parquet")
    (tmp_path / "b.csv").write_text(
        'url,boxes,tags\nhttp://x/1.jpg,"[{""category"": ""dog"", ""bbox"": [0.1, 0.2, 0.5, 0.9]}]",'
        '"[""animal""]"\nhttp://x/2.jpg,"[{""bbox"": [2, 0, 1, 1]}]",\n')
    for name in ("b.parquet", "b.csv"):
        first = rows(tmp_path / name, boxes_col="boxes", tags_col="tags")[0]
        assert (first.boxes, first.tags) == ([Box("dog", [0.1, 0.2, 0.5, 0.9])], ["animal"])
    assert rows(tmp_path / "b.csv", boxes_col="boxes")[1].reason == "bad_box"


def test_unreadable_inputs_fail_with_one_line(tmp_path):
    with pytest.raises(InputError, match="no input file matches"):
        rows(tmp_path / "missing-*.parquet")
    (tmp_path / "x.weird").write_text("?")
    with pytest.raises(InputError, match="set read.format"):
        rows(tmp_path / "x.weird")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        rows(tmp_path / "broken.json")


def test_folder_source_pairs_images_with_sidecar_captions(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.jpg").write_bytes(encode_test_image("jpeg"))
    (tmp_path / "a.txt").write_text("caption a\n")
    (tmp_path / "b" / "c.png").write_bytes(encode_test_image("png"))
    (tmp_path / "notes.md").write_text("ignored")
    got = rows(tmp_path)
    assert [(p.path.split("/")[-1], p.caption) for p in got] == [("a.jpg", "caption a"), ("c.png", None)]


def ingest_local(tmp_path, path, **read):
    cfg = from_dict(IngestConfig, {"read": {"path": str(path), **read},
                                   "write": {"path": str(tmp_path / "out"), "shard_size": 8},
                                   "resize": {"image_size": 128, "resize_mode": "border", "encode_format": "png"}})
    report = run(cfg, ["--runner=FnApiRunner"])
    samples = list(wds.WebDataset([str(p) for p in sorted((tmp_path / "out").glob("*.tar"))], shardshuffle=False))
    return report, [SampleMeta.from_json(s["json"]) for s in samples]


def test_coco_annotations_keep_captions_and_normalised_boxes(tmp_path):
    root = shapes_dataset(tmp_path / "shapes", n=10, seed=3)
    instances = json.loads((root / "annotations" / "instances.json").read_text())
    report, metas = ingest_local(tmp_path, root / "annotations" / "*.json", format="coco",
                                 image_root=str(root / "images"))
    assert report["written"] == 10 and report["accounted"]
    captions = json.loads((root / "annotations" / "captions.json").read_text())["annotations"]
    assert [m.caption for m in metas] == [c["caption"] for c in captions]
    first = [a for a in instances["annotations"] if a["image_id"] == 1]
    names = {c["id"]: c["name"] for c in instances["categories"]}
    x, y, w, h = first[0]["bbox"]
    assert metas[0].boxes[0] == Box(names[first[0]["category_id"]], [x / 256, y / 256, (x + w) / 256, (y + h) / 256])
    assert len(metas[0].boxes) == len(first) and metas[0].source == {"coco_id": 1}


def test_llava_json_keeps_conversations_and_rejects_bad_entries(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "a.png").write_bytes(encode_test_image("png"))
    conversation = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A picture."}]
    entries = [{"id": "a", "image": "a.png", "conversations": conversation},
               {"id": "text-only", "conversations": conversation},
               {"id": "bad", "image": "a.png", "conversations": [{"from": "gpt", "value": "no image token"}]},
               {"id": "missing-file", "image": "nope.png", "conversations": conversation}]
    (tmp_path / "llava.json").write_text(json.dumps(entries))
    report, metas = ingest_local(tmp_path, tmp_path / "llava.json", image_root=str(images))
    assert [m.conversations for m in metas] == [[Turn("human", "<image>\nWhat is this?"), Turn("gpt", "A picture.")]]
    assert metas[0].source == {"llava_id": "a"}
    assert report["rejected_by_reason"] == {"bad_conversation": 1, "file_error": 1, "missing_url": 1}
    assert report["inputs"] == 4 and report["accounted"]
