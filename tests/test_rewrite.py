"""The one shard rewrite and the one commit: every stage that writes shards is a judge handed to them.

Each judge (ingest's finalize dropping dedup losers, a filter, a generator, ``remove``) runs through the same
commit on real files: tars read back with ``tarfile``, indexes and dead letters with pyarrow. Then the commit's
order under an in-place rewrite (a failure after the dead letters leaves the old shard readable, and the next run
finishes), and the ``dropped_<reason>`` counters of a real Beam run, counted from the decisions.
"""

import json
import tarfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import apache_beam as beam
import pyarrow.parquet as pq
import pytest

from visinstruct.cli.remove import load_takedown, remove_samples
from visinstruct.cli.validate import validate
from visinstruct.schemas import ClipScore, Decision, GenerationInfo, IndexRow, Rejection, SampleMeta, Turn
from visinstruct.testing.server import encode_test_image
from visinstruct.transforms import commit as commit_module
from visinstruct.transforms.commit import commit_shard
from visinstruct.transforms.dedup import lost_to
from visinstruct.transforms.layout import read_stats, resolve_shards, shard_in
from visinstruct.transforms.rewrite import rewrite_shard
from visinstruct.transforms.rewrite_stage import RewriteShard
from visinstruct.transforms.shards import TarShardWriter
from visinstruct.transforms.staging import ShardDraft
from visinstruct.transforms.write import finalize_shard

KEYS = ["000000000", "000000001", "000000002"]  # written; 000000003 was rejected by ingest (http_404)
IMAGES = [encode_test_image("jpeg", (40 + 8 * i, 32)) for i in range(3)]
SCORES = {"000000000": 0.31, "000000001": 0.12, "000000002": 0.27}


def members_of(key: str) -> dict[str, bytes]:
    meta = SampleMeta(key=key, url=f"https://img.test/{key}.jpg", caption=f"caption {key}", sha256=f"{key}-sha")
    return {"jpg": IMAGES[int(key) % 3], "txt": meta.caption.encode(), "json": meta.to_json().encode()}


def write_ingested(folder: Path) -> None:
    """Shard 00000 as ingest commits it: three samples written and one ``http_404`` row, with its dead letter."""
    writer, rows = TarShardWriter(), []
    for key in KEYS:
        placed = writer.add(key, list(members_of(key).items()))
        rows.append(IndexRow(key, "success", url=f"https://img.test/{key}.jpg", sha256=f"{key}-sha", members=placed))
    rows.append(IndexRow("000000003", "http_404", url="https://img.test/gone.jpg", error_message="404"))
    dead = [Rejection("download", "http_404", "404", "000000003", "https://img.test/gone.jpg")]
    commit_shard(shard_in(str(folder), 0), rows, dead, writer, "ingest", 0.5)


def tar_samples(tar: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar) as archive:
        for info in archive:
            key, ext = info.name.split(".", 1)
            samples.setdefault(key, {})[ext] = archive.extractfile(info).read()
    return samples


def index(folder: Path) -> dict[str, dict]:
    return {r["key"]: r for r in pq.read_table(folder / "00000.parquet").to_pylist()}


def dead_letters(folder: Path, stage: str) -> list[dict]:
    return pq.read_table(folder / "rejected" / f"{stage}-00000.parquet").to_pylist()


def filter_judge(key: str, meta: SampleMeta, members: dict[str, bytes]) -> Decision[SampleMeta]:
    """Keeps a pair scoring 0.2 or more; the score is an index column whether it is kept or not."""
    score = SCORES[key]
    if score < 0.2:
        return Decision.drop("clip_below_threshold", f"CLIP score {score}", {"score": score}, clip_score=score)
    return Decision.keep(replace(meta, clip=ClipScore(score, "tiny")), clip_score=score)


def judge_of(path: str, groups) -> object:
    """A picklable ``make_judge`` for :class:`RewriteShard`."""
    return filter_judge


# ---------------------------------------------------------------------------------------------------------------
# One judge each, through the one rewrite and commit


def test_ingest_finalize_drops_a_dedup_loser_and_commits_through_the_one_commit(tmp_path):
    out = tmp_path / "out"
    staging = out / "_staging" / "00000.a1.tar"
    staging.parent.mkdir(parents=True)
    writer, rows = TarShardWriter(), []
    for key in KEYS:
        placed = writer.add(key, list(members_of(key).items()))
        rows.append(IndexRow(key, "success", url=f"https://img.test/{key}.jpg", sha256="same", members=placed))
    size = writer.finish(str(staging))
    draft = ShardDraft(0, str(staging), rows, [], 1.25, size)
    dropped = Counter()
    stats = finalize_shard(draft, [("000000002", lost_to("duplicate_sha256", "000000000"))], str(out), dropped=dropped)
    assert (stats.stage, stats.inputs, stats.written, stats.rejected_by_reason) == (
        "ingest",
        3,
        2,
        {"duplicate_sha256": 1},
    )
    assert sorted(tar_samples(out / "00000.tar")) == ["000000000", "000000001"]
    assert index(out)["000000002"]["status"] == "duplicate_sha256" and index(out)["000000002"]["members"] == []
    [letter] = dead_letters(out, "ingest")
    assert (letter["stage"], letter["reason"], json.loads(letter["detail"])["duplicate_of"]) == (
        "dedup",
        "duplicate_sha256",
        "000000000",
    )
    assert dropped == {"duplicate_sha256": 1} and not list((out / "_staging").iterdir())
    assert read_stats(str(out / "00000_stats.json")) == stats
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert finalize_shard(draft, [], str(out)) == stats  # a finished shard is left alone
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_ingest_finalize_with_no_drop_renames_the_staging_tar(tmp_path):
    out = tmp_path / "out"
    staging = out / "_staging" / "00000.a1.tar"
    staging.parent.mkdir(parents=True)
    writer = TarShardWriter()
    rows = [IndexRow(k, "success", members=writer.add(k, list(members_of(k).items()))) for k in KEYS]
    writer.finish(str(staging))
    staged = staging.read_bytes()
    stats = finalize_shard(ShardDraft(0, str(staging), rows, [], 0.1, len(staged)), [], str(out))
    assert (out / "00000.tar").read_bytes() == staged and stats.tar_bytes == len(staged) and stats.written == 3
    for key, row in index(out).items():  # the staging tar's offsets hold in the final tar
        assert {m["name"]: staged[m["offset"] : m["offset"] + m["size"]] for m in row["members"]} == {
            f"{key}.{ext}": data for ext, data in members_of(key).items()
        }


def test_a_filter_judge_drops_with_its_reason_and_carries_earlier_rejections(tmp_path):
    write_ingested(tmp_path / "in")
    dropped = Counter()
    stats = rewrite_shard(
        str(tmp_path / "in" / "00000.tar"), 0, str(tmp_path / "out"), "filter", filter_judge, dropped
    )
    out = tmp_path / "out"
    assert (stats.stage, stats.inputs, stats.written) == ("filter", 4, 2)
    assert stats.rejected_by_reason == {"clip_below_threshold": 1, "http_404": 1}
    assert dropped == {"clip_below_threshold": 1}  # the carried 404 is ingest's drop, not the filter's
    rows = index(out)
    assert {k: (r["status"], r["clip_score"]) for k, r in rows.items()} == {
        "000000000": ("success", 0.31),
        "000000001": ("clip_below_threshold", 0.12),
        "000000002": ("success", 0.27),
        "000000003": ("http_404", None),
    }
    assert [(d["key"], d["stage"], d["reason"]) for d in dead_letters(out, "filter")] == [
        ("000000001", "filter", "clip_below_threshold")
    ]
    samples = tar_samples(out / "00000.tar")
    assert sorted(samples) == ["000000000", "000000002"]
    assert json.loads(samples["000000000"]["json"])["clip"] == {"score": 0.31, "model": "tiny", "pretrained": None}
    assert validate(resolve_shards(str(out))).problems == []


def test_a_generate_judge_keeps_samples_with_new_metadata_and_index_columns(tmp_path):
    write_ingested(tmp_path / "in")
    info = GenerationInfo("conversation", "tiny-llm", "t" * 64, 17, 40, 9)

    def generate(key: str, meta: SampleMeta, members: dict[str, bytes]) -> Decision[SampleMeta]:
        turns = [Turn("human", "<image>\nWhat is it?"), Turn("gpt", meta.caption)]
        return Decision.keep(replace(meta, conversations=turns, generation=info))

    stats = rewrite_shard(str(tmp_path / "in" / "00000.tar"), 0, str(tmp_path / "out"), "generate", generate)
    assert (stats.inputs, stats.written, stats.rejected_by_reason) == (4, 3, {"http_404": 1})
    sample = tar_samples(tmp_path / "out" / "00000.tar")["000000001"]
    written = json.loads(sample["json"])
    assert written["conversations"][1] == {"from": "gpt", "value": "caption 000000001"}
    assert written["generation"]["model"] == "tiny-llm" and sample["jpg"] == IMAGES[1]
    assert index(tmp_path / "out")["000000001"]["conversation_kind"] == "conversation"
    assert dead_letters(tmp_path / "out", "generate") == []


def test_remove_is_a_judge_that_keeps_identity_and_merges_its_journal(tmp_path):
    folder = tmp_path / "in"
    write_ingested(folder)
    before = tar_samples(folder / "00000.tar")
    urls = tmp_path / "urls.txt"
    urls.write_text("https://img.test/000000001.jpg\n")
    remove_samples(resolve_shards(str(folder)), load_takedown(urls_file=str(urls)))
    rows = index(folder)
    removed = rows["000000001"]
    assert (removed["status"], removed["url"], removed["sha256"], removed["caption"]) == (
        "takedown",
        "https://img.test/000000001.jpg",
        "000000001-sha",
        None,
    )
    assert tar_samples(folder / "00000.tar") == {k: v for k, v in before.items() if k != "000000001"}  # untouched
    urls.write_text("https://img.test/000000002.jpg\n")
    remove_samples(resolve_shards(str(folder)), load_takedown(urls_file=str(urls)))
    letters = dead_letters(folder, "remove")
    assert [(d["key"], d["reason"], json.loads(d["detail"])["matched_by"]) for d in letters] == [
        ("000000001", "takedown", "url"),
        ("000000002", "takedown", "url"),
    ]
    stats = read_stats(str(folder / "00000_stats.json"))
    assert (stats.stage, stats.written, stats.rejected_by_reason) == ("remove", 1, {"http_404": 1, "takedown": 2})
    assert validate(resolve_shards(str(folder))).problems == []


# ---------------------------------------------------------------------------------------------------------------
# The commit's order under an in-place rewrite


def test_a_rewrite_in_place_cut_after_its_dead_letters_leaves_the_old_shard_and_the_next_run_finishes(
    tmp_path, monkeypatch
):
    folder = tmp_path / "in"
    write_ingested(folder)
    old = {p.name: p.read_bytes() for p in folder.glob("00000*")}
    real = commit_module.write_table

    def cut_off(path, *args):
        real(path, *args)
        if "/rejected/" in path:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(commit_module, "write_table", cut_off)
        with pytest.raises(KeyboardInterrupt):
            rewrite_shard(str(folder / "00000.tar"), 0, str(folder), "filter", filter_judge)
    assert {p.name: p.read_bytes() for p in folder.glob("00000*")} == old  # readable, complete, unchanged
    assert [d["key"] for d in dead_letters(folder, "filter")] == ["000000001"]  # the journal
    stats = rewrite_shard(str(folder / "00000.tar"), 0, str(folder), "filter", filter_judge)
    assert (stats.written, stats.rejected_by_reason) == (2, {"clip_below_threshold": 1, "http_404": 1})
    assert validate(resolve_shards(str(folder))).problems == []


def test_a_rewrite_in_place_cut_between_tar_and_index_is_finished_from_its_journal(tmp_path, monkeypatch):
    folder = tmp_path / "in"
    write_ingested(folder)
    real = commit_module.write_table

    def cut_off(path, *args):
        if path.endswith("/00000.parquet"):
            raise KeyboardInterrupt
        real(path, *args)

    with monkeypatch.context() as m:
        m.setattr(commit_module, "write_table", cut_off)
        with pytest.raises(KeyboardInterrupt):
            rewrite_shard(str(folder / "00000.tar"), 0, str(folder), "filter", filter_judge)
    assert not (folder / "00000_stats.json").exists() and "000000001" not in tar_samples(folder / "00000.tar")
    dropped = Counter()
    stats = rewrite_shard(str(folder / "00000.tar"), 0, str(folder), "filter", filter_judge, dropped)
    assert stats.rejected_by_reason == {"clip_below_threshold": 1, "http_404": 1}  # not missing_in_tar
    assert index(folder)["000000001"]["status"] == "clip_below_threshold" and dropped == {}
    assert [d["key"] for d in dead_letters(folder, "filter")] == ["000000001"]
    assert validate(resolve_shards(str(folder))).problems == []


# ---------------------------------------------------------------------------------------------------------------
# Counters come from the decisions


def test_rewrite_shard_counts_this_stages_drops_from_its_decisions_in_a_real_pipeline(tmp_path):
    write_ingested(tmp_path / "in")
    path = str(tmp_path / "in" / "00000.tar")
    p = beam.Pipeline(runner="FnApiRunner")
    stats = (
        p
        | beam.Create([(path, {"decisions": []})])
        | "RewriteShard" >> beam.ParDo(RewriteShard("filter", str(tmp_path / "out"), {}, judge_of))
    )
    _ = stats | beam.Map(lambda s: (tmp_path / "stats.json").write_text(json.dumps(s.written)))
    result = p.run()
    result.wait_until_finish()
    counters = {
        c.key.metric.name: c.committed
        for c in result.metrics().query(beam.metrics.MetricsFilter().with_namespace("filter"))["counters"]
    }
    assert counters["dropped_clip_below_threshold"] == 1
    assert not [name for name in counters if name.startswith("dropped_") and name != "dropped_clip_below_threshold"]
    assert counters["busy_us"] > 0 and json.loads((tmp_path / "stats.json").read_text()) == 2
