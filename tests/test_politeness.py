"""Job-wide per-host politeness: with ``download.per_host_rps`` set, each host's URLs are fetched by a bounded set
of fetch partitions, so the budget holds for the whole job, however many workers and shards hold the host's URLs.

First the plain functions (which partition, how a large host is split, interleaving, each partition's share of the
budget, robots.txt verdicts handed between steps); then ingest on FnApiRunner with four worker processes against
three loopback hosts (127.0.0.1, .2, .3: one server each, told apart by address), read from the servers' request
logs; then the routed path against the direct one (same bytes) and a resumed run (no request for a staged shard).
"""

import io
import json
import math
import random
import tarfile
import threading
import time
import zlib
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from visinstruct.configs import DownloadConfig, IngestConfig, from_dict
from visinstruct.pipelines.ingest import Ingest, run
from visinstruct.pipelines.options import pipeline_options
from visinstruct.pipelines.report import counter_value, summarize
from visinstruct.schemas import ImageRef, ImageTextPair, key_for_row
from visinstruct.testing.responder import Responder
from visinstruct.testing.server import ImageServer, encode_test_image
from visinstruct.transforms import write
from visinstruct.transforms.fetch import (
    ROBOTS_FAILURE_TTL_S,
    ROBOTS_MAX_BYTES,
    Fetcher,
    HostRateLimiter,
    capped_robots,
    host_name,
    origin_of,
    robots_verdict,
)
from visinstruct.transforms.hosts import (
    HostSchedule,
    fetch_partition,
    first_url,
    host_of,
    split_count,
    stable_hash,
)
from visinstruct.transforms.routed import FetchPartition

pytestmark = pytest.mark.timeout(300)
RUNNER = ["--runner=FnApiRunner"]
FOUR_WORKERS = [*RUNNER, "--direct_running_mode=multi_processing", "--direct_num_workers=4"]
WINDOW_S = 2.0


# -- plain functions ---------------------------------------------------------------------------------------------


def test_a_hosts_partition_is_a_stable_hash_not_pythons_salted_one():
    assert stable_hash("images.example.com") == zlib.crc32(b"images.example.com")
    assert fetch_partition("images.example.com", "000000007", {}, 64) == zlib.crc32(b"images.example.com") % 64
    # every row of a host that is not split goes to that one partition, whatever its key
    assert {fetch_partition("a.example", key_for_row(i, 100), {}, 64) for i in range(500)} == {
        stable_hash("a.example") % 64
    }


def test_a_host_is_split_only_past_large_host_urls_and_never_over_the_partitions():
    assert [split_count(n, 2000, 64) for n in (1, 2000, 2001, 4000, 4001, 10_000)] == [1, 1, 2, 2, 3, 5]
    assert split_count(10_000_000, 2000, 64) == 64  # at most one share per partition


def test_a_split_hosts_rows_spread_deterministically_over_k_distinct_partitions():
    keys = [key_for_row(i, 1000) for i in range(3000)]
    routed = [fetch_partition("big.example", key, {"big.example": 3}, 64) for key in keys]
    assert routed == [fetch_partition("big.example", key, {"big.example": 3}, 64) for key in keys]
    first = stable_hash("big.example") % 64
    assert set(routed) == {first, (first + 1) % 64, (first + 2) % 64}
    assert all(800 <= routed.count(p) <= 1200 for p in set(routed))  # about 1000 each (hash of the key)


class FakeClock:
    """Time that passes only when the schedule sleeps: decisions, not timings, are what the tests check."""

    def __init__(self):
        self.now = 0.0
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def _pairs(hosts: str) -> list[ImageTextPair]:
    return [ImageTextPair(key=f"{i:09d}", url=f"http://{h}.example/{i}.jpg") for i, h in enumerate(hosts)]


def test_free_threads_take_the_host_whose_slot_comes_due_first():
    clock = FakeClock()
    intervals = {"a.example": 1.0, "b.example": 1.0, "c.example": 4.0}  # c: a split host's share, k times slower
    schedule = HostSchedule(intervals.__getitem__, clock=lambda: clock.now, sleep=clock.sleep)
    schedule.add(_pairs("aaaaabbcc"))
    schedule.close()
    order = [(round(clock.now, 6), host_of(pair.url)[0]) for pair in schedule]
    # a and b alternate at their pace, c comes once per 4 s; nothing is taken before its host is due, and no thread
    # sleeps on a's slot while b or c is due (a fixed order would send a's last three back to back)
    assert order == [
        (0.0, "a"), (0.0, "b"), (0.0, "c"),
        (1.0, "a"), (1.0, "b"),
        (2.0, "a"), (3.0, "a"), (4.0, "c"), (4.0, "a"),  # a tie: the host that has waited longer goes first
    ]  # fmt: skip
    assert clock.slept == [1.0, 1.0, 1.0, 1.0]


def test_a_host_added_later_goes_before_a_busy_host_and_each_pair_goes_once():
    clock = FakeClock()
    schedule = HostSchedule(lambda host: 10.0, clock=lambda: clock.now, sleep=clock.sleep)
    assert schedule.due_in() == math.inf  # nothing waiting
    schedule.add(_pairs("aaa"))
    assert host_of(next(schedule).url) == "a.example" and schedule.waiting == 2
    assert schedule.due_in() == 10.0  # every waiting host waits for its slot: the partition reads ahead then
    schedule.add(_pairs("bb"))  # read while a waits for its next slot, 10 s away
    assert schedule.due_in() == 0.0
    assert (host_of(next(schedule).url), clock.now) == ("b.example", 0.0)  # b is due at once
    schedule.close()
    rest = list(schedule)
    assert [host_of(p.url) for p in rest] == ["a.example", "b.example", "a.example"]
    assert schedule.waiting == 0


def test_a_schedule_forgets_hosts_whose_slot_has_passed_but_not_one_still_to_wait_for():
    clock = FakeClock()
    schedule = HostSchedule(lambda host: 1.0, clock=lambda: clock.now, sleep=clock.sleep)
    pairs = [ImageTextPair(key=f"{i:09d}", url=f"http://h{i}.example/x.jpg") for i in range(20_000)]
    for pair in pairs:  # 20,000 hosts with a pair each, taken 1 ms apart
        schedule.add([pair])
        assert next(schedule) is pair
        clock.now += 0.001
    assert len(schedule._due) < 10_000  # not every host met: those whose slot has passed were forgotten
    schedule.add([replace(pairs[-1], key="000099999")])  # the last host's slot is still ahead: 1 s after its pair
    assert next(schedule).key == "000099999" and clock.slept == [pytest.approx(1.0 - 0.001)]


def test_threads_waiting_for_pairs_end_when_the_schedule_closes():
    schedule = HostSchedule(lambda host: 0.0)
    taken: list[str] = []
    threads = [threading.Thread(target=lambda: taken.extend(p.key for p in schedule)) for _ in range(4)]
    for thread in threads:
        thread.start()
    schedule.add(_pairs("abcabc"))
    schedule.close()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    assert sorted(taken) == [p.key for p in _pairs("abcabc")]  # each pair taken once, by some thread


def test_a_failed_partition_discards_its_waiting_pairs_so_no_further_request_goes():
    schedule = HostSchedule(lambda host: 0.0)
    schedule.add(_pairs("abcabc"))
    assert next(schedule).key == "000000000"
    schedule.close(discard=True)
    assert schedule.waiting == 0 and list(schedule) == []


def test_a_row_is_routed_by_its_first_url_and_rows_without_urls_are_not_routed():
    multi = ImageTextPair(
        key="000000001", images=[ImageRef(data=b"bytes"), ImageRef("http://b.example/1.jpg"), ImageRef("/x.jpg")]
    )
    assert first_url(multi) == "http://b.example/1.jpg"
    assert first_url(ImageTextPair(key="000000002", url="https://A.example:8443/x.jpg")) == (
        "https://A.example:8443/x.jpg"
    )
    assert host_of("https://A.example:8443/x.jpg") == "a.example"
    assert origin_of("https://A.example:8443/x.jpg") == "https://a.example:8443"  # as the robots cache keys it
    for pair in (
        ImageTextPair(key="000000003", path="/data/x.jpg"),
        ImageTextPair(key="000000004", image=b"bytes"),
        ImageTextPair(key="000000005", text_only=True),
    ):
        assert first_url(pair) is None


def test_every_spelling_of_a_host_name_is_one_host_and_every_spelling_of_an_origin_one_origin():
    assert host_name("Example.COM.") == host_name("example.com") == "example.com"  # case, trailing dot
    assert host_name("bücher.example") == host_name("xn--bcher-kva.example") == "xn--bcher-kva.example"  # IDNA
    assert host_of("http://BÜCHER.example./a.jpg") == "xn--bcher-kva.example"
    assert fetch_partition(host_of("http://Example.COM./a.jpg"), "k", {}, 64) == fetch_partition(
        host_of("http://example.com/b.jpg"), "k", {}, 64
    )
    # the origin drops user info and the scheme's default port; another port is another origin
    assert (
        origin_of("HTTP://user:secret@Example.COM.:80/a.jpg")
        == origin_of("http://example.com/b")
        == ("http://example.com")
    )
    assert origin_of("https://example.com:443/") == "https://example.com"
    assert origin_of("https://example.com:8443/") == "https://example.com:8443"
    assert origin_of("http://[::1]:8080/a.jpg") == "http://[::1]:8080"
    assert origin_of("not a url") == origin_of("http://[::1/a.jpg") == ""


def test_two_spellings_of_one_host_share_its_budget_and_its_robots_txt(server):
    f = Fetcher(DownloadConfig(allow_loopback=True, per_host_rps=1000.0, retries=0, threads=2))
    try:
        server.reset_log()
        lower = server.url("/image.jpg").replace("127.0.0.1", "localhost")
        upper = server.url("/image.jpg").replace("127.0.0.1", "LOCALHOST")
        assert f.fetch(lower).kept and f.fetch(upper).kept
        assert server.hits("/robots.txt") == 1  # one origin, one robots.txt
        assert f.limiter.next_slot("localhost") > 0  # paced under the one name the limiter knows it by
    finally:
        f.close()


def test_the_shares_of_a_split_host_add_up_to_its_budget():
    rps, k = 8.0, 4
    limiter = HostRateLimiter(rps, {"big.example": k})
    assert limiter.interval_of("small.example") == pytest.approx(1 / rps)
    assert limiter.interval_of("big.example") == pytest.approx(k / rps)
    assert k * (1 / limiter.interval_of("big.example")) == pytest.approx(rps)  # k partitions together: rps


def test_a_partitions_limiter_spaces_a_split_host_by_its_share():
    clock = FakeClock()
    clock.now = 100.0
    limiter = HostRateLimiter(1000.0, {"big.example": 50}, clock=lambda: clock.now, sleep=clock.sleep)
    for _ in range(3):
        limiter.wait("big.example")
    assert clock.slept == pytest.approx([0.05, 0.05])  # the second and third waited 50 ms each for their slots
    assert limiter.next_slot("big.example") == pytest.approx(100.15)  # the fourth slot is three intervals on
    limiter.wait("small.example")  # another host does not wait for big's slots: 1 ms from now
    assert len(clock.slept) == 2 and limiter.next_slot("small.example") == pytest.approx(100.101)
    assert limiter.next_slot("never.example") == 0.0


def test_a_limiter_forgets_hosts_whose_slot_has_passed_but_still_spaces_one_whose_slot_is_ahead():
    clock = FakeClock()
    limiter = HostRateLimiter(1.0, clock=lambda: clock.now, sleep=clock.sleep)  # a request a second per host
    for i in range(20_000):  # 20,000 hosts of one request each, 1 ms apart
        limiter.wait(f"h{i}.example")
        clock.now += 0.001
    assert len(limiter._hosts) < 10_000 and clock.slept == []  # not every host met is kept
    limiter.wait("h19999.example")  # its slot is 1 s after its request, 1 ms ago: it still waits
    assert clock.slept == [pytest.approx(0.999)]
    assert limiter.next_slot("h0.example") == 0.0  # forgotten: due at once, as it was anyway


def test_only_url_rows_still_to_fetch_are_sent_to_the_fetch_partitions():
    from visinstruct.schemas import Rejection
    from visinstruct.transforms.routed import network_pairs
    from visinstruct.transforms.takedown import Takedown

    rows = [
        ImageTextPair(key="000000000", url="http://a.example/0.jpg"),
        ImageTextPair(key="000000001", url="http://a.example/listed.jpg"),  # on a takedown list
        ImageTextPair(key="000000002", url="http://a.example/2.jpg"),  # a final failure kept from the shard
        ImageTextPair(key="000000003", path="/data/3.jpg"),  # read where the shard is built
        ImageTextPair(key="000000004", text_only=True),
        Rejection("read", "bad_url", "not a URL", "000000005", "nope"),
    ]
    previous = {"000000002": Rejection("download", "http_404", "gone", "000000002", "http://a.example/2.jpg")}
    takedown = Takedown(urls=frozenset({"http://a.example/listed.jpg"}))
    assert [p.key for p in network_pairs(rows, previous, takedown)] == ["000000000"]


def test_a_row_whose_fetch_outcome_never_came_is_an_internal_error_not_a_lost_row(tmp_path):
    from visinstruct.schemas import Rejection
    from visinstruct.transforms.download import build_draft
    from visinstruct.transforms.progress import ShardProgress

    cfg = ingest_config(tmp_path, ["http://a.example/0.jpg"], "out", 4, per_host_rps=10.0)
    rows = [
        ImageTextPair(key="000000000", url="http://a.example/0.jpg"),  # its outcome is lost
        ImageTextPair(key="000000001", url="http://a.example/1.jpg"),
        Rejection("read", "bad_url", "not a URL", "000000002", "nope"),
    ]
    fetched = {"000000001": Rejection("download", "http_404", "gone", "000000001", "http://a.example/1.jpg")}
    fetcher, progress = Fetcher(cfg.download), ShardProgress(0, 2)
    try:
        draft = build_draft(0, rows, fetcher, cfg, str(tmp_path / "0.tar"), progress=progress, prefetched=fetched)
    finally:
        fetcher.close()
    assert [(r.key, r.status) for r in draft.rows] == [
        ("000000000", "internal_error"),
        ("000000001", "http_404"),
        ("000000002", "bad_url"),
    ]
    assert "never came back" in draft.rows[0].error_message
    assert (progress.done, progress.rejected) == (2, 2)  # the fetched row was counted where it was fetched


@pytest.fixture(scope="module")
def server():
    with ImageServer() as srv:
        yield srv


def test_a_seeded_robots_verdict_is_used_without_asking_the_host(server):
    f = Fetcher(DownloadConfig(allow_loopback=True, per_host_rps=None, retries=0, threads=2))
    try:
        server.reset_log()
        record = f.robots_record(origin_of(server.url("/")))
        assert record[0] == "rules" and "Disallow: /private/" in record[1]
        assert server.hits("/robots.txt") == 1
        other = Fetcher(DownloadConfig(allow_loopback=True, per_host_rps=None, retries=0, threads=2))
        assert other.seed_robots({origin_of(server.url("/")): record}) == 1
        assert other.fetch(server.url("/private/image.jpg")).reason == "robots_txt"
        assert other.fetch(server.url("/image.jpg")).kept
        assert server.hits("/robots.txt") == 1  # the seeded verdict, not a second request
        other.close()
    finally:
        f.close()


def test_a_seeded_failure_expires_like_a_fetched_one(server):
    now = [0.0]
    f = Fetcher(DownloadConfig(allow_loopback=True, per_host_rps=None, retries=0, threads=2), clock=lambda: now[0])
    try:
        server.reset_log()
        origin = origin_of(server.url("/"))
        f.seed_robots({origin: ("error", "robots_unreachable", "robots.txt was unreachable (seeded)")})
        assert f.fetch(server.url("/image.jpg")).reason == "robots_unreachable"
        assert server.hits("/robots.txt") == 0
        now[0] += ROBOTS_FAILURE_TTL_S + 1
        assert f.fetch(server.url("/image.jpg")).kept  # asked again after the failure's time
        assert server.hits("/robots.txt") == 1
    finally:
        f.close()


HOSTILE_ROBOTS = "User-agent: *\nDisallow: //[x\nDisallow: /private/\n"  # urllib raises on //[x (Invalid IPv6 URL)


def test_a_robots_rule_urllib_cannot_read_is_left_out_and_the_others_apply():
    rules = robots_verdict(("rules", HOSTILE_ROBOTS, ""))
    assert not rules.can_fetch("visinstruct", "http://h.example/private/a.jpg")
    assert rules.can_fetch("visinstruct", "http://h.example/a.jpg")


def test_a_robots_record_that_does_not_parse_is_not_seeded_and_the_others_are():
    f = Fetcher(DownloadConfig(per_host_rps=None, threads=1))
    try:
        records = {
            "http://bad.example": ("rules", None, ""),  # no text: parsing it raises
            "http://hostile.example": ("rules", HOSTILE_ROBOTS, ""),
            "http://ok.example": ("allow", "", ""),
        }
        assert f.seed_robots(records) == 2
    finally:
        f.close()


def test_a_robots_txt_over_500_kib_is_cut_at_the_last_line_end_before_it():
    line = b"Disallow: /private/\n"
    small = line * 10
    assert capped_robots(small) == small
    big = b"User-agent: *\n" + line * (ROBOTS_MAX_BYTES // len(line) + 5)
    cut = capped_robots(big)
    assert len(cut) <= ROBOTS_MAX_BYTES and big.startswith(cut) and cut.endswith(b"/private/")
    assert len(cut) > ROBOTS_MAX_BYTES - len(line)


def test_outcomes_come_as_they_complete_with_a_bounded_number_in_flight():
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from visinstruct.transforms.routed import completed

    gate, lock, running, most = threading.Event(), threading.Lock(), [0], [0]

    def work(item: int) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        if item == 0:
            gate.wait(timeout=60)  # the first item is slow: it must not hold up the others
        with lock:
            running[0] -= 1
        return item * 10

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = completed(lambda fn, items: list(pool.map(fn, items)), work, list(range(20)), workers=3)
        first = [next(results) for _ in range(19)]  # all but the slow one, while it still waits
        gate.set()
        rest = list(results)
    assert sorted(item for item, _ in first) == list(range(1, 20))
    assert rest == [(0, 0)] and all(out == item * 10 for item, out in first)
    assert most[0] <= 3


def test_an_error_on_a_worker_thread_is_raised_to_the_consumer():
    from concurrent.futures import ThreadPoolExecutor

    from visinstruct.transforms.routed import completed

    def work(item: int) -> int:
        if item == 5:
            raise RuntimeError("boom")
        return item

    with ThreadPoolExecutor(max_workers=2) as pool, pytest.raises(RuntimeError, match="boom"):
        list(completed(lambda fn, items: list(pool.map(fn, items)), work, list(range(10)), workers=2))


# -- ingest ------------------------------------------------------------------------------------------------------


def write_urls(path: Path, urls: list[str]) -> str:
    pq.write_table(pa.table({"url": urls, "caption": [f"caption {i}" for i in range(len(urls))]}), path)
    return str(path)


def ingest_config(tmp_path: Path, urls: list[str], out: str, shard_size: int, **download) -> IngestConfig:
    settings = {
        "read": {"path": write_urls(tmp_path / f"{out}-urls.parquet", urls)},
        "write": {"path": str(tmp_path / out), "shard_size": shard_size},
        "download": {"allow_loopback": True, "timeout": 10.0, "retries": 0, "threads": 8} | download,
        "resize": {"image_size": 32, "resize_mode": "center_crop"},
        "dedup": {"sha256": False},  # hosts serve the same bytes under many URLs
    }
    return from_dict(IngestConfig, settings)


def most_in_window(times: list[float], window: float = WINDOW_S) -> int:
    """The most requests in any window ``[t, t + window)`` starting at a request (a sliding window)."""
    times, best, j = sorted(times), 0, 0
    for i, start in enumerate(times):
        j = max(j, i)
        while j < len(times) and times[j] < start + window:
            j += 1
        best = max(best, j - i)
    return best


def test_most_in_window_counts_a_half_open_sliding_window():
    assert most_in_window([0.0, 0.5, 1.0, 1.5, 2.0]) == 4  # 2.0 is outside [0, 2)
    assert most_in_window([0.0, 0.5, 1.0, 1.5, 2.0, 2.1]) == 5  # [0.5, 2.5)
    assert most_in_window([0.0, 1.99, 2.0, 3.9]) == 3
    assert most_in_window([]) == 0


def tar_keys(out: Path) -> list[str]:
    keys = []
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(fileobj=io.BytesIO(tar.read_bytes())) as f:
            keys += sorted({m.name.split(".", 1)[0] for m in f.getmembers() if m.name.endswith(".jpg")})
    return keys


def test_four_workers_keep_each_hosts_budget_for_the_whole_job(tmp_path, capsys):
    """One large host split over two partitions and two small ones, their URLs in every shard; four worker
    processes. Every 2 s window holds at most 1.1 x 2 x per_host_rps requests of a host, +1 for the window's edge
    (a window starting at a request holds the requests paced into its 2 s and may close just after one more);
    each host's robots.txt is asked once in the job; every row is written."""
    rps, counts = 20.0, {"127.0.0.1": 200, "127.0.0.2": 60, "127.0.0.3": 60}
    jpeg = encode_test_image("jpeg", (64, 48))
    servers = {host: ImageServer(host=host).start() for host in counts}
    try:
        urls = []
        for host, n in counts.items():
            for i in range(n):
                urls.append(servers[host].add_image(f"/img/{i}.jpg", jpeg))
        random.Random(0).shuffle(urls)  # every shard of 8 holds rows of every host
        cfg = ingest_config(tmp_path, urls, "out", shard_size=8, per_host_rps=rps, large_host_urls=100)
        report = run(cfg, FOUR_WORKERS)
        logs = {host: srv.requests for host, srv in servers.items()}
    finally:
        for srv in servers.values():
            srv.stop()
    bound = 1.1 * WINDOW_S * rps + 1
    with capsys.disabled():
        for host, requests in logs.items():
            times = sorted(r.time for r in requests)
            span = times[-1] - times[0]
            print(
                f"\n{host}: {len(times)} requests in {span:.1f}s, {(len(times) - 1) / span:.1f} req/s, "
                f"most in a {WINDOW_S:g}s window {most_in_window(times)} (bound {bound:g})"
            )
    for host, requests in logs.items():
        assert most_in_window([r.time for r in requests]) <= bound, host
        paths = [r.path for r in requests]
        assert paths.count("/robots.txt") == 1, host
        assert sorted(p for p in paths if p != "/robots.txt") == sorted(f"/img/{i}.jpg" for i in range(counts[host]))
        assert all(r.headers.get("Host", "").startswith(host) for r in requests)
    assert report["written"] == report["inputs"] == len(urls) and report["accounted"]
    assert tar_keys(tmp_path / "out") == [key_for_row(i, 8) for i in range(len(urls))]


def tree_bytes(out: Path) -> dict[str, bytes]:
    """Every file a finished ingest leaves, except its report and stats (they hold durations)."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "run_report.json" and not p.name.endswith("_stats.json")
    }


@pytest.fixture(scope="module")
def photos():
    with ImageServer() as srv:
        for i in range(12):
            srv.add_image(f"/photo{i}.jpg", encode_test_image("jpeg", (60 + 5 * i, 48 + 3 * i)))
        yield srv


def photo_urls(srv) -> list[str]:
    """Twelve images, a 404 and a robots.txt refusal: four shards of four rows."""
    return [srv.url(f"/photo{i}.jpg") for i in range(12)] + [srv.fault_url("404"), srv.url("/private/image.jpg")]


def test_the_routed_path_writes_the_same_bytes_as_the_direct_one(photos, tmp_path):
    urls = photo_urls(photos)
    direct = run(ingest_config(tmp_path, urls, "direct", 4, per_host_rps=None), RUNNER)
    photos.reset_log()
    # a host of 14 URLs split over 3 partitions (large_host_urls 5), at a rate that never binds
    cfg = ingest_config(tmp_path, urls, "routed", 4, per_host_rps=1000.0, large_host_urls=5)
    pipeline = beam.Pipeline(options=pipeline_options(RUNNER))
    _ = pipeline | Ingest(cfg)
    result = pipeline.run()
    result.wait_until_finish()
    routed = summarize(cfg.write.path, stage="ingest", result=result)
    assert (direct["written"], direct["rejected"]) == (routed["written"], routed["rejected"]) == (12, 2)
    assert routed["accounted"] and routed["rejected_by_reason"] == {"http_404": 1, "robots_txt": 1}
    counters = [
        counter_value(result, "ingest", name) for name in ("rows_read", "rows_done", "rows_ok", "rows_rejected")
    ]
    assert counters == [14, 14, 12, 2]  # each row counted once, where it was fetched
    assert photos.hits("/robots.txt") == 1  # the split host's, asked once by FetchRobots
    assert tree_bytes(tmp_path / "direct") == tree_bytes(tmp_path / "routed")
    assert len(tree_bytes(tmp_path / "routed")) == 4 * 3  # per shard: tar, parquet index, rejected table


def test_a_resumed_routed_run_reuses_committed_drafts_without_a_request(photos, tmp_path, monkeypatch):
    urls = photo_urls(photos)
    cfg = ingest_config(tmp_path, urls, "out", 4, per_host_rps=1000.0, large_host_urls=5)
    reference = run(ingest_config(tmp_path, urls, "reference", 4, per_host_rps=None), RUNNER)
    assert reference["written"] == 12

    def killed(draft, losers, out_dir, stage="ingest", dropped=None):  # every shard downloaded, none finalized
        raise RuntimeError("killed")

    with monkeypatch.context() as m:
        m.setattr(write, "finalize_shard", killed)
        with pytest.raises(Exception, match="killed"):
            run(cfg, RUNNER)
    staging = tmp_path / "out" / "_staging"
    assert len(list(staging.glob("*.draft.json"))) == 4
    [draft] = staging.glob("00001.*.draft.json")
    draft.unlink()  # shard 1 was killed mid-download
    photos.reset_log()
    report = run(cfg, RUNNER)
    fetched = sorted(urlsplit(r.path).path for r in photos.requests if r.path != "/robots.txt")
    assert fetched == sorted(urlsplit(u).path for u in urls[4:8])  # shard 1's rows only
    assert report["written"] == 12 and report["accounted"]
    assert tree_bytes(tmp_path / "out") == tree_bytes(tmp_path / "reference")


def test_a_split_hosts_hostile_robots_txt_costs_only_its_unreadable_rule(tmp_path):
    """A robots.txt with a rule that is no URL path (``//[x`` raises in urllib's parser) on a host split over
    partitions: the unreadable rule is left out, the rest applies, every row is accounted and the job succeeds."""
    with ImageServer() as srv:
        srv.robots_txt = "User-agent: *\nDisallow: //[x\nDisallow: /private/\n"
        urls = [srv.add_image(f"/h{i}.jpg", encode_test_image("jpeg", (40 + i, 40))) for i in range(7)]
        urls.append(srv.url("/private/image.jpg"))
        cfg = ingest_config(tmp_path, urls, "out", 4, per_host_rps=1000.0, large_host_urls=3)
        report = run(cfg, RUNNER)
        robots_asked = sum(r.path == "/robots.txt" for r in srv.requests)
    assert report["inputs"] == 8 and report["accounted"]
    assert report["written"] == 7 and report["rejected_by_reason"] == {"robots_txt": 1}
    assert robots_asked == 1  # read once, by FetchRobots, and handed to the partitions


def llava_config(tmp_path: Path, rows: list[dict], root: Path, out: str, **write) -> IngestConfig:
    path = tmp_path / f"{out}.json"
    path.write_text(json.dumps(rows))
    settings = {
        "read": {"path": str(path), "format": "llava", "image_root": str(root)},
        "write": {"path": str(tmp_path / out), "shard_size": 3} | write,
        "download": {"allow_loopback": True, "timeout": 10.0, "retries": 0, "threads": 4, "per_host_rps": None},
        "resize": {"image_size": 32, "resize_mode": "center_crop"},
        "dedup": {"sha256": False},
    }
    return from_dict(IngestConfig, settings)


def test_every_row_shape_takes_the_routed_path_to_the_same_bytes_as_the_direct_one(photos, tmp_path):
    """URL rows, path rows, a multi-image row (a URL and a path), text-only rows, a retryable failure; shard 2
    needs no network (built at once by PlanShard); then ``write.retry_failed`` redoes shard 1 on both paths."""
    root = tmp_path / "root"
    root.mkdir()
    for i in range(3):
        (root / f"local{i}.jpg").write_bytes(encode_test_image("jpeg", (50 + 7 * i, 40 + 3 * i)))

    def row(i: int, image=None) -> dict:
        turns = [
            {"from": "human", "value": ("<image>\n" * n_images(image)) + f"Row {i}?"},
            {"from": "gpt", "value": "Yes."},
        ]
        return {"id": i, "conversations": turns} | ({} if image is None else {"image": image})

    def n_images(image) -> int:
        return 0 if image is None else 1 if isinstance(image, str) else len(image)

    rows = [
        row(0, photos.url("/photo0.jpg")),  # shard 0: a URL row, a path row, a multi-image row
        row(1, "local0.jpg"),
        row(2, [photos.url("/photo1.jpg"), "local1.jpg"]),
        row(3),  # shard 1: text-only, a retryable failure, a URL row
        row(4, photos.fault_url("503")),
        row(5, photos.url("/photo2.jpg")),
        row(6, "local2.jpg"),  # shard 2: no network at all
        row(7),
        row(8, ["local0.jpg", "local2.jpg"]),
    ]
    reports = {}
    for name, rps in (("direct", None), ("routed", 1000.0)):
        cfg = llava_config(tmp_path, rows, root, name)
        cfg = replace(cfg, download=replace(cfg.download, per_host_rps=rps, large_host_urls=2))
        first = run(cfg, RUNNER)
        assert first["inputs"] == 9 and first["accounted"] and first["rejected_by_reason"] == {"http_503": 1}, name
        retry = replace(cfg, write=replace(cfg.write, retry_failed=True))
        reports[name] = run(retry, RUNNER)
    for name, report in reports.items():
        assert (report["inputs"], report["written"], report["rejected"]) == (9, 8, 1) and report["accounted"], name
    assert tree_bytes(tmp_path / "direct") == tree_bytes(tmp_path / "routed")


def test_a_shard_with_nothing_to_fetch_is_built_by_plan_shard_itself(tmp_path):
    from visinstruct.schemas import Rejection
    from visinstruct.transforms.routed import PlanShard
    from visinstruct.transforms.staging import ShardDraft

    image = tmp_path / "a.jpg"
    image.write_bytes(encode_test_image("jpeg", (40, 40)))
    cfg = ingest_config(tmp_path, ["http://a.example/0.jpg"], "out", 4, per_host_rps=10.0)
    local = [
        ImageTextPair(key="000000004", path=str(image)),
        ImageTextPair(key="000000005", text_only=True, caption="words"),
        Rejection("read", "bad_url", "not a URL", "000000006", "nope"),
    ]
    step = PlanShard(cfg)
    step.setup()
    try:
        built = list(step.process((1, local)))
        routed = list(step.process((2, [*local[:1], ImageTextPair(key="000000008", url="http://a.example/0.jpg")])))
    finally:
        step.teardown()
    assert len(built) == 1 and isinstance(built[0], ShardDraft)  # no shuffle, no wait for the fetch partitions
    assert [(r.key, r.status) for r in built[0].rows] == [
        ("000000004", "success"),
        ("000000005", "success"),
        ("000000006", "bad_url"),
    ]
    assert [o.tag for o in routed] == [PlanShard.PENDING, PlanShard.REQUESTS]
    shard, (digest, rows) = routed[0].value
    assert shard == 2 and len(digest) == 64 and [r.key for r in rows] == ["000000004", "000000008"]


class CountingResponder(Responder):
    """The in-memory fetcher, counting the URLs it was asked for."""

    asked: list[str] = []

    def fetch(self, url: str, limiter=None):
        CountingResponder.asked.append(url)
        return super().fetch(url, limiter)


def test_a_partition_whose_bundle_fails_sends_no_further_request(tmp_path):
    cfg = ingest_config(tmp_path, ["http://a.example/x.jpg"], "out", shard_size=8, per_host_rps=1000.0)
    step = FetchPartition(cfg, fetcher_factory=CountingResponder)
    step.setup()
    CountingResponder.asked = []
    pairs = _pairs("ab" * 500)
    outputs = step.process((0, pairs), {}, {})
    try:
        next(outputs)
        with pytest.raises(RuntimeError):
            outputs.throw(RuntimeError("a later step of the bundle failed"))
        time.sleep(0.5)  # were the fetch threads still at work, they would have asked for most of the 1,000 by now
        # the outcome consumed, and at most what the 8 threads had taken when the bundle failed
        assert len(CountingResponder.asked) <= 1 + 2 * cfg.download.threads
    finally:
        step.teardown()
