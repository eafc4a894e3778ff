"""The ingest pipeline on a real Beam runner against the fault-injecting loopback server.

Every input row ends written or rejected with its reason; shards read back with webdataset and pyarrow; the
same input gives byte-identical shards; reruns resume without duplicates.
"""

import io
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from visinstruct.configs import IngestConfig, from_dict
from visinstruct.pipelines.ingest import run
from visinstruct.schemas import SampleMeta
from visinstruct.testing.server import ImageServer, encode_test_image

pytestmark = pytest.mark.timeout(300)
RUNNER = ["--runner=FnApiRunner"]


@pytest.fixture(scope="module")
def server():
    with ImageServer() as srv:
        for i, size in enumerate([(80, 60), (90, 70), (100, 50), (70, 70), (120, 90)]):
            srv.add_image(f"/photo{i}.jpg", encode_test_image("jpeg", size))
        srv.add_image("/photo0.png", encode_test_image("png", (80, 60)))  # same picture, other bytes
        srv.add_image("/photo1-copy.jpg", encode_test_image("jpeg", (90, 70)))  # same bytes, other URL
        srv.add("/bomb.png", png_bomb(30_000, 30_000), "image/png")
        yield srv


def png_bomb(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + chunk(b"IEND", b"")
    )


def write_urls(path: Path, urls: list[str]) -> str:
    pq.write_table(
        pa.table(
            {"url": urls, "caption": [f"caption {i}" for i in range(len(urls))], "license": ["cc-by"] * len(urls)}
        ),
        path,
    )
    return str(path)


def ingest(tmp_path: Path, urls: list[str], out: str = "out", beam_args=RUNNER, **sections) -> tuple[dict, Path]:
    settings = {
        "read": {"path": write_urls(tmp_path / "urls.parquet", urls), "save_additional_columns": ["license"]},
        "write": {"path": str(tmp_path / out), "shard_size": 4},
        "download": {
            "allow_loopback": True,
            "timeout": 1.0,
            "retries": 1,
            "backoff": 0.01,
            "per_host_rps": None,
            "threads": 8,
        },
        "resize": {"image_size": 64, "resize_mode": "center_crop"},
    }
    for name, values in sections.items():
        settings[name] = settings.get(name, {}) | values
    return run(from_dict(IngestConfig, settings), list(beam_args)), tmp_path / out


def statuses(out: Path) -> dict[str, str]:
    rows = pq.read_table(sorted(out.glob("*.parquet"))).to_pylist() if list(out.glob("*.parquet")) else []
    return {r["key"]: r["status"] for r in rows}


def read_shards(out: Path) -> list[dict]:
    tars = [str(p) for p in sorted(out.glob("*.tar"))]
    return list(wds.WebDataset(tars, shardshuffle=False))


def test_every_fault_ends_written_or_rejected_with_its_reason(server, tmp_path):
    urls = [
        server.url("/photo0.jpg"),
        server.fault_url("404"),
        server.fault_url("flaky", n=1),
        server.fault_url("500"),
        server.fault_url("hang"),
        server.fault_url("truncated"),
        server.fault_url("corrupt"),
        server.fault_url("html"),
        server.fault_url("redirect", n=2),
        server.fault_url("redirect_loop"),
        server.fault_url("noai"),
        server.url("/bomb.png"),
        server.fault_url("huge_stream", megabytes=1),
        server.url("/photo2.jpg"),
        "notaurl",
        server.fault_url("429", n=1, retry_after=0.1),
    ]
    report, out = ingest(tmp_path, urls, download={"max_bytes": 512 * 1024})
    expected = [
        "success",
        "http_404",
        "success",
        "http_500",
        "timeout",
        "truncated",
        "decode_error",
        "not_an_image",
        "duplicate_sha256",
        "redirect_loop",
        "optout",
        "decompression_bomb",
        "too_large",
        "success",
        "invalid_url",
        "duplicate_sha256",
    ]
    # flaky, redirect and 429 all end at the server's default image: one copy is kept (the smallest key)
    assert list(statuses(out).values()) == expected
    assert report["inputs"] == report["rows_read"] == len(urls) and report["accounted"]
    assert report["written"] == 3 and report["written"] + report["rejected"] == len(urls)

    samples = read_shards(out)
    assert [s["__key__"] for s in samples] == ["000000000", "000000002", "000030001"]
    for sample in samples:
        meta = SampleMeta.from_json(sample["json"])
        assert Image.open(io.BytesIO(sample["jpg"])).size == (64, 64) == (meta.width, meta.height)
        assert sample["txt"].decode() == meta.caption and meta.source == {"license": "cc-by"}
        assert meta.url == urls[int(meta.key[-4:]) + 4 * int(meta.key[:5])]
    rejected = pq.read_table(out / "rejected").to_pylist()
    assert sorted((r["key"], r["reason"]) for r in rejected) == sorted(
        (k, s) for k, s in statuses(out).items() if s != "success"
    )
    assert {r["stage"] for r in rejected} == {"download", "decode", "dedup"}
    assert not (out / "_staging").exists()


def test_loopback_is_refused_unless_allowed(server, tmp_path):
    report, out = ingest(
        tmp_path, [server.url("/photo3.jpg")] * 2 + [server.url("/photo4.jpg")], download={"allow_loopback": False}
    )
    assert set(statuses(out).values()) == {"blocked_address", "duplicate_url"}
    assert report["written"] == 0


def test_duplicates_are_written_once_keeping_the_smallest_key(server, tmp_path):
    urls = [
        server.url("/photo1-copy.jpg"),
        server.url("/photo1.jpg"),
        server.url("/photo0.jpg"),
        server.url("/photo1.jpg"),
        server.url("/photo0.png"),
        server.url("/photo3.jpg"),
    ]
    _, out = ingest(tmp_path, urls)
    assert list(statuses(out).values()) == [
        "success",
        "duplicate_sha256",
        "success",
        "duplicate_url",
        "success",
        "success",
    ]
    _, out = ingest(tmp_path, urls, out="near", dedup={"phash_max_distance": 6})
    assert statuses(out)["000010000"] == "near_duplicate"  # the PNG of photo0: other bytes, same picture


def test_url_dedup_shuffles_small_records_and_rejects_each_loser_in_its_own_shard():
    from visinstruct.schemas import ImageTextPair, Rejection
    from visinstruct.transforms.dedup import drop_url_losers, url_losers, url_record

    long_url = "https://a.example/" + "x" * 5000
    rows = [
        ImageTextPair(key="000000000", url=long_url),
        ImageTextPair(key="000000001", url="https://b.example/1.jpg"),
        ImageTextPair(key="000010002", url=long_url),  # another shard
        ImageTextPair(key="000010003", url=long_url, conversations=[{"from": "human", "value": "<image>?"}]),
        Rejection("read", "missing_url", "no URL", "000010004", None),
        ImageTextPair(key="000010005", path="/data/x.jpg"),
    ]
    records = [record for row in rows for record in url_record(row)]
    # a record per pair fetched by URL without a conversation; 16 bytes stand for the URL, however long
    assert [(len(url_hash), key) for url_hash, key in records] == [
        (16, "000000000"),
        (16, "000000001"),
        (16, "000010002"),
    ]
    groups: dict[bytes, list[str]] = {}
    for url_hash, key in records:
        groups.setdefault(url_hash, []).append(key)
    losers = dict(loser for keys in groups.values() for loser in url_losers(reversed(keys)))
    assert losers == {"000010002": "000000000"}  # the smallest key wins, whatever order the shuffle gives
    kept = drop_url_losers(rows[2:], losers)  # the second shard's rows and its losers
    assert kept[1:] == rows[3:]
    assert (kept[0].key, kept[0].reason, kept[0].message, kept[0].url) == (
        "000010002",
        "duplicate_url",
        "same URL as 000000000",
        long_url,
    )
    assert kept[0].detail == {"duplicate_of": "000000000"} and kept[0].stage == "dedup"


def test_the_perceptual_hash_is_computed_only_when_a_step_compares_looks(server, tmp_path):
    urls = [server.url("/photo2.jpg"), server.url("/photo3.jpg")]
    _, plain = ingest(tmp_path, urls, out="plain")  # exact dedup only: no pHash
    _, near = ingest(tmp_path, urls, out="near", dedup={"phash_max_distance": 4})
    for out, computed in [(plain, False), (near, True)]:
        index = pq.read_table(sorted(out.glob("*.parquet"))).to_pylist()
        assert [row["phash"] is not None for row in index] == [computed, computed]
        assert ["phash" in json.loads(sample["json"]) for sample in read_shards(out)] == [computed, computed]
    assert [s["jpg"] for s in read_shards(plain)] == [s["jpg"] for s in read_shards(near)]  # same images either way


def test_reference_images_are_kept_out(server, tmp_path):
    reference = tmp_path / "eval"
    reference.mkdir()
    (reference / "a.png").write_bytes(encode_test_image("png", (100, 50)))
    _, out = ingest(
        tmp_path,
        [server.url("/photo2.jpg"), server.url("/photo3.jpg")],
        dedup={"reference_dir": str(reference), "phash_max_distance": 4},
    )
    assert list(statuses(out).values()) == ["near_reference", "success"]


def tree_bytes(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "run_report.json" and not p.name.endswith("_stats.json")
    }


def test_same_input_gives_byte_identical_shards_also_with_two_processes(server, tmp_path):
    urls = [server.url(f"/photo{i}.jpg") for i in range(5)] + [server.fault_url("404"), server.url("/photo0.png")]
    _, first = ingest(tmp_path, urls, out="a")
    _, second = ingest(
        tmp_path,
        urls,
        out="b",
        beam_args=RUNNER + ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
    )
    assert tree_bytes(first) == tree_bytes(second)
    assert len(tree_bytes(first)) == 2 * 3  # per shard: tar, parquet index, rejected table


def test_rerun_after_a_killed_run_completes_without_duplicates(server, tmp_path):
    urls = [server.url(f"/photo{i}.jpg") for i in range(5)] + [server.fault_url("404")] * 3
    _, out = ingest(tmp_path, urls, out="fresh")
    reference = tree_bytes(out)
    # A killed run: shard 1 lost its stats and index, a temporary file and a staging tar are left behind.
    os.remove(out / "00001_stats.json")
    os.remove(out / "00001.parquet")
    (out / ".00001.tar.abc123.tmp").write_bytes(b"partial")
    (out / "_staging").mkdir()
    shutil.copy(out / "00001.tar", out / "_staging" / "00001.tar")
    (out / "00001.tar").write_bytes(b"half a tar")
    server.reset_log()
    report, out = ingest(tmp_path, urls, out="fresh")
    assert server.hits("/photo0.jpg") == 0  # shard 0 was complete: not downloaded again
    assert server.hits("/photo4.jpg") == 1
    assert tree_bytes(out) == reference  # the killed write's temporary file is gone too
    assert report["inputs"] == len(urls) and report["written"] == 5
    assert len({s["__key__"] for s in read_shards(out)}) == len(read_shards(out)) == 5


def test_index_offsets_point_at_member_bytes(server, tmp_path):
    _, out = ingest(tmp_path, [server.url(f"/photo{i}.jpg") for i in range(3)])
    tar = (out / "00000.tar").read_bytes()
    for row in pq.read_table(out / "00000.parquet").to_pylist():
        members = {m["name"].split(".", 1)[1]: tar[m["offset"] : m["offset"] + m["size"]] for m in row["members"]}
        assert json.loads(members["json"])["key"] == row["key"]
        assert members["txt"].decode() == row["caption"]
        assert Image.open(io.BytesIO(members["jpg"])).size == (row["width"], row["height"])


def test_retry_mode_downloads_only_the_retryable_failures_again(server, tmp_path):
    flaky = server.fault_url("flaky", n=2)  # fails both attempts of a run, then succeeds
    urls = [
        server.url("/photo0.jpg"),
        flaky,
        server.fault_url("404"),
        server.url("/photo1.jpg"),
        server.url("/photo2.jpg"),
    ]
    report, out = ingest(tmp_path, urls)
    assert list(statuses(out).values()) == ["success", "http_503", "http_404", "success", "success"]
    untouched = (out / "00001.tar").read_bytes()
    before = [server.hits(u) for u in urls]
    report, out = ingest(tmp_path, urls, write={"retry_failed": True, "shard_size": 4})
    assert [server.hits(u) - b for u, b in zip(urls, before)] == [0, 1, 0, 0, 0]  # only the retryable row
    assert list(statuses(out).values()) == ["success", "success", "http_404", "success", "success"]
    assert report["written"] == 4 and report["accounted"] and (out / "00001.tar").read_bytes() == untouched
    assert [s["__key__"] for s in read_shards(out)] == ["000000000", "000000001", "000000003", "000010000"]


def test_retry_after_a_takedown_keeps_the_takedown(server, tmp_path):
    from visinstruct.cli.remove import load_takedown, remove_samples

    urls = [server.url("/photo0.jpg"), server.fault_url("500"), server.url("/photo1.jpg")]
    _, out = ingest(tmp_path, urls)
    (tmp_path / "takedown.txt").write_text(urls[0] + "\n")
    remove_samples([str(out / "00000.tar")], load_takedown(urls_file=str(tmp_path / "takedown.txt")))
    assert list(statuses(out).values()) == ["takedown", "http_500", "success"]
    report, out = ingest(tmp_path, urls, write={"retry_failed": True})  # the 500 is retried, the takedown kept
    assert list(statuses(out).values()) == ["takedown", "http_500", "success"] and report["accounted"]
    assert [s["__key__"] for s in read_shards(out)] == ["000000002"]


def test_takedown_lists_keep_urls_undownloaded_and_listed_images_out(server, tmp_path):
    import hashlib

    urls = [server.url("/photo0.jpg"), server.url("/photo1.jpg"), server.url("/photo2.jpg"), server.url("/photo3.jpg")]
    listed_bytes = encode_test_image("jpeg", (100, 50))  # what /photo2.jpg serves, under any URL
    (tmp_path / "takedown.txt").write_text(f"# opt-outs\n{urls[0]}\n\n{hashlib.sha256(listed_bytes).hexdigest()}\n")
    before = server.hits("/photo0.jpg")
    report, out = ingest(tmp_path, urls, dedup={"takedown_lists": [str(tmp_path / "takedown.txt")]})
    assert list(statuses(out).values()) == ["takedown", "success", "takedown", "success"] and report["accounted"]
    assert report["rejected_by_reason"] == {"takedown": 2}
    rejected = pq.read_table(out / "rejected").to_pylist()
    assert {(r["stage"], r["reason"], r["url"]) for r in rejected} == {
        ("dedup", "takedown", urls[0]),
        ("dedup", "takedown", urls[2]),
    }
    assert [s["__key__"] for s in read_shards(out)] == ["000000001", "000000003"]
    assert server.hits("/photo0.jpg") == before  # a listed URL is never requested

    # an earlier dataset's indexes carry its removals (rows with status takedown) into a rebuild
    from visinstruct.cli.remove import load_takedown, remove_samples

    _, first = ingest(tmp_path, urls, out="first")
    (tmp_path / "remove.txt").write_text(urls[3] + "\n")
    remove_samples([str(first / "00000.tar")], load_takedown(urls_file=str(tmp_path / "remove.txt")))
    _, rebuilt = ingest(tmp_path, urls, out="rebuilt", dedup={"takedown_lists": [str(first / "0*.parquet")]})
    assert list(statuses(rebuilt).values()) == ["success", "success", "success", "takedown"]


def test_a_missing_takedown_list_fails_before_anything_runs(server, tmp_path):
    from visinstruct.configs import ConfigError

    with pytest.raises(ConfigError, match="dedup.takedown_lists: no takedown list matches"):
        ingest(tmp_path, [server.url("/photo0.jpg")], dedup={"takedown_lists": [str(tmp_path / "nope.txt")]})
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.tar"))


def test_an_ingest_without_an_output_folder_is_refused_in_one_line(server, tmp_path, capsys):
    """``write.path`` is optional in a config (a build sets it); a standalone ingest without one is refused."""
    from visinstruct.cli.main import main
    from visinstruct.configs import ConfigError

    settings = {"read": {"path": write_urls(tmp_path / "urls.parquet", [server.url("/photo0.jpg")])}}
    with pytest.raises(ConfigError, match=r"^ingest needs write.path \(the output folder\)$"):
        run(from_dict(IngestConfig, settings), RUNNER)
    config = tmp_path / "ingest.yaml"
    config.write_text(json.dumps(settings))  # JSON is YAML
    assert main(["config", "check", "ingest", str(config)]) == 2
    assert capsys.readouterr().err == (
        f"visinstruct config: error: {config}: write.path: ingest needs an output folder (write.path, or --out DIR)\n"
    )
    assert main(["ingest", "--config", str(config)]) == 2
    assert capsys.readouterr().err == (
        "visinstruct ingest: error: write.path: ingest needs an output folder (write.path, or --out DIR)\n"
    )


def test_a_user_agent_token_is_appended_and_opt_outs_addressed_to_it_are_honoured(server, tmp_path):
    """img2dataset's ``--user_agent_token`` appends to the User-Agent and, as in img2dataset, an
    ``X-Robots-Tag: TOKEN: noai`` opts out (any case); the first word stays ours, so ``visinstruct: noai`` does
    too, while a directive addressed to another crawler still does not."""
    from visinstruct.cli.main import main
    from visinstruct.configs import DownloadConfig

    jpeg = encode_test_image("jpeg", (80, 60))
    for name, tag in (("us", "visinstruct: noai"), ("token", "mycrawl: noai"), ("other", "otherbot: noai")):
        server.add_image(f"/{name}.jpg", jpeg, {"X-Robots-Tag": tag})
    names = ["/photo2.jpg", "/us.jpg", "/token.jpg", "/other.jpg"]
    urls = write_urls(tmp_path / "urls.parquet", [server.url(n) for n in names])
    out = tmp_path / "out"
    server.reset_log()
    argv = ["-q", "ingest", "--url-list", urls, "--out", str(out), "--user_agent_token", "MyCrawl"]
    assert main([*argv, "--set", "download.allow_loopback=true", *RUNNER]) == 0
    agents = {r.headers.get("User-Agent") for r in server.requests}
    assert agents == {f"{DownloadConfig().user_agent} (compatible; MyCrawl)"}
    assert list(statuses(out).values()) == ["success", "optout", "optout", "success"]
    rejected = pq.read_table(out / "rejected").to_pylist()
    assert {(r["url"].rsplit("/", 1)[1], r["reason"], r["message"]) for r in rejected} == {
        ("us.jpg", "optout", "X-Robots-Tag opts out: noai"),
        ("token.jpg", "optout", "X-Robots-Tag opts out: noai"),
    }


def test_a_user_agent_token_that_would_break_the_header_is_refused(capsys):
    from visinstruct.cli.main import main

    assert main(["ingest", "--url-list", "u.txt", "--out", "o", "--user_agent_token", "a) evil"]) == 2
    assert capsys.readouterr().err == (
        "visinstruct ingest: error: command line: in 'download': 'user_agent_token' must be printable ASCII "
        "without parentheses, got 'a) evil'\n"
    )


def test_a_planted_bug_in_one_record_costs_that_record_only(server, tmp_path, monkeypatch):
    """A bug one record triggers (in decoding, in building its metadata) becomes its ``internal_error`` row, with
    the exception's class, and a counter; every other row is written. FnApiRunner runs DoFns in this process, so
    the patched functions are the ones the pipeline calls."""
    import apache_beam as beam

    from visinstruct.pipelines.ingest import Ingest
    from visinstruct.pipelines.options import pipeline_options
    from visinstruct.transforms import download

    urls = [server.url(f"/photo{i}.jpg") for i in range(5)]
    poisoned_bytes = encode_test_image("jpeg", (100, 50))  # what /photo2.jpg serves
    real_process, real_from_pair = download.process_image, SampleMeta.from_pair

    def process_image(data, cfg, **options):
        if data == poisoned_bytes:
            raise ZeroDivisionError("planted in decoding")
        return real_process(data, cfg, **options)

    def from_pair(cls, pair, image):
        if pair.url == urls[4]:
            raise KeyError("planted in the metadata")
        return real_from_pair(pair, image)

    monkeypatch.setattr(download, "process_image", process_image)
    monkeypatch.setattr(SampleMeta, "from_pair", classmethod(from_pair))
    cfg = from_dict(
        IngestConfig,
        {
            "read": {"path": write_urls(tmp_path / "urls.parquet", urls)},
            "write": {"path": str(tmp_path / "out"), "shard_size": 4},
            "download": {"allow_loopback": True, "per_host_rps": None, "threads": 4},
        },
    )
    p = beam.Pipeline(options=pipeline_options(RUNNER))
    _ = p | Ingest(cfg)
    result = p.run()
    result.wait_until_finish()

    out = tmp_path / "out"
    assert statuses(out) == {
        "000000000": "success",
        "000000001": "success",
        "000000002": "internal_error",
        "000000003": "success",
        "000010000": "internal_error",
    }
    assert [s["__key__"] for s in read_shards(out)] == ["000000000", "000000001", "000000003"]
    rejected = {r["key"]: r for r in pq.read_table(out / "rejected").to_pylist()}
    assert {k: (r["stage"], r["reason"], json.loads(r["detail"])["exception"]) for k, r in rejected.items()} == {
        "000000002": ("decode", "internal_error", "ZeroDivisionError"),
        "000010000": ("decode", "internal_error", "KeyError"),
    }
    assert rejected["000000002"]["message"] == "ZeroDivisionError: planted in decoding"
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    assert sum(s["inputs"] for s in stats) == len(urls) and sum(s["written"] for s in stats) == 3
    counters = {
        (c.key.metric.namespace, c.key.metric.name): c.committed
        for c in result.metrics().query(beam.metrics.MetricsFilter())["counters"]
    }
    assert counters[("decode", "internal_error")] == 2
    assert counters[("ingest", "rows_done")] == len(urls)


def test_a_corrupt_annotation_file_is_an_unreadable_file_not_a_bug(tmp_path):
    """A COCO file that does not parse is found only when the run reads it: one ``unreadable_file`` read rejection
    with the reader's message, not an ``internal_error`` blaming visinstruct."""
    import apache_beam as beam

    from visinstruct.pipelines.ingest import Ingest
    from visinstruct.pipelines.options import pipeline_options

    (tmp_path / "annotations.json").write_text('{"images": [{"id": 1, "file_name": "a.jpg"}, ')  # cut short
    cfg = from_dict(
        IngestConfig,
        {
            "read": {"path": str(tmp_path / "annotations.json"), "format": "coco"},
            "write": {"path": str(tmp_path / "out"), "shard_size": 4},
        },
    )
    p = beam.Pipeline(options=pipeline_options(RUNNER))
    _ = p | Ingest(cfg)
    result = p.run()
    result.wait_until_finish()
    out = tmp_path / "out"
    assert statuses(out) == {"000000000": "unreadable_file"}
    [rejected] = pq.read_table(out / "rejected").to_pylist()
    assert (rejected["stage"], rejected["reason"]) == ("read", "unreadable_file")
    assert rejected["message"].startswith(f"{tmp_path / 'annotations.json'}: not valid JSON")
    assert "bug" not in rejected["message"]
    counters = {
        (c.key.metric.namespace, c.key.metric.name): c.committed
        for c in result.metrics().query(beam.metrics.MetricsFilter())["counters"]
    }
    assert ("read", "internal_error") not in counters


def test_a_reader_that_fails_midway_keeps_its_rows_and_dead_letters_the_failure(server, tmp_path, monkeypatch):
    """A file that breaks after some rows: those rows go on, and the break is one ``internal_error`` row saying
    where reading stopped, not a failed bundle; a bug numbering one row costs that row."""
    from visinstruct.pipelines import ingest as ingest_pipeline

    real_read, real_keyed = ingest_pipeline.read_unit, ingest_pipeline._keyed

    def read_unit(fmt, paths, cfg):
        rows = real_read(fmt, paths, cfg)
        yield next(rows)
        yield next(rows)
        yield next(rows)
        raise OSError("planted: the file is damaged here")

    def keyed(item, key):
        if key == "000000001":
            raise ValueError("planted in numbering")
        return real_keyed(item, key)

    monkeypatch.setattr(ingest_pipeline, "read_unit", read_unit)
    monkeypatch.setattr(ingest_pipeline, "_keyed", keyed)
    report, out = ingest(tmp_path, [server.url(f"/photo{i}.jpg") for i in range(5)])
    assert statuses(out) == {
        "000000000": "success",
        "000000001": "internal_error",
        "000000002": "success",
        "000000003": "internal_error",
    }
    rejected = {r["key"]: r for r in pq.read_table(out / "rejected").to_pylist()}
    assert rejected["000000003"]["stage"] == "read"
    assert rejected["000000003"]["message"].startswith("reading stopped after 3 rows of ")
    assert "OSError: planted: the file is damaged here" in rejected["000000003"]["message"]
    assert rejected["000000001"]["message"] == "ValueError: planted in numbering"
    assert report["rows_read"] == report["inputs"] == 4 and report["accounted"]
