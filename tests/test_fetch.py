"""The fetcher against real faults on a loopback server: each fault ends in the right outcome."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from visinstruct.configs import DownloadConfig
from visinstruct.testing.server import ImageServer, encode_test_image
from visinstruct.transforms.addresses import address_allowed
from visinstruct.transforms.fetch import CONTROL_CHARS, ROBOTS_FAILURE_TTL_S, Fetcher, optout_directive
from visinstruct.transforms.http import RETRYABLE_REASONS, parse_retry_after

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def server():
    with ImageServer() as srv:
        yield srv


def fetcher(**overrides) -> Fetcher:
    settings = (
        dict(allow_loopback=True, timeout=1.0, retries=2, backoff=0.01, max_backoff=2.0, threads=8, per_host_rps=None)
        | overrides
    )
    return Fetcher(DownloadConfig(**settings))


def attempts(decision) -> int:
    """How many attempts a fetch took: the kept body says so, and so does a dead letter's detail."""
    return decision.value.attempts if decision.kept else decision.detail["attempts"]


@pytest.mark.parametrize(
    "fault, params, reason, n",
    [
        ("404", {}, "http_404", 1),  # not retryable
        ("500", {}, "http_500", 3),  # retried, then given up
        ("hang", {}, "timeout", 3),
        ("slow", {"seconds": 3}, "timeout", 3),  # drips bytes: only a total deadline stops it
        ("truncated", {}, "truncated", 3),
        ("redirect_loop", {}, "redirect_loop", 1),
        ("redirect", {"n": 6}, "too_many_redirects", 1),
        ("huge", {"megabytes": 2}, "too_large", 1),  # Content-Length says so: refused before reading
        ("huge_stream", {"megabytes": 2}, "too_large", 1),  # no Content-Length: cut off while reading
        ("noai", {}, "optout", 1),
        ("noindex", {}, "optout", 1),
    ],
)
def test_each_fault_is_rejected_with_its_reason(server, fault, params, reason, n):
    f = fetcher(max_bytes=1024 * 1024, timeout=0.6)
    result = f.fetch(server.fault_url(fault, **params))
    assert (result.kept, result.reason, attempts(result)) == (False, reason, n), result.message


@pytest.mark.parametrize(
    "fault, params, message",
    [
        ("huge", {"megabytes": 2}, "Content-Length 2097152 exceeds download.max_bytes=1048576"),
        ("huge_stream", {"megabytes": 2}, "the body exceeds download.max_bytes=1048576"),
        ("hang", {}, "no complete answer within download.timeout=0.6s (Read timed out."),
        ("slow", {"seconds": 3}, "no complete answer within download.timeout=0.6s (Read timed out."),
    ],
)
def test_a_limit_reached_names_the_config_key_to_change(server, fault, params, message):
    result = fetcher(max_bytes=1024 * 1024, timeout=0.6, retries=0).fetch(server.fault_url(fault, **params))
    assert result.message.startswith(message), result.message


@pytest.mark.parametrize(
    "fault, params",
    [
        ("flaky", {"n": 2}),  # two 503s, then the image
        ("redirect", {"n": 3}),
        ("noimageai", {}),  # "googlebot: noimageai" is addressed to another crawler
        ("text_plain", {}),  # wrong content type: the bytes decide, later
    ],
)
def test_recoverable_faults_end_with_the_image(server, fault, params):
    result = fetcher().fetch(server.fault_url(fault, **params))
    assert result.kept, result.message
    assert result.value.data == encode_test_image("jpeg")


def test_429_waits_for_retry_after_then_succeeds(server):
    url = server.fault_url("429", n=1, retry_after=0.5)
    start = time.monotonic()
    result = fetcher().fetch(url)
    assert result.kept and attempts(result) == 2
    assert time.monotonic() - start >= 0.5


def test_retry_after_longer_than_max_backoff_gives_up_at_once(server):
    result = fetcher(max_backoff=1.0).fetch(server.fault_url("429", n=1, retry_after=60))
    assert (result.reason, attempts(result)) == ("http_429", 1)
    assert "Retry-After" in result.message


def test_retries_zero_means_one_attempt(server):
    url = server.fault_url("flaky", n=1)
    assert fetcher(retries=0).fetch(url).reason == "http_503"
    assert server.hits(url) == 1


def test_loopback_is_refused_by_default_without_a_request(server):
    server.reset_log()
    for url in (server.url("/image.jpg"), server.url("/image.jpg").replace("127.0.0.1", "localhost")):
        result = fetcher(allow_loopback=False).fetch(url)
        assert (result.reason, attempts(result)) == ("blocked_address", 1)
    assert server.requests == []


def test_redirect_to_a_blocked_address_is_refused(server):
    # 0.0.0.0 reaches this machine on Linux: a classic way around loopback checks. Allowing loopback must
    # not allow it, and the refusal happens before any connection (the server sees no second request).
    target = server.url("/image.webp").replace("127.0.0.1", "0.0.0.0")
    server.reset_log()
    result = fetcher().fetch(server.fault_url("redirect_to", url=target))
    assert result.reason == "blocked_address"
    first_hop = server.fault_url("redirect_to", url=target).split(str(server.port), 1)[1]
    assert [r.path for r in server.requests] == ["/robots.txt", first_hop]


@pytest.mark.parametrize(
    "ip, loopback, private, allowed",
    [
        ("8.8.8.8", False, False, True),
        ("2606:4700:4700::1111", False, False, True),
        ("127.0.0.1", False, False, False),
        ("127.0.0.1", True, False, True),
        ("::1", True, False, True),
        ("::ffff:127.0.0.1", False, False, False),
        ("10.1.2.3", True, False, False),
        ("172.16.0.1", True, False, False),
        ("192.168.1.1", True, False, False),
        ("169.254.169.254", True, False, False),  # cloud metadata
        ("fd00:ec2::254", True, False, False),  # AWS metadata over IPv6
        ("100.100.100.200", True, False, False),  # shared address space (Alibaba metadata)
        ("fe80::1", True, False, False),
        ("0.0.0.0", True, False, False),
        ("224.0.0.1", True, False, False),
        ("10.1.2.3", False, True, True),
        # IPv6 forms that carry an IPv4 address to its destination are judged by that address (class 10)
        ("::ffff:10.0.0.1", True, False, False),  # IPv4-mapped
        ("::127.0.0.1", False, False, False),  # IPv4-compatible (deprecated, still routed by some stacks)
        ("::a00:1", True, False, False),
        ("::ffff:0:a00:1", True, False, False),  # SIIT IPv4-translated
        ("64:ff9b::7f00:1", False, False, False),  # NAT64 well-known prefix
        ("64:ff9b::a9fe:a9fe", True, False, False),  # NAT64 of the metadata address
        ("64:ff9b::808:808", False, False, True),  # NAT64 of a public address is public
        ("64:ff9b:1::a00:1", True, False, False),  # local-use NAT64: private whatever it embeds
        ("64:ff9b:1::808:808", True, False, False),
        ("2002:7f00:1::", False, False, False),  # 6to4 of 127.0.0.1
        ("2002:a9fe:a9fe::1", True, False, False),  # 6to4 of 169.254.169.254
        ("2002:808:808::1", False, False, True),  # 6to4 of a public address
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", True, False, False),  # Teredo, client 10.0.0.1
        ("2001:0:a00:1:8000:63bf:f7f6:f7f7", True, False, False),  # Teredo, server 10.0.0.1
        ("2001:db8::5efe:a00:1", True, False, False),  # ISATAP interface id carrying 10.0.0.1
        ("fe80::5efe:808:808", True, False, False),  # ISATAP id of a public address behind a link-local prefix
        ("fd00::5efe:8.8.8.8", True, False, False),  # ... behind a private prefix
        ("ff02::5efe:808:808", True, False, False),  # ... behind a multicast prefix
        ("2606:4700::5efe:808:808", False, False, True),  # a public prefix carrying a public address stays public
        ("::", True, False, False),  # unspecified: reaches this machine, like 0.0.0.0
        ("::7f00:1", True, False, True),  # allowed loopback stays allowed in its embedded forms
        ("64:ff9b::7f00:1", True, False, True),
        ("100::1", True, False, False),  # discard-only and other reserved blocks
        ("240.0.0.1", True, False, False),
    ],
)
def test_address_policy(ip, loopback, private, allowed):
    assert address_allowed(ip, loopback, private) is allowed


def test_robots_txt_is_honoured_by_default_and_fetched_once(server):
    # robots.txt is held at the server until all 8 fetch threads are waiting for the origin's verdict, so the
    # first requests really overlap: a fetcher that loaded robots.txt once per thread would send 8 of them.
    assert DownloadConfig().check_robots_txt
    server.reset_log()
    f, entered = fetcher(), threading.Semaphore(0)
    verdict = f._robots_verdict

    def counted(origin, *limiter):
        entered.release()
        return verdict(origin, *limiter)

    f._robots_verdict = counted
    server.robots_gate = threading.Event()
    try:
        with ThreadPoolExecutor(1) as pool:
            results = pool.submit(f.map, f.fetch, [server.url("/image.png")] * 16)  # 8 threads, one new origin
            for _ in range(8):
                assert entered.acquire(timeout=30)
            server.robots_gate.set()
            assert all(r.kept for r in results.result(timeout=30))
    finally:
        server.robots_gate.set()
        server.robots_gate = None
    assert server.hits("/robots.txt") == 1
    robots_at = next(r.time for r in server.requests if r.path == "/robots.txt")
    assert all(r.time > robots_at for r in server.requests if r.path != "/robots.txt")  # all waited for it
    assert fetcher().fetch(server.fault_url("private")).reason == "robots_txt"
    assert fetcher(check_robots_txt=False).fetch(server.fault_url("private")).kept


def test_a_robots_txt_load_that_raises_costs_that_url_only_and_is_tried_again(server, monkeypatch, caplog):
    server.reset_log()
    f = fetcher()
    load, calls = f._load_robots, []

    def planted(origin, *limiter):
        calls.append(origin)
        if len(calls) == 1:
            raise RuntimeError("planted bug")
        return load(origin, *limiter)

    monkeypatch.setattr(f, "_load_robots", planted)
    first = f.fetch(server.url("/image.jpg"))
    assert (first.reason, first.message) == ("internal_error", "RuntimeError: planted bug")
    assert "download: internal error" in caplog.text  # the guard's log line
    assert f.fetch(server.url("/image.png")).kept  # the origin's robots.txt is loaded again, not the error reused
    assert len(calls) == 2 and server.hits("/robots.txt") == 1


def test_a_failed_robots_verdict_is_tried_again_after_its_time_and_a_good_one_is_kept(server):
    now = [0.0]
    f = Fetcher(
        DownloadConfig(allow_loopback=True, timeout=1.0, retries=0, per_host_rps=None, threads=2), clock=lambda: now[0]
    )
    server.reset_log()
    server.robots_status = 503  # a transient outage
    try:
        assert f.fetch(server.url("/image.jpg")).reason == "robots_unreachable"
    finally:
        server.robots_status = None
    assert f.fetch(server.url("/image.png")).reason == "robots_unreachable"  # within its time: reused
    assert server.hits("/robots.txt") == 1
    now[0] += ROBOTS_FAILURE_TTL_S
    assert f.fetch(server.url("/image.png")).kept  # the host is back: robots.txt is asked for again
    now[0] += 100 * ROBOTS_FAILURE_TTL_S
    assert f.fetch(server.url("/image.jpg")).kept
    assert server.hits("/robots.txt") == 2  # a verdict that came from a robots.txt is kept


def test_a_bug_anywhere_in_a_fetch_is_that_urls_internal_error_logged_by_the_guard(server, monkeypatch, caplog):
    f = fetcher()

    def planted(url, image=True, limiter=None):
        raise KeyError("planted")

    monkeypatch.setattr(f, "_attempt", planted)
    result = f.fetch(server.url("/image.jpg"))
    assert (result.kept, result.reason, result.message) == (False, "internal_error", "KeyError: 'planted'")
    assert "download: internal error on http://127.0.0.1" in caplog.text


def test_one_set_of_retryable_reasons_for_images_and_llm_replies():
    from visinstruct.transforms import download, llm, read_bounds

    assert "http_425" in RETRYABLE_REASONS and "http_404" not in RETRYABLE_REASONS
    assert RETRYABLE_REASONS <= download.RETRYABLE_REASONS and RETRYABLE_REASONS <= llm.RETRYABLE_REASONS
    assert read_bounds.CONTROL_CHARS is CONTROL_CHARS


def test_a_tls_failure_is_an_ssl_error_with_a_hint_and_a_rerun_retries_it(server):
    from visinstruct.pipelines.report import reason_hint
    from visinstruct.transforms import download

    # TLS to a plain-http port: robots.txt fails first, and says ssl_error, as the image would
    result = fetcher(retries=0).fetch(server.url("/image.jpg").replace("http:", "https:"))
    assert result.reason == "ssl_error", result.message
    assert "ssl_error" in download.RETRYABLE_REASONS
    assert "write.retry_failed: true" in reason_hint("ssl_error", "ingest")
    assert "ingest.write.retry_failed" in reason_hint("ssl_error", "ingest", {"ingest": "ingest."})
    network = ["timeout", "connection_error", "dns_error", "too_large", "blocked_address", "robots_unreachable"]
    assert all(reason_hint(reason, "ingest") for reason in network)


def test_optout_can_be_switched_off(server):
    assert fetcher(respect_optout=False).fetch(server.fault_url("noai")).kept


def test_user_agent_is_sent(server):
    server.reset_log()
    fetcher(user_agent="mybot/2.0").fetch(server.url("/image.jpg"))
    assert server.requests[-1].headers.get("User-Agent") == "mybot/2.0"


def test_a_user_agent_token_is_appended_and_an_opt_out_addressed_to_it_is_honoured(server):
    """As img2dataset does: ``(compatible; TOKEN)`` in the header, ``TOKEN: noai`` (any case) opts out."""
    jpeg = server.images["jpeg"]
    server.add_image("/token-noai.jpg", jpeg, {"X-Robots-Tag": "MYCRAWL: noai"})
    server.add_image("/other-noai.jpg", jpeg, {"X-Robots-Tag": "otherbot: noai"})
    f = fetcher(user_agent="mybot/2.0", user_agent_token="MyCrawl")
    server.reset_log()
    token, other = (f.fetch(server.url(p)) for p in ("/token-noai.jpg", "/other-noai.jpg"))
    assert (token.kept, token.reason, other.kept) == (False, "optout", True)
    assert {r.headers.get("User-Agent") for r in server.requests} == {"mybot/2.0 (compatible; MyCrawl)"}
    assert fetcher(user_agent="mybot/2.0").fetch(server.url("/token-noai.jpg")).kept  # no token: not for us


def test_per_host_rate_limit_spaces_requests(server):
    server.reset_log()
    limited = fetcher(per_host_rps=20.0)
    results = limited.map(limited.fetch, [server.url("/image.jpg")] * 8)
    assert all(r.kept for r in results)
    times = sorted(r.time for r in server.requests)
    assert times[-1] - times[0] >= 7 / 20 * 0.9
    server.reset_log()
    unlimited = fetcher(timeout=30.0)
    server.latency = 5.0  # one request at a time would take 5 s each: all 8 arriving within 5 s means concurrent
    try:
        unlimited.map(unlimited.fetch, [server.url("/image.jpg")] * 8)
    finally:
        server.latency = 0.0
    times = sorted(r.time for r in server.requests if r.path == "/image.jpg")
    assert len(times) == 8 and times[-1] - times[0] < 5.0  # no limit: all sent before the first answer came


def test_mapped_fetches_keep_order_and_never_raise(server):
    urls = [
        server.url("/image.png"),
        "ftp://example.com/x.jpg",
        "not a url",
        server.fault_url("404"),
        server.url("/image.webp"),
    ]
    f = fetcher()
    results = f.map(f.fetch, urls)
    assert [r.reason for r in results] == [None, "invalid_url", "invalid_url", "http_404", None]
    assert results[4].value.data == encode_test_image("webp")


def test_header_parsers():
    agents, optouts = {"*", "visinstruct"}, {"noai", "noimageai"}
    assert optout_directive(["noai"], agents, optouts) == "noai"
    assert optout_directive(["googlebot: noai"], agents, optouts) is None
    assert optout_directive(["visinstruct: noimageai"], agents, optouts) == "noimageai"
    assert optout_directive(["nofollow, NoAI"], agents, optouts) == "noai"
    assert optout_directive(["googlebot: noindex", "noimageai"], agents, optouts) == "noimageai"
    assert parse_retry_after("7") == 7.0 and parse_retry_after(None) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: no wait


def test_a_dripping_body_is_cut_off_at_the_deadline(server):
    start = time.monotonic()
    result = fetcher(retries=0, timeout=0.5).fetch(server.fault_url("slow", seconds=100, pieces=1000))
    assert result.reason == "timeout"
    # the deadline is the whole attempt, not each read (a piece every 0.1 s would keep a per-read timeout waiting
    # 100 s); the bound is loose so that a stalled machine does not fail it
    assert time.monotonic() - start < 30.0


@pytest.mark.parametrize(
    "host",
    [
        "2130706433",
        "0x7f000001",
        "0x7f.1",
        "0177.0.0.1",
        "017700000001",
        "127.1",
        "127.0.1",
        "0x7f.0.0.1",
        "127.0.0.1.",
        "localhost.",
        "LOCALHOST",
        "foo.localhost",
        "[::ffff:127.0.0.1]",
        "[::127.0.0.1]",
        "[64:ff9b::7f00:1]",
        "[2002:7f00:1::]",
        "[::1]",
        "evil.example@127.0.0.1",
        "167772161",
        "0xa.0.0.1",
        "012.0.0.1",
        "0xa9fea9fe",
        "[::ffff:a9fe:a9fe]",
        "0",
        "0.0.0.0",
        "[::]",
    ],
)
def test_every_form_of_a_loopback_or_private_host_is_refused_before_a_request(server, host):
    server.reset_log()
    result = fetcher(allow_loopback=False).fetch(f"http://{host}:{server.port}/image.jpg")
    assert (result.reason, attempts(result)) == ("blocked_address", 1), result.message
    assert server.requests == []  # neither the image nor robots.txt was asked for


@pytest.mark.parametrize("host", ["2130706433", "0x7f.1", "017700000001", "127.1", "[::ffff:127.0.0.1]"])
def test_the_numeric_forms_really_reach_loopback_when_it_is_allowed(server, host):
    # The refusal above is not a parser quirk: these hosts are 127.0.0.1 to the resolver and the socket.
    assert fetcher().fetch(f"http://{host}:{server.port}/image.jpg").value.data == encode_test_image("jpeg")


@pytest.mark.parametrize(
    "url, reason",
    [
        ("", "invalid_url"),
        ("file:///etc/passwd", "invalid_url"),
        ("ftp://example.com/x.jpg", "invalid_url"),
        ("javascript:alert(1)", "invalid_url"),
        ("data:image/png;base64,iVBORw0KGgo=", "invalid_url"),
        ("gopher://127.0.0.1:70/_GET", "invalid_url"),
        ("http://", "invalid_url"),
        ("http://[::1/x", "invalid_url"),
        ("http://example.com:99999/x", "invalid_url"),
        ("http://x/\x00.jpg", "invalid_url"),
        ("http://x/a\r\nHost: evil", "invalid_url"),
        ("http://" + "a" * 10_000 + ".com/", "invalid_url"),
        ("http://xn--a.example/", "dns_error"),
        ("http://ⓛⓞⓒⓐⓛⓗⓞⓢⓣ/", "invalid_url"),
        ("http://a..b/", "invalid_url"),
        ("http://bücher.invalid/x.jpg", "dns_error"),
        ("http://\udcff.example/", "invalid_url"),
    ],
)
def test_hostile_urls_end_with_a_reason_and_never_raise(url, reason):
    result = fetcher(retries=0).fetch(url)
    assert (result.kept, result.reason) == (False, reason), result.message


@pytest.mark.parametrize(
    "status, reason",
    [
        (503, "robots_unreachable"),
        (500, "robots_unreachable"),
        (429, "robots_unreachable"),
        (404, None),
        (403, None),
        (401, None),
    ],
)
def test_robots_txt_5xx_disallows_and_4xx_allows_as_rfc_9309_says(server, status, reason):
    server.robots_status = status
    try:
        server.reset_log()
        f = fetcher(retries=1)
        results = [f.fetch(server.url("/image.jpg")), f.fetch(server.url("/image.png"))]
        assert [r.reason for r in results] == [reason, reason]
        retried = 2 if status in (429, 500, 503) else 1  # a retryable status gets the fetcher's retries
        assert server.hits("/robots.txt") == retried  # then the verdict is cached for the origin
        assert server.hits("/image.jpg") == (0 if reason else 1)
    finally:
        server.robots_status = None


class _DraftShard:
    """A one-DoFn pipeline step: the real download path (``build_draft``) over one shard of pairs."""

    def __init__(self, cfg, tar_path):
        self.cfg, self.tar_path = cfg, tar_path

    def __call__(self, rows):
        from visinstruct.transforms.download import build_draft

        f = Fetcher(self.cfg.download)
        try:
            draft = build_draft(0, rows, f, self.cfg, self.tar_path)
        finally:
            f.close()
        return sorted((r.key, r.status) for r in draft.rows)


def test_an_internal_error_of_a_fetch_is_counted_once_in_a_pipeline(server, monkeypatch, tmp_path):
    # The guard inside Fetcher.fetch runs on a fetch thread, where Beam's counter is lost; the progress report
    # counts the row on the DoFn's thread. One planted bug per URL: one count per URL, not zero, not two.
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from visinstruct.configs import IngestConfig, from_dict
    from visinstruct.schemas import ImageTextPair

    attempt = Fetcher._attempt

    def planted(self, url, image=True, limiter=None):
        if "boom" in url:
            raise KeyError("planted")
        return attempt(self, url, image, limiter)

    monkeypatch.setattr(Fetcher, "_attempt", planted)
    cfg = from_dict(
        IngestConfig,
        {
            "read": {"path": "unused"},
            "write": {"path": str(tmp_path)},
            "download": {"allow_loopback": True, "timeout": 2.0, "retries": 0, "per_host_rps": None, "threads": 4},
            "resize": {"image_size": 32, "resize_mode": "center_crop", "encode_format": "png"},
        },
    )
    rows = [
        ImageTextPair(key=f"00000000{i}", url=server.url("/image.png" + ("?boom" if i % 2 else ""))) for i in range(4)
    ]
    p = TestPipeline(runner="FnApiRunner")
    out = p | beam.Create([rows]) | beam.Map(_DraftShard(cfg, str(tmp_path / "00000.tar")))
    assert_that(
        out,
        equal_to(
            [
                [
                    ("000000000", "success"),
                    ("000000001", "internal_error"),
                    ("000000002", "success"),
                    ("000000003", "internal_error"),
                ]
            ]
        ),
    )
    result = p.run()
    result.wait_until_finish()
    counters = result.metrics().query(beam.metrics.MetricsFilter().with_name("internal_error"))["counters"]
    assert sum(c.committed for c in counters if c.key.metric.namespace == "download") == 2
