"""The fetcher against real faults on a loopback server: each fault ends in the right outcome."""

import time

import pytest

from visinstruct.configs import DownloadConfig
from visinstruct.testing.server import ImageServer, encode_test_image
from visinstruct.transforms.fetch import Fetcher, address_allowed, optout_directive, parse_retry_after

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def server():
    with ImageServer() as srv:
        yield srv


def fetcher(**overrides) -> Fetcher:
    settings = dict(allow_loopback=True, timeout=1.0, retries=2, backoff=0.01, max_backoff=2.0, threads=8,
                    per_host_rps=None) | overrides
    return Fetcher(DownloadConfig(**settings))


@pytest.mark.parametrize("fault, params, reason, attempts", [
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
])
def test_each_fault_is_rejected_with_its_reason(server, fault, params, reason, attempts):
    f = fetcher(max_bytes=1024 * 1024, timeout=0.6)
    result = f.fetch(server.fault_url(fault, **params))
    assert (result.ok, result.reason, result.attempts) == (False, reason, attempts), result.message


@pytest.mark.parametrize("fault, params", [
    ("flaky", {"n": 2}),  # two 503s, then the image
    ("redirect", {"n": 3}),
    ("noimageai", {}),  # "googlebot: noimageai" is addressed to another crawler
    ("text_plain", {}),  # wrong content type: the bytes decide, later
])
def test_recoverable_faults_end_with_the_image(server, fault, params):
    result = fetcher().fetch(server.fault_url(fault, **params))
    assert result.ok, result.message
    assert result.data == encode_test_image("jpeg")


def test_429_waits_for_retry_after_then_succeeds(server):
    url = server.fault_url("429", n=1, retry_after=0.5)
    start = time.monotonic()
    result = fetcher().fetch(url)
    assert result.ok and result.attempts == 2
    assert time.monotonic() - start >= 0.5


def test_retry_after_longer_than_max_backoff_gives_up_at_once(server):
    result = fetcher(max_backoff=1.0).fetch(server.fault_url("429", n=1, retry_after=60))
    assert (result.reason, result.attempts) == ("http_429", 1)
    assert "Retry-After" in result.message


def test_retries_zero_means_one_attempt(server):
    url = server.fault_url("flaky", n=1)
    assert fetcher(retries=0).fetch(url).reason == "http_503"
    assert server.hits(url) == 1


def test_loopback_is_refused_by_default_without_a_request(server):
    server.reset_log()
    for url in (server.url("/image.jpg"), server.url("/image.jpg").replace("127.0.0.1", "localhost")):
        result = fetcher(allow_loopback=False).fetch(url)
        assert (result.reason, result.attempts) == ("blocked_address", 1)
    assert server.requests == []


def test_redirect_to_a_blocked_address_is_refused(server):
    # 0.0.0.0 reaches this machine on Linux: a classic way around loopback checks. Allowing loopback must
    # not allow it, and the refusal happens before any connection (the server sees no second request).
    target = server.url("/image.webp").replace("127.0.0.1", "0.0.0.0")
    server.reset_log()
    result = fetcher().fetch(server.fault_url("redirect_to", url=target))
    assert result.reason == "blocked_address"
    first_hop = server.fault_url("redirect_to", url=target).split(str(server.port), 1)[1]
    assert [r.path for r in server.requests] == [first_hop]


@pytest.mark.parametrize("ip, loopback, private, allowed", [
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
])
def test_address_policy(ip, loopback, private, allowed):
    assert address_allowed(ip, loopback, private) is allowed


def test_robots_txt_is_honoured_when_enabled_and_fetched_once(server):
    server.reset_log()
    f = fetcher(check_robots_txt=True)
    assert f.fetch(server.fault_url("private")).reason == "robots_txt"
    assert f.fetch(server.url("/image.png")).ok
    assert server.hits("/robots.txt") == 1
    assert fetcher().fetch(server.fault_url("private")).ok  # off by default


def test_optout_can_be_switched_off(server):
    assert fetcher(respect_optout=False).fetch(server.fault_url("noai")).ok


def test_user_agent_is_sent(server):
    server.reset_log()
    fetcher(user_agent="mybot/2.0").fetch(server.url("/image.jpg"))
    assert server.requests[-1].headers.get("User-Agent") == "mybot/2.0"


def test_per_host_rate_limit_spaces_requests(server):
    server.reset_log()
    results = fetcher(per_host_rps=20.0).fetch_all([server.url("/image.jpg")] * 8)
    assert all(r.ok for r in results)
    times = sorted(r.time for r in server.requests)
    assert times[-1] - times[0] >= 7 / 20 * 0.9
    server.reset_log()
    fetcher().fetch_all([server.url("/image.jpg")] * 8)
    times = sorted(r.time for r in server.requests)
    assert times[-1] - times[0] < 0.3  # no limit: concurrent


def test_fetch_all_keeps_order_and_never_raises(server):
    urls = [server.url("/image.png"), "ftp://example.com/x.jpg", "not a url", server.fault_url("404"),
            server.url("/image.webp")]
    results = fetcher().fetch_all(urls)
    assert [r.url for r in results] == urls
    assert [r.reason for r in results] == [None, "invalid_url", "invalid_url", "http_404", None]
    assert results[4].data == encode_test_image("webp")


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
    result = fetcher(retries=0, timeout=0.5).fetch(server.fault_url("slow", seconds=5, pieces=50))
    assert result.reason == "timeout"
    assert time.monotonic() - start < 1.5  # the deadline is the whole attempt, not each read
