"""Every LLaVA row shape through the shard commands: single-image, multi-image and text-only samples, and several
conversations about one image.

A mix665k-shaped shard (written here as ingest writes it: ``TarShardWriter``, index rows from ``index_row``) passes
``validate``; ``export --format llava`` gives back the LLaVA rows it came from, but for image paths, with every
image file byte-equal to its member and one file per distinct image; ``--format hf`` keeps the three shapes as
``Image`` features and reads back through ``read.format: hf`` as the same shapes; ``show``, ``gallery`` and
``stats`` describe them. Each new ``validate`` problem code is planted once, on its own.
"""

import hashlib
import io
import json
from dataclasses import replace
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image
from test_shard_cli import RUNNER, write_shard

from visinstruct.cli.export import export_hf, export_llava, export_parquet
from visinstruct.cli.gallery import gallery
from visinstruct.cli.main import main
from visinstruct.cli.show import format_sample, show_sample
from visinstruct.cli.stats import dataset_stats, format_stats
from visinstruct.cli.validate import validate
from visinstruct.configs import IngestConfig, ReadConfig, from_dict
from visinstruct.pipelines.ingest import run as ingest
from visinstruct.schemas import (
    SCHEMA_VERSION,
    ImageInfo,
    ImageRef,
    ImageTextPair,
    IndexRow,
    SampleMeta,
    ShardStats,
    Turn,
)
from visinstruct.testing.sample_data import llava_mix_dataset
from visinstruct.transforms.layout import image_members, resolve_shards, shard_in, write_stats
from visinstruct.transforms.read_hf import hf_files, hf_pair, hf_rows, hf_schema, resolve_columns
from visinstruct.transforms.rewrite import index_row
from visinstruct.transforms.shards import TarShardWriter, write_table

pytestmark = pytest.mark.timeout(300)


def encode(size: tuple[int, int], fmt: str, colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, fmt)
    return buffer.getvalue()


PHOTO = encode((40, 30), "JPEG", (200, 40, 40))  # the image two rows ask about
OTHER = encode((24, 36), "PNG", (40, 200, 40))
THIRD = encode((32, 32), "JPEG", (40, 40, 200))


def turns(*values: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


# The LLaVA rows the shard was ingested from (mix665k's shapes), and each row's images as the shard holds them.
ROWS = [
    ({"id": 7, "image": "coco/a.jpg", "conversations": turns("<image>\nDescribe it.", "A red box.")}, [PHOTO]),
    (
        {"id": "vqa-0", "image": "coco/a.jpg", "conversations": turns("What colour?\n<image>\nOne word.", "Red.")},
        [PHOTO],
    ),
    (
        {"id": "list-0", "image": ["gqa/b.png"], "conversations": turns("<image>\nWhat?", "Green.", "Sure?", "Yes.")},
        [OTHER],
    ),
    (
        {
            "id": "pair-0",
            "image": ["gqa/b.png", "coco/c.jpg"],
            "conversations": turns("<image>\n<image>\nCompare them.", "Green, then blue."),
        },
        [OTHER, THIRD],
    ),
    (
        {"id": "sharegpt-0", "model": "", "conversations": turns("What is 2 plus 2?", "4.", "And times 2?", "8.")},
        [],
    ),
    (
        {
            "id": "triple-0",
            "image": ["coco/a.jpg", "gqa/b.png", "coco/c.jpg"],
            "conversations": turns("<image>\n<image>\nBoth?", "Red; green.", "And <image>?", "Blue."),
        },
        [PHOTO, OTHER, THIRD],
    ),
]
KEYS = [f"00000{i:04d}" for i in range(len(ROWS))]
SINGLE, SHARED, LISTED, PAIR, TEXT, TRIPLE = KEYS


def extension(data: bytes) -> str:
    return "png" if data.startswith(b"\x89PNG") else "jpg"


def meta_of(key: str, row: dict, images: list[bytes]) -> SampleMeta:
    """``KEY.json`` as ingest writes it for ``row`` (FORMAT.md): provenance in ``source``, sizes per image."""
    source = {"llava_id": row["id"]}
    if isinstance(row.get("image"), list) and len(row["image"]) == 1:
        source["llava_image_list"] = True
    others = {k: v for k, v in row.items() if k not in ("id", "image", "conversations")}
    if others:
        source["llava_fields"] = others
    fields = dict(key=key, source=source, conversations=[Turn(t["from"], t["value"]) for t in row["conversations"]])
    sizes = [Image.open(io.BytesIO(data)).size for data in images]
    if len(images) == 1:
        w, h = sizes[0]
        digest = hashlib.sha256(images[0]).hexdigest()
        return SampleMeta(path=row["image"] if isinstance(row["image"], str) else row["image"][0], width=w, height=h,
                          original_width=w, original_height=h, sha256=digest, **fields)  # fmt: skip
    infos = [
        ImageInfo(f"{i}.{extension(d)}", path=row["image"][i], width=w, height=h, sha256=hashlib.sha256(d).hexdigest())
        for i, (d, (w, h)) in enumerate(zip(images, sizes))
    ]
    return SampleMeta(image_count=len(images), images=infos, **fields)


def write_rows(folder: Path, rows=ROWS) -> Path:
    """Shard 00000 of ``rows`` as ingest writes it: tar, index (``index_row``) and stats."""
    folder.mkdir(parents=True, exist_ok=True)
    writer, index = TarShardWriter(), []
    for key, (row, images) in zip(KEYS, rows):
        meta = meta_of(key, row, images)
        if len(images) == 1:
            pictures = [(extension(images[0]), images[0])]
        else:
            pictures = [(info.member, data) for info, data in zip(meta.images, images)]
        members = writer.add(key, [*pictures, ("txt", b""), ("json", meta.to_json().encode())])
        index.append(index_row(meta, members=members))
    files = shard_in(str(folder), 0)
    size = writer.finish(files.tar)
    write_table(files.index, index, IndexRow, SCHEMA_VERSION)
    write_stats(files.stats, ShardStats(0, "ingest", len(index), len(index), 0, tar_bytes=size))
    return folder


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    return write_rows(tmp_path_factory.mktemp("shapes") / "shards")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# validate


def test_validate_passes_every_row_shape(shard):
    report = validate(resolve_shards(str(shard)))
    assert report.problems == []
    assert (report.samples, report.images) == (6, 1 + 1 + 1 + 2 + 0 + 3)


def size_of(data: bytes) -> tuple[int | None, int | None]:
    try:
        return Image.open(io.BytesIO(data)).size
    except OSError:  # the planted broken image: its JSON records no size
        return None, None


def multi(key: str, members: list[tuple[str, bytes]], **changes) -> list[tuple[str, bytes]]:
    """A two-image sample's members with its JSON as written for ``members``, then ``changes`` applied to it."""
    images = [ImageInfo(name, None, None, *size_of(data)) for name, data in members if name[0].isdigit()]
    meta = SampleMeta(
        key=key,
        image_count=2,
        images=images,
        conversations=[Turn("human", "<image>\n<image>\nCompare."), Turn("gpt", "Alike.")],
    ).to_dict()
    meta.update(changes)
    return [(f"{key}.{n}", d) for n, d in members] + [(f"{key}.txt", b""), (f"{key}.json", json.dumps(meta).encode())]


def text_only(key: str, *extra: tuple[str, bytes]) -> list[tuple[str, bytes]]:
    meta = SampleMeta(key=key, image_count=0, conversations=[Turn("human", "Hi?"), Turn("gpt", "Hello.")])
    return [(f"{key}.{n}", d) for n, d in extra] + [(f"{key}.txt", b""), (f"{key}.json", meta.to_json().encode())]


K = "000000000"
TWO = [("0.jpg", PHOTO), ("1.png", OTHER)]
ONE, THREE = turns("<image>\nCompare.", "Alike."), turns("<image>\n<image>\n<image>\nCompare.", "Alike.")
SIZES_OF_TWO = [{"member": "0.jpg", "width": 40, "height": 30}, {"member": "1.png", "width": 24, "height": 36}]


@pytest.mark.parametrize(
    "members, codes",
    [
        (multi(K, TWO), []),
        (text_only(K), []),
        (text_only(K, ("jpg", PHOTO)), ["image_count_mismatch"]),
        (
            multi(K, TWO, image_count=3, images=[*SIZES_OF_TWO, {"member": "2.jpg"}], conversations=THREE),
            ["missing_image_member"],
        ),
        (multi(K, [*TWO, ("2.jpg", THIRD)], images=SIZES_OF_TWO), ["unexpected_image_member"]),
        (
            multi(K, [("0.jpg", PHOTO), ("01.png", OTHER)], images=SIZES_OF_TWO),
            ["unexpected_image_member", "missing_image_member"],
        ),
        (multi(K, [*TWO, ("1.jpg", THIRD)], images=SIZES_OF_TWO), ["unexpected_image_member"]),
        (multi(K, [("jpg", PHOTO), *TWO]), ["mixed_image_members"]),
        (multi(K, TWO, images=SIZES_OF_TWO[::-1]), ["image_list_mismatch"]),
        (multi(K, TWO, images=[]), ["image_list_mismatch"]),
        (multi(K, TWO, images=[SIZES_OF_TWO[0], {**SIZES_OF_TWO[1], "width": 99}]), ["image_size_mismatch"]),
        (multi(K, [("0.jpg", PHOTO), ("1.png", b"not an image")]), ["bad_image"]),
        (multi(K, [("jpg", PHOTO)], images=[]), ["image_count_mismatch"]),
        (multi(K, TWO, image_count=None, images=[], conversations=ONE), ["image_count_mismatch"]),
        (multi(K, TWO, conversations=ONE), ["bad_conversation"]),
        (text_only(K)[:1] + [(f"{K}.json", b'{"key": "000000000"}')], ["missing_member"]),
        (multi(K, TWO, image_count=10**12, images=SIZES_OF_TWO), ["missing_image_member", "bad_conversation"]),
    ],
    ids=[
        "two-images",
        "text-only",
        "text-only-with-an-image",
        "image-2-missing",
        "image-past-the-count",
        "image-numbered-oddly",
        "image-1-twice",
        "plain-next-to-numbered",
        "images-listed-out-of-order",
        "no-images-list",
        "image-1-size",
        "image-1-broken",
        "multi-json-single-member",
        "single-json-numbered-members",
        "one-placeholder-for-two",
        "no-image-no-count",
        "a-hostile-count-costs-nothing",
    ],
)
def test_validate_reports_each_row_shape_problem_by_its_code(tmp_path, members, codes):
    report = validate(resolve_shards(str(write_shard(tmp_path / "s", members))))
    assert sorted(p.code for p in report.problems) == sorted(codes), report.problems
    assert all(p.key == K for p in report.problems)


# ---------------------------------------------------------------------------------------------------------------
# export --format llava


def test_the_llava_export_equals_the_rows_ingested_but_for_image_paths(shard, tmp_path):
    report = export_llava(resolve_shards(str(shard)), str(tmp_path / "out"))
    entries = json.loads((tmp_path / "out" / "llava.json").read_text())
    assert (report["exported"], report["skipped"], report["ids_from_keys"]) == (6, {}, 0)
    assert [e["id"] for e in entries] == [row["id"] for row, _ in ROWS]  # key order, the LLaVA ids
    for entry, (row, images) in zip(entries, ROWS):
        names = entry.get("image")
        assert {**entry, "image": None} == {**row, "image": None}  # every other key, conversations included
        files = [names] if isinstance(names, str) else names or []
        assert type(names) is type(row.get("image")) and len(files) == len(images)  # the same shape
        assert [sha256((tmp_path / "out" / "images" / n).read_bytes()) for n in files] == [sha256(d) for d in images]


def test_identical_images_are_written_once_and_shared_by_name(shard, tmp_path):
    report = export_llava(resolve_shards(str(shard)), str(tmp_path / "out"))
    entries = {e["id"]: e for e in json.loads((tmp_path / "out" / "llava.json").read_text())}
    assert entries[7]["image"] == entries["vqa-0"]["image"] == f"{SINGLE}.jpg"  # two conversations, one file
    assert entries["pair-0"]["image"] == [f"{LISTED}.png", f"{PAIR}.1.jpg"]  # named after the first holder
    assert entries["triple-0"]["image"] == [f"{SINGLE}.jpg", f"{LISTED}.png", f"{PAIR}.1.jpg"]
    files = sorted(p.name for p in (tmp_path / "out" / "images").iterdir())
    assert files == sorted([f"{SINGLE}.jpg", f"{LISTED}.png", f"{PAIR}.1.jpg"])
    assert (report["image_files"], report["shared_images"]) == (3, 5)


def test_ids_that_would_repeat_become_keys(tmp_path):
    again = [({**row, "id": "same"}, images) for row, images in ROWS[:2]]
    clash = [({**ROWS[2][0], "id": KEYS[3]}, ROWS[2][1]), ({**ROWS[3][0], "id": None}, ROWS[3][1])]
    folder = write_rows(tmp_path / "s", again + clash)
    report = export_llava(resolve_shards(str(folder)), str(tmp_path / "out"))
    entries = json.loads((tmp_path / "out" / "llava.json").read_text())
    assert [e["id"] for e in entries] == KEYS[:4]  # repeated, or another row's key, or none: the key
    assert report["ids_from_keys"] == 4


# ---------------------------------------------------------------------------------------------------------------
# export --format hf, and reading it back


@pytest.fixture(scope="module")
def exported(shard, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "export"
    assert export_hf(resolve_shards(str(shard)), str(out))["exported"] == 6
    return out


def test_the_hf_export_holds_the_three_shapes_as_image_features(exported):
    dataset = datasets.load_from_disk(str(exported))
    assert isinstance(dataset.features["image"], datasets.Image)
    assert isinstance(dataset.features["images"].feature, datasets.Image)
    rows = dict(zip(dataset["key"], dataset))
    assert [rows[k]["image_count"] for k in KEYS] == [1, 1, 1, 2, 0, 3]
    assert rows[TEXT]["image"] is None and rows[TEXT]["images"] == []
    assert rows[SINGLE]["image"].size == (40, 30) and rows[SINGLE]["images"] == []
    assert rows[PAIR]["image"] is None and [i.size for i in rows[PAIR]["images"]] == [(24, 36), (32, 32)]
    raw = dict(zip(dataset["key"], dataset.cast_column("images", datasets.List(datasets.Image(decode=False)))))
    assert [(i["path"], sha256(i["bytes"])) for i in raw[TRIPLE]["images"]] == [
        (f"{TRIPLE}.{n}", sha256(d)) for n, d in zip(["0.jpg", "1.png", "2.jpg"], ROWS[5][1])
    ]


@pytest.mark.parametrize("source", ["folder", "parquet"])
def test_the_hf_export_reads_back_as_the_same_row_shapes(exported, source):
    path = str(exported) if source == "folder" else str(exported / "parquet" / "*.parquet")
    cfg = ReadConfig(path=path, format="hf")
    [data] = hf_files(cfg)
    cfg = resolve_columns(cfg, hf_schema(data))
    pairs = [hf_pair(row, cfg) for row in hf_rows(data)]
    assert all(isinstance(p, ImageTextPair) for p in pairs), pairs
    assert [p.image_count for p in pairs] == [1, 1, 1, 2, 0, 3]
    assert [p.image for p in pairs[:3]] == [PHOTO, PHOTO, OTHER]
    assert pairs[3].images == [ImageRef(data=OTHER), ImageRef(data=THIRD)]
    assert pairs[5].images == [ImageRef(data=d) for d in (PHOTO, OTHER, THIRD)]
    text = pairs[4]
    assert text.text_only and (text.image, text.images, text.url, text.path) == (None, [], None, None)
    assert [[t.value for t in p.conversations] for p in pairs] == [
        [t["value"] for t in row["conversations"]] for row, _ in ROWS
    ]


def test_hf_rows_with_an_images_list_become_pairs_of_their_shape():
    cfg = ReadConfig(path="x", format="hf", image_col="image", conversations_col="conversations")
    two = turns("<image>\n<image>\nCompare.", "Alike.")
    row = {"image": None, "images": [{"bytes": PHOTO, "path": "a.jpg"}, OTHER], "conversations": two}
    assert hf_pair(row, cfg).images == [ImageRef(data=PHOTO), ImageRef(data=OTHER)]
    assert hf_pair({**row, "images": [{"bytes": PHOTO, "path": None}]}, cfg).reason == "bad_conversation"
    assert hf_pair({**row, "image": PHOTO}, cfg).reason == "bad_image"  # both columns hold images
    assert hf_pair({**row, "images": [PHOTO, 7]}, cfg).reason == "bad_image"
    assert hf_pair({**row, "images": ["/etc/a.jpg", "/etc/b.jpg"]}, cfg).reason == "unsafe_path"
    named = hf_pair({**row, "images": ["https://example.com/a.jpg", "b.jpg"]}, replace(cfg, image_root="/data"))
    assert named.images == [ImageRef(location="https://example.com/a.jpg"), ImageRef(location="/data/b.jpg")]
    assert hf_pair({**row, "images": [], "conversations": turns("Hi?", "Hello.")}, cfg).text_only
    assert hf_pair({**row, "images": []}, cfg).reason == "missing_image"  # the conversation asks for images


def test_the_parquet_export_counts_images_and_turns(shard, tmp_path):
    export_parquet(resolve_shards(str(shard)), str(tmp_path / "flat"))
    rows = pq.read_table(tmp_path / "flat" / "samples.parquet").to_pylist()
    assert [(r["image_count"], r["turns"]) for r in rows] == [(1, 2), (1, 2), (1, 4), (2, 2), (0, 4), (3, 4)]
    assert rows[0]["image"] == PHOTO and [rows[i]["image"] for i in (3, 4, 5)] == [None] * 3


# ---------------------------------------------------------------------------------------------------------------
# show, gallery, stats


def test_show_writes_each_image_and_says_text_only(shard, tmp_path):
    shown = show_sample(resolve_shards(str(shard)), key=PAIR, out_dir=str(tmp_path))
    assert shown["image_paths"] == [str(tmp_path / f"{PAIR}.0.png"), str(tmp_path / f"{PAIR}.1.jpg")]
    assert [Path(p).read_bytes() for p in shown["image_paths"]] == [OTHER, THIRD]
    assert shown["image_sizes"] == [(24, 36), (32, 32)] and "2 images" in format_sample(shown)
    text = show_sample(resolve_shards(str(shard)), key=TEXT, out_dir=str(tmp_path / "text"))
    assert (text["image_count"], text["image_path"], text["text_only"]) == (0, None, True)
    assert "text-only" in format_sample(text) and not (tmp_path / "text").exists()


def test_the_command_line_shows_and_validates_the_row_shapes(shard, tmp_path, capsys):
    assert main(["validate", str(shard)]) == 0
    assert main(["show", str(shard), TRIPLE, "--save-images", str(tmp_path)]) == 0
    assert "3 images" in capsys.readouterr().out


def test_the_gallery_badges_multi_image_samples_and_shows_text_only_cards(shard, tmp_path):
    page = gallery(resolve_shards(str(shard)), str(tmp_path / "g.html"), str(tmp_path / "sheet.png"))
    html = (tmp_path / "g.html").read_text()
    assert (page["shown"], page["text_only"], page["broken_images"]) == (6, 1, 0)
    assert html.count('class="badge"') == 2 and ">+1<" in html and ">+2<" in html
    assert html.count('<p class="textonly">text-only</p>') == 1 and html.count("<img ") == 5


def test_stats_counts_samples_by_image_count(shard):
    stats = dataset_stats(resolve_shards(str(shard)))
    assert stats["images_per_sample"] == {"0": 1, "1": 3, "2": 1, "3": 1}
    assert (stats["turns"]["min"], stats["turns"]["max"]) == (2, 4)
    assert "images per sample" in format_stats(stats)


# ---------------------------------------------------------------------------------------------------------------
# The whole way: a mix665k-shaped LLaVA JSON through the real ingest, the shard commands, and back


@pytest.fixture(scope="module")
def mix(tmp_path_factory) -> tuple[Path, list[dict]]:
    """``llava_mix_dataset`` ingested: every row shape of mix665k, in shards of 8."""
    root = tmp_path_factory.mktemp("mix")
    path, images, rows = llava_mix_dataset(root)
    cfg = from_dict(
        IngestConfig,
        {
            "read": {"path": str(path), "format": "llava", "image_root": str(images)},
            "write": {"path": str(root / "out"), "shard_size": 8},
            "resize": {"image_size": 64, "resize_mode": "border"},
        },
    )
    report = ingest(cfg, RUNNER)
    assert (report["written"], report["rejected"]) == (len(rows), 0)
    return root / "out", rows


def test_a_mix665k_shaped_dataset_validates_and_exports_back_to_its_llava_json(mix, tmp_path):
    shards, rows = mix
    assert validate(resolve_shards(str(shards))).problems == []
    export_llava(resolve_shards(str(shards)), str(tmp_path / "out"))
    entries = json.loads((tmp_path / "out" / "llava.json").read_text())
    members = [s for tar in sorted(shards.glob("*.tar")) for s in wds.WebDataset(str(tar), shardshuffle=False)]
    renamed = {}  # each input image path -> the exported file: one file per input image, one input image per file
    for row, entry, sample in zip(rows, entries, members, strict=True):
        assert {**entry, "image": None} == {**row, "image": None}
        before, after = row.get("image"), entry.get("image")
        assert type(before) is type(after)
        before, after = ([before], [after]) if isinstance(before, str) else (before or [], after or [])
        assert len(before) == len(after)
        renamed.update((b, renamed.setdefault(b, a)) for b, a in zip(before, after))
        assert [renamed[b] for b in before] == after
        data = [sample[name] for name in image_members(sample)]
        assert [sha256((tmp_path / "out" / "images" / a).read_bytes()) for a in after] == [sha256(d) for d in data]
    assert len(set(renamed.values())) == len(renamed)


def test_the_hf_export_of_every_row_shape_ingests_back(mix, tmp_path):
    shards, rows = mix
    export_hf(resolve_shards(str(shards)), str(tmp_path / "hf"))
    cfg = from_dict(
        IngestConfig,
        {
            "read": {"path": str(tmp_path / "hf"), "format": "hf"},
            "write": {"path": str(tmp_path / "again"), "shard_size": 8},
            "resize": {"image_size": 64, "resize_mode": "border"},
        },
    )
    assert (ingest(cfg, RUNNER)["written"], validate(resolve_shards(str(tmp_path / "again"))).problems) == (12, [])
    export_llava(resolve_shards(str(tmp_path / "again")), str(tmp_path / "back"))
    after = json.loads((tmp_path / "back" / "llava.json").read_text())
    assert [e["conversations"] for e in after] == [r["conversations"] for r in rows]
    shape = [len(e["image"]) if isinstance(e.get("image"), list) else int("image" in e) for e in after]
    assert shape == [len(r["image"]) if isinstance(r.get("image"), list) else int("image" in r) for r in rows]
