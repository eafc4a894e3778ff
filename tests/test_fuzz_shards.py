"""Shards cut short in transit: every reader accounts for every indexed row, at every cut point.

A real shard (our writer's tar, parquet index and stats) is cut at every member boundary and in the middle of
every member's header and data. For each cut: ``read_tar_samples`` yields only whole samples and then says where
reading stopped; the rewrite that filter and generate share writes a shard whose index keeps every input row
(``missing_in_tar`` rows and dead letters for what the tar lost) and which ``validate`` passes; ``export`` and
``gallery`` say how many indexed samples they could not read and exit non-zero. A text file named ``.tar`` is
never written as an empty, complete shard.
"""

import io
import json
import shutil
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from visinstruct.cli.export import export_llava
from visinstruct.cli.gallery import gallery
from visinstruct.cli.main import main
from visinstruct.cli.validate import validate
from visinstruct.configs import GenerateConfig, from_dict
from visinstruct.pipelines import generate
from visinstruct.schemas import SCHEMA_VERSION, Decision, IndexRow, Rejection, SampleMeta, Turn, from_table
from visinstruct.transforms.commit import recount
from visinstruct.transforms.layout import ShardError, resolve_shards, shard_in, write_stats
from visinstruct.transforms.rewrite import MISSING, UNREADABLE, rewrite_shard
from visinstruct.transforms.shards import (
    ShardReadError,
    TarShardWriter,
    read_table,
    read_tar_samples,
    write_table,
)

pytestmark = pytest.mark.timeout(300)
SAMPLES = 5
CONVERSATION = [Turn("human", "<image>\nWhat colour is it?"), Turn("gpt", "It is a shade of red.")]


def jpeg(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24 + i, 20), (40 * i % 256, 90, 160)).save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


def write_dataset(folder: Path, samples: int = SAMPLES) -> list[IndexRow]:
    """Shard 00000 as our ingest writes it: ``samples`` written plus one rejected row, index and stats."""
    folder.mkdir(parents=True, exist_ok=True)
    writer, rows = TarShardWriter(), []
    for i in range(samples):
        key = f"00000{i:04d}"
        meta = SampleMeta(
            key=key,
            url=f"http://example.test/{i}.jpg",
            caption=f"a red square {i}",
            width=24 + i,
            height=20,
            conversations=CONVERSATION,
        )
        members = writer.add(
            key, [("jpg", jpeg(i)), ("txt", meta.caption.encode()), ("json", meta.to_json().encode())]
        )
        rows.append(
            IndexRow(
                key=key, status="success", url=meta.url, caption=meta.caption, width=24 + i, height=20, members=members
            )
        )
    rows.append(
        IndexRow(key=f"00000{samples:04d}", status="http_404", url="http://example.test/gone.jpg", error_message="404")
    )
    write_index_and_stats(folder, rows, writer.finish(shard_in(str(folder), 0).tar))
    return rows


def write_index_and_stats(folder: Path, rows: list[IndexRow], tar_bytes: int) -> None:
    """Shard 00000's parquet index and the stats counted from its rows, beside its tar of ``tar_bytes``."""
    files = shard_in(str(folder), 0)
    write_table(files.index, rows, IndexRow, SCHEMA_VERSION)
    write_stats(files.stats, recount(0, "ingest", rows, tar_bytes))


def cut_points(tar: Path) -> list[int]:
    """Every member boundary, the middle of every header and of every member's data, and inside the end blocks."""
    points = set()
    with tarfile.open(tar) as archive:
        for info in archive:
            points |= {
                info.offset,
                info.offset + 100,
                info.offset_data,
                info.offset_data + info.size // 2,
                info.offset_data + info.size,
            }
        end = archive.offset
    points |= {end, end + 256, end + 512 + 100}
    return sorted(p for p in points if 0 <= p < tar.stat().st_size)


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> tuple[Path, list[IndexRow]]:
    folder = tmp_path_factory.mktemp("whole") / "shards"
    return folder, write_dataset(folder)


def cut_copy(whole: Path, at: int, tmp_path: Path) -> Path:
    folder = Path(shutil.copytree(whole, tmp_path / f"cut{at}"))
    with open(folder / "00000.tar", "r+b") as f:
        f.truncate(at)
    return folder


def keep_all(key: str, meta: SampleMeta, members: dict[str, bytes]) -> Decision[SampleMeta]:
    return Decision.keep(meta)


def written_keys(rows: list[IndexRow]) -> set[str]:
    return {r.key for r in rows if r.status == "success"}


def test_the_cut_points_cover_every_member(whole):
    folder, _ = whole
    assert len(cut_points(folder / "00000.tar")) >= 5 * 3 * SAMPLES


def test_read_tar_samples_yields_whole_samples_then_says_where_it_stopped(whole, tmp_path):
    folder, _ = whole
    original = dict(read_tar_samples(str(folder / "00000.tar")))
    for at in cut_points(folder / "00000.tar"):
        cut = cut_copy(folder, at, tmp_path)
        got = []
        with pytest.raises(ShardReadError, match=r"00000\.tar"):
            for key, members in read_tar_samples(str(cut / "00000.tar")):
                got.append(key)
                assert members == original[key], f"cut at {at}: sample {key} is not whole"
        assert got == sorted(original)[: len(got)], f"cut at {at}"
        shutil.rmtree(cut)


def test_the_rewrite_accounts_for_every_indexed_row_at_every_cut(whole, tmp_path):
    folder, rows = whole
    for at in cut_points(folder / "00000.tar"):
        cut = cut_copy(folder, at, tmp_path)
        out = cut / "out"
        stats = rewrite_shard(str(cut / "00000.tar"), 0, str(out), "generate", keep_all)
        index = from_table(IndexRow, read_table(str(out / "00000.parquet"), IndexRow))
        assert [r.key for r in index] == [r.key for r in rows], f"cut at {at}"
        statuses = {r.key: r.status for r in index}
        dead = from_table(Rejection, read_table(str(out / "rejected" / "generate-00000.parquet"), Rejection))
        assert {d.key for d in dead} == {k for k, s in statuses.items() if s == MISSING}
        assert all(d.reason == MISSING and "00000.tar" in d.message for d in dead)
        assert set(statuses.values()) <= {"success", MISSING, "http_404"}
        assert stats.written + sum(s == MISSING for s in statuses.values()) == SAMPLES
        tar = wds.WebDataset(str(out / "00000.tar"), shardshuffle=False, empty_check=False)
        assert written_keys(index) == {sample["__key__"] for sample in tar}
        checked = validate(resolve_shards(str(out)))
        assert checked.ok, f"cut at {at}: {checked.problems}"
        shutil.rmtree(cut)


def test_export_and_gallery_count_what_they_could_not_read_at_every_cut(whole, tmp_path):
    folder, rows = whole
    for at in cut_points(folder / "00000.tar"):
        cut = cut_copy(folder, at, tmp_path)
        try:
            report = export_llava(resolve_shards(str(cut)), str(cut / "export"))
        except ShardError as e:  # not one whole sample before the cut: nothing to export, and it says why
            assert f"{SAMPLES} indexed samples could not be read from 1 shards" in str(e), f"cut at {at}"
        else:  # the export writes the whole samples and counts the rest
            entries = json.loads((cut / "export" / "llava.json").read_text())
            assert (
                report["exported"] + report["skipped"]["missing_in_tar"]
                == SAMPLES
                == len(entries) + report["unread"][0]["missing"]
            ), f"cut at {at}"
        page = gallery(resolve_shards(str(cut)), str(cut / "g.html"), limit=SAMPLES)
        past_the_cut = sum(any(m.offset + m.size > at for m in r.members) for r in rows)  # read at the offsets
        assert (page["shown"], page["unread"], page["broken_images"]) == (SAMPLES, past_the_cut, 0), f"cut at {at}"
        shutil.rmtree(cut)


def test_the_commands_exit_non_zero_and_say_how_many_samples_they_could_not_read(whole, tmp_path, capsys):
    folder, _ = whole
    tar = folder / "00000.tar"
    with tarfile.open(tar) as archive:
        third = [m for m in archive if m.name.startswith("000000002")][0]
    # Cut exactly at a member boundary: samples 2, 3 and 4 are gone, and sample 1 cannot be known whole (more of
    # its members could have followed), so the tar reader gives samples 0 only; reading at the index's offsets
    # (gallery, show) still finds sample 1's bytes.
    cut = cut_copy(folder, third.offset, tmp_path)
    assert main(["export", str(cut), "--out", str(tmp_path / "x")]) == 1
    out = capsys.readouterr().out
    assert "exported 1 samples" in out and "NOT READ: 4 indexed samples could not be read from 1 shards" in out
    assert main(["gallery", str(cut), "-o", str(tmp_path / "g.html")]) == 1
    assert "NOT READ: 3 of the samples picked could not be read" in capsys.readouterr().out
    assert main(["show", str(cut), "000000003"]) == 2
    assert "cut short" in capsys.readouterr().err
    assert main(["validate", str(cut)]) == 1


def test_a_text_file_named_tar_is_never_written_as_a_complete_shard(tmp_path):
    shards = tmp_path / "in"
    shards.mkdir()
    (shards / "00000.tar").write_text("this is not a tar file\n" * 40)
    stats = rewrite_shard(str(shards / "00000.tar"), 0, str(tmp_path / "out"), "filter", keep_all)
    assert (stats.inputs, stats.written) == (0, 0)
    assert not (tmp_path / "out" / "00000_stats.json").exists() and not (tmp_path / "out" / "00000.tar").exists()
    dead = pq.read_table(tmp_path / "out" / "rejected" / "filter-00000.parquet").to_pylist()
    assert [(d["reason"], d["url"]) for d in dead] == [(UNREADABLE, str(shards / "00000.tar"))]
    assert "not a tar" in dead[0]["message"]


def test_generate_on_a_cut_shard_keeps_every_row_on_record(whole, tmp_path):
    folder, rows = whole
    with tarfile.open(folder / "00000.tar") as archive:
        fourth = [m for m in archive if m.name == "000000003.txt"][0]
    cut = cut_copy(folder, fourth.offset_data + 3, tmp_path)  # mid-member: samples 3 and 4 lost
    cfg = from_dict(GenerateConfig, {"backend": "caption_only", "write": {"path": str(tmp_path / "gen")}})
    report = generate.run(cfg, [str(cut / "00000.tar")], ["--runner=FnApiRunner"])
    assert (report["inputs"], report["written"]) == (len(rows), 3)
    assert report["rejected_by_reason"] == {MISSING: 2, "http_404": 1} and report["accounted"]
    assert validate(resolve_shards(str(tmp_path / "gen"))).ok


def test_a_run_over_a_shard_it_cannot_read_is_a_failed_run(whole, tmp_path, capsys):
    folder, rows = whole
    shards = tmp_path / "in"
    shutil.copytree(folder, shards)
    (shards / "00001.tar").write_text("this is not a tar file\n" * 40)  # a second shard, not a tar at all
    config = tmp_path / "generate.yaml"
    config.write_text("backend: caption_only\n")
    out = tmp_path / "out"
    status = main(
        [
            "-q",
            "generate",
            "--config",
            str(config),
            "--input",
            f"{shards}/{{00000,00001}}.tar",
            "--out",
            str(out),
            "--runner=FnApiRunner",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1
    assert err[-1].startswith("visinstruct generate: failed: 1 input shards could not be read"), err
    assert (out / "00000_stats.json").exists() and not (out / "00001_stats.json").exists()
    assert json.loads((out / "run_report.json").read_text())["shards_unwritten"] == 1


def write_raw_shard(folder: Path, samples: dict[str, dict[str, bytes]], index: list[IndexRow]) -> Path:
    """Shard 00000 with members exactly as given (any JSON), its index rows as given, and stats that add up."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "00000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    write_index_and_stats(folder, index, (folder / "00000.tar").stat().st_size)
    return folder / "00000.tar"


BAD_JSON = {  # tar key: the JSON member; every one is that sample's bad_metadata, never a failed bundle
    "000000001": b"[1]",  # not an object (AttributeError before)
    "000000002": b'{"key": 5}',  # a key that is not a string (TypeError in the sort before)
    "000000003": b'{"key": "000000000", "caption": "claims sample 0"}',  # another sample's key (AccountingError)
    "000000004": b'{"key": "000000000", "caption": "claims sample 0 too"}',
    "000000005": b'{"key": "000000005", "boxes": ["dog"], "conversations": [{"value": "x"}]}',
    "000000006": b'{"key": "000000006", "caption": "\\ud800"}',  # a lone surrogate: no table could hold it
}


def bad_json_shard(folder: Path) -> Path:
    samples = {
        "000000000": {
            "jpg": jpeg(0),
            "txt": b"good",
            "json": SampleMeta(key="000000000", caption="good").to_json().encode(),
        }
    }
    samples |= {key: {"jpg": jpeg(1), "txt": b"x", "json": data} for key, data in BAD_JSON.items()}
    samples["000000007"] = {"jpg": jpeg(2), "txt": b"no json at all"}
    index = [IndexRow(key=key, status="success", caption="x") for key in samples]
    return write_raw_shard(folder, samples, index)


def test_a_bad_json_member_costs_that_sample_only_in_the_rewrite(tmp_path):
    tar = bad_json_shard(tmp_path / "in")
    stats = rewrite_shard(str(tar), 0, str(tmp_path / "out"), "generate", keep_all)
    index = from_table(IndexRow, read_table(str(tmp_path / "out" / "00000.parquet"), IndexRow))
    assert {r.key: r.status for r in index} == {
        "000000000": "success",
        "000000007": "success",
        **{key: "bad_metadata" for key in BAD_JSON},
    }
    dead = from_table(Rejection, read_table(str(tmp_path / "out" / "rejected" / "generate-00000.parquet"), Rejection))
    assert sorted((d.key, d.reason) for d in dead) == [(key, "bad_metadata") for key in BAD_JSON]
    assert "its JSON says key '000000000'" in {d.key: d.message for d in dead}["000000003"]
    assert (stats.inputs, stats.written, stats.rejected_by_reason) == (8, 2, {"bad_metadata": 6})
    checked = validate(resolve_shards(str(tmp_path / "out")))
    assert checked.ok, checked.problems


def test_filter_reads_bad_json_members_as_bad_metadata_in_a_pipeline(tmp_path):
    import apache_beam as beam
    from apache_beam.testing import test_pipeline
    from apache_beam.testing.util import assert_that, equal_to

    from visinstruct.transforms.filter_stages import ReadShardSamples

    tar = bad_json_shard(tmp_path / "in")
    with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
        out = p | beam.Create([str(tar)]) | beam.ParDo(ReadShardSamples()).with_outputs("rejected", main="samples")
        assert_that(
            out.samples | "Keys" >> beam.Map(lambda e: e[0][1]), equal_to(["000000000", "000000007"]), label="Read"
        )
        assert_that(
            out.rejected | "Reasons" >> beam.Map(lambda e: (e[1].key, e[1].reason)),
            equal_to([(key, "bad_metadata") for key in BAD_JSON]),
            label="Rejected",
        )


def test_generate_dead_letters_bad_json_members_and_accounts_for_every_row(tmp_path):
    tar = bad_json_shard(tmp_path / "in")
    cfg = from_dict(GenerateConfig, {"backend": "caption_only", "write": {"path": str(tmp_path / "gen")}})
    report = generate.run(cfg, [str(tar)], ["--runner=FnApiRunner"])
    assert (report["inputs"], report["written"]) == (8, 2)
    assert report["rejected_by_reason"] == {"bad_metadata": 6} and report["accounted"]
    assert validate(resolve_shards(str(tmp_path / "gen"))).ok


def test_metadata_errors_other_than_value_error_are_internal_errors(tmp_path, monkeypatch):
    """ValueError is bad_metadata; anything else reading a sample's metadata raises is a bug: internal_error."""
    tar = bad_json_shard(tmp_path / "in")
    real = SampleMeta.from_json

    def from_json(text):
        if b"claims sample 0 too" in text:
            raise KeyError("a bug")
        return real(text)

    monkeypatch.setattr(SampleMeta, "from_json", staticmethod(from_json))
    rewrite_shard(str(tar), 0, str(tmp_path / "out"), "filter", keep_all)
    dead = from_table(Rejection, read_table(str(tmp_path / "out" / "rejected" / "filter-00000.parquet"), Rejection))
    reasons = {d.key: d.reason for d in dead}
    assert reasons.pop("000000004") == "internal_error" and set(reasons.values()) == {"bad_metadata"}


def test_a_key_twice_in_the_input_index_keeps_the_first_row_and_dead_letters_the_rest(tmp_path):
    samples = {f"00000000{i}": {"jpg": jpeg(i), "txt": f"caption {i}".encode()} for i in range(3)}
    index = [
        IndexRow(key="000000000", status="success", url="u0"),
        IndexRow(key="000000001", status="success", url="u1"),
        IndexRow(key="000000001", status="http_404", url="u1-again"),  # sample in the tar, indexed twice
        IndexRow(key="000000002", status="success", url="u2"),
        IndexRow(key="000000003", status="http_500", url="u3"),  # rejected earlier, indexed twice
        IndexRow(key="000000003", status="http_500", url="u3-again"),
    ]
    tar = write_raw_shard(tmp_path / "in", samples, index)
    stats = rewrite_shard(str(tar), 0, str(tmp_path / "out"), "filter", keep_all)
    out = from_table(IndexRow, read_table(str(tmp_path / "out" / "00000.parquet"), IndexRow))
    assert [(r.key, r.status) for r in out] == [
        ("000000000", "success"),
        ("000000001", "success"),
        ("000000002", "success"),
        ("000000003", "http_500"),
    ]
    assert {r.key: r.url for r in out}["000000003"] == "u3"  # the first row of the key
    dead = from_table(Rejection, read_table(str(tmp_path / "out" / "rejected" / "filter-00000.parquet"), Rejection))
    assert sorted((d.key, d.reason, d.url) for d in dead) == [
        ("000000001", "duplicate_key", "u1-again"),
        ("000000003", "duplicate_key", "u3-again"),
    ]
    assert (stats.inputs, stats.written, stats.rejected) == (4, 3, 1)
    assert len(out) + len(dead) == len(index)  # every input index row: kept once, or a dead letter
    assert validate(resolve_shards(str(tmp_path / "out"))).ok


def test_a_sample_the_writer_cannot_hold_leaves_no_member_in_the_tar(tmp_path):
    writer = TarShardWriter()
    writer.add("000000000", [("jpg", jpeg(0)), ("txt", b"first")])
    long_key = "k" * 96  # "<key>.jpg" and "<key>.txt" fit USTAR's 100 characters, "<key>.json" does not
    with pytest.raises(ValueError, match="too long"):
        writer.add(long_key, [("jpg", jpeg(1)), ("txt", b"long"), ("json", b"{}")])
    last = writer.add("000000002", [("jpg", jpeg(2)), ("txt", b"third")])
    writer.finish(str(tmp_path / "00000.tar"))
    with tarfile.open(tmp_path / "00000.tar") as tar:
        names = tar.getnames()
        data = {m.name: (m.offset_data, m.size) for m in tar}
    assert names == ["000000000.jpg", "000000000.txt", "000000002.jpg", "000000002.txt"]
    assert [(m.offset, m.size) for m in last] == [data[m.name] for m in last]


def test_a_write_that_fails_part_way_is_undone(tmp_path):
    """A sample whose bytes stop being written part-way (a full disk) is rolled back to where it began."""
    writer = TarShardWriter()
    writer.add("000000000", [("jpg", jpeg(0)), ("txt", b"first")])
    real = writer._tar.fileobj

    class FullDisk:  # the tar's file, refusing its third write: the second member's header
        writes = 0

        def write(self, data):
            FullDisk.writes += 1
            if FullDisk.writes == 3:
                raise OSError(28, "No space left on device")
            return real.write(data)

    writer._tar.fileobj = FullDisk()
    with pytest.raises(OSError, match="No space"):
        writer.add("000000001", [("jpg", jpeg(1)), ("txt", b"second")])
    writer._tar.fileobj = real
    last = writer.add("000000002", [("jpg", jpeg(2)), ("txt", b"third")])
    writer.finish(str(tmp_path / "00000.tar"))
    with tarfile.open(tmp_path / "00000.tar") as tar:
        data = {m.name: (m.offset_data, m.size) for m in tar}
    assert list(data) == ["000000000.jpg", "000000000.txt", "000000002.jpg", "000000002.txt"]
    assert [(m.offset, m.size) for m in last] == [data[m.name] for m in last]


def test_a_member_name_that_is_not_utf8_stops_reading_there_and_costs_no_more_than_the_rest(whole, tmp_path):
    folder, rows = whole
    shards = Path(shutil.copytree(folder, tmp_path / "in"))
    with tarfile.open(folder / "00000.tar") as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive]
    with tarfile.open(shards / "00000.tar", "w", format=tarfile.USTAR_FORMAT, errors="surrogateescape") as archive:
        for i, (info, data) in enumerate(members):
            if i == 6:  # a member of the third sample, renamed to bytes that are not UTF-8
                info.name = b"\xff\xfe.txt".decode("utf-8", "surrogateescape")
            archive.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="not UTF-8"):  # UnsafeMember, as a link or an escaping name
        list(read_tar_samples(str(shards / "00000.tar")))
    stats = rewrite_shard(str(shards / "00000.tar"), 0, str(tmp_path / "out"), "filter", keep_all)
    assert stats.inputs == len(rows)  # every indexed row accounted for: written, or dead-lettered
    index = pq.read_table(tmp_path / "out" / "00000.parquet").to_pylist()
    assert {r["status"] for r in index} <= {"success", MISSING, "http_404"} and MISSING in {r["status"] for r in index}
    assert validate(resolve_shards(str(tmp_path / "out"))).ok
