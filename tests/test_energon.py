"""Megatron-Energon loads our shards from the metadata we write from the indexes, with no ``energon prepare``.

Datasets come from real ingests (LLaVA JSON with conversations and missing images; mix665k's row shapes: several
images, text only; a folder of captioned images). Energon's own loader (``get_train_dataset``, ``get_loader``,
``WorkerConfig`` on CPU) reads them back: every written sample once per epoch, with its conversation and images;
a metadataset blend draws by weight. What we write equals what ``energon prepare`` computes from the tars.
"""

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from visinstruct.cli.main import main
from visinstruct.configs import IngestConfig, from_dict
from visinstruct.pipelines.ingest import run as ingest
from visinstruct.schemas import SampleMeta
from visinstruct.testing.sample_data import llava_json_dataset, llava_mix_dataset, shapes_samples, write_images
from visinstruct.transforms import energon
from visinstruct.transforms.layout import ShardError, resolve_shards
from visinstruct.transforms.shards import read_tar_samples

pytest.importorskip("megatron.energon", reason="the dev extra installs megatron-energon")
pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true"),  # torch's DataLoader, on CPU
]
RUNNER = ["--runner=FnApiRunner"]
RESIZE = {"image_size": 32, "resize_mode": "border", "encode_format": "png"}


def _ingest(settings: dict) -> dict:
    return ingest(from_dict(IngestConfig, settings), RUNNER)


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> Path:
    """Seven LLaVA rows in shards of 3 over five images: written 3 + 2 + 0, the last two rejected (no image)."""
    root = tmp_path_factory.mktemp("llava")
    report = _ingest(llava_json_dataset(root, entries=7, images=5, shard_size=3))
    assert (report["written"], report["rejected"]) == (5, 2)
    return root / "out"


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """mix665k's row shapes: one image, the same image again, a one-element list, two and three images, text only."""
    root = tmp_path_factory.mktemp("mix")
    path, images, _ = llava_mix_dataset(root)
    report = _ingest(
        {
            "read": {"path": str(path), "image_root": str(images)},
            "write": {"path": str(root / "out"), "shard_size": 4},
            "resize": RESIZE,
        }
    )
    assert report["written"] == 12
    return root / "out"


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    """A folder of eight captioned images: no conversations."""
    root = tmp_path_factory.mktemp("captions")
    samples = shapes_samples(8, seed=1, size=(48, 48))
    for i, path in enumerate(write_images(samples, root / "images")):
        path.with_suffix(".txt").write_text(samples[i]["caption"])
    report = _ingest(
        {
            "read": {"path": str(root / "images")},
            "write": {"path": str(root / "out"), "shard_size": 5},
            "resize": RESIZE,
        }
    )
    assert report["written"] == 8
    return root / "out"


def written_samples(folder: Path) -> dict[str, SampleMeta]:
    """Every sample the tars hold, by key, with its JSON member (what energon must give back)."""
    return {
        key: SampleMeta.from_json(members["json"])
        for tar in resolve_shards(str(folder))
        for key, members in read_tar_samples(tar)
    }


def loader(path: Path, **kwargs):
    from megatron.energon import WorkerConfig, get_loader, get_train_dataset

    worker_config = WorkerConfig(rank=0, world_size=1, num_workers=0)
    dataset = get_train_dataset(
        str(path),
        worker_config=worker_config,
        batch_size=None,
        shuffle_buffer_size=None,
        max_samples_per_sequence=None,
        **kwargs,
    )
    return dataset, iter(get_loader(dataset))


def take(samples, n: int) -> list:
    return [next(samples) for _ in range(n)]


def turns(meta: SampleMeta) -> list[dict]:
    return [{"from": t.role, "value": t.value} for t in meta.conversations]


def metadata_bytes(folder: Path) -> dict[str, bytes]:
    files = sorted((folder / energon.META_DIR).iterdir()) + sorted(folder.glob(f"*{energon.ITAR_SUFFIX}"))
    return {f.name: f.read_bytes() for f in files}


# ---------------------------------------------------------------------------------------------------------------
# One dataset


def test_energon_yields_every_written_sample_once_per_epoch_with_its_conversation(llava):
    summary = energon.write_metadata(str(llava))
    expected = written_samples(llava)
    assert summary["sample_type"] == "SimilarityInterleavedSample" and summary["samples"] == len(expected) == 5
    dataset, samples = loader(llava)
    assert len(dataset) == 5
    for _epoch in range(3):
        epoch = take(samples, 5)
        assert Counter(s.__key__ for s in epoch) == Counter(list(expected))  # each written sample exactly once
        for sample in epoch:
            meta = expected[sample.__key__]
            assert sample.texts == turns(meta) and sample.texts[0]["value"].startswith("<image>")
            assert [tuple(image.shape) for image in sample.images] == [(3, meta.height, meta.width)]
            assert sample.__subflavors__ == {"has_image": True}


def test_rejected_rows_and_shards_that_wrote_nothing_are_not_in_the_metadata(llava):
    energon.write_metadata(str(llava))
    info = json.loads((llava / energon.META_DIR / energon.INFO_NAME).read_text())
    assert info == {"shard_counts": {"00000.tar": 3, "00001.tar": 2}}  # 00002 holds only a rejected row
    with sqlite3.connect(llava / energon.META_DIR / energon.SQLITE_NAME) as db:
        keys = {key for (key,) in db.execute("SELECT sample_key FROM samples")}
    assert keys == set(written_samples(llava)) and len(keys) == 5
    assert not (llava / "00002.tar.idx").exists()


def test_what_we_write_equals_what_energon_prepare_computes_from_the_tars(llava, tmp_path):
    from megatron.energon.flavors.webdataset.prepare import WebdatasetPreparator

    energon.write_metadata(str(llava))
    prepared = Path(shutil.copytree(llava, tmp_path / "prepared"))
    shutil.rmtree(prepared / energon.META_DIR)
    for idx in prepared.glob(f"*{energon.ITAR_SUFFIX}"):
        idx.unlink()
    WebdatasetPreparator.prepare_dataset(
        prepared, ["00000.tar", "00001.tar"], split_parts_ratio=[("train", 1.0)], workers=1
    )
    for name in ("00000.tar.idx", "00001.tar.idx"):
        assert (prepared / name).read_bytes() == (llava / name).read_bytes()
    queries = (
        "SELECT * FROM samples ORDER BY tar_file_id, sample_index",
        "SELECT * FROM sample_parts ORDER BY 1, 2, 4",
    )
    for query in queries:
        with (
            sqlite3.connect(prepared / energon.META_DIR / energon.SQLITE_NAME) as a,
            sqlite3.connect(llava / energon.META_DIR / energon.SQLITE_NAME) as b,
        ):
            assert a.execute(query).fetchall() == b.execute(query).fetchall()


def test_a_rerun_writes_byte_identical_metadata(llava):
    energon.write_metadata(str(llava))
    first = metadata_bytes(llava)
    energon.write_metadata(str(llava))
    assert metadata_bytes(llava) == first
    assert set(first) >= {
        ".info.json",
        "split.yaml",
        "dataset.yaml",
        "sample_loader.py",
        "index.sqlite",
        "index.uuid",
        "00000.tar.idx",
    }


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664)])
def test_metadata_files_honour_the_umask(llava, tmp_path, umask, mode):
    folder = Path(shutil.copytree(llava, tmp_path / "copy"))
    shutil.rmtree(folder / energon.META_DIR, ignore_errors=True)
    previous = os.umask(umask)
    try:
        energon.write_metadata(str(folder))
    finally:
        os.umask(previous)
    for name in metadata_bytes(folder):
        path = folder / energon.META_DIR / name if (folder / energon.META_DIR / name).exists() else folder / name
        assert path.stat().st_mode & 0o777 == mode, name
    assert not list((folder / energon.META_DIR).glob(".*.tmp"))


def test_several_images_and_text_only_samples_load_with_every_image_and_their_turns(mixed):
    energon.write_metadata(str(mixed))
    expected = written_samples(mixed)
    _, samples = loader(mixed)
    epoch = take(samples, len(expected))
    assert Counter(s.__key__ for s in epoch) == Counter(list(expected))
    counts = Counter()
    for sample in epoch:
        meta = expected[sample.__key__]
        assert sample.texts == turns(meta)
        assert len(sample.images) == meta.n_images  # KEY.0.png, KEY.1.png... in order; none for text only
        counts[meta.n_images] += 1
        if meta.images:
            assert [tuple(i.shape) for i in sample.images] == [(3, info.height, info.width) for info in meta.images]
    assert counts == {1: 6, 2: 2, 3: 2, 0: 2}
    assert epoch[0].__subflavors__ == {}  # not every sample has an image


def test_a_dataset_without_conversations_loads_as_captioning_samples(captions):
    from megatron.energon import CaptioningSample

    assert energon.write_metadata(str(captions))["sample_type"] == "CaptioningSample"
    expected = written_samples(captions)
    _, samples = loader(captions)
    epoch = take(samples, len(expected))
    assert Counter(s.__key__ for s in epoch) == Counter(list(expected))
    for sample in epoch:
        assert isinstance(sample, CaptioningSample)
        assert sample.caption == expected[sample.__key__].caption and sample.image.shape[0] == 3


def test_a_val_fraction_puts_the_last_shards_in_val(mixed, tmp_path):
    from megatron.energon import WorkerConfig, get_loader, get_val_dataset

    folder = Path(shutil.copytree(mixed, tmp_path / "copy"))
    summary = energon.write_metadata(str(folder), val_fraction=0.3)
    assert summary["splits"] == {"train": ["00000.tar", "00001.tar"], "val": ["00002.tar"]}
    worker_config = WorkerConfig(rank=0, world_size=1, num_workers=0)
    val = get_val_dataset(str(folder), split_part="val", worker_config=worker_config, batch_size=1)
    keys = [key for batch in get_loader(val) for key in batch.__key__]
    assert sorted(keys) == sorted(k for k in written_samples(folder) if k.startswith("00002"))
    with pytest.raises(ValueError, match="val_fraction"):
        energon.split_shards(["00000.tar", "00001.tar"], 1.0)


@pytest.mark.parametrize("dropped", [["turns"], ["members", "turns"]])
def test_older_indexes_without_offsets_or_turns_give_the_same_metadata(llava, tmp_path, dropped):
    """Without ``turns`` the JSON members say whether there are conversations; without ``members`` (img2dataset's
    index) the tar is read, as ``energon prepare`` would."""
    energon.write_metadata(str(llava))
    folder = Path(shutil.copytree(llava, tmp_path / "older"))
    for index in folder.glob("0000?.parquet"):
        pq.write_table(pq.read_table(index).drop_columns(dropped), index)
    energon.write_metadata(str(folder))
    assert metadata_bytes(folder) == metadata_bytes(llava)


def test_a_folder_with_an_unfinished_shard_is_refused(llava, tmp_path):
    folder = Path(shutil.copytree(llava, tmp_path / "copy"))
    (folder / "00001_stats.json").unlink()
    with pytest.raises(ShardError, match="not complete"):
        energon.write_metadata(str(folder))


# ---------------------------------------------------------------------------------------------------------------
# Blends


def test_a_blend_draws_from_each_folder_by_its_weight(llava, captions, tmp_path):
    energon.write_metadata(str(llava))
    energon.write_metadata(str(captions))
    blend = tmp_path / "blend.yaml"
    energon.write_blend(str(blend), [(str(llava), 3.0), (str(captions), 1.0)])
    _, samples = loader(blend)
    drawn = Counter(str(s.__sources__[0].dataset_path) for s in take(samples, 1200))
    assert set(drawn) == {str(llava), str(captions)}
    # 1200 draws at p = 0.75: the standard deviation of the share is 0.0125, so 0.06 is nearly five of them.
    assert abs(drawn[str(llava)] / 1200 - 0.75) < 0.06


def test_a_blend_refuses_a_folder_without_metadata(llava, tmp_path):
    bare = Path(shutil.copytree(llava, tmp_path / "bare"))
    shutil.rmtree(bare / energon.META_DIR, ignore_errors=True)
    with pytest.raises(ShardError, match="no energon metadata"):
        energon.write_blend(str(tmp_path / "blend.yaml"), [(str(bare), 1.0)])


# ---------------------------------------------------------------------------------------------------------------
# The command and the write.energon setting


def test_the_energon_command_writes_metadata_and_a_blend(llava, captions, tmp_path, capsys):
    blend = tmp_path / "mix.yaml"
    assert (
        main(["energon", str(llava), str(captions), "--blend", str(blend), "--weight", "2", "--weight", "1", "--json"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert [d["samples"] for d in out["datasets"]] == [5, 8]
    assert [e["weight"] for e in out["blend"]["splits"]["train"]["blend"]] == [2.0, 1.0]
    assert blend.exists()
    assert main(["energon", str(llava), "--weight", "1"]) == 2
    assert main(["energon", str(tmp_path / "missing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_an_ingest_with_write_energon_ends_ready_for_energon(tmp_path, capsys):
    settings = llava_json_dataset(tmp_path, entries=3, images=3, shard_size=2)
    settings["write"]["energon"] = True
    config = tmp_path / "ingest.json"
    config.write_text(json.dumps(settings))
    assert main(["ingest", "--config", str(config), *RUNNER]) == 0
    assert "energon metadata: 3 samples in 2 shards" in capsys.readouterr().out
    _, samples = loader(tmp_path / "out")
    assert sorted(s.__key__ for s in take(samples, 3)) == sorted(written_samples(tmp_path / "out"))


def test_the_energon_command_imports_neither_beam_nor_torch(llava, tmp_path):
    """Writing the metadata needs the indexes only: no Beam, no torch, not even energon."""
    folder = Path(shutil.copytree(llava, tmp_path / "copy"))
    console = os.path.join(os.path.dirname(sys.executable), "visinstruct")
    done = subprocess.run(
        [sys.executable, "-X", "importtime", console, "energon", str(folder)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    modules = {
        line.rpartition("|")[2].strip().split(".")[0] for line in done.stderr.splitlines() if "import time:" in line
    }
    assert not modules & {"apache_beam", "torch", "megatron"}
    assert "5 samples in 2 shards" in done.stdout


def test_a_mix_with_energon_set_ends_ready_for_energon_blended_by_what_each_source_gave(
    llava, captions, tmp_path, capsys
):
    import yaml

    config = tmp_path / "mix.json"
    sources = [
        {"name": "chat", "input": str(llava), "count": 4},
        {"name": "captions", "input": str(captions), "count": 6},
    ]
    config.write_text(json.dumps({"sources": sources, "energon": True}))
    assert main(["mix", "--config", str(config), "--out", str(tmp_path / "mixed"), *RUNNER]) == 0
    assert "energon metadata: 10 samples in 2 source folders" in capsys.readouterr().out
    blend = yaml.safe_load((tmp_path / "mixed" / energon.MIX_BLEND_NAME).read_text())
    assert [(e["path"], e["weight"]) for e in blend["splits"]["train"]["blend"]] == [("chat", 4.0), ("captions", 6.0)]
    _, samples = loader(tmp_path / "mixed" / energon.MIX_BLEND_NAME)
    drawn = take(samples, 200)
    mixed = {**written_samples(tmp_path / "mixed" / "chat"), **written_samples(tmp_path / "mixed" / "captions")}
    assert len(mixed) == 10 and {s.__key__ for s in drawn} <= set(mixed)
    assert {Path(str(s.__sources__[0].dataset_path)).name for s in drawn} == {"chat", "captions"}


def test_a_takedown_of_one_image_of_a_multi_image_sample_removes_it_and_refreshes_the_metadata(
    mixed, tmp_path, capsys
):
    import yaml

    folder = Path(shutil.copytree(mixed, tmp_path / "copy"))
    energon.write_metadata(str(folder), val_fraction=0.34)
    before = json.loads((folder / energon.META_DIR / energon.INFO_NAME).read_text())["shard_counts"]
    rows = pq.read_table(sorted(folder.glob("*.parquet"))).to_pylist()
    victim = next(r for r in rows if r["image_count"] == 3)  # its second image is named in the list
    (tmp_path / "digests.txt").write_text(victim["image_sha256s"][1] + "\n")
    assert main(["remove", str(folder), "--sha256", str(tmp_path / "digests.txt"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # the first three-image sample and the other that shares its second image (rows 2 and 4 of a group use it)
    removed = {r["key"] for r in report["removed"]}
    assert victim["key"] in removed and len(removed) == 2 and report["energon"][0]["folder"] == str(folder)
    after = json.loads((folder / energon.META_DIR / energon.INFO_NAME).read_text())["shard_counts"]
    assert sum(after.values()) == sum(before.values()) - len(removed)
    split = yaml.safe_load((folder / energon.META_DIR / energon.SPLIT_NAME).read_text())["split_parts"]
    assert split["val"] == [sorted(before)[-1]]  # the split kept its val shard
    _, samples = loader(folder)  # the train split, round and round
    keys = {s.__key__ for s in take(samples, 40)}
    assert keys.isdisjoint(removed) and keys <= set(written_samples(folder))


def test_a_removal_that_leaves_nothing_to_train_on_withdraws_the_metadata_and_says_so(llava, tmp_path, capsys):
    import pyarrow.parquet as pq

    folder = Path(shutil.copytree(llava, tmp_path / "copy"))
    energon.write_metadata(str(folder), val_fraction=0.5)  # shards 00000 (train) and 00001 (val)
    train = pq.read_table(folder / "00000.parquet").to_pylist()
    (tmp_path / "digests.txt").write_text("".join(r["sha256"] + "\n" for r in train if r["status"] == "success"))
    assert main(["remove", str(folder), "--sha256", str(tmp_path / "digests.txt")]) == 0
    out = capsys.readouterr().out
    assert "energon metadata of" in out and "withdrawn: no shard with samples is left for the train split" in out
    assert not (folder / energon.META_DIR / energon.INFO_NAME).exists()
