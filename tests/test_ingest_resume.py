"""Resuming ingest: a killed run keeps every shard whose download finished; a run that failed for its settings is
redone when the settings are corrected; a shard reports progress while it downloads.

Runs on FnApiRunner against the loopback server. A kill is made where it matters, deterministically: a crash in
finalizing (after the global dedup barrier, so every shard's download is committed) before it, before the stats
(the tar already renamed) or before the staging cleanup; staging files removed as a kill at an earlier point would
have left them; and a real SIGKILL of a process that holds its later shards at a chosen step until it is killed.
Requests are counted in the server's log; a finished run leaves no temporary or staging file.
"""

import json
import logging
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from visinstruct.configs import IngestConfig, from_dict
from visinstruct.pipelines.ingest import run
from visinstruct.schemas import ImageTextPair, key_for_row
from visinstruct.testing.server import ImageServer, encode_test_image
from visinstruct.transforms import commit, write
from visinstruct.transforms.download import NOT_FINAL_REASONS, RETRYABLE_REASONS, DownloadShard, build_draft
from visinstruct.transforms.fetch import Fetcher
from visinstruct.transforms.progress import ShardProgress

pytestmark = pytest.mark.timeout(300)
RUNNER = ["--runner=FnApiRunner"]
SIZES = [(80, 60), (90, 70), (100, 50), (70, 70), (120, 90), (60, 80), (50, 90), (110, 60), (64, 48), (72, 96)]


@pytest.fixture(scope="module")
def server():
    with ImageServer() as srv:
        for i, size in enumerate(SIZES):
            srv.add_image(f"/img{i}.jpg", encode_test_image("jpeg", size))
        yield srv


def urls_of(server) -> list[str]:
    """Ten images and a 404, in three shards of four rows."""
    return [server.url(f"/img{i}.jpg") for i in range(len(SIZES))] + [server.fault_url("404")]


def settings(tmp_path: Path, urls: list[str], out: str = "out", captions: list[str] | None = None, **download) -> dict:
    path = tmp_path / f"{out}-urls.parquet"
    pq.write_table(pa.table({"url": urls, "caption": captions or [f"caption {i}" for i in range(len(urls))]}), path)
    return {
        "read": {"path": str(path)},
        "write": {"path": str(tmp_path / out), "shard_size": 4},
        "download": {"allow_loopback": True, "per_host_rps": None, "threads": 4, "timeout": 5.0, "retries": 0}
        | download,
    }


def config(tmp_path: Path, urls: list[str], out: str = "out", captions: list[str] | None = None, **download):
    return from_dict(IngestConfig, settings(tmp_path, urls, out, captions, **download))


def tree_bytes(out: Path) -> dict[str, bytes]:
    """Every file a finished ingest leaves, except its report and stats (they hold durations)."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "run_report.json" and not p.name.endswith("_stats.json")
    }


def statuses(out: Path) -> dict[str, str]:
    return {r["key"]: r["status"] for r in pq.read_table(sorted(out.glob("*.parquet"))).to_pylist()}


def requested(server) -> list[str]:
    """The image paths requested since the log was reset, sorted (robots.txt, asked once a run, left out)."""
    return sorted(r.path for r in server.requests if r.path != "/robots.txt")


def paths(urls: list[str], shards: set[int]) -> list[str]:
    """The paths of the rows of ``shards`` (four rows a shard), sorted."""
    return sorted(urlsplit(u).path for i, u in enumerate(urls) if i // 4 in shards)


def killed_while_finalizing(cfg, monkeypatch, finalized: set[int] = frozenset()) -> None:
    """Run ingest until every shard is downloaded, then crash finalizing each shard not in ``finalized``."""
    real = write.finalize_shard

    def crash(draft, losers, out_dir, stage="ingest", dropped=None):
        if draft.shard not in finalized:
            raise RuntimeError("killed")
        return real(draft, losers, out_dir, stage, dropped)

    with monkeypatch.context() as m:
        m.setattr(write, "finalize_shard", crash)
        with pytest.raises(Exception, match="killed"):
            run(cfg, RUNNER)


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory) -> dict[str, bytes]:
    """The files of an uninterrupted run."""
    tmp = tmp_path_factory.mktemp("reference")
    report = run(config(tmp, urls_of(server)), RUNNER)
    assert report["written"] == 10 and report["accounted"]
    return tree_bytes(tmp / "out")


@pytest.mark.parametrize(
    "unfinished", [set(), {1}, {0, 2}], ids=["at-the-barrier", "shard-1-unfinished", "shards-0-2-unfinished"]
)
def test_a_killed_run_downloads_only_its_unfinished_shards_again(server, tmp_path, monkeypatch, reference, unfinished):
    urls = urls_of(server)
    cfg = config(tmp_path, urls)
    killed_while_finalizing(cfg, monkeypatch)
    staging = tmp_path / "out" / "_staging"
    assert sorted(p.name[:5] for p in staging.glob("*.draft.json")) == ["00000", "00001", "00002"]
    for shard in unfinished:  # killed mid-download: no committed draft, maybe a partial file
        [draft] = staging.glob(f"{shard:05d}.*.draft.json")
        draft.unlink()
        (staging / f".{draft.name}.x1.tmp").write_bytes(b'{"dig')
    server.reset_log()
    report = run(cfg, RUNNER)
    assert requested(server) == paths(urls, unfinished)
    assert report["written"] == 10 and report["accounted"]
    assert tree_bytes(tmp_path / "out") == reference  # the partial temporary files are gone too
    assert not staging.exists()


def test_a_run_killed_while_finalizing_finishes_without_downloading(server, tmp_path, monkeypatch, reference):
    cfg = config(tmp_path, urls_of(server))
    killed_while_finalizing(cfg, monkeypatch, finalized={0})
    assert (tmp_path / "out" / "00000_stats.json").exists() and not (tmp_path / "out" / "00001_stats.json").exists()
    server.reset_log()
    report = run(cfg, RUNNER)
    assert requested(server) == [] and report["written"] == 10
    assert tree_bytes(tmp_path / "out") == reference


def killed_in(module, name: str, cfg, monkeypatch, spared: set[int] = frozenset()) -> None:
    """Run ingest with ``module.name`` raising for every shard not in ``spared``: a kill right before that step.
    The step is ``write_stats(path, stats)`` or ``remove_staging(out_dir, shard)``."""
    real = getattr(module, name)

    def crash(first, second, *rest):
        if getattr(second, "shard", second) not in spared:
            raise RuntimeError("killed")
        return real(first, second, *rest)

    with monkeypatch.context() as m:
        m.setattr(module, name, crash)
        with pytest.raises(Exception, match="killed"):
            run(cfg, RUNNER)


def test_a_run_killed_between_renaming_the_tar_and_its_stats_does_not_download_again(
    server, tmp_path, monkeypatch, reference
):
    """Finalizing renames the staging tar to the final tar before it writes ``_stats.json``: killed in between,
    the committed draft points at a tar that moved, and the rerun finds it under its final name."""
    cfg = config(tmp_path, urls_of(server))
    killed_in(commit, "write_stats", cfg, monkeypatch, spared={0, 2})  # (0 and 2 may come after: not finalized)
    out = tmp_path / "out"
    assert (out / "00001.tar").exists() and not (out / "00001_stats.json").exists()  # renamed from staging
    assert [p.name.endswith(".draft.json") for p in (out / "_staging").glob("00001.*")] == [True]
    server.reset_log()
    report = run(cfg, RUNNER)
    assert requested(server) == [] and report["written"] == 10 and report["accounted"]
    assert tree_bytes(out) == reference and not (out / "_staging").exists()


def test_retry_failed_retries_a_shard_whose_stale_draft_a_kill_left(server, tmp_path, monkeypatch):
    """Killed after a shard's stats but before its staging files were removed: ``retry_failed`` must retry the
    shard's retryable rows, not reuse the draft that holds those very failures."""
    server.add_image("/img0-copy.jpg", encode_test_image("jpeg", SIZES[0]))  # a duplicate: the tar is rewritten,
    urls = [server.url("/img0.jpg"), server.url("/img0-copy.jpg"), server.fault_url("500")]  # staging tar kept
    killed_in(write, "remove_staging", config(tmp_path, urls), monkeypatch)
    out = tmp_path / "out"
    assert (out / "00000_stats.json").exists() and len(list((out / "_staging").glob("00000.*.draft.json"))) == 1
    assert len(list((out / "_staging").glob("00000.*.tar"))) == 1
    assert statuses(out) == {"000000000": "success", "000000001": "duplicate_sha256", "000000002": "http_500"}
    cfg = config(tmp_path, urls)
    cfg.write.retry_failed = True
    server.reset_log()
    report = run(cfg, RUNNER)
    assert requested(server) == [urlsplit(urls[2]).path]  # the 500 is tried again; the images are kept
    assert report["written"] == 1 and report["accounted"] and not (out / "_staging").exists()


def test_a_rerun_removes_the_staging_files_a_kill_after_the_stats_left(server, tmp_path, monkeypatch, reference):
    cfg = config(tmp_path, urls_of(server))
    killed_in(write, "remove_staging", cfg, monkeypatch, spared={0, 2})
    out = tmp_path / "out"
    assert (out / "00001_stats.json").exists() and len(list((out / "_staging").glob("00001.*.draft.json"))) == 1
    server.reset_log()
    report = run(cfg, RUNNER)
    assert requested(server) == [] and report["written"] == 10 and report["accounted"]  # all downloads committed
    assert tree_bytes(out) == reference and not (out / "_staging").exists()


def test_a_damaged_stats_file_makes_its_shard_incomplete_not_a_failed_plan(server, tmp_path, reference, caplog):
    urls = urls_of(server)
    out = tmp_path / "out"
    run(config(tmp_path, urls), RUNNER)
    (out / "00001_stats.json").write_text('{"shard": 1, "inp')  # cut short
    server.reset_log()
    with caplog.at_level(logging.WARNING, logger="visinstruct"):
        report = run(config(tmp_path, urls), RUNNER)
    assert requested(server) == paths(urls, {1}) and report["written"] == 10 and report["accounted"]
    assert tree_bytes(out) == reference
    assert any("00001: its stats cannot be read (JSONDecodeError" in r.getMessage() for r in caplog.records)


def test_a_redone_shards_url_that_a_complete_shard_holds_is_still_a_duplicate_url(server, tmp_path):
    urls = [server.url(f"/img{i}.jpg") for i in range(4)] + [server.url(f"/img{i}.jpg") for i in (4, 0, 5, 6)]
    out = tmp_path / "out"
    run(config(tmp_path, urls), RUNNER)
    (out / "00001_stats.json").write_text('{"shard": 1, "inp')  # shard 1 is redone, shard 0 stays complete
    server.reset_log()
    report = run(config(tmp_path, urls), RUNNER)
    # the winner of img0's URL is in the skipped shard 0: the redone row loses to it without a request
    assert requested(server) == ["/img4.jpg", "/img5.jpg", "/img6.jpg"] and report["accounted"]
    assert statuses(out)["000010001"] == "duplicate_url"
    (rejection,) = pq.read_table(out / "rejected" / "ingest-00001.parquet").to_pylist()
    assert (rejection["key"], rejection["message"]) == ("000010001", "same URL as 000000000")


def test_a_staged_download_of_other_inputs_is_not_reused(server, tmp_path, monkeypatch, reference):
    urls = urls_of(server)
    killed_while_finalizing(
        config(tmp_path, urls, captions=["old caption"] + [f"caption {i}" for i in range(1, len(urls))]), monkeypatch
    )
    server.reset_log()
    report = run(config(tmp_path, urls), RUNNER)  # row 0's caption changed: shard 0 is downloaded again
    assert requested(server) == paths(urls, {0}) and report["written"] == 10
    assert tree_bytes(tmp_path / "out") == reference


def test_a_retried_bundle_neither_loses_nor_duplicates_rows(server, tmp_path):
    """Beam retries a bundle whose first attempt died: after the commit, the retry reuses the draft; before it
    (a staging tar written, no draft), the retry downloads again into a tar of its own."""
    urls = urls_of(server)[:4]
    cfg = config(tmp_path, urls)
    rows = [ImageTextPair(key=key_for_row(i, 4), url=u, caption=f"caption {i}") for i, u in enumerate(urls)]
    fn = DownloadShard(cfg)
    fn.setup()
    try:
        server.reset_log()
        [first] = fn.process((0, rows))
        assert len(requested(server)) == 4
        [retried] = fn.process((0, list(reversed(rows))))  # a retry may see the rows in another order
        assert len(requested(server)) == 4  # committed: nothing downloaded again
        [draft] = (tmp_path / "out" / "_staging").glob("00000.*.draft.json")
        draft.unlink()  # died after its tar, before the commit
        [redone] = fn.process((0, rows))
        assert len(requested(server)) == 8
    finally:
        fn.teardown()
    assert retried.rows == first.rows == redone.rows and [r.status for r in first.rows] == ["success"] * 4
    assert retried.staging_tar == first.staging_tar != redone.staging_tar  # each attempt writes its own tar
    for draft in (first, redone):
        samples = list(wds.WebDataset(draft.staging_tar, shardshuffle=False))
        assert [s["__key__"] for s in samples] == [r.key for r in rows]


@pytest.mark.parametrize("fixed_by", ["allow_loopback", "retry_failed"])
def test_a_run_that_failed_for_its_settings_is_redone_when_they_are_corrected(server, tmp_path, caplog, fixed_by):
    urls = urls_of(server)
    report = run(config(tmp_path, urls, allow_loopback=False), RUNNER)
    assert set(statuses(tmp_path / "out").values()) == {"blocked_address"} and report["written"] == 0
    assert len(list((tmp_path / "out").glob("*_stats.json"))) == 3  # accounted for, but not final
    cfg = config(tmp_path, urls)
    if fixed_by == "retry_failed":
        cfg.write.retry_failed = True
    with caplog.at_level(logging.INFO, logger="visinstruct"):
        report = run(cfg, RUNNER)
    assert report["written"] == 10 and report["rejected_by_reason"] == {"http_404": 1}
    redone = [r.getMessage() for r in caplog.records if "doing it again" in r.getMessage()]
    assert len(redone) == 3 and "blocked_address 4" in redone[0]


def test_a_shard_with_a_final_failure_stays_complete_unless_retry_failed(server, tmp_path):
    urls = [server.url("/img0.jpg"), server.url("/img0.jpg")]  # the repeat is a duplicate_url: final
    run(config(tmp_path, urls, allow_loopback=False), RUNNER)
    assert statuses(tmp_path / "out") == {"000000000": "blocked_address", "000000001": "duplicate_url"}
    run(config(tmp_path, urls), RUNNER)
    assert statuses(tmp_path / "out")["000000000"] == "blocked_address"  # complete: skipped
    cfg = config(tmp_path, urls)
    cfg.write.retry_failed = True
    run(cfg, RUNNER)
    assert statuses(tmp_path / "out") == {"000000000": "success", "000000001": "duplicate_url"}


def test_what_is_not_final_is_retryable_or_caused_by_the_settings():
    assert RETRYABLE_REASONS < NOT_FINAL_REASONS
    assert {"blocked_address", "internal_error", "missing_column"} <= NOT_FINAL_REASONS
    assert not {"http_404", "optout", "robots_txt", "decode_error", "duplicate_sha256", "takedown"} & NOT_FINAL_REASONS


class RecordingProgress(ShardProgress):
    """Notes the counts each time a row finishes: they must grow while the shard downloads."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[int, int, int]] = []

    def row(self, outcome):
        super().row(outcome)
        self.seen.append((self.done, self.ok, self.rejected))


def test_a_downloading_shard_reports_each_row_as_it_finishes(server, tmp_path, caplog):
    urls = urls_of(server)[8:] + [server.url("/img0.jpg")]  # img8, img9, a 404, img0
    cfg = config(tmp_path, urls, progress_interval=0)
    rows = [ImageTextPair(key=key_for_row(i, 4), url=u) for i, u in enumerate(urls)]
    progress = RecordingProgress(0, len(rows), every_s=0)
    fetcher = Fetcher(cfg.download)
    try:
        with caplog.at_level(logging.INFO, logger="visinstruct"):
            draft = build_draft(0, rows, fetcher, cfg, str(tmp_path / "staging.tar"), progress=progress)
    finally:
        fetcher.close()
    assert [done for done, _, _ in progress.seen] == [1, 2, 3, 4]
    assert progress.seen[-1] == (4, 3, 1) and sum(r.status == "success" for r in draft.rows) == 3
    lines = [r.getMessage() for r in caplog.records if r.name == "visinstruct.transforms.progress"]
    assert [line.split(",")[0] for line in lines] == [
        "shard 00000: 1/4 rows",
        "shard 00000: 2/4 rows",
        "shard 00000: 3/4 rows",
        "shard 00000: 4/4 rows",
    ]
    assert all("rows/s" in line for line in lines)


def test_a_shard_logs_its_last_line_when_it_finishes(caplog):
    """However long the interval, a shard ends with one line of its totals (and one only)."""
    from visinstruct.schemas import Rejection

    progress = ShardProgress(3, 3, every_s=3600)
    with caplog.at_level(logging.INFO, logger="visinstruct"):
        for outcome in ["kept", Rejection("download", "http_404", "not found", "000030001"), "kept"]:
            progress.row(outcome)
    lines = [r.getMessage() for r in caplog.records if r.name == "visinstruct.transforms.progress"]
    assert [line.rsplit(",", 1)[0] for line in lines] == ["shard 00003: 3/3 rows, 2 ok, 1 rejected"]


def test_progress_counters_add_up_over_a_run(server, tmp_path):
    import apache_beam as beam

    from visinstruct.pipelines.ingest import Ingest
    from visinstruct.pipelines.options import pipeline_options

    p = beam.Pipeline(options=pipeline_options(RUNNER))
    _ = p | Ingest(config(tmp_path, urls_of(server)))
    result = p.run()
    result.wait_until_finish()
    counters = {
        c.key.metric.name: c.committed
        for c in result.metrics().query(beam.metrics.MetricsFilter())["counters"]
        if c.key.metric.namespace == "ingest"
    }
    assert (counters["rows_done"], counters["rows_ok"], counters["rows_rejected"]) == (11, 10, 1)
    assert not {"images_ok", "images_rejected"} & counters.keys()  # one pair counts kept and rejected rows
    assert json.loads((tmp_path / "out" / "00002_stats.json").read_text())["rejected_by_reason"] == {"http_404": 1}


KILLABLE_RUN = """
import json, sys, threading
from pathlib import Path
from visinstruct.configs import IngestConfig, from_dict
from visinstruct.pipelines.ingest import run
from visinstruct.transforms import commit, download

settings, step, marks = json.loads(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
module = {"commit_draft": download, "write_stats": commit}[step]
real, lock, calls = getattr(module, step), threading.Lock(), []

def gated(first, second, *rest):
    # the first call goes through; every later one marks that it is waiting, then waits to be killed
    with lock:
        calls.append(second.shard)
        first_call = len(calls) == 1
    if not first_call:
        (marks / f"waiting-{second.shard:05d}").touch()
        threading.Event().wait()
    return real(first, second, *rest)

setattr(module, step, gated)
run(from_dict(IngestConfig, settings), ["--runner=FnApiRunner"])
"""


def committed(out: Path) -> set[int]:
    """Shards a killed run finished downloading: a committed staging draft, or final stats."""
    drafts = {int(p.name[:5]) for p in (out / "_staging").glob("*.draft.json")}  # none when no folder
    return drafts | {int(p.name[:5]) for p in out.glob("*_stats.json")}


@pytest.mark.parametrize("kill_at", ["commit_draft", "write_stats"], ids=["first-download", "first-finalized"])
def test_a_run_killed_for_real_resumes_with_the_shards_it_finished(server, tmp_path, reference, kill_at):
    """SIGKILL a real ingest process once its first shard is downloaded (or finalized) and another is held just
    before its own commit (or, its tar renamed, just before its stats), then rerun: only the shards without a
    committed download are requested again, and the output is that of an uninterrupted run.

    The process itself holds the later shards (it waits for the kill), so where it is killed is an event, not a
    time: the first case always leaves undownloaded shards, the second a shard between rename and stats.
    """
    import subprocess
    import sys
    import time

    urls, out, marks = urls_of(server), tmp_path / "out", tmp_path / "marks"
    marks.mkdir()
    done_file = "*.draft.json" if kill_at == "commit_draft" else "*_stats.json"
    log_path = tmp_path / "killed-run.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLABLE_RUN, json.dumps(settings(tmp_path, urls)), kill_at, str(marks)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        while proc.poll() is None and not (list(out.rglob(done_file)) and list(marks.iterdir())):
            time.sleep(0.02)  # polls for the two events; the process waits for the kill however long this takes
        assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
    finally:
        proc.kill()
        proc.wait()
    waiting = {int(p.name[-5:]) for p in marks.iterdir()}
    finished = committed(out)
    if kill_at == "commit_draft":
        assert len(finished) == 1 and not finished & waiting  # the others were not committed
    else:
        assert len(list(out.glob("*_stats.json"))) == 1 and finished == {0, 1, 2}  # downloads precede finalizing
        for shard in waiting:  # held between the rename of its tar and its stats
            assert (out / f"{shard:05d}.tar").exists() and not (out / f"{shard:05d}_stats.json").exists()
            assert len(list((out / "_staging").glob(f"{shard:05d}.*.draft.json"))) == 1
            assert not list((out / "_staging").glob(f"{shard:05d}.*.tar"))
    server.reset_log()
    report = run(config(tmp_path, urls), RUNNER)
    assert requested(server) == paths(urls, {0, 1, 2} - finished)
    assert report["written"] == 10 and report["accounted"]
    assert tree_bytes(out) == reference and not (out / "_staging").exists()


def test_a_row_whose_sample_the_staging_tar_lacks_is_not_counted_as_written():
    from visinstruct.schemas import IndexRow, Member
    from visinstruct.transforms.write import unstaged_as_errors

    rows = [
        IndexRow("000000000", "success", members=[Member("000000000.jpg", 512, 10)]),
        IndexRow("000000001", "success"),
        IndexRow("000000002", "http_404"),
    ]
    fixed, rejections = unstaged_as_errors(rows, [], {"000000000"})  # the keys the staging tar holds
    assert [r.status for r in fixed] == ["success", "internal_error", "http_404"]
    assert [(r.key, r.stage, r.reason) for r in rejections] == [("000000001", "download", "internal_error")]


def test_a_retry_of_a_shard_whose_tar_was_cut_downloads_again_what_the_cut_lost(server, tmp_path):
    urls = [server.url(f"/img{i}.jpg") for i in range(3)] + [server.fault_url("500")]  # one shard, one retryable
    run(config(tmp_path, urls), RUNNER)
    tar = tmp_path / "out" / "00000.tar"
    whole = {k: v for k, v in tree_bytes(tmp_path / "out").items() if k.endswith(".tar")}
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])  # damaged in transit, after the run
    cfg = config(tmp_path, urls)
    cfg.write.retry_failed = True
    server.reset_log()
    report = run(cfg, RUNNER)
    assert urlsplit(urls[0]).path not in requested(server)  # read back from what is left of the tar
    assert urlsplit(urls[2]).path in requested(server)  # lost to the cut: downloaded again
    assert report["written"] == 3 and report["accounted"]
    assert {k: v for k, v in tree_bytes(tmp_path / "out").items() if k.endswith(".tar")} == whole
    assert len(list(wds.WebDataset(str(tar), shardshuffle=False))) == 3
