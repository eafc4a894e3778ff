"""transforms/layout.py is FORMAT.md as data: its functions on literal inputs; a sample whose image member is
``KEY.jpeg`` (as other tools write it) working in every shard command and the trainer; and no other module of the
package spelling a layout string.
"""

import ast
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from visinstruct.cli.main import main
from visinstruct.schemas import SCHEMA_VERSION, IndexRow, Member, SampleMeta, ShardStats, Turn, make_key
from visinstruct.trainer.data import ShardStream, iterate_once, shard_list
from visinstruct.transforms import layout
from visinstruct.transforms.layout import ShardError, ShardFiles, image_member, resolve_shards
from visinstruct.transforms.shards import write_table

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parent.parent
PACKAGE_FOLDERS = ("schemas", "configs", "transforms", "pipelines", "cli", "trainer", "testing")
# Each layout string as a regular expression: ``_staging`` and ``rejected/`` only where they begin a path part
# (``rows_reused_from_staging`` is a counter, not the folder).
LAYOUT_STRINGS = [
    re.compile(pattern)
    for pattern in (r"_stats\.json", r"(?<!\w)_staging\b", r"run_report\.json", r"\.draft\.json", r"(?<!\w)rejected/")
]
PATH_CALLS = {"join", "Path", "PurePosixPath", "joinpath", "makedirs", "mkdir", "glob", "match", "match_paths"}
SIZES = [(40, 30), (32, 48), (50, 50)]


# ---------------------------------------------------------------------------------------------------------------
# The layout on literal inputs


def test_a_shard_number_names_its_files_and_dead_letters():
    files = layout.shard_in("out", 42)
    assert files == ShardFiles("00042", "out/00042.tar", "out/00042.parquet", "out/00042_stats.json", "out")
    assert files.number == 42
    assert files.rejected("filter") == "out/rejected/filter-00042.parquet"
    assert files.rejected_pattern() == "out/rejected/*-00042.parquet"
    assert layout.rejected_path("out", "ingest", 3) == "out/rejected/ingest-00003.parquet"
    assert layout.rejected_shard("out/rejected/ingest-00003.parquet") == ("ingest", "00003")
    assert layout.rejected_shard("out/rejected/notes.txt") is None
    assert layout.rejected_pattern("out") == "out/rejected/*.parquet"
    assert layout.stats_pattern("out") == "out/*_stats.json"


def test_a_tar_path_names_its_shard_wherever_it_lies():
    assert layout.shard_files("a/b/00007.tar") == ShardFiles(
        "00007", "a/b/00007.tar", "a/b/00007.parquet", "a/b/00007_stats.json", "a/b"
    )
    loose = layout.shard_files("train.tar")  # a tar not named like a shard, in the current folder
    assert (loose.name, loose.index, loose.folder, loose.number) == ("train", "train.parquet", ".", None)
    assert layout.shard_files("gs://bucket/d/00001.tar").stats == "gs://bucket/d/00001_stats.json"
    assert layout.shard_id("d/00042.tar") == 42 and layout.shard_id("d/train.tar", 3) == 3
    with pytest.raises(ShardError, match="shard names must be numbers"):
        layout.shard_id("d/train.tar")
    assert layout.index_of("d/00001.tar") == "d/00001.parquet" and layout.index_of("d/00001.tgz") is None


def test_only_files_named_like_a_shards_belong_to_one():
    assert [layout.shard_stem(n) for n in ("d/00042.tar", "00042.parquet", "d/00042_stats.json")] == ["00042"] * 3
    assert [layout.shard_stem(n) for n in ("urls.parquet", "d/train.tar", "00042.json", "run_report.json")] == [
        None
    ] * 4


def test_staging_and_report_paths():
    assert layout.staging_dir("out") == "out/_staging"
    assert layout.staging_tar("out", 1, "abc123") == "out/_staging/00001.abc123.tar"
    assert layout.draft_path("out", 1, "abc123") == "out/_staging/00001.abc123.draft.json"
    assert layout.draft_pattern("out", 1) == "out/_staging/00001.*.draft.json"
    assert layout.draft_attempt("out/_staging/00001.abc123.draft.json") == "abc123"
    assert layout.staging_patterns("out", 1) == ["out/_staging/00001.*", "out/_staging/.00001.*"]
    assert layout.report_path("out") == "out/run_report.json"


@pytest.mark.parametrize(
    "members, expected",
    [
        ({"jpg": b"", "jpeg": b"", "png": b""}, "jpg"),
        ({"png": b"", "jpeg": b""}, "jpeg"),
        ({"webp": b"", "txt": b""}, "webp"),
        ({"png": b""}, "png"),
        ({"txt": b"", "json": b""}, None),
    ],
)
def test_the_image_member_is_looked_for_in_a_fixed_order(members, expected):
    assert layout.IMAGE_EXTENSIONS == ("jpg", "jpeg", "png", "webp")
    assert image_member(members) == expected


@pytest.fixture
def folder(tmp_path, monkeypatch) -> Path:
    """``d/``: shards 0 and 1 with tars; shard 2's index without its tar; a parquet that is no shard; dead
    letters and staging files in subfolders."""
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "d"
    for name in ("00000.tar", "00001.tar", "00001.parquet", "00002.parquet", "urls.parquet"):
        (d / name).parent.mkdir(exist_ok=True)
        (d / name).write_bytes(b"x")
    for name in ("rejected/ingest-00000.parquet", "_staging/00003.abc.tar"):
        (d / name).parent.mkdir(exist_ok=True)
        (d / name).write_bytes(b"x")
    return d


def test_a_folder_names_its_shards_even_those_whose_tar_is_gone(folder):
    assert resolve_shards("d") == ["d/00000.tar", "d/00001.tar", "d/00002.tar"]
    assert resolve_shards("d/") == ["d/00000.tar", "d/00001.tar", "d/00002.tar"]


def test_globs_braces_and_joined_specs(folder):
    assert resolve_shards("d/*.tar") == ["d/00000.tar", "d/00001.tar"]
    assert resolve_shards("d/0000[1].tar") == ["d/00001.tar"]
    assert resolve_shards("d/{00000..00001}.tar") == ["d/00000.tar", "d/00001.tar"]
    assert resolve_shards("d/{00001,00000}.tar") == ["d/00000.tar", "d/00001.tar"]
    assert resolve_shards("d/00001.tar::d/00000.tar::d/00001.tar") == ["d/00000.tar", "d/00001.tar"]
    assert layout.expand_braces("s/{008..010}.tar") == ["s/008.tar", "s/009.tar", "s/010.tar"]
    assert layout.expand_braces("{a,b}{1..2}") == ["a1", "a2", "b1", "b2"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "no shards given"),
        ("nope", "no such file or folder: nope"),
        ("d/{00000..00004}.tar", "no such shard: d/00002.tar (and 2 more of 5)"),
        ("d/*.json", "nothing matches d/*.json"),
        ("d/*.parquet", "d/*.parquet matches 3 files but no shards (.tar files)"),
        ("d/urls.parquet", "d/urls.parquet is not a shard"),
        ("d/rejected", "d/rejected holds no shards"),
        ("d/{x}.tar", "bad brace pattern {x}"),
        ("d::nope", "no such file or folder: nope"),
    ],
)
def test_a_spec_that_names_no_shards_says_why_in_one_line(folder, spec, message):
    with pytest.raises(ShardError) as raised:
        resolve_shards(spec)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_img2dataset_stats_read_as_ours(tmp_path):
    path = tmp_path / "00003_stats.json"
    path.write_text(json.dumps({"count": 10, "successes": 7, "failed_to_download": 2, "failed_to_resize": 1}))
    stats = layout.read_stats(str(path))
    assert stats == ShardStats(3, "img2dataset", 10, 7, 3, {"failed_to_download": 2, "failed_to_resize": 1})
    layout.write_stats(str(tmp_path / "00004_stats.json"), ShardStats(4, "ingest", 2, 1, 1, {"http_404": 1}, 9))
    assert layout.read_stats(str(tmp_path / "00004_stats.json")).rejected_by_reason == {"http_404": 1}


# ---------------------------------------------------------------------------------------------------------------
# A .jpeg sample, as another tool writes it, in every command and the trainer


def jpeg(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def jpeg_shard(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """One complete shard of three samples whose images are ``KEY.jpeg`` members, written with ``tarfile`` (not
    our writer), with an index and stats that agree with it. Returns the folder and each key's image bytes."""
    folder = tmp_path_factory.mktemp("jpeg") / "shards"
    folder.mkdir()
    files, images, captions = layout.shard_in(str(folder), 0), {}, {}
    with tarfile.open(files.tar, "w") as tar:
        for i, size in enumerate(SIZES):
            key, captions[key] = make_key(0, i), f"a plain square number {i}"
            conversation = [Turn("human", "<image>\nWhat is this?"), Turn("gpt", f"It is square number {i}.")]
            meta = SampleMeta(
                key=key, caption=captions[key], width=size[0], height=size[1], conversations=conversation
            )
            images[key] = jpeg(size, (40 * i, 200, 90))
            for ext, data in (
                ("jpeg", images[key]),
                ("txt", captions[key].encode()),
                ("json", meta.to_json().encode()),
            ):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    members: dict[str, list[Member]] = {}
    with tarfile.open(files.tar) as tar:  # where each member's data lies, as read back
        for info in tar:
            members.setdefault(info.name.partition(".")[0], []).append(Member(info.name, info.offset_data, info.size))
    rows = [
        IndexRow(key, "success", caption=captions[key], width=w, height=h, members=members[key])
        for key, (w, h) in zip(images, SIZES)
    ]
    write_table(files.index, rows, IndexRow, SCHEMA_VERSION)
    tar_bytes = Path(files.tar).stat().st_size
    layout.write_stats(files.stats, ShardStats(0, "ingest", len(rows), len(rows), 0, {}, tar_bytes))
    return folder, images


def run_json(capsys, argv: list[str]) -> dict | list:
    assert main([*argv, "--json"]) == 0, capsys.readouterr()
    return json.loads(capsys.readouterr().out)


def test_ls_stats_and_show_see_the_jpeg_images(jpeg_shard, tmp_path, capsys):
    folder, images = jpeg_shard
    [row] = run_json(capsys, ["ls", str(folder)])
    assert (row["written"], row["complete"]) == (3, True)
    assert run_json(capsys, ["stats", str(folder)])["written"] == 3
    key = make_key(0, 1)
    shown = run_json(capsys, ["show", str(folder), key, "--save-images", str(tmp_path / "show")])
    assert shown["image_path"] == str(tmp_path / "show" / f"{key}.jpeg")
    assert Path(shown["image_path"]).read_bytes() == images[key] and shown["image_size"] == list(SIZES[1])


def test_validate_finds_every_jpeg_image(jpeg_shard, capsys):
    folder, _ = jpeg_shard
    report = run_json(capsys, ["validate", str(folder)])
    assert report["problems"] == [] and (report["samples"], report["images"]) == (3, 3)


def test_export_writes_the_jpeg_images(jpeg_shard, tmp_path, capsys):
    folder, images = jpeg_shard
    llava = run_json(capsys, ["export", str(folder), "--out", str(tmp_path / "llava")])
    assert (llava["exported"], llava["skipped"]) == (3, {})
    entries = json.loads((tmp_path / "llava" / "llava.json").read_text())
    assert [e["image"] for e in entries] == [f"{key}.jpeg" for key in images]
    assert {key: (tmp_path / "llava" / "images" / f"{key}.jpeg").read_bytes() for key in images} == images
    flat = run_json(capsys, ["export", str(folder), "--out", str(tmp_path / "flat"), "--format", "parquet"])
    assert (flat["exported"], flat["skipped"]) == (3, {})
    table = pq.read_table(tmp_path / "flat" / "samples.parquet", columns=["key", "image", "image_format"])
    assert {r["key"]: r["image"] for r in table.to_pylist()} == images
    assert set(table.column("image_format").to_pylist()) == {"jpeg"}


def test_the_gallery_shows_the_jpeg_images(jpeg_shard, tmp_path, capsys):
    folder, _ = jpeg_shard
    page = tmp_path / "gallery.html"
    report = run_json(capsys, ["gallery", str(folder), "--out", str(page)])
    assert (report["shown"], report["broken_images"]) == (3, 0)
    assert page.read_text().count('<img src="data:image/jpeg;base64,') == 3


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.resize((16, 16)), dtype=np.float32)).permute(2, 0, 1)


def test_the_trainer_streams_the_jpeg_images(jpeg_shard):
    folder, images = jpeg_shard
    urls = shard_list(str(folder))
    assert urls == [str(folder / "00000.tar")]
    [batch] = list(iterate_once(urls, 8, _to_tensor))
    assert batch["key"] == list(images) and batch["image"].shape == (3, 3, 16, 16)
    assert batch["caption"] == [f"a plain square number {i}" for i in range(3)]
    stream = ShardStream(urls, 3, _to_tensor, shard_shuffle=0, shuffle_buffer=0, rank=0, world_size=1)
    first = next(stream)
    stream.close()
    assert sorted(first["key"]) == list(images) and first["image"].shape == (3, 3, 16, 16)


def test_the_trainers_shard_list_resolves_like_the_layout_and_passes_urls_through(jpeg_shard):
    folder, _ = jpeg_shard
    tar = str(folder / "00000.tar")
    assert shard_list(f"{folder}/*.tar::{folder}/{{00000..00000}}.tar") == [tar, tar]
    assert shard_list("pipe:cat /x/{0..1}.tar::https://h/a.tar") == [
        "pipe:cat /x/0.tar",
        "pipe:cat /x/1.tar",
        "https://h/a.tar",
    ]
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        shard_list(str(folder / "nope"))


# ---------------------------------------------------------------------------------------------------------------
# One module spells the layout


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (a module's, class's or function's first statement)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def _names_a_folder(node: ast.Constant, parent: ast.AST) -> bool:
    """Whether a ``"rejected"`` constant is used as a path part: an argument of a path call, a ``/`` operand, or a
    module constant (``REJECTED_DIR = "rejected"``); a dict key or a counter name is not."""
    if isinstance(parent, ast.Call) and node in parent.args:
        func = parent.func
        return (func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")) in PATH_CALLS
    if isinstance(parent, ast.BinOp):
        return isinstance(parent.op, ast.Div)
    if isinstance(parent, ast.Assign | ast.AnnAssign):
        targets = parent.targets if isinstance(parent, ast.Assign) else [parent.target]
        return any(isinstance(t, ast.Name) and t.id.isupper() for t in targets)
    return False


def layout_literals(path: Path, root: Path = ROOT) -> list[str]:
    """``file:line: 'literal'`` for each string constant of ``path`` (docstrings aside) that spells the layout."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings, parents = _docstrings(tree), {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[id(child)] = node
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or not isinstance(node.value, str) or id(node) in docstrings:
            continue
        spelled = [p.pattern for p in LAYOUT_STRINGS if p.search(node.value)]
        if node.value == "rejected" and _names_a_folder(node, parents.get(id(node))):
            spelled.append("rejected")
        if spelled:
            found.append((node.lineno, node.col_offset, node.value))
    return [f"{path.relative_to(root)}:{line}: {value!r}" for line, _, value in sorted(found)]


def test_the_scan_finds_layout_strings_but_not_docstrings_or_counters(tmp_path):
    source = tmp_path / "example.py"
    source.write_text(
        '"""Writes ``_stats.json`` and ``rejected/``."""\n'
        "import os\n"
        'REJECTED_DIR = "rejected"\n'
        "def f(out, n):\n"
        '    """Mentions run_report.json."""\n'
        '    counts = {"rejected": n}\n'
        '    return os.path.join(out, "rejected"), f"{out}/{n}_stats.json", counts["rejected"]\n'
    )
    found = [line.partition(": ")[2] for line in layout_literals(source, tmp_path)]
    assert found == ["'rejected'", "'rejected'", "'_stats.json'"]


def test_only_the_layout_module_spells_the_layout():
    offenders = [
        line
        for folder in PACKAGE_FOLDERS
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path != ROOT / "transforms" / "layout.py"
        for line in layout_literals(path)
    ]
    assert not offenders, "layout strings outside transforms/layout.py:\n" + "\n".join(offenders)
