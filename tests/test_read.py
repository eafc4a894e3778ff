"""Input readers: URL lists in every format with img2dataset's column options, folders, COCO and LLaVA JSON."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from visinstruct.configs import ConfigError, IngestConfig, ReadConfig, from_dict
from visinstruct.pipelines.ingest import run
from visinstruct.schemas import Box, Decision, SampleMeta, Turn
from visinstruct.testing.sample_data import shapes_dataset
from visinstruct.testing.server import encode_test_image
from visinstruct.transforms.read import plan_units, read_unit
from visinstruct.transforms.read_bounds import MAX_CAPTION_CHARS, MAX_ROW_CHARS, InputError

pytestmark = pytest.mark.timeout(300)


def rows(path, **cfg):
    read = ReadConfig(path=str(path), **cfg)
    return [row for fmt, paths in plan_units(read) for row in read_unit(fmt, paths, read)]


def test_csv_tsv_jsonl_txt_parquet_give_the_same_pairs(tmp_path):
    (tmp_path / "a.csv").write_text("url,caption,license\nhttp://x/1.jpg,one,cc\nhttp://x/2.jpg,two,pd\n")
    (tmp_path / "a.tsv").write_text("url\tcaption\tlicense\nhttp://x/1.jpg\tone\tcc\nhttp://x/2.jpg\ttwo\tpd\n")
    (tmp_path / "a.jsonl").write_text(
        '{"url": "http://x/1.jpg", "caption": "one", "license": "cc"}\n\n'
        '{"url": "http://x/2.jpg", "caption": "two", "license": "pd"}\n'
    )
    pq.write_table(
        pa.table({"url": ["http://x/1.jpg", "http://x/2.jpg"], "caption": ["one", "two"], "license": ["cc", "pd"]}),
        tmp_path / "a.parquet",
    )
    expected = None
    for ext in ("csv", "tsv", "jsonl", "parquet"):
        got = [(p.url, p.caption, p.source) for p in rows(tmp_path / f"a.{ext}", save_additional_columns=["license"])]
        expected = expected or got
        assert (
            got
            == expected
            == [("http://x/1.jpg", "one", {"license": "cc"}), ("http://x/2.jpg", "two", {"license": "pd"})]
        )
    (tmp_path / "a.txt").write_text("http://x/1.jpg\n\nhttp://x/2.jpg\n")
    got = [(p.url, p.caption) for p in rows(tmp_path / "a.txt")]
    assert got == [("http://x/1.jpg", None), ("http://x/2.jpg", None)]


def test_custom_column_names_and_globs_in_name_order(tmp_path):
    for name in ("part-2.csv", "part-1.csv"):
        (tmp_path / name).write_text(f"IMG,TEXT\nhttp://x/{name}.jpg,{name}\n")
    pairs = rows(tmp_path / "part-*.csv", url_col="IMG", caption_col="TEXT")
    assert [p.caption for p in pairs] == ["part-1.csv", "part-2.csv"]


def test_malformed_rows_become_bad_rows_not_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text(
        '{"url": "http://x/1.jpg"}\nnot json\n[1, 2]\n{"caption": "no url"}\n'
        '{"url": "  "}\n{"url": "http://x/2.jpg", "caption": 5}\n'
    )
    got = rows(tmp_path / "bad.jsonl")
    assert [r.reason if isinstance(r, Decision) else "ok" for r in got] == [
        "ok",
        "malformed_row",
        "malformed_row",
        "missing_column",
        "missing_url",
        "bad_caption",
    ]
    (tmp_path / "bad.csv").write_text("url,caption\nhttp://x/1.jpg,a\nhttp://x/2.jpg,b,extra\n")
    assert [type(r).__name__ for r in rows(tmp_path / "bad.csv")] == ["ImageTextPair", "Decision"]


def test_a_dropped_row_is_one_dead_letter_row_with_its_url_and_an_excerpt(tmp_path):
    # The read stage's drops become rejected/read-NNNNN.parquet rows: the URL when the row has one, detail.raw always.
    (tmp_path / "bad.jsonl").write_text('not json\n{"url": "http://x/2.jpg", "caption": 5}\n{"caption": "no url"}\n')
    cfg = from_dict(
        IngestConfig, {"read": {"path": str(tmp_path / "bad.jsonl")}, "write": {"path": str(tmp_path / "out")}}
    )
    report = run(cfg, ["--runner=FnApiRunner"])
    assert report["written"] == 0
    assert report["rejected_by_reason"] == {"malformed_row": 1, "bad_caption": 1, "missing_column": 1}
    got = sorted(pq.read_table(tmp_path / "out" / "rejected").to_pylist(), key=lambda r: r["key"])
    assert [(r["stage"], r["key"], r["reason"], r["message"], r["url"], json.loads(r["detail"])) for r in got] == [
        ("read", "000000000", "malformed_row", "line 1 is not a JSON object", None, {"raw": "not json\n"}),
        (
            "read",
            "000000001",
            "bad_caption",
            "column 'caption' is not text",
            "http://x/2.jpg",
            {"raw": '{"url": "http://x/2.jpg", "caption": 5}'},
        ),
        ("read", "000000002", "missing_column", "row has no column 'url'", None, {"raw": '{"caption": "no url"}'}),
    ]


def test_boxes_and_tags_columns_as_lists_or_json_text(tmp_path):
    boxes = [{"category": "dog", "bbox": [0.1, 0.2, 0.5, 0.9]}]
    pq.write_table(
        pa.table({"url": ["http://x/1.jpg"], "boxes": [boxes], "tags": [["animal"]]}), tmp_path / "b.parquet"
    )
    (tmp_path / "b.csv").write_text(
        'url,boxes,tags\nhttp://x/1.jpg,"[{""category"": ""dog"", ""bbox"": [0.1, 0.2, 0.5, 0.9]}]",'
        '"[""animal""]"\nhttp://x/2.jpg,"[{""bbox"": [2, 0, 1, 1]}]",\n'
    )
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
    cfg = from_dict(
        IngestConfig,
        {
            "read": {"path": str(path), **read},
            "write": {"path": str(tmp_path / "out"), "shard_size": 8},
            "resize": {"image_size": 128, "resize_mode": "border", "encode_format": "png"},
        },
    )
    report = run(cfg, ["--runner=FnApiRunner"])
    samples = list(wds.WebDataset([str(p) for p in sorted((tmp_path / "out").glob("*.tar"))], shardshuffle=False))
    return report, [SampleMeta.from_json(s["json"]) for s in samples]


def test_coco_annotations_keep_captions_and_normalised_boxes(tmp_path):
    root = shapes_dataset(tmp_path / "shapes", n=10, seed=3)
    instances = json.loads((root / "annotations" / "instances.json").read_text())
    report, metas = ingest_local(
        tmp_path, root / "annotations" / "*.json", format="coco", image_root=str(root / "images")
    )
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
    entries = [
        {"id": "a", "image": "a.png", "conversations": conversation},
        {"id": "text-only-with-placeholder", "conversations": conversation},
        {"id": "bad", "image": "a.png", "conversations": [{"from": "gpt", "value": "no image token"}]},
        {"id": "missing-file", "image": "nope.png", "conversations": conversation},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(entries))
    report, metas = ingest_local(tmp_path, tmp_path / "llava.json", image_root=str(images))
    assert [m.conversations for m in metas] == [[Turn("human", "<image>\nWhat is this?"), Turn("gpt", "A picture.")]]
    assert metas[0].source == {"llava_id": "a"}
    assert report["rejected_by_reason"] == {"bad_conversation": 2, "file_error": 1}
    assert report["inputs"] == 4 and report["accounted"]


# -- what one row can hold never stops a file (issue 13, class 2) ---------------------------------------------------


def outcomes(got):
    return [r.reason if isinstance(r, Decision) else "ok" for r in got]


@pytest.mark.parametrize("ext, sep", [("csv", ","), ("tsv", "\t")])
def test_a_caption_over_128_kib_is_one_rejected_row_and_the_file_goes_on(tmp_path, ext, sep):
    # Python's csv refuses fields over 128 KiB by default: the whole file used to fail on this one row.
    long_caption = "x" * (130 * 1024)
    path = tmp_path / f"long.{ext}"
    path.write_text(
        f'url{sep}caption\nhttp://x/1.jpg{sep}one\nhttp://x/2.jpg{sep}"{long_caption}"\nhttp://x/3.jpg{sep}three\n'
    )
    got = rows(path)
    assert outcomes(got) == ["ok", "field_too_long", "ok"]
    assert got[1].index["url"] == "http://x/2.jpg" and str(MAX_CAPTION_CHARS) in got[1].message
    assert len(got[1].detail["raw"]) <= 500  # the dead-letter row keeps an excerpt, not the 130 KiB


def test_a_caption_within_the_bound_is_kept_whole(tmp_path):
    caption = "word " * (MAX_CAPTION_CHARS // 5)
    (tmp_path / "ok.csv").write_text(f'url,caption\nhttp://x/1.jpg,"{caption}"\n')
    assert [p.caption for p in rows(tmp_path / "ok.csv")] == [caption]


DELIMITED_CASES = [  # (url cell, caption cell, expected outcome): one row each, in one file
    (b"http://x/ok.jpg", b"fine", "ok"),
    (b"http://x/nul\x00.jpg", b"nul in url", "bad_url"),
    (b"http://x/2.jpg", b"nul \x00 in caption", "bad_caption"),
    (b"http://x/3.jpg", b"latin-1 caf\xe9", "bad_encoding"),
    (b"http://x/\xff\xfe.jpg", b"bad bytes in url", "bad_encoding"),
    (b"http://x/" + b"a" * 10_000 + b".jpg", b"10 KB url", "field_too_long"),
    (b"", b"no url", "missing_url"),
    (b"http://x/last.jpg", b"caf\xc3\xa9", "ok"),
]


@pytest.mark.parametrize("ext, sep", [("csv", b","), ("tsv", b"\t")])
def test_nul_bytes_bad_utf8_and_long_urls_in_csv_cost_their_row_only(tmp_path, ext, sep):
    path = tmp_path / f"hostile.{ext}"
    path.write_bytes(
        b"\xef\xbb\xbfurl"
        + sep
        + b"caption\n"  # a BOM, as spreadsheets write it
        + b"".join(url + sep + caption + b"\n" for url, caption, _ in DELIMITED_CASES)
    )
    got = rows(path)
    assert outcomes(got) == [expected for _, _, expected in DELIMITED_CASES]
    assert got[-1].caption == "café"
    for bad in got[1:-1]:
        bad.detail["raw"].encode("utf-8")  # dead-letter excerpts are valid UTF-8 (parquet refuses anything else)


def test_jsonl_lines_that_are_not_objects_or_not_utf8_cost_their_line_only(tmp_path):
    lines = [
        b'{"url": "http://x/1.jpg", "caption": "one"}',
        b'{"url": "http://x/2.jpg", "caption": "caf\xe9"}',  # latin-1 byte
        b'{"url": "http://x/3.jpg", "caption": "\\ud800 lone surrogate"}',  # valid JSON, not encodable
        b"[" * 100_000 + b"]" * 100_000,  # deep nesting: RecursionError in the parser
        b'{"url": "http://x/4.jpg", "caption": "not closed',
        b'{"url": 12345}',
        b'{"url": "http://x/5.jpg", "caption": ["a", "list"]}',
        b'{"url": "http://x/6.jpg", "caption": "six"}',
    ]
    (tmp_path / "hostile.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    assert outcomes(rows(tmp_path / "hostile.jsonl")) == [
        "ok",
        "bad_encoding",
        "bad_encoding",
        "malformed_row",
        "malformed_row",
        "bad_url",
        "bad_caption",
        "ok",
    ]


def test_parquet_cells_of_the_wrong_type_or_bad_utf8_cost_their_row_only(tmp_path):
    table = pa.table(
        {
            "url": pa.array([b"http://x/1.jpg", b"http://x/\xff.jpg", b"http://x/3.jpg"]).view(pa.string()),
            "caption": ["one", "two", "three"],
            "when": pa.array([0, 1, 2], pa.timestamp("s")),
        }
    )
    pq.write_table(table, tmp_path / "a.parquet")
    got = rows(tmp_path / "a.parquet", save_additional_columns=["when"])
    assert outcomes(got) == ["ok", "bad_encoding", "ok"]
    assert got[0].source == {"when": "1970-01-01 00:00:00"}  # a timestamp kept as text, JSON-safe
    pq.write_table(pa.table({"url": [1, 2], "caption": [["a"], None]}), tmp_path / "b.parquet")
    assert outcomes(rows(tmp_path / "b.parquet")) == ["bad_url", "bad_url"]
    pq.write_table(
        pa.table({"url": ["http://x/1.jpg", "http://x/2.jpg"], "caption": [["a"], None]}), tmp_path / "c.parquet"
    )
    assert outcomes(rows(tmp_path / "c.parquet")) == ["bad_caption", "ok"]


def test_a_line_longer_than_the_row_bound_is_skipped_without_losing_the_rest(tmp_path):
    huge = "y" * (MAX_ROW_CHARS + 10)
    (tmp_path / "a.csv").write_text(f"url,caption\nhttp://x/1.jpg,{huge}\nhttp://x/2.jpg,two\n")
    (tmp_path / "a.jsonl").write_text(
        f'{{"url": "http://x/1.jpg", "caption": "{huge}"}}\n{{"url": "http://x/2.jpg"}}\n'
    )
    (tmp_path / "a.txt").write_text(f"http://x/{huge}\nhttp://x/2.jpg\n")
    for name in ("a.csv", "a.jsonl", "a.txt"):
        got = rows(tmp_path / name)
        assert outcomes(got) == ["field_too_long", "ok"], name
        assert got[1].url == "http://x/2.jpg"


def test_a_quoted_field_over_the_parser_limit_is_one_rejected_row_up_to_where_it_ends(tmp_path):
    # Each physical line is under the bound, the quoted field spanning them is not: the csv parser itself fails
    # on that record (in its second line). Reading resumes after the end of that quoted field, so what is left
    # of it is not read as rows of its own.
    half = "z" * (MAX_ROW_CHARS // 2 + 10)
    (tmp_path / "a.csv").write_text(f'url,caption\nhttp://x/1.jpg,"{half}\n{half}\n{half}"\nhttp://x/2.jpg,two\n')
    got = rows(tmp_path / "a.csv")
    assert outcomes(got) == ["field_too_long", "ok"]
    assert got[1].caption == "two"
    assert "lines 2-4" in got[0].message


@pytest.mark.parametrize("ext, sep", [("csv", ","), ("tsv", "\t")])
def test_url_looking_lines_inside_a_caption_over_the_parser_limit_never_become_rows(tmp_path, ext, sep):
    # The parser fails inside the quoted caption; lines after that point that look like rows must not become
    # pairs (they would be fetched, and shift every later key).
    part = "w" * (MAX_ROW_CHARS // 4)
    caption = "\n".join([part] * 5 + [f"http://evil/x.jpg{sep}pwned", f'http://evil/y.jpg{sep}""quoted""', "end"])
    path = tmp_path / f"a.{ext}"
    path.write_text(
        f'url{sep}caption\nhttp://x/1.jpg{sep}one\nhttp://x/2.jpg{sep}"{caption}"\nhttp://x/3.jpg{sep}three\n'
    )
    got = rows(path)
    assert outcomes(got) == ["ok", "field_too_long", "ok"]
    assert [p.url for p in got if not isinstance(p, Decision)] == ["http://x/1.jpg", "http://x/3.jpg"]


def test_a_quote_that_never_closes_within_the_bound_rejects_the_rest_of_the_file_once(tmp_path):
    part = "v" * (MAX_ROW_CHARS // 4)
    lines = [part if i % 2 else f"http://evil/{i}.jpg,caption {i}" for i in range(24)]
    (tmp_path / "a.csv").write_text(
        'url,caption\nhttp://x/1.jpg,one\nhttp://x/2.jpg,"never closed\n'
        + "\n".join(lines)
        + "\nhttp://x/3.jpg,three\n"
    )
    got = rows(tmp_path / "a.csv")
    assert outcomes(got) == ["ok", "field_too_long", "unreadable_file"]  # the rows before it are kept
    assert "reading stopped at line" in got[2].message and "line 3" in got[2].message


def test_a_planted_bug_in_one_row_is_that_rows_internal_error(tmp_path, monkeypatch):
    from visinstruct.transforms import read_lists

    real = read_lists.pair_problem

    def buggy(pair):
        if pair.url.endswith("boom.jpg"):
            raise RuntimeError("planted bug")
        return real(pair)

    monkeypatch.setattr(read_lists, "pair_problem", buggy)
    (tmp_path / "a.csv").write_text("url,caption\nhttp://x/1.jpg,a\nhttp://x/boom.jpg,b\nhttp://x/3.jpg,c\n")
    got = rows(tmp_path / "a.csv")
    assert outcomes(got) == ["ok", "internal_error", "ok"]
    assert got[1].message == "RuntimeError: planted bug" and "boom.jpg" in got[1].detail["raw"]


def test_a_compressed_file_cut_short_or_corrupt_keeps_its_rows_and_says_where_it_stopped(tmp_path):
    import gzip

    body = gzip.compress(b"".join(b'{"url": "http://x/%d.jpg"}\n' % i for i in range(20_000)))
    (tmp_path / "cut.jsonl.gz").write_bytes(body[: len(body) // 2])  # Beam reads a cut gzip to where it ends
    got = outcomes(rows(tmp_path / "cut.jsonl.gz", format="jsonl"))
    assert 1000 < got.count("ok") < 20_000 and set(got[got.count("ok") :]) <= {"malformed_row"}  # the cut line
    mid = len(body) // 2
    corrupt = body[:mid] + bytes(b ^ 0x55 for b in body[mid : mid + 64]) + body[mid + 64 :]
    (tmp_path / "b-corrupt.jsonl.gz").write_bytes(corrupt)  # zlib raises while reading it
    (tmp_path / "a-good.jsonl.gz").write_bytes(gzip.compress(b'{"url": "http://x/a.jpg"}\n'))
    got = rows(tmp_path / "[ab]-*.jsonl.gz", format="jsonl")
    assert outcomes(got)[0] == "ok" and got[-1].reason == "unreadable_file"
    assert "b-corrupt.jsonl.gz: reading stopped after" in got[-1].message and "error" in got[-1].message
    with pytest.raises(InputError, match="b-corrupt.jsonl.gz: cannot read it as jsonl"):
        rows(tmp_path / "b-*.jsonl.gz", format="jsonl")  # the first file is checked when the run is planned


def test_coco_llava_and_folder_entries_that_do_not_fit_cost_themselves_only(tmp_path):
    coco = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 0, "height": 10},  # zero width: no box math
            {"file_name": "no-id.jpg"},
            {"id": 2, "file_name": "b.jpg", "width": 10, "height": 10},
            "not an object",
        ],
        "annotations": [
            {"image_id": 1, "bbox": [1, 1, 2, 2], "category_id": 1},
            {"image_id": [2], "caption": "unhashable id"},
            {"image_id": 2, "caption": "two"},
        ],
        "categories": [{"id": 1, "name": "dot"}],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    assert outcomes(rows(tmp_path / "coco.json")) == [
        "bad_box",
        "ok",
        "malformed_row",
        "malformed_row",
        "malformed_row",
    ]
    conversation = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A dot."}]
    entries = [
        {"id": "a", "image": "a.png", "conversations": conversation},
        "not an object",
        {"id": "b", "image": "b.png", "conversations": "not a list"},
        {
            "id": "c",
            "image": "c.png",
            "conversations": [{"from": "human", "value": "<image>\n\udcff"}, {"from": "gpt", "value": "x"}],
        },
    ]
    (tmp_path / "llava.json").write_bytes(json.dumps(entries, ensure_ascii=False).encode("utf-8", "surrogateescape"))
    assert outcomes(rows(tmp_path / "llava.json", format="llava")) == [
        "ok",
        "malformed_row",
        "bad_conversation",
        "bad_encoding",
    ]
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        (folder / name).write_bytes(encode_test_image("png"))
    (folder / "a.txt").write_bytes(b"caf\xe9")
    with open(os.path.join(os.fsencode(folder), b"c\xff.png"), "wb") as f:  # a file name that is not UTF-8
        f.write(encode_test_image("png"))
    assert outcomes(rows(folder)) == ["bad_encoding", "ok", "bad_encoding"]


# -- a column the input lacks fails before anything runs (issue 13, class 3) ----------------------------------------


def write_table_as(path, ext):
    data = {"url": ["http://x/1.jpg"], "caption": ["one"], "width": [64]}
    if ext == "parquet":
        pq.write_table(pa.table(data), path)
    elif ext == "jsonl":
        path.write_text(json.dumps({k: v[0] for k, v in data.items()}) + "\n")
    else:
        sep = "," if ext == "csv" else "\t"
        path.write_text(sep.join(data) + "\n" + sep.join(str(v[0]) for v in data.values()) + "\n")


@pytest.mark.parametrize("ext", ["parquet", "csv", "tsv", "jsonl"])
def test_a_named_column_missing_from_the_input_is_one_error_listing_the_columns(tmp_path, ext, caplog):
    write_table_as(tmp_path / f"urls.{ext}", ext)
    for option, value in [
        ("url_col", "link"),
        ("caption_col", "text"),
        ("boxes_col", "objects"),
        ("save_additional_columns", ["licence"]),
    ]:
        column = value[0] if isinstance(value, list) else value
        cfg = ReadConfig(path=str(tmp_path / f"urls.{ext}"), **{option: value})
        if ext == "jsonl" and option in ("boxes_col", "save_additional_columns"):
            plan_units(cfg)  # optional columns may appear in later objects only: a warning, not an error
            assert f"read.{option}: column {column!r} not in the first 100 objects of urls.jsonl" in caplog.text
            continue
        with pytest.raises(InputError) as caught:
            plan_units(cfg)
        assert str(caught.value) == (
            f"read.{option}: column {column!r} not in urls.{ext} (columns: url, caption, width)"
        )
    assert len(rows(tmp_path / f"urls.{ext}", caption_col="caption")) == 1
    (tmp_path / "nocaption.csv").write_text("url\nhttp://x/1.jpg\n")  # the default caption column is optional
    assert [p.caption for p in rows(tmp_path / "nocaption.csv")] == [None]


def test_jsonl_optional_columns_first_seen_after_the_sampled_objects_are_read(tmp_path):
    objects = [{"url": f"http://x/{i}.jpg"} for i in range(150)]
    objects[120] |= {"boxes": [{"category": "dog", "bbox": [0, 0, 1, 1]}], "tags": ["animal"], "licence": "cc"}
    (tmp_path / "late.jsonl").write_text("".join(json.dumps(o) + "\n" for o in objects))
    got = rows(tmp_path / "late.jsonl", boxes_col="boxes", tags_col="tags", save_additional_columns=["licence"])
    assert outcomes(got) == ["ok"] * 150
    assert (got[120].boxes, got[120].tags, got[120].source) == (
        [Box("dog", [0, 0, 1, 1])],
        ["animal"],
        {"licence": "cc"},
    )
    assert (got[0].boxes, got[0].tags, got[0].source) == ([], [], {})


def test_a_wrong_url_col_stops_ingest_before_it_writes_anything(tmp_path):
    write_table_as(tmp_path / "urls.parquet", "parquet")
    cfg = from_dict(
        IngestConfig,
        {
            "read": {"path": str(tmp_path / "urls.parquet"), "url_col": "link"},
            "write": {"path": str(tmp_path / "out")},
        },
    )
    with pytest.raises(ConfigError, match="read.url_col: column 'link' not in urls.parquet"):
        run(cfg, ["--runner=FnApiRunner"])
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_command_line_says_so_in_one_line_and_exits_2(tmp_path, capsys):
    from visinstruct.cli.main import main

    write_table_as(tmp_path / "urls.csv", "csv")
    (tmp_path / "ingest.yaml").write_text(
        f"read: {{path: {tmp_path / 'urls.csv'}, url_col: link}}\nwrite: {{path: {tmp_path / 'out'}}}\n"
    )
    assert main(["ingest", "--config", str(tmp_path / "ingest.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "visinstruct ingest: error: read.url_col: column 'link' not in urls.csv (columns: url, caption, width)"
    )


@pytest.mark.parametrize("sep", [",", "\t"])
def test_the_quote_tracker_ends_records_where_the_csv_parser_does(sep):
    # The recovery after a parser error skips to where the failed record ends: the tracker must agree with the
    # parser on that, for any mix of quotes, escaped quotes, delimiters and line ends (seeded, 3000 texts).
    import csv
    import random

    from visinstruct.transforms.read_bounds import still_quoted

    rng = random.Random(7)
    for _ in range(3000):
        text = "".join(rng.choice(["a", sep, '"', '"', "\n", "\r\n", "b"]) for _ in range(rng.randrange(1, 40)))
        lines = text.splitlines(keepends=True)
        taken: list[str] = []
        fed = (taken.append(line) or line for line in lines)
        parser_ends = [len(taken) for _ in csv.reader(fed, delimiter=sep)]
        tracker_ends, inside = [], False
        for number, line in enumerate(lines, 1):
            inside = still_quoted(line, sep, inside)
            if not inside or number == len(lines):
                tracker_ends.append(number)
        assert tracker_ends == parser_ends, repr(text)
