"""The one shard rewrite and the one commit: every stage that writes shards is a judge handed to them.

Each judge (ingest's finalize dropping dedup losers, the filter's, generation's, ``remove``'s: the product's own)
runs through the same ``rewrite_shard`` and commit on real files: tars read back with ``tarfile``, indexes and
dead letters with pyarrow. Then the commit's order under an in-place rewrite (a failure after the dead letters
leaves the old shard readable, and the next run finishes), and the ``dropped_<reason>`` counters of a real Beam
run, counted from the decisions (also by a retried bundle whose shard its first attempt committed).
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
from visinstruct.schemas import (
    ClipScore,
    Decision,
    GenerationInfo,
    IndexRow,
    Member,
    Rejection,
    SampleMeta,
    Turn,
    from_table,
)
from visinstruct.testing.server import encode_test_image
from visinstruct.transforms import commit as commit_module
from visinstruct.transforms import filter_stages, generate_stages, write
from visinstruct.transforms.commit import commit_shard
from visinstruct.transforms.dedup import lost_to
from visinstruct.transforms.download import NOT_FINAL_REASONS
from visinstruct.transforms.layout import read_stats, resolve_shards, shard_in
from visinstruct.transforms.rewrite import Earlier, rewrite_shard
from visinstruct.transforms.rewrite_stage import RewriteShard
from visinstruct.transforms.shards import ShardReadError, TarShardWriter, read_table
from visinstruct.transforms.staging import ShardDraft, commit_draft
from visinstruct.transforms.write import FinalizeShard, dedup_judge, finalize_shard, finalize_staged

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


def index_rows(folder: Path) -> dict[str, IndexRow]:
    return {r.key: r for r in from_table(IndexRow, read_table(str(folder / "00000.parquet"), IndexRow))}


def dead_letters(folder: Path, stage: str) -> list[dict]:
    return pq.read_table(folder / "rejected" / f"{stage}-00000.parquet").to_pylist()


def scored(key: str) -> Decision[ClipScore]:
    """The filter's decision for a pair (as ``score_decision`` makes it): kept from 0.2 up, the score indexed."""
    score = SCORES[key]
    if score < 0.2:
        return Decision.drop("clip_below_threshold", f"CLIP score {score}", {"score": score}, clip_score=score)
    return Decision.keep(ClipScore(score, "tiny"), clip_score=score)


SCORED = [(key, scored(key)) for key in KEYS]  # the filter's CoGroupByKey group "decisions" of shard 00000
filter_judge = filter_stages.filter_judge(dict(SCORED), {})


def staged_draft(out: Path, sha256: str = "same", staged: list[str] = KEYS, attempt: str = "a1") -> ShardDraft:
    """Shard 00000 as ingest's download attempt ``attempt`` leaves it: three written rows (their samples in the
    staging tar: those of ``staged``), and a ``http_404`` row; made from inputs of digest ``d1``."""
    staging = out / "_staging" / f"00000.{attempt}.tar"
    staging.parent.mkdir(parents=True, exist_ok=True)
    writer, rows = TarShardWriter(), []
    for key in KEYS:
        placed = writer.add(key, list(members_of(key).items())) if key in staged else [Member(f"{key}.jpg", 512, 9)]
        rows.append(IndexRow(key, "success", url=f"https://img.test/{key}.jpg", sha256=sha256, members=placed))
    rows.append(IndexRow("000000003", "http_404", url="https://img.test/gone.jpg", error_message="404"))
    dead = [Rejection("download", "http_404", "404", "000000003", "https://img.test/gone.jpg")]
    return ShardDraft(0, str(staging), rows, dead, 1.25, writer.finish(str(staging)), "d1", attempt)


# ---------------------------------------------------------------------------------------------------------------
# One judge each, through the one rewrite and commit


def test_ingest_finalize_is_a_judge_that_drops_a_dedup_loser_and_keeps_the_draft_rows(tmp_path):
    out = tmp_path / "out"
    draft = staged_draft(out)
    judge = dedup_judge(draft.rows, [("000000002", lost_to("duplicate_sha256", "000000000"))])
    dropped = Counter()
    earlier = Earlier(draft.rows, draft.rejections, draft.duration_s, step="dedup")
    stats = rewrite_shard(draft.staging_tar, 0, str(out), "ingest", judge, dropped, earlier)
    assert (stats.stage, stats.inputs, stats.written, stats.rejected_by_reason) == (
        "ingest",
        4,
        2,
        {"duplicate_sha256": 1, "http_404": 1},
    )
    assert stats.duration_s >= 1.25 and dropped == {"duplicate_sha256": 1, "http_404": 1}  # all ingest's drops
    samples = tar_samples(out / "00000.tar")
    assert samples == {key: members_of(key) for key in KEYS[:2]}
    rows = index_rows(out)
    for row in draft.rows[:2] + draft.rows[3:]:  # the draft's rows exactly, but for where the members now lie
        assert replace(rows[row.key], members=[]) == replace(row, members=[])
    lost = replace(draft.rows[2], status="duplicate_sha256", error_message="same image bytes as 000000000", members=[])
    assert rows["000000002"] == lost
    assert [m.name for m in rows["000000001"].members] == [f"000000001.{ext}" for ext in members_of("000000001")]
    letters = dead_letters(out, "ingest")
    assert [(d["key"], d["stage"], d["reason"]) for d in letters] == [
        ("000000002", "dedup", "duplicate_sha256"),
        ("000000003", "download", "http_404"),
    ]
    assert json.loads(letters[0]["detail"]) == {"duplicate_of": "000000000", "sha256": "same", "phash": None}
    assert validate(resolve_shards(str(out))).problems == []


def test_ingest_finalize_drops_a_loser_as_before_and_leaves_a_finished_shard_alone(tmp_path):
    out = tmp_path / "out"
    losers = [("000000002", lost_to("duplicate_sha256", "000000000"))]
    draft, dropped = staged_draft(out), Counter()
    stats = finalize_shard(draft, losers, str(out), dropped=dropped)
    assert tar_samples(out / "00000.tar") == {key: members_of(key) for key in KEYS[:2]}
    rows = {key: (r["status"], r["error_message"], r["sha256"]) for key, r in index(out).items()}
    assert rows == {  # what the finalize before the one rewrite (1b76b4a) committed
        "000000000": ("success", None, "same"),
        "000000001": ("success", None, "same"),
        "000000002": ("duplicate_sha256", "same image bytes as 000000000", "same"),
        "000000003": ("http_404", "404", None),
    }
    letters = [(d["stage"], d["reason"], d["message"], d["key"], d["url"]) for d in dead_letters(out, "ingest")]
    assert letters == [
        ("dedup", "duplicate_sha256", "same image bytes as 000000000", "000000002", "https://img.test/000000002.jpg"),
        ("download", "http_404", "404", "000000003", "https://img.test/gone.jpg"),
    ]
    assert json.loads(dead_letters(out, "ingest")[0]["detail"]) == {
        "duplicate_of": "000000000",
        "sha256": "same",
        "phash": None,
    }
    assert (stats.inputs, stats.written, stats.rejected_by_reason) == (4, 2, {"duplicate_sha256": 1, "http_404": 1})
    assert stats.duration_s >= 1.25  # the download's seconds and the finalize's, as with no loser
    assert dropped == {"duplicate_sha256": 1, "http_404": 1} and not list((out / "_staging").iterdir())
    assert read_stats(str(out / "00000_stats.json")) == stats and validate(resolve_shards(str(out))).problems == []
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    again = Counter()  # a retried bundle: its first attempt committed the shard, Beam kept none of its counters
    assert finalize_shard(draft, losers, str(out), dropped=again) == stats
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # left alone
    assert again == dropped  # counted from the committed dead letters


@pytest.mark.parametrize("losers", [[], [("000000001", lost_to("duplicate_sha256", "000000000"))]])
def test_ingest_finalize_makes_a_written_row_the_staging_tar_lacks_a_retryable_download_error(tmp_path, losers):
    out = tmp_path / "out"
    draft = staged_draft(out, staged=KEYS[:2])  # the draft says 000000002 was written; its tar does not hold it
    stats = finalize_shard(draft, losers, str(out))
    row = index(out)["000000002"]
    assert (row["status"], row["error_message"], row["members"]) == (
        "internal_error",
        "LookupError: the staging tar lacks this sample",
        [],
    )
    assert ("000000002", "download", "internal_error") in [
        (d["key"], d["stage"], d["reason"]) for d in dead_letters(out, "ingest")
    ]
    assert "internal_error" in NOT_FINAL_REASONS and stats.rejected_by_reason["internal_error"] == 1
    assert "000000002" not in tar_samples(out / "00000.tar")
    assert validate(resolve_shards(str(out))).problems == []


@pytest.mark.parametrize("losers", [[], [("000000001", lost_to("duplicate_sha256", "000000000"))]])
def test_ingest_finalize_raises_for_a_cut_staging_tar_and_commits_nothing(tmp_path, losers):
    out = tmp_path / "out"
    draft = staged_draft(out)
    staging = Path(draft.staging_tar)
    staging.write_bytes(staging.read_bytes()[: staging.stat().st_size // 2])
    with pytest.raises(ShardReadError):
        finalize_shard(draft, losers, str(out))
    assert not (out / "00000_stats.json").exists() and not (out / "00000.parquet").exists()
    assert (out / "_staging" / "00000.a1.tar").exists()  # left for a rerun to download the shard again


def test_ingest_finalize_by_reference_reads_the_committed_draft_and_makes_the_same_shard(tmp_path):
    by_value, by_reference = tmp_path / "value", tmp_path / "reference"
    losers = [("000000002", lost_to("duplicate_sha256", "000000000"))]
    expected = finalize_shard(staged_draft(by_value), losers, str(by_value))
    commit_draft(str(by_reference), staged_draft(by_reference))
    stats = finalize_staged(0, ("d1", "a1"), losers, str(by_reference))
    assert replace(stats, duration_s=0) == replace(expected, duration_s=0)
    assert (by_reference / "00000.tar").read_bytes() == (by_value / "00000.tar").read_bytes()
    assert index(by_reference) == index(by_value) and not list((by_reference / "_staging").iterdir())


def test_ingest_finalize_by_reference_reads_its_own_attempts_draft_when_another_attempt_committed_later(tmp_path):
    """Two attempts of one download bundle (a retry, or a zombie on Dataflow) each commit a draft; Beam keeps the
    output of one of them, whose rows dedup saw: the finalize uses that attempt's draft and tar, and removes both
    attempts' staging files."""
    expected = finalize_shard(staged_draft(tmp_path / "value"), [], str(tmp_path / "value"))
    out = tmp_path / "out"
    commit_draft(str(out), staged_draft(out, attempt="a1"))
    other = staged_draft(out, staged=KEYS[:1], attempt="b2")  # this attempt's fetches of two images failed
    other.rows[1:3] = [replace(r, status="http_500", members=[]) for r in other.rows[1:3]]
    commit_draft(str(out), other)
    stats = finalize_staged(0, ("d1", "a1"), [], str(out))
    assert replace(stats, duration_s=0) == replace(expected, duration_s=0) and stats.written == 3
    assert (out / "00000.tar").read_bytes() == (tmp_path / "value" / "00000.tar").read_bytes()
    assert not list((out / "_staging").iterdir())


@pytest.mark.parametrize("damage", ["gone", "other inputs", "cut tar", "other attempt"])
def test_ingest_finalize_by_reference_raises_for_a_draft_it_cannot_trust_and_commits_nothing(tmp_path, damage):
    out = tmp_path / "out"
    draft = staged_draft(out)
    commit_draft(str(out), draft)
    if damage == "gone":
        (out / "_staging" / "00000.a1.draft.json").unlink()
    elif damage == "cut tar":
        Path(draft.staging_tar).write_bytes(Path(draft.staging_tar).read_bytes()[:1024])
    reference = {"other inputs": ("d2", "a1"), "other attempt": ("d1", "b2")}.get(damage, ("d1", "a1"))
    reason = {"other inputs": "made from other inputs", "cut tar": "staging tar is missing or cut short"}
    with pytest.raises(ShardReadError, match=f"shard 00000: cannot finalize: .*{reason.get(damage, 'is gone')}"):
        finalize_staged(0, reference, [], str(out))
    assert not (out / "00000_stats.json").exists() and not (out / "00000.tar").exists()


def test_ingest_finalize_by_reference_whose_draft_another_attempt_finished_meanwhile_returns_its_stats(
    tmp_path, monkeypatch
):
    """Two finalize attempts at once: the other one commits the shard and removes its staging files between this
    one's check for stats and its read of the draft; this one then finds the stats, not an error."""
    out = tmp_path / "out"
    commit_draft(str(out), staged_draft(out))
    real = write.load_draft

    def finished_meanwhile(out_dir, shard, digest, attempt):
        finalize_shard(real(out_dir, shard, digest, attempt), [], out_dir)
        return real(out_dir, shard, digest, attempt)  # gone now: raises StaleDraft

    monkeypatch.setattr(write, "load_draft", finished_meanwhile)
    dropped = Counter()
    stats = finalize_staged(0, ("d1", "a1"), [], str(out), dropped=dropped)
    assert stats == read_stats(str(out / "00000_stats.json")) and stats.written == 3
    assert dropped == Counter(http_404=1)


def test_ingest_finalize_by_reference_of_a_finished_shard_returns_its_stats_without_its_draft(tmp_path):
    out = tmp_path / "out"
    stats = finalize_shard(staged_draft(out), [], str(out))  # its staging files are gone now
    dropped = Counter()
    assert finalize_staged(0, ("d1", "a1"), [], str(out), dropped=dropped) == stats
    assert dropped == Counter(http_404=1)


def test_ingest_finalize_places_a_written_sample_whose_draft_row_lacks_its_members(tmp_path):
    out = tmp_path / "out"
    draft = staged_draft(out)
    draft.rows[1] = replace(draft.rows[1], members=[])  # the sample is in the staging tar all the same
    stats = finalize_shard(draft, [], str(out))
    assert stats.written == 3 and tar_samples(out / "00000.tar") == {key: members_of(key) for key in KEYS}
    assert [m.name for m in index_rows(out)["000000001"].members] == [f"000000001.{e}" for e in members_of(KEYS[1])]
    assert validate(resolve_shards(str(out))).problems == []


def test_ingest_finalize_never_keeps_a_staged_sample_whose_draft_row_is_not_written(tmp_path):
    out = tmp_path / "out"
    draft = staged_draft(out)
    draft.rows[1] = replace(draft.rows[1], status="http_404", error_message="404", members=[])
    draft.rejections.append(Rejection("download", "http_404", "404", "000000001", "https://img.test/000000001.jpg"))
    finalize_shard(draft, [], str(out))
    assert set(tar_samples(out / "00000.tar")) == {"000000000", "000000002"}
    assert index(out)["000000001"]["status"] == "internal_error"  # a download at odds with itself: redone
    assert [(d["key"], d["stage"], d["reason"]) for d in dead_letters(out, "ingest")] == [
        ("000000001", "dedup", "internal_error"),
        ("000000003", "download", "http_404"),
    ]
    assert validate(resolve_shards(str(out))).problems == []


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
    assert stats.duration_s >= 0.1  # the download's seconds and the finalize's, as with a loser
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
    decisions = {}  # what RunInference's results become (judge_reply); none reached the writer for 000000002
    for key in KEYS[:2]:
        meta = SampleMeta.from_json(members_of(key)["json"])
        turns = [Turn("human", "<image>\nWhat is it?"), Turn("gpt", meta.caption)]
        decisions[key] = Decision.keep(replace(meta, conversations=turns, generation=info))
    judge = generate_stages.generate_judge(decisions)
    stats = rewrite_shard(str(tmp_path / "in" / "00000.tar"), 0, str(tmp_path / "out"), "generate", judge)
    assert (stats.inputs, stats.written, stats.rejected_by_reason) == (4, 2, {"http_404": 1, "not_generated": 1})
    sample = tar_samples(tmp_path / "out" / "00000.tar")["000000001"]
    written = json.loads(sample["json"])
    assert written["conversations"][1] == {"from": "gpt", "value": "caption 000000001"}
    assert written["generation"]["model"] == "tiny-llm" and sample["jpg"] == IMAGES[1]
    assert index(tmp_path / "out")["000000001"]["conversation_kind"] == "conversation"
    assert [(d["key"], d["reason"]) for d in dead_letters(tmp_path / "out", "generate")] == [
        ("000000002", "not_generated")
    ]


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
        | beam.Create([(path, {"decisions": SCORED, "rejections": []})])
        | "RewriteShard" >> beam.ParDo(RewriteShard("filter", str(tmp_path / "out"), {}, filter_stages.shard_judge))
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


def test_a_retried_finalize_of_a_committed_shard_still_counts_its_drops_in_a_real_pipeline(tmp_path):
    out = tmp_path / "out"
    losers = [("000000002", lost_to("duplicate_sha256", "000000000"))]
    draft = staged_draft(out)
    finalize_shard(draft, losers, str(out))  # the first attempt: committed, then its counters discarded
    p = beam.Pipeline(runner="FnApiRunner")
    _ = (
        p
        | beam.Create([(0, {"draft": [("d1", "a1")], "losers": losers})])
        | "FinalizeShard" >> beam.ParDo(FinalizeShard(str(out)))
    )
    result = p.run()
    result.wait_until_finish()
    counters = {
        c.key.metric.name: c.committed
        for c in result.metrics().query(beam.metrics.MetricsFilter().with_namespace("ingest"))["counters"]
    }
    assert (counters["dropped_duplicate_sha256"], counters["dropped_http_404"]) == (1, 1)
    assert (counters["written"], counters["rejected"]) == (2, 2)
