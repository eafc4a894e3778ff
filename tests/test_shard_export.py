"""The shard commands that write: export (LLaVA layout, parquet), gallery (HTML page, contact sheet) and remove.

``export`` output loads as LLaVA JSON with every image present and reads back through ingest; ``remove`` rewrites
only the shards holding the taken-down samples and leaves shards that ``validate`` passes; the gallery renders in
headless Chromium with every image loaded. Datasets come from the real ingest pipeline, as in test_shard_cli.py.
"""

import hashlib
import json
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import test_shard_cli
import webdataset as wds
from PIL import Image
from test_shard_cli import RUNNER, SIZES, copy_of, sample, symlink, write_shard

from visinstruct.cli.export import BRIEF_PROMPT, export_llava, export_parquet
from visinstruct.cli.gallery import Card, _pick, gallery, render_page
from visinstruct.cli.main import main
from visinstruct.cli.remove import load_takedown, remove_samples
from visinstruct.cli.shards import list_shards
from visinstruct.cli.stats import dataset_stats
from visinstruct.cli.validate import validate
from visinstruct.configs import IngestConfig, from_dict
from visinstruct.pipelines.ingest import run as ingest
from visinstruct.schemas import IndexRow, SampleMeta, Turn, conversation_problems
from visinstruct.testing.sample_data import LLAVA_CONVERSATION
from visinstruct.testing.server import encode_test_image
from visinstruct.transforms import commit as commit_module
from visinstruct.transforms import rewrite as rewrite_module
from visinstruct.transforms.layout import ShardError, read_stats, resolve_shards, shard_files

pytestmark = pytest.mark.timeout(300)
HOSTILE = '<b>"bold"</b> & <script>alert(1)</script>'
PHOTOS = [encode_test_image("jpeg", size) for size in SIZES]  # what the server behind `dataset` sent
# The ingested datasets of test_shard_cli.py, set up again for this module:
# `dataset`: 10 URLs in shards of 4 with captions; written 3 + 2 + 1 (keys 000000000, 000000001, 000000003,
# 000010000, 000010002, 000020000); rejected two 404s, a repeated URL and a copy of photo 1.
# `llava`: one shard of two LLaVA samples with conversations (32 px PNGs).
dataset = test_shard_cli.dataset
llava = test_shard_cli.llava


def tar_members(tar: Path) -> dict[str, dict]:
    return {s["__key__"]: s for s in wds.WebDataset(str(tar), shardshuffle=False)}


# ---------------------------------------------------------------------------------------------------------------
# export


def test_llava_export_loads_as_llava_json_with_every_image_present(llava, tmp_path):
    report = export_llava(resolve_shards(str(llava)), str(tmp_path / "out"))
    entries = json.loads((tmp_path / "out" / "llava.json").read_text())
    members = tar_members(llava / "00000.tar")
    assert report["exported"] == len(entries) == 2 and report["skipped"] == {}
    assert [e["id"] for e in entries] == ["s0", "s1"]  # the LLaVA ids ingest kept, in key order
    for entry, key in zip(entries, sorted(members)):
        assert set(entry) == {"id", "image", "conversations"} and entry["conversations"] == LLAVA_CONVERSATION
        image = tmp_path / "out" / "images" / entry["image"]
        assert entry["image"] == f"{key}.png" and image.read_bytes() == members[key]["png"]
        assert Image.open(image).size == (32, 32)
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == sorted(
        ["images", "llava.json"] + [e["image"] for e in entries]
    )


def test_the_llava_export_reads_back_through_ingest(llava, tmp_path):
    export_llava(resolve_shards(str(llava)), str(tmp_path / "export"))
    cfg = from_dict(
        IngestConfig,
        {
            "read": {
                "path": str(tmp_path / "export" / "llava.json"),
                "image_root": str(tmp_path / "export" / "images"),
            },
            "write": {"path": str(tmp_path / "again"), "shard_size": 8},
            "resize": {"image_size": 32, "resize_mode": "border", "encode_format": "png"},
        },
    )
    assert ingest(cfg, RUNNER)["written"] == 2
    again = tar_members(tmp_path / "again" / "00000.tar")
    assert [json.loads(s["json"])["conversations"] for s in again.values()] == [LLAVA_CONVERSATION] * 2


def test_samples_without_a_conversation_need_caption_only(dataset, tmp_path):
    paths = resolve_shards(str(dataset))
    with pytest.raises(ShardError, match="nothing to export from 3 shards: no_conversation 6 .*--caption-only"):
        export_llava(paths, str(tmp_path / "plain"))
    report = export_llava(paths, str(tmp_path / "captions"), caption_only=True)
    entries = json.loads((tmp_path / "captions" / "llava.json").read_text())
    assert report["exported"] == 6 and [e["id"] for e in entries][:3] == ["000000000", "000000001", "000000003"]
    assert entries[2]["conversations"] == [
        {"from": "human", "value": "<image>\nDescribe the image briefly."},
        {"from": "gpt", "value": "caption number 3"},
    ]
    assert all(conversation_problems([Turn(t["from"], t["value"]) for t in e["conversations"]]) == [] for e in entries)
    assert BRIEF_PROMPT == "<image>\nDescribe the image briefly."


def test_parquet_export_is_one_flat_row_per_written_sample(dataset, tmp_path):
    report = export_parquet(resolve_shards(str(dataset)), str(tmp_path / "flat"))
    table = pq.read_table(tmp_path / "flat" / "samples.parquet")
    assert report["exported"] == table.num_rows == 6
    assert not any(pa.types.is_nested(f.type) for f in table.schema)
    rows = table.to_pylist()
    members = tar_members(dataset / "00001.tar")
    row = next(r for r in rows if r["key"] == "000010002")
    assert (row["shard"], row["caption"], row["width"], row["image_format"]) == (
        "00001",
        "caption number 6",
        64,
        "jpg",
    )
    assert row["image"] == members["000010002"]["jpg"] and json.loads(row["metadata"])["key"] == "000010002"
    assert row["sha256"] == hashlib.sha256(PHOTOS[4]).hexdigest() and row["conversations"] is None
    assert pq.ParquetFile(tmp_path / "flat" / "samples.parquet").num_row_groups == 3  # one per shard


def test_export_names_files_by_checked_keys_never_by_member_names(tmp_path):
    members = sample("000000000") + sample("notakey") + sample("٠٠٠٠٠٠٠٠٧")  # Arabic-Indic digits pass isdigit()
    write_shard(tmp_path / "odd", members)
    report = export_parquet(resolve_shards(str(tmp_path / "odd")), str(tmp_path / "flat"))
    assert (report["exported"], report["skipped"]) == (1, {"unsafe_key": 2})
    for hostile in ([("../evil.jpg", b"x")], [symlink("000000001.jpg", "/etc/passwd")]):
        folder = write_shard(tmp_path / f"bad{len(list(tmp_path.iterdir()))}", sample("000000000") + hostile)
        report = export_parquet(resolve_shards(str(folder)), str(tmp_path / f"out-{folder.name}"))
        assert report["exported"] == 0 and "run validate" in report["unread_summary"]
    assert [p for p in tmp_path.parent.rglob("*") if "evil" in p.name or "passwd" in p.name] == []


def test_export_refuses_a_folder_that_already_holds_files(llava, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(ShardError, match="taken is not empty \\(1 entries\\); .* --overwrite"):
        export_llava(resolve_shards(str(llava)), str(tmp_path / "taken"))
    assert export_llava(resolve_shards(str(llava)), str(tmp_path / "taken"), overwrite=True)["exported"] == 2
    with pytest.raises(ShardError, match="notes.txt is a file"):
        export_llava(resolve_shards(str(llava)), str(tmp_path / "taken" / "notes.txt"))


# ---------------------------------------------------------------------------------------------------------------
# remove


def takedown_file(tmp_path: Path, name: str, lines: list[str]) -> str:
    path = tmp_path / name
    path.write_text("# takedown request 17\n\n" + "\n".join(lines) + "\n")
    return str(path)


def test_remove_by_url_rewrites_only_the_affected_shard(dataset, tmp_path, monkeypatch):
    out = copy_of(dataset, tmp_path)
    untouched = {p.name: p.read_bytes() for p in out.glob("0000[02]*")}
    url = json.loads(tar_members(out / "00001.tar")["000010000"]["json"])["url"]
    opened = []
    real = rewrite_module.read_tar_samples
    monkeypatch.setattr(
        rewrite_module, "read_tar_samples", lambda path: opened.append(shard_files(path).name) or real(path)
    )
    takedown = load_takedown(urls_file=takedown_file(tmp_path, "urls.txt", [f"  {url}\t", "https://x.test/none"]))
    report = remove_samples(resolve_shards(str(out)), takedown)
    assert report["removed"] == [{"key": "000010000", "shard": "00001", "url": url, "matched_by": "url"}]
    assert (report["rewritten"], report["not_found"], opened) == (["00001"], ["https://x.test/none"], ["00001"])
    assert {p.name: p.read_bytes() for p in out.glob("0000[02]*")} == untouched
    assert sorted(tar_members(out / "00001.tar")) == ["000010002"]
    assert validate(resolve_shards(str(out))).problems == []
    row = next(r for r in pq.read_table(out / "00001.parquet").to_pylist() if r["key"] == "000010000")
    assert (row["status"], row["url"], row["caption"], row["members"]) == ("takedown", url, None, [])
    stats = read_stats(str(out / "00001_stats.json"))
    assert (stats.inputs, stats.written, stats.rejected, stats.stage) == (4, 1, 3, "remove")
    summary = dataset_stats(resolve_shards(str(out)))
    assert (summary["inputs"], summary["written"], summary["rejected"]) == (10, 5, 5)
    assert summary["rejected_by_stage"]["remove"] == {"takedown": 1}
    assert [r["stages"] for r in list_shards(resolve_shards(str(out)))] == [
        ["ingest"],
        ["ingest", "remove"],
        ["ingest"],
    ]


def test_remove_by_sha256_matches_in_any_case_and_reports_what_matched_nothing(dataset, tmp_path):
    out = copy_of(dataset, tmp_path)
    unknown = "ab" * 32
    digests = [hashlib.sha256(PHOTOS[0]).hexdigest().upper(), hashlib.sha256(PHOTOS[5]).hexdigest(), unknown]
    report = remove_samples(
        resolve_shards(str(out)), load_takedown(sha256_file=takedown_file(tmp_path, "sha.txt", digests))
    )
    assert [(r["key"], r["matched_by"]) for r in report["removed"]] == [
        ("000000000", "sha256"),
        ("000020000", "sha256"),
    ]
    assert report["rewritten"] == ["00000", "00002"] and report["not_found"] == [unknown]
    assert validate(resolve_shards(str(out))).problems == []
    assert dataset_stats(resolve_shards(str(out)))["rejected_by_reason"]["takedown"] == 2


def test_a_takedown_also_counts_the_rows_that_had_no_sample(dataset, tmp_path):
    out = copy_of(dataset, tmp_path)
    # photo 1 was written once (000000001) and rejected as a copy under another URL (000010003)
    report = remove_samples(
        resolve_shards(str(out)),
        load_takedown(sha256_file=takedown_file(tmp_path, "sha.txt", [hashlib.sha256(PHOTOS[1]).hexdigest()])),
    )
    assert [r["key"] for r in report["removed"]] == ["000000001"] and report["already_absent"] == 1


KILLS = {  # where a removal's commit is cut off: (function, part of its path, before or after it runs, what
    # validate finds, what the next removal, of another sample of the shard, removes)
    "after the dead letters": ("write_table", "/rejected/", "after", [], ["000000000", "000000003"]),
    "before the index": (
        "write_table",
        "/00000.parquet",
        "before",
        ["key_not_in_tar", "index_offset_mismatch", "index_offset_mismatch", "incomplete"],
        ["000000000", "000000003"],
    ),
    "before the stats": ("write_stats", "_stats.json", "before", ["incomplete"], ["000000003"]),
}


@pytest.mark.parametrize("kill", list(KILLS))
def test_an_interrupted_removal_is_finished_by_the_next_one(dataset, tmp_path, monkeypatch, kill):
    name, part, when, problems, finished = KILLS[kill]
    out = copy_of(dataset, tmp_path)
    urls = [json.loads(tar_members(out / "00000.tar")[k]["json"])["url"] for k in ("000000000", "000000003")]
    first, second = (load_takedown(takedown_file(tmp_path, f"u{i}.txt", [u])) for i, u in enumerate(urls))
    real = getattr(commit_module, name)

    def cut_off(path, *args):
        if part in path and when == "before":
            raise KeyboardInterrupt
        real(path, *args)
        if part in path:
            raise KeyboardInterrupt

    monkeypatch.setattr(commit_module, name, cut_off)
    with pytest.raises(KeyboardInterrupt):
        remove_samples(resolve_shards(str(out)), first)
    assert [p.code for p in validate(resolve_shards(str(out))).problems] == problems
    monkeypatch.undo()
    report = remove_samples(resolve_shards(str(out)), second)
    assert [r["key"] for r in report["removed"]] == finished and report["rewritten"] == ["00000"]
    assert validate(resolve_shards(str(out))).problems == []
    assert sorted(tar_members(out / "00000.tar")) == ["000000001"]
    dead = pq.read_table(out / "rejected" / "remove-00000.parquet").to_pylist()
    assert [(d["key"], d["stage"], d["reason"]) for d in dead] == [
        ("000000000", "remove", "takedown"),
        ("000000003", "remove", "takedown"),
    ]


def test_a_dry_run_reports_and_changes_nothing(dataset, tmp_path):
    out = copy_of(dataset, tmp_path)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    url = json.loads(tar_members(out / "00000.tar")["000000001"]["json"])["url"]
    report = remove_samples(
        resolve_shards(str(out)), load_takedown(takedown_file(tmp_path, "u.txt", [url])), dry_run=True
    )
    assert [r["key"] for r in report["removed"]] == ["000000001"] and report["already_absent"] == 1  # the repeat
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    "lists, message",
    [
        ({}, "give --urls FILE or --sha256 FILE"),
        ({"sha256_file": "urls"}, "'https://a.test/1.jpg' is not a sha256 hex digest \\(1 such lines\\)"),
        ({"urls_file": "missing"}, "no such takedown list: .*/nope$"),
    ],
)
def test_a_bad_takedown_list_is_a_one_line_error(tmp_path, lists, message):
    files = {"urls": takedown_file(tmp_path, "urls", ["https://a.test/1.jpg"]), "missing": str(tmp_path / "nope")}
    with pytest.raises(ShardError, match=message) as error:
        load_takedown(**{k: files[v] for k, v in lists.items()})
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------------------------
# gallery


def test_samples_are_spread_over_the_dataset_or_picked_with_a_seed():
    assert _pick(10, 3, None) == [0, 3, 6] and _pick(2, 5, None) == [0, 1]
    assert _pick(100, 4, seed=1) == _pick(100, 4, seed=1) != _pick(100, 4, seed=2)


def test_the_gallery_shows_samples_and_rejected_rows_with_their_stage(dataset, tmp_path):
    report = gallery(resolve_shards(str(dataset)), str(tmp_path / "g.html"), str(tmp_path / "g.png"), thumb=48)
    page = (tmp_path / "g.html").read_text()
    assert (report["shown"], report["rejected"], report["rejected_by_reason"]) == (
        6,
        4,
        {"http_404": 2, "duplicate_url": 1, "duplicate_sha256": 1},
    )
    assert page.count("<img ") == 6 and page.count('src="data:image/jpeg;base64,') == 6
    assert "caption number 6" in page  # each reason with its share of the 10 rows:
    assert "Rejected by reason: http_404 2 (20.0%), duplicate_url 1 (10.0%), duplicate_sha256 1 (10.0%)" in page
    assert re.search(
        r'<td>download</td><td>http_404</td><td class="url"><a href="http://127\.0\.0\.1:\d+/gone'
        r'\.jpg"',
        page,
    )
    assert "<td>dedup</td><td>duplicate_sha256</td>" in page
    assert Image.open(tmp_path / "g.png").size == (6 * 48, 48 + 14)


def test_text_from_the_web_is_escaped_and_only_http_urls_become_links():
    meta = SampleMeta(
        key="000000000",
        url="javascript:alert(1)",
        caption=HOSTILE,
        conversations=[Turn("human", "<image>\n<img src=x onerror=alert(1)>"), Turn("gpt", "ok")],
    )
    row = IndexRow("000000001", "http_404", url='https://a.test/"><script>x</script>', error_message=HOSTILE)
    files = shard_files("shards/00000.tar")
    page = render_page(
        ["shards/00000.tar"],
        [Card("000000000", "00000", meta, HOSTILE, Image.new("RGB", (8, 8)))],
        [(files, row, None)],
        1,
        Counter({"http_404": 1}),
    )
    assert "<script>alert" not in page and "<img src=x" not in page and page.count("<script>") == 1
    assert "&lt;b&gt;&quot;bold&quot;&lt;/b&gt; &amp; &lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "javascript:alert(1)" in page and 'href="javascript' not in page
    assert 'href="https://a.test/&quot;&gt;&lt;script&gt;x&lt;/script&gt;"' in page
    assert "default-src 'none'; img-src data:;" in page  # nothing else may load, whatever slipped through


CHROMIUM = next(
    (shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None
)


def chromium(page: Path, profile: Path, *args: str) -> str:
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        *args,
        page.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install chromium)")
def test_the_gallery_renders_in_headless_chromium_with_every_image_loaded(dataset, llava, tmp_path):
    both = f"{{{dataset},{llava}}}/*.tar"  # captions, rejections and conversations on one page
    report = gallery(resolve_shards(both), str(tmp_path / "gallery.html"))
    assert report["shown"] == 8 and report["broken_images"] == 0
    dom = chromium(tmp_path / "gallery.html", tmp_path / "profile", "--dump-dom")
    images, loaded = (re.search(f'data-{name}="(\\d+)"', dom) for name in ("images", "loaded"))
    assert images and loaded, "the page's status script did not run"
    assert int(images.group(1)) == int(loaded.group(1)) == 8
    assert "What shape is this?" in dom and "gone.jpg" in dom
    chromium(
        tmp_path / "gallery.html",
        tmp_path / "profile",
        "--screenshot=" + str(tmp_path / "shot.png"),
        "--window-size=1200,2000",
    )
    shot = Image.open(tmp_path / "shot.png").convert("RGB")
    assert shot.size == (1200, 2000) and len(shot.getcolors(1 << 24)) > 100  # thumbnails, not a blank page


# ---------------------------------------------------------------------------------------------------------------
# The command line


def test_the_commands_print_their_reports(dataset, tmp_path, capsys):
    out = copy_of(dataset, tmp_path)
    assert main(["export", str(out), "--out", str(tmp_path / "llava"), "--caption-only"]) == 0
    assert capsys.readouterr().out.startswith(f"exported 6 samples from 3 shards to {tmp_path}/llava/llava.json")
    assert main(["gallery", str(out), "-o", str(tmp_path / "g.html"), "--limit", "2"]) == 0
    assert capsys.readouterr().out.strip() == (
        f"{tmp_path}/g.html: 2 of 6 samples, 2 of 4 rejected rows; contact sheet {tmp_path}/g.png"
    )
    url = json.loads(tar_members(out / "00000.tar")["000000000"]["json"])["url"]
    assert main(["remove", str(out), "--urls", takedown_file(tmp_path, "u.txt", [url])]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"00000  000000000  url     {url}",
        "removed 1 samples (1 by url) from 1 of 3 shards; 0 matching rows had no sample; 0 list entries matched "
        "nothing",
    ]
    assert main(["validate", str(out)]) == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["export", "empty", "--out", "out"], "visinstruct export: error: empty holds no shards (no .tar files)"),
        (
            ["export", "shards", "--out", "out", "--format", "parquet", "--caption-only"],
            "visinstruct export: error: --caption-only goes with --format llava",
        ),
        (["export", "shards", "--out", "shards"], "visinstruct export: error: shards is not empty"),
        (["gallery", "note.txt"], "visinstruct gallery: error: note.txt is not a shard"),
        (["remove", "shards"], "visinstruct remove: error: give --urls FILE or --sha256 FILE"),
        (["remove", "nope", "--urls", "note.txt"], "visinstruct remove: error: no such file or folder: nope"),
    ],
)
def test_user_errors_print_one_line_and_exit_two(tmp_path, monkeypatch, capsys, argv, message):
    write_shard(tmp_path / "shards", sample("000000000"))
    # the read-only commands' check, in a folder that also holds "empty/" and "note.txt"
    test_shard_cli.test_user_errors_print_one_line_and_exit_two(tmp_path, monkeypatch, capsys, argv, message)
