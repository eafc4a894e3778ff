"""The read-only shard commands: ls, stats, show and validate, on ingested shards and on hand-made broken ones.

``validate`` finds every planted fault by its code and passes cleanly on what ingest writes; ``ls``, ``stats``
and ``show`` report what was written; ``stats`` reads the indexes only; a wrong PATH is one line, exit status 2.
"""

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from visinstruct.cli.main import main
from visinstruct.cli.shards import format_listing, list_shards
from visinstruct.cli.show import format_sample, show_sample
from visinstruct.cli.stats import dataset_stats, format_stats
from visinstruct.cli.validate import format_report, validate
from visinstruct.configs import IngestConfig, from_dict
from visinstruct.pipelines.ingest import run as ingest
from visinstruct.schemas import SampleMeta, ShardStats
from visinstruct.testing.sample_data import llava_json_dataset
from visinstruct.testing.server import ImageServer, encode_test_image
from visinstruct.transforms.layout import ShardError, expand_braces, read_stats, resolve_shards, write_stats

pytestmark = pytest.mark.timeout(300)
RUNNER = ["--runner=FnApiRunner"]
SIZES = [(80, 60), (90, 70), (100, 50), (70, 70), (120, 90), (64, 128)]


# ---------------------------------------------------------------------------------------------------------------
# Datasets written by the ingest stage


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """10 URLs in shards of 4: written 3 + 2 + 1; rejected two 404s, a repeated URL and a copy of photo 1."""
    root = tmp_path_factory.mktemp("ingest")
    with ImageServer() as server:
        for i, size in enumerate(SIZES):
            server.add_image(f"/photo{i}.jpg", encode_test_image("jpeg", size))
        server.add_image("/copy.jpg", encode_test_image("jpeg", SIZES[1]))  # photo 1's bytes under another URL
        urls = [
            server.url(p)
            for p in (
                "/photo0.jpg",
                "/photo1.jpg",
                "/gone.jpg",
                "/photo2.jpg",
                "/photo3.jpg",
                "/photo1.jpg",
                "/photo4.jpg",
                "/copy.jpg",
                "/photo5.jpg",
                "/lost.jpg",
            )
        ]
        pq.write_table(
            pa.table({"url": urls, "caption": [f"caption number {i}" for i in range(len(urls))]}),
            root / "urls.parquet",
        )
        cfg = from_dict(
            IngestConfig,
            {
                "read": {"path": str(root / "urls.parquet")},
                "write": {"path": str(root / "out"), "shard_size": 4},
                "download": {"allow_loopback": True, "timeout": 2.0, "retries": 0, "per_host_rps": None},
                "resize": {"image_size": 64, "resize_mode": "center_crop"},
            },
        )
        report = ingest(cfg, RUNNER)
    assert (report["written"], report["rejected"]) == (6, 4)
    return root / "out"


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> Path:
    """One shard of two LLaVA samples with conversations."""
    root = tmp_path_factory.mktemp("llava")
    cfg = from_dict(IngestConfig, llava_json_dataset(root, entries=2, images=2, shard_size=8))
    assert ingest(cfg, RUNNER)["written"] == 2
    return root / "out"


def copy_of(dataset: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(dataset, tmp_path / "copy"))


def rewrite_index(path: Path, **columns) -> None:
    """Replace whole columns of a parquet index, keeping its schema (a stand-in for a later stage's rewrite)."""
    table = pq.read_table(path)
    for name, values in columns.items():
        position = table.schema.get_field_index(name)
        table = table.set_column(position, table.schema.field(name), pa.array(values, table.schema.field(name).type))
    pq.write_table(table, path)


# ---------------------------------------------------------------------------------------------------------------
# Naming shards


def test_brace_patterns_expand_ranges_with_their_padding_and_lists():
    assert expand_braces("s/{00000..00002}.tar") == ["s/00000.tar", "s/00001.tar", "s/00002.tar"]
    assert expand_braces("{8..10}.tar") == ["8.tar", "9.tar", "10.tar"]
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ShardError, match="bad brace pattern"):
        expand_braces("s/{00000}.tar")


def test_a_folder_a_glob_a_brace_pattern_and_a_file_name_the_same_shards(dataset):
    tars = [str(dataset / f"{i:05d}.tar") for i in range(3)]
    assert resolve_shards(str(dataset)) == tars
    assert resolve_shards(str(dataset / "*.tar")) == tars
    assert resolve_shards(str(dataset / "{00000..00002}.tar")) == tars
    assert resolve_shards(str(dataset / "{00002,00000}.tar")) == [tars[0], tars[2]]
    assert resolve_shards(tars[1]) == [tars[1]]


@pytest.mark.parametrize(
    "path, message",
    [
        ("nope", "no such file or folder: .*nope$"),
        ("empty", "empty holds no shards"),
        ("00000.parquet", "00000.parquet is not a shard"),
        ("*.zip", "nothing matches"),
        ("*.parquet", "matches 3 files but no shards"),
        ("{00000..00004}.tar", "no such shard: .*00003.tar \\(and 1 more of 5\\)$"),
    ],
)
def test_a_path_without_shards_is_a_one_line_error(dataset, tmp_path, monkeypatch, path, message):
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path if path in ("nope", "empty") else dataset)
    with pytest.raises(ShardError, match=message) as error:
        resolve_shards(path)
    assert "\n" not in str(error.value)


def test_a_shard_whose_tar_is_gone_still_counts_in_its_folder(dataset, tmp_path):
    out = copy_of(dataset, tmp_path)
    (out / "00001.tar").unlink()
    assert [Path(p).name for p in resolve_shards(str(out))] == ["00000.tar", "00001.tar", "00002.tar"]


# ---------------------------------------------------------------------------------------------------------------
# ls


def test_ls_counts_what_ingest_wrote(dataset):
    rows = list_shards(resolve_shards(str(dataset)))
    assert [(r["shard"], r["written"], r["inputs"], r["rejected"], r["complete"], r["stages"]) for r in rows] == [
        ("00000", 3, 4, 1, True, ["ingest"]),
        ("00001", 2, 4, 2, True, ["ingest"]),
        ("00002", 1, 2, 1, True, ["ingest"]),
    ]
    assert [r["tar_bytes"] for r in rows] == [(dataset / f"{i:05d}.tar").stat().st_size for i in range(3)]
    lines = format_listing(rows).splitlines()
    assert lines[0].split() == ["shard", "written", "inputs", "rejected", "tar", "size", "complete", "stages"]
    assert lines[-1].split()[:4] == ["total", "6", "10", "4"] and lines[-1].endswith("3/3")


def test_ls_counts_the_tar_without_an_index_and_shows_later_stages(dataset, tmp_path):
    out = copy_of(dataset, tmp_path)
    (out / "00000.parquet").unlink()
    rewrite_index(
        out / "00001.parquet",
        clip_score=[0.31, None, 0.12, None],
        conversation_kind=["conversation", None, None, None],
    )
    (out / "00002_stats.json").unlink()
    rows = {r["shard"]: r for r in list_shards(resolve_shards(str(out)))}
    assert (rows["00000"]["written"], rows["00000"]["inputs"], rows["00000"]["stages"]) == (3, 4, ["ingest"])
    assert rows["00001"]["stages"] == ["ingest", "filter", "generate"]
    assert rows["00002"]["complete"] is False and "NO" in format_listing(list(rows.values())).splitlines()[3]


# ---------------------------------------------------------------------------------------------------------------
# stats


def test_stats_counts_sizes_captions_and_rejections_by_stage(dataset):
    stats = dataset_stats(resolve_shards(str(dataset)))
    assert (stats["shards"], stats["inputs"], stats["written"], stats["rejected"]) == (3, 10, 6, 4)
    assert stats["rejected_by_reason"] == {"http_404": 2, "duplicate_url": 1, "duplicate_sha256": 1}
    assert stats["rejected_by_stage"] == {
        "dedup": {"duplicate_sha256": 1, "duplicate_url": 1},
        "download": {"http_404": 2},
    }
    assert (stats["width"]["min"], stats["width"]["max"], stats["width"]["histogram"]) == (64, 64, [["64-127", 6]])
    widths = sorted(w for w, _ in SIZES)
    assert (stats["original_width"]["min"], stats["original_width"]["median"], stats["original_width"]["max"]) == (
        widths[0],
        (widths[2] + widths[3]) / 2,
        widths[-1],
    )
    assert stats["original_height"]["histogram"] == [["32-63", 2], ["64-127", 3], ["128-255", 1]]
    assert stats["caption_chars"]["min"] == len("caption number 0") and stats["caption_words"]["max"] == 3
    assert stats["clip_score"] is None and stats["conversation_kinds"] == {}
    report = format_stats(stats)
    assert "written     6 (60.0% kept)" in report and "download    2: http_404 2" in report
    assert "original width (px): min 64  median 85  max 120" in report


def test_stats_reads_the_indexes_only(dataset, tmp_path, monkeypatch):
    before = dataset_stats(resolve_shards(str(dataset)))
    out = copy_of(dataset, tmp_path)
    for tar in out.glob("*.tar"):
        tar.unlink()

    def no_tars(*args, **kwargs):
        raise AssertionError("stats opened a tar")

    monkeypatch.setattr(tarfile, "open", no_tars)
    after = dataset_stats(resolve_shards(str(out)))
    assert after == before


def test_stats_of_scored_and_generated_shards(dataset, tmp_path):
    out = copy_of(dataset, tmp_path)
    rewrite_index(
        out / "00000.parquet",
        clip_score=[0.31, 0.26, None, 0.349],
        conversation_kind=["conversation", "detail", None, "conversation"],
    )
    stats = dataset_stats(resolve_shards(str(out / "00000.tar")))
    assert stats["clip_score"]["histogram"] == [["0.25..0.30", 1], ["0.30..0.35", 2]]
    assert stats["conversation_kinds"] == {"conversation": 2, "detail": 1}
    assert stats["rejected_by_stage"] == {"download": {"http_404": 1}}  # only this shard's dead letters
    assert "CLIP score (every scored row): min 0.260" in format_stats(stats)


# ---------------------------------------------------------------------------------------------------------------
# show


def test_show_by_key_writes_the_image_member_and_prints_caption_and_metadata(dataset, tmp_path):
    sample = show_sample(resolve_shards(str(dataset)), key="000010002", out_dir=str(tmp_path / "shown"))
    member = next(
        s for s in wds.WebDataset(str(dataset / "00001.tar"), shardshuffle=False) if s["__key__"] == "000010002"
    )
    assert Path(sample["image_path"]).read_bytes() == member["jpg"]
    assert (sample["caption"], sample["meta"]["original_width"], sample["image_size"]) == (
        "caption number 6",
        SIZES[4][0],
        (64, 64),
    )
    text = format_sample(sample)
    assert "key            000010002 (shard 00001)" in text and "caption        caption number 6" in text


def test_show_by_index_and_by_seeded_random_pick_written_samples_in_order(dataset, tmp_path):
    paths = resolve_shards(str(dataset))
    written = ["000000000", "000000001", "000000003", "000010000", "000010002", "000020000"]
    assert [show_sample(paths, index=i, out_dir=str(tmp_path))["key"] for i in (0, 3, 5)] == [
        written[0],
        written[3],
        written[5],
    ]
    picks = {show_sample(paths, random_seed=seed, out_dir=str(tmp_path))["key"] for seed in range(8)}
    assert picks <= set(written) and len(picks) > 1
    assert show_sample(paths, random_seed=3, out_dir=str(tmp_path)) == show_sample(
        paths, random_seed=3, out_dir=str(tmp_path)
    )
    with pytest.raises(ShardError, match="index 6 is out of range: 6 samples"):
        show_sample(paths, index=6, out_dir=str(tmp_path))


def test_show_prints_a_conversation_turn_by_turn(llava, tmp_path):
    sample = show_sample(resolve_shards(str(llava)), key="000000001", out_dir=str(tmp_path))
    assert sample["conversation"] == "human: <image>\n       What shape is this?\ngpt:   A square."
    assert Image.open(sample["image_path"]).size == (32, 32)


def test_show_of_a_missing_or_rejected_key_is_a_one_line_error(dataset, tmp_path):
    paths = resolve_shards(str(dataset))
    with pytest.raises(ShardError, match="no sample '000099999' in 3 shards"):
        show_sample(paths, key="000099999", out_dir=str(tmp_path))
    with pytest.raises(ShardError, match="sample 000000002 was not written: http_404"):
        show_sample(paths, key="000000002", out_dir=str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# validate: clean on what ingest writes


def test_validate_passes_on_ingested_shards(dataset, llava):
    for out, samples in ((dataset, 6), (llava, 2)):
        report = validate(resolve_shards(str(out)))
        assert report.problems == [] and (report.samples, report.images) == (samples, samples)
        assert format_report(report).startswith("ok: ")


# ---------------------------------------------------------------------------------------------------------------
# validate: hand-made shards with one planted fault each

KEYS = ["000000000", "000000001", "000000002"]


def jpeg(size=(32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


def sample(name: str, **meta) -> list[tuple[str, bytes]]:
    """The members of a good sample called ``name``; ``meta`` overrides fields of its JSON."""
    fields = {"key": name, "caption": "a red square", "width": 32, "height": 24} | meta
    return [
        (f"{name}.jpg", jpeg()),
        (f"{name}.txt", b"a red square"),
        (f"{name}.json", SampleMeta.from_dict(fields).to_json().encode()),
    ]


def write_shard(folder: Path, members: list, stem: str = "00000") -> Path:
    """A tar of ``members`` (``(name, bytes)`` or a ready ``TarInfo``), and an index and stats that agree with it."""
    folder.mkdir(exist_ok=True)
    with tarfile.open(folder / f"{stem}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))
    rows = {}
    with tarfile.open(folder / f"{stem}.tar") as tar:
        for info in tar.getmembers():
            if info.isfile() and ".." not in info.name:
                rows.setdefault(info.name.partition(".")[0], []).append(
                    {"name": info.name, "offset": info.offset_data, "size": info.size}
                )
    index = pa.table({"key": list(rows), "status": ["success"] * len(rows), "members": list(rows.values())})
    pq.write_table(index, folder / f"{stem}.parquet")
    write_stats(
        str(folder / f"{stem}_stats.json"),
        ShardStats(
            shard=int(stem),
            stage="ingest",
            inputs=len(rows),
            written=len(rows),
            rejected=0,
            tar_bytes=(folder / f"{stem}.tar").stat().st_size,
        ),
    )
    return folder


def good_members() -> list:
    return [m for key in KEYS for m in sample(key)]


def replace_member(name: str, data: bytes) -> list:
    return [(n, data if n == name else d) for n, d in good_members()]


def symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def cut_tar(folder: Path, size: int) -> None:
    tar = folder / "00000.tar"
    tar.write_bytes(tar.read_bytes()[:size])


def data_of(folder: Path, name: str) -> tuple[int, int]:
    """Where member ``name``'s data starts in the tar, and where its padded data ends."""
    with tarfile.open(folder / "00000.tar") as tar:
        info = tar.getmember(name)
    return info.offset_data, info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def append_garbage(folder: Path) -> None:
    cut_tar(folder, data_of(folder, f"{KEYS[2]}.json")[1])
    with (folder / "00000.tar").open("ab") as f:
        f.write(b"x" * 1024)


def edit_index(folder: Path, edit) -> None:
    rows = pq.read_table(folder / "00000.parquet").to_pylist()
    edit(rows)
    pq.write_table(pa.Table.from_pylist(rows, pq.read_schema(folder / "00000.parquet")), folder / "00000.parquet")


def edit_stats(folder: Path, **changes) -> None:
    path = folder / "00000_stats.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def move_offset(rows):
    rows[1]["members"][0]["offset"] += 512


def rename_key(rows):
    rows[1]["key"] = "000000007"


FAULTS = {  # name: (members, what to do after writing, expected (code, key) problems)
    "truncated inside a member": (
        good_members(),
        lambda f: cut_tar(f, data_of(f, f"{KEYS[2]}.jpg")[0] + 100),
        [("truncated", KEYS[2])],
    ),
    "truncated inside a header": (
        good_members(),
        lambda f: cut_tar(f, data_of(f, f"{KEYS[2]}.json")[0] - 100),
        [("truncated", None)],
    ),
    "truncated after the last member": (
        good_members(),
        lambda f: cut_tar(f, data_of(f, f"{KEYS[2]}.json")[1]),
        [("truncated", None)],
    ),
    "garbage after the last member": (good_members(), append_garbage, [("bad_tar", None)]),
    "missing json": ([m for m in good_members() if m[0] != f"{KEYS[1]}.json"], None, [("missing_member", KEYS[1])]),
    "missing image": ([m for m in good_members() if m[0] != f"{KEYS[0]}.jpg"], None, [("missing_member", KEYS[0])]),
    "bad json": (replace_member(f"{KEYS[1]}.json", b'{"key": "000'), None, [("bad_json", KEYS[1])]),
    "json off the schema": (
        replace_member(f"{KEYS[1]}.json", b'{"key": "000000001", "width": "wide"}'),
        None,
        [("bad_metadata", KEYS[1])],
    ),
    "json of another key": (good_members()[:3] + sample(KEYS[1], key=KEYS[2]), None, [("key_mismatch", KEYS[1])]),
    "bad conversation": (
        good_members()[:3] + sample(KEYS[1], conversations=[{"from": "human", "value": "hi"}]),
        None,
        [("bad_conversation", KEYS[1])],
    ),
    "image does not decode": (replace_member(f"{KEYS[2]}.jpg", b"\xff\xd8not a jpeg"), None, [("bad_image", KEYS[2])]),
    "image of another size": (
        good_members()[:3] + sample(KEYS[1], width=64),
        None,
        [("image_size_mismatch", KEYS[1])],
    ),
    "../ member name": (good_members() + [("../evil.jpg", jpeg())], None, [("unsafe_name", None)]),
    "symlink member": (good_members() + [symlink(f"{KEYS[2]}.png", "/etc/passwd")], None, [("link_member", None)]),
    "members not adjacent": (
        good_members()[:2] + good_members()[3:6] + good_members()[2:3] + good_members()[6:],
        None,
        [("missing_member", KEYS[0]), ("members_not_adjacent", KEYS[0]), ("missing_member", KEYS[0])],
    ),
    "member twice": (good_members() + [(f"{KEYS[2]}.txt", b"again")], None, [("duplicate_member", KEYS[2])]),
    "index offset off": (good_members(), lambda f: edit_index(f, move_offset), [("index_offset_mismatch", KEYS[1])]),
    "index key unknown to the tar": (
        good_members(),
        lambda f: edit_index(f, rename_key),
        [("key_not_in_tar", "000000007"), ("key_not_in_index", KEYS[1])],
    ),
    "stats count another tar": (
        good_members(),
        lambda f: edit_stats(f, inputs=4, written=4),
        [("stats_mismatch", None), ("stats_mismatch", None)],
    ),
    "stats that do not add up": (good_members(), lambda f: edit_stats(f, inputs=9), [("bad_stats", None)]),
    "no stats": (good_members(), lambda f: (f / "00000_stats.json").unlink(), [("incomplete", None)]),
    "no index": (good_members(), lambda f: (f / "00000.parquet").unlink(), [("index_missing", None)]),
    "no tar": (good_members(), lambda f: (f / "00000.tar").unlink(), [("tar_missing", None)]),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_validate_finds_the_planted_fault(tmp_path, fault):
    members, damage, expected = FAULTS[fault]
    folder = write_shard(tmp_path / "shards", members)
    if damage:
        damage(folder)
    report = validate(resolve_shards(str(folder)))
    assert [(p.code, p.key) for p in report.problems] == expected
    assert all(p.shard == "00000" and p.message and "\n" not in p.message for p in report.problems)
    assert format_report(report).splitlines()[-1].startswith("FAILED: 1 shards, ")


def test_the_same_good_shard_passes_so_each_fault_alone_fails_it(tmp_path):
    report = validate(resolve_shards(str(write_shard(tmp_path / "shards", good_members()))))
    assert report.ok and (report.shards, report.samples, report.images) == (1, 3, 3)


def test_a_key_in_two_shards_is_a_duplicate(tmp_path):
    write_shard(tmp_path / "shards", good_members())
    write_shard(tmp_path / "shards", sample(KEYS[2]), stem="00001")
    report = validate(resolve_shards(str(tmp_path / "shards")))
    assert [(p.shard, p.code, p.key) for p in report.problems] == [("00001", "duplicate_key", KEYS[2])]


def test_unsafe_members_are_never_extracted(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    folder = write_shard(tmp_path / "shards", good_members() + [("../evil.jpg", jpeg()), symlink("link.jpg", "..")])
    report = validate(resolve_shards(str(folder)))
    assert [p.code for p in report.problems] == ["unsafe_name", "link_member"] and report.samples == 3
    assert sorted(p.name for p in tmp_path.rglob("*") if "evil" in p.name or "link" in p.name) == []


def test_validate_on_an_ingested_dataset_with_a_damaged_shard(dataset, tmp_path):
    out = copy_of(dataset, tmp_path)
    stats = read_stats(str(out / "00001_stats.json"))
    (out / "00001_stats.json").write_text(
        json.dumps(stats.__dict__ | {"written": 3, "rejected": 1, "rejected_by_reason": {"http_404": 1}})
    )
    report = validate(resolve_shards(str(out)))
    assert sorted({(p.shard, p.code) for p in report.problems}) == [("00001", "stats_mismatch")]
    assert len(report.problems) == 2  # written vs the tar, rejections by reason vs the index


# ---------------------------------------------------------------------------------------------------------------
# The command line


def test_commands_exit_zero_and_print_their_reports(dataset, tmp_path, capsys):
    assert main(["ls", str(dataset)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split()[:4] == ["total", "6", "10", "4"]
    assert main(["stats", str(dataset), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == dataset_stats(resolve_shards(str(dataset)))
    assert main(["show", str(dataset), "--random", "--seed", "3", "--save-images", str(tmp_path)]) == 0
    assert "random seed    3" in capsys.readouterr().out
    assert main(["validate", str(dataset / "{00000..00002}.tar")]) == 0
    assert capsys.readouterr().out.strip() == "ok: 3 shards, 6 samples, 6 images checked, no problems"


def test_validate_exits_one_on_problems_and_json_lists_them(tmp_path, capsys):
    folder = write_shard(tmp_path / "shards", replace_member(f"{KEYS[1]}.json", b"nope"))
    assert main(["validate", str(folder), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert (out["ok"], out["problems_by_code"], out["problems"][0]["key"]) == (False, {"bad_json": 1}, KEYS[1])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["ls", "nope"], "visinstruct ls: error: no such file or folder: nope"),
        (["stats", "empty"], "visinstruct stats: error: empty holds no shards (no .tar files)"),
        (["validate", "note.txt"], "visinstruct validate: error: note.txt is not a shard (expected a .tar file"),
        (["show", "empty", "--seed", "1"], "visinstruct show: error: --seed goes with --random"),
    ],
)
def test_user_errors_print_one_line_and_exit_two(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "note.txt").write_text("not a shard")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_the_module_entry_point_gives_the_same_exit_statuses(tmp_path):
    folder = write_shard(tmp_path / "shards", replace_member(f"{KEYS[0]}.jpg", b"broken"))
    bad = subprocess.run(
        [sys.executable, "-m", "visinstruct.cli.main", "validate", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and "bad_image" in bad.stdout
    wrong = subprocess.run(
        [sys.executable, "-m", "visinstruct.cli.main", "ls", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert wrong.returncode == 2
    assert wrong.stderr == f"visinstruct ls: error: no such file or folder: {tmp_path}/nope\n"


def test_progress_counts_shards_on_a_terminal_only(dataset, monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["validate", str(dataset)]) == 0
    assert capsys.readouterr().err.endswith("\rvalidate: 3/3 shards\n")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert main(["ls", str(dataset)]) == 0
    assert capsys.readouterr().err == ""
