"""Hugging Face ``datasets`` in and out.

``visinstruct export --format hf`` writes what ``datasets.load_from_disk`` and ``load_dataset("parquet")`` read:
an ``Image`` column holding each tar member's bytes unchanged, conversations as ``[{from, value}]``, the JSON member
as text, byte-identical on a rerun. ``read.format: hf`` ingests such a dataset (or parquet files) back without a
download: same samples, their original bytes' sha256 the exported members', same conversations, nothing rejected;
rows that cannot be used become dead letters with a reason. The shards come from our real ingest of LLaVA JSON.
"""

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from visinstruct.cli.export import HF_COLUMNS, export_hf
from visinstruct.cli.main import main
from visinstruct.configs import ConfigError, IngestConfig, ReadConfig, from_dict
from visinstruct.pipelines.ingest import run as ingest
from visinstruct.schemas import ImageTextPair, Turn
from visinstruct.testing.server import encode_test_image
from visinstruct.transforms.layout import ShardError, resolve_shards
from visinstruct.transforms.read import plan_units, read_unit
from visinstruct.transforms.read_bounds import InputError
from visinstruct.transforms.read_hf import hf_pair

pytestmark = pytest.mark.timeout(300)
RUNNER = ["--runner=FnApiRunner"]
SAMPLES = 6
RESIZE = {"image_size": 32, "resize_mode": "border", "encode_format": "png"}


def conversation(i: int) -> list[dict]:
    """A different conversation per sample; odd samples have two rounds."""
    turns = [
        {"from": "human", "value": f"<image>\nHow wide is picture {i}?"},
        {"from": "gpt", "value": f"{40 + 8 * i} pixels."},
    ]
    if i % 2:
        turns += [{"from": "human", "value": "And its height?"}, {"from": "gpt", "value": "40 pixels."}]
    return turns


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Our ingest of a LLaVA JSON of six PNGs (40+8i by 40 pixels): two shards, every sample written."""
    root = tmp_path_factory.mktemp("llava")
    (root / "images").mkdir()
    for i in range(SAMPLES):
        (root / "images" / f"{i}.png").write_bytes(encode_test_image("png", (40 + 8 * i, 40)))
    entries = [{"id": f"s{i}", "image": f"{i}.png", "conversations": conversation(i)} for i in range(SAMPLES)]
    (root / "llava.json").write_text(json.dumps(entries))
    cfg = from_dict(
        IngestConfig,
        {
            "read": {"path": str(root / "llava.json"), "format": "llava", "image_root": str(root / "images")},
            "write": {"path": str(root / "out"), "shard_size": 4},
            "resize": RESIZE,
        },
    )
    assert ingest(cfg, RUNNER)["written"] == SAMPLES
    return root / "out"


def tar_samples(folder: Path) -> dict[str, dict]:
    """Every sample of the folder's tars, read by webdataset: key -> {png, json}."""
    tars = sorted(str(p) for p in folder.glob("*.tar"))
    return {s["__key__"]: s for s in wds.WebDataset(tars, shardshuffle=False)}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def exported(shards, tmp_path_factory) -> Path:
    """``visinstruct export SHARDS --format hf --out OUT``."""
    out = tmp_path_factory.mktemp("hf") / "export"
    assert main(["export", str(shards), "--format", "hf", "--out", str(out)]) == 0
    return out


# ---------------------------------------------------------------------------------------------------------------------
# export --format hf


def test_load_from_disk_reads_every_sample_with_its_image_bytes_unchanged(shards, exported):
    members = tar_samples(shards)
    dataset = datasets.load_from_disk(str(exported))
    assert isinstance(dataset.features["image"], datasets.Image)
    assert dataset.column_names == list(HF_COLUMNS) and dataset.num_rows == SAMPLES
    rows = list(dataset.cast_column("image", datasets.Image(decode=False)))
    assert [r["key"] for r in rows] == sorted(members)
    for row in rows:
        member = members[row["key"]]
        meta = json.loads(member["json"])
        assert sha256(row["image"]["bytes"]) == sha256(member["png"]) and row["image"]["path"] == f"{row['key']}.png"
        assert row["conversations"] == meta["conversations"] and json.loads(row["metadata"]) == meta
        assert (row["sha256"], row["path"], row["shard"]) == (meta["sha256"], meta["path"], row["key"][:5])
    assert dataset[0]["image"].size == (32, 32)  # decoded by datasets' own Image feature


def test_the_parquet_files_load_with_the_image_feature(shards, exported, tmp_path):
    files = sorted(str(p) for p in (exported / "parquet").glob("*.parquet"))
    assert [Path(f).name for f in files] == ["data-00000-of-00001.parquet"]
    assert b"huggingface" in pq.read_schema(files[0]).metadata  # where datasets keeps the features
    loaded = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "cache"))
    assert loaded.features == datasets.load_from_disk(str(exported)).features
    members = tar_samples(shards)
    rows = list(loaded.cast_column("image", datasets.Image(decode=False)))
    assert {r["key"]: sha256(r["image"]["bytes"]) for r in rows} == {k: sha256(m["png"]) for k, m in members.items()}
    assert [r["conversations"] for r in rows] == [json.loads(members[r["key"]]["json"])["conversations"] for r in rows]


def test_exporting_again_gives_byte_identical_files(shards, exported, tmp_path):
    again = tmp_path / "again"  # in another process, with another hash seed
    command = "import sys; from visinstruct.cli.main import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", command, "export", str(shards), "--format", "hf", "--out", str(again)]
    subprocess.run(argv, check=True, env={**os.environ, "PYTHONHASHSEED": "12345"}, capture_output=True)
    assert files(again) == files(exported)  # state.json's fingerprint included
    assert sorted(files(exported)) == [
        "data-00000-of-00001.arrow",
        "dataset_info.json",
        "parquet/data-00000-of-00001.parquet",
        "state.json",
    ]


def test_export_refuses_a_folder_with_files_unless_overwrite(shards, exported, tmp_path):
    out = tmp_path / "out"
    (out / "parquet").mkdir(parents=True)
    (out / "parquet" / "data-00000-of-00009.parquet").write_bytes(b"stale")  # an earlier export's
    with pytest.raises(ShardError, match="not empty"):
        export_hf(resolve_shards(str(shards)), str(out))
    export_hf(resolve_shards(str(shards)), str(out), overwrite=True)
    assert files(out) == files(exported)  # the stale file is gone


def test_the_command_reports_what_it_wrote(shards, tmp_path, capsys):
    assert main(["export", str(shards), "--format", "hf", "--out", str(tmp_path / "hf"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["format"], report["dataset"], report["exported"], report["shards"]) == (
        "hf",
        str(tmp_path / "hf"),
        SAMPLES,
        2,
    )
    assert report["parquet"] == [str(tmp_path / "hf" / "parquet" / "data-00000-of-00001.parquet")]
    assert (report["skipped"], report["unread"]) == ({}, [])
    assert main(["export", str(shards), "--format", "hf", "--out", str(tmp_path / "hf2")]) == 0
    assert capsys.readouterr().out == (
        f"exported 6 samples from 2 shards to {tmp_path / 'hf2'} "
        f"(for datasets.load_from_disk; parquet files in {tmp_path / 'hf2' / 'parquet'})\n"
    )


def test_export_hf_needs_a_local_folder(shards):
    with pytest.raises(ShardError, match="local folder"):
        export_hf(resolve_shards(str(shards)), "gs://bucket/hf")


# ---------------------------------------------------------------------------------------------------------------------
# read.format hf: the export back through ingest


def ingest_hf(read: dict, out: Path) -> dict:
    cfg = from_dict(IngestConfig, {"read": read, "write": {"path": str(out), "shard_size": 4}, "resize": RESIZE})
    return ingest(cfg, RUNNER)


@pytest.mark.parametrize("source", ["folder", "parquet"])
def test_the_export_ingests_back_with_the_same_images_and_conversations(shards, exported, tmp_path, source):
    path = str(exported) if source == "folder" else str(exported / "parquet" / "*.parquet")
    report = ingest_hf({"path": path, "format": "hf", "save_additional_columns": ["key"]}, tmp_path / "again")
    assert (report["written"], report["rejected"]) == (SAMPLES, 0)
    before, after = tar_samples(shards), tar_samples(tmp_path / "again")
    metas = [json.loads(s["json"]) for s in after.values()]
    assert [m["source"]["key"] for m in metas] == sorted(before)  # same order, nothing fetched
    for meta in metas:
        member = before[meta["source"]["key"]]
        assert meta["sha256"] == sha256(member["png"])  # the original bytes ingest saw: the exported member
        assert meta["conversations"] == json.loads(member["json"])["conversations"]
        assert "url" not in meta and "path" not in meta


def test_a_save_to_disk_folder_is_found_by_format_auto(exported):
    assert plan_units(ReadConfig(path=str(exported))) == [("hf", [str(exported / "data-00000-of-00001.arrow")])]


def broken_rows_dataset(folder: Path, image_root: Path) -> str:
    """One parquet file with datasets' features, one row per way a row can fail, around two good ones (one of them
    a path alone: datasets' own writers would embed its bytes)."""
    good = encode_test_image("png", (40, 40))
    (image_root / "on-disk.png").write_bytes(encode_test_image("png", (48, 40)))
    ok = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A test image."}]
    rows = [
        ({"bytes": good, "path": "a.png"}, "good bytes", ok),
        ({"bytes": b"these bytes are no image", "path": "b.png"}, "broken bytes", ok),
        (None, "no image", ok),
        ({"bytes": good, "path": None}, "a turn without text", [{"from": "human", "value": ""}]),
        ({"bytes": None, "path": "on-disk.png"}, "a path under image_root", ok),
    ]
    features = datasets.Features(
        {
            "picture": datasets.Image(),
            "text": datasets.Value("string"),
            "dialogue": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}),
        }
    )
    table = pa.Table.from_pylist([dict(zip(features, row)) for row in rows], schema=features.arrow_schema)
    folder.mkdir()
    pq.write_table(table, folder / "rows.parquet")
    return str(folder / "*.parquet")


def dead_letters(out: Path) -> dict[str, tuple[str, str]]:
    rows = [r for p in sorted((out / "rejected").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    return {r["key"]: (r["stage"], r["reason"]) for r in rows}


def test_rows_that_cannot_be_used_become_dead_letters_with_a_reason(tmp_path):
    (tmp_path / "images").mkdir()
    read = {
        "path": broken_rows_dataset(tmp_path / "broken", tmp_path / "images"),
        "format": "hf",
        "caption_col": "text",
        "conversations_col": "dialogue",
        "image_root": str(tmp_path / "images"),
    }  # image_col: found by its Image feature
    report = ingest_hf(read, tmp_path / "out")
    assert (report["written"], report["rejected"]) == (2, 3)
    assert dead_letters(tmp_path / "out") == {
        "000000001": ("decode", "not_an_image"),
        "000000002": ("read", "missing_image"),
        "000000003": ("read", "bad_conversation"),
    }
    written = {s["__key__"]: json.loads(s["json"]) for s in tar_samples(tmp_path / "out").values()}
    assert {k: m["caption"] for k, m in written.items()} == {
        "000000000": "good bytes",
        "000010000": "a path under image_root",
    }
    assert written["000010000"]["path"] == str(tmp_path / "images" / "on-disk.png")
    assert Image.open(io.BytesIO(tar_samples(tmp_path / "out")["000000000"]["png"])).size == (32, 32)


# ---------------------------------------------------------------------------------------------------------------------
# One row at a time, and mistakes in the config


def test_a_row_becomes_a_pair_with_its_bytes_caption_and_turns():
    cfg = ReadConfig(path="x", format="hf", image_col="image", conversations_col="conversations")
    row = {
        "image": {"bytes": b"\x89PNG...", "path": "a.png"},
        "caption": "a cat",
        "conversations": json.dumps(
            [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]
        ),
    }
    assert hf_pair(row, cfg) == ImageTextPair(
        key="",
        image=b"\x89PNG...",
        caption="a cat",
        conversations=[Turn("human", "<image>\nWhat?"), Turn("gpt", "A cat.")],
    )
    assert hf_pair({**row, "image": b"raw"}, cfg).image == b"raw"
    assert hf_pair({**row, "image": "https://example.com/a.jpg"}, cfg).url == "https://example.com/a.jpg"
    for image, reason in (({"bytes": None, "path": ""}, "missing_image"), (7, "bad_image")):
        assert hf_pair({**row, "image": image}, cfg).reason == reason
    assert hf_pair({**row, "caption": 3}, cfg).reason == "bad_caption"
    assert hf_pair({**row, "conversations": [{"from": "human"}]}, cfg).reason == "bad_conversation"
    dropped = hf_pair({**row, "conversations": "{not json"}, cfg)
    assert dropped.reason == "bad_conversation" and "<7 bytes>" in dropped.detail["raw"]  # bytes not copied


def test_config_mistakes_fail_with_one_line(exported):
    with pytest.raises(InputError, match=r"read.image_col: column 'photo' not in the dataset \(columns: key, shard"):
        plan_units(ReadConfig(path=str(exported), format="hf", image_col="photo"))
    with pytest.raises(InputError, match="read.conversations_col: column 'turns' not in"):
        plan_units(ReadConfig(path=str(exported), format="hf", conversations_col="turns"))
    with pytest.raises(InputError, match="read.split: .* holds one Dataset, not a DatasetDict of splits"):
        plan_units(ReadConfig(path=str(exported), format="hf", split="train"))
    with pytest.raises(InputError, match="read.split: only a saved DatasetDict"):
        plan_units(ReadConfig(path=str(exported / "parquet" / "*.parquet"), format="hf", split="train"))
    with pytest.raises(ConfigError, match="'image_col' is read.format hf's"):
        from_dict(IngestConfig, {"read": {"path": "x.csv", "format": "csv", "image_col": "image"}})
    with pytest.raises(ConfigError, match="never from a URL"):
        from_dict(IngestConfig, {"read": {"path": str(exported), "format": "hf", "url_col": "link"}})


def test_a_dataset_dict_is_read_by_split(exported, tmp_path):
    dataset = datasets.load_from_disk(str(exported))
    datasets.DatasetDict({"train": dataset.select(range(4)), "test": dataset.select(range(4, 6))}).save_to_disk(
        str(tmp_path / "dict")
    )
    with pytest.raises(InputError, match="holds splits train, test; the config names no split"):
        plan_units(ReadConfig(path=str(tmp_path / "dict"), format="hf"))
    cfg = ReadConfig(path=str(tmp_path / "dict"), format="hf", split="test")
    [(fmt, paths)] = plan_units(cfg)
    pairs = list(read_unit(fmt, paths, cfg))
    assert [p.conversations[0].value for p in pairs] == [
        t[0]["value"] for t in dataset.select(range(4, 6))["conversations"]
    ]


@pytest.mark.parametrize(
    "name, root, expected",
    [
        ("a.png", "/data/im", "/data/im/a.png"),
        ("/data/im/b/c.png", "/data/im", "/data/im/b/c.png"),
        ("../../etc/passwd", "/data/im", None),
        ("/etc/passwd", "/data/im", None),
        ("a.png", None, None),  # no root: a dataset's paths are never read from wherever it says
        ("s3://other/secret.png", "/data/im", None),
        ("gs://b/r/x.png", "gs://b/r", "gs://b/r/x.png"),
        ("gs://b/other.png", "gs://b/r", None),
        ("../s.png", "gs://b/r", None),
    ],
)
def test_a_datasets_image_path_is_read_only_inside_image_root(name, root, expected):
    from visinstruct.transforms.read_hf import contained_path

    assert contained_path(name, root) == expected


def test_a_row_naming_a_path_outside_image_root_is_an_unsafe_path_dead_letter(tmp_path):
    outside = tmp_path / "private.png"
    outside.write_bytes(encode_test_image("png", (32, 32)))
    (tmp_path / "images").mkdir()
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {"image": pa.array([{"bytes": None, "path": str(outside)}], image), "text": ["escapes"]}
    )  # an image cell that is only a path, as a dataset saved with Image(decode=False) paths holds
    pq.write_table(table, tmp_path / "rows.parquet")
    read = {
        "path": str(tmp_path / "rows.parquet"),
        "format": "hf",
        "image_col": "image",
        "caption_col": "text",
        "image_root": str(tmp_path / "images"),
    }
    report = ingest_hf(read, tmp_path / "out")
    assert (report["written"], report["rejected"]) == (0, 1)
    assert dead_letters(tmp_path / "out") == {"000000000": ("read", "unsafe_path")}


def test_a_local_image_over_max_bytes_is_too_large_and_never_read_whole(tmp_path):
    from visinstruct.transforms.download import _read_local

    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * 5000)
    rejected = _read_local(ImageTextPair(key="000000000", path=str(big)), max_bytes=4096)
    assert rejected.reason == "too_large" and "4096" in rejected.message
    assert _read_local(ImageTextPair(key="000000000", path=str(big)), max_bytes=5000) == b"\0" * 5000


def test_url_col_is_refused_for_a_dataset_found_by_format_auto(exported):
    with pytest.raises(InputError, match="url_col"):
        plan_units(ReadConfig(path=str(exported), url_col="img_url"))
