"""The HTTP core on its own, against the real loopback servers: the classifier, the capped reader, the retry loop.

Waits are recorded, not slept: the retry loop takes ``sleep`` and ``clock``, so the tests check the delays it
computes (Retry-After, backoff, the deadline) without measuring wall time.
"""

import json
import random

import pytest

from visinstruct.testing.openai_server import OpenAIServer
from visinstruct.testing.server import ImageServer, encode_test_image
from visinstruct.transforms.http import (
    HttpError,
    RetryPolicy,
    attempt_deadline,
    discard,
    pool_manager,
    read_capped,
    retrying,
    send,
    status_error,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def images():
    with ImageServer() as srv:
        yield srv


@pytest.fixture
def chat():
    with OpenAIServer() as srv:
        yield srv


class Recorder:
    """A clock that only moves when the retry loop sleeps, and the list of what it slept."""

    def __init__(self):
        self.now, self.sleeps = 100.0, []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class FixedJitter(random.Random):
    """``random()`` always returns ``value``: 0.0 gives the shortest jittered delay (half), 1.0 the full one."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def random(self) -> float:
        return self.value


def get(pool, url: str, max_bytes: int = 1 << 20, timeout: float = 2.0) -> bytes:
    """One GET through the core, as a client does: a non-200 status is an error, the body is capped."""
    with attempt_deadline(timeout):
        resp = send(pool, "GET", url)
        try:
            if resp.status != 200:
                discard(resp)  # unread bytes left on a pooled connection would be the next answer's status line
                raise status_error(resp.status, resp.headers)
            return read_capped(resp, max_bytes)
        finally:
            resp.release_conn()


def post_chat(pool, srv: OpenAIServer, text: str) -> dict:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]}).encode()
    with attempt_deadline(2.0):
        resp = send(pool, "POST", f"{srv.base_url}/chat/completions", body, {"Content-Type": "application/json"})
        try:
            data = read_capped(resp, 1 << 20)
        finally:
            resp.release_conn()
    if resp.status != 200:
        raise status_error(resp.status, resp.headers)
    return json.loads(data)


def failure(fn) -> HttpError:
    with pytest.raises(HttpError) as caught:
        fn()
    return caught.value


# -- the classifier and the capped reader --------------------------------------------------------------------------


def test_503_with_retry_after_then_200_is_one_retry_after_the_given_delay(chat):
    pool, rec = pool_manager(maxsize=2), Recorder()
    policy = RetryPolicy(retries=3, backoff=0.01, max_backoff=10.0)
    answer = retrying(
        lambda n: post_chat(pool, chat, "hello [[fault:503:1:2]]"), policy, random.Random(0), rec.sleep, rec.clock
    )
    assert answer["choices"][0]["message"]["content"] == "Echo: hello"
    assert rec.sleeps == [2.0] and chat.calls == 2  # the server's Retry-After, not the 10 ms backoff


def test_a_status_error_is_http_code_retryable_only_for_transient_statuses(images):
    pool = pool_manager(maxsize=2)
    gone = failure(lambda: get(pool, images.fault_url("404")))
    busy = failure(lambda: get(pool, images.fault_url("429", n=1, retry_after=7)))
    assert (gone.reason, gone.retryable, gone.retry_after) == ("http_404", False, None)
    assert (busy.reason, busy.retryable, busy.retry_after) == ("http_429", True, 7.0)


@pytest.mark.parametrize("fault", ["huge", "huge_stream"])  # refused on Content-Length; cut off while reading
def test_a_body_over_the_cap_is_too_large(images, fault):
    error = failure(lambda: get(pool_manager(maxsize=2), images.fault_url(fault, megabytes=2), max_bytes=1 << 20))
    assert (error.reason, error.retryable) == ("too_large", False)
    assert str(error).endswith("exceeds the limit of 1048576 bytes"), str(error)


def test_a_capped_read_names_the_setting_that_holds_the_cap(images):
    pool = pool_manager(maxsize=2)
    with attempt_deadline(2.0):
        resp = send(pool, "GET", images.fault_url("huge", megabytes=2))
        error = failure(lambda: read_capped(resp, 1024, setting="download.max_bytes"))
    assert str(error) == "Content-Length 2097152 exceeds download.max_bytes=1024"


def test_a_body_within_the_cap_is_read_whole(images):
    assert get(pool_manager(maxsize=2), images.url("/image.png")) == encode_test_image("png")


def test_a_connection_closed_without_an_answer_is_a_retryable_connection_error(chat):
    error = failure(lambda: post_chat(pool_manager(maxsize=2), chat, "hi [[fault:drop]]"))
    assert (error.reason, error.retryable) == ("connection_error", True), str(error)


def test_a_refused_connection_is_a_retryable_connection_error():
    srv = OpenAIServer().start()
    url = srv.base_url
    srv.stop()  # nothing listens on the port now: the connect is reset at once
    error = failure(lambda: get(pool_manager(maxsize=2), f"{url}/models"))
    assert (error.reason, error.retryable) == ("connection_error", True), str(error)


def test_a_cut_body_is_truncated_and_a_silent_server_a_timeout(images):
    pool = pool_manager(maxsize=2)
    cut = failure(lambda: get(pool, images.fault_url("truncated")))
    hung = failure(lambda: get(pool, images.fault_url("hang"), timeout=0.3))
    assert (cut.reason, cut.retryable, hung.reason, hung.retryable) == ("truncated", True, "timeout", True)


def test_a_timeout_while_sending_the_request_is_a_timeout_not_a_connection_error(images):
    # /hang never reads: a body larger than the socket buffers blocks the send until the deadline, and urllib3
    # wraps that TimeoutError in ProtocolError("Connection aborted.", ...).
    with attempt_deadline(0.3):
        error = failure(lambda: send(pool_manager(maxsize=2), "GET", images.fault_url("hang"), b"x" * (32 << 20)))
    assert (error.reason, error.retryable) == ("timeout", True), str(error)


def test_a_message_names_no_pool_or_connection_object(images):
    hung = failure(lambda: get(pool_manager(maxsize=2), images.fault_url("hang"), timeout=0.3))
    assert "host=" not in str(hung) and "Read timed out" in str(hung), str(hung)


def test_tls_to_a_plain_http_port_is_an_ssl_error(images):
    error = failure(lambda: get(pool_manager(maxsize=2), images.url("/image.jpg").replace("http:", "https:")))
    assert (error.reason, error.retryable) == ("ssl_error", True), str(error)


def test_the_connection_policy_judges_every_resolved_address_before_connecting(images):
    images.reset_log()
    judged = []

    def refuse(ip: str) -> bool:
        judged.append(ip)
        return False

    blocked = failure(lambda: get(pool_manager(maxsize=2, address_allowed=refuse), images.url("/image.jpg")))
    unknown = failure(lambda: get(pool_manager(maxsize=2, address_allowed=refuse), "http://no-such-host.invalid/"))
    assert (blocked.reason, blocked.retryable, judged, images.requests) == (
        "blocked_address",
        False,
        ["127.0.0.1"],
        [],
    )
    assert (unknown.reason, unknown.retryable) == ("dns_error", False)
    assert get(pool_manager(maxsize=2, address_allowed=lambda ip: True), images.url("/image.jpg"))


# -- the retry loop -------------------------------------------------------------------------------------------------


def test_backoff_doubles_with_jitter_up_to_max_backoff(images):
    url = images.fault_url("flaky", n=4)
    pool, rec = pool_manager(maxsize=2), Recorder()
    policy = RetryPolicy(retries=4, backoff=1.0, max_backoff=3.0)
    assert retrying(lambda n: get(pool, url), policy, FixedJitter(1.0), rec.sleep, rec.clock)
    assert rec.sleeps == [1.0, 2.0, 3.0, 3.0]
    shortest = [policy.delay(n, HttpError("timeout", "", True), FixedJitter(0.0)) for n in (1, 2, 3)]
    assert shortest == [0.5, 1.0, 1.5]


def test_giving_up_reports_the_attempts_and_why(images):
    rec = Recorder()
    pool = pool_manager(maxsize=2)
    policy = RetryPolicy(retries=2, backoff=0.5, max_backoff=5.0)
    url = images.fault_url("flaky", n=9)
    error = failure(lambda: retrying(lambda n: get(pool, url), policy, random.Random(0), rec.sleep, rec.clock))
    assert (error.reason, error.attempts, len(rec.sleeps), images.hits(url)) == ("http_503", 3, 2, 3)
    slow = images.fault_url("429", n=1, retry_after=60)
    error = failure(lambda: retrying(lambda n: get(pool, slow), policy, random.Random(0), rec.sleep, rec.clock))
    assert (error.reason, error.attempts, len(rec.sleeps)) == ("http_429", 1, 2)  # no wait for 60 s
    assert "Retry-After 60s exceeds max_backoff=5s" in str(error)
    final = failure(lambda: retrying(lambda n: get(pool, images.fault_url("404")), policy, random.Random(0)))
    assert (final.reason, final.attempts) == ("http_404", 1)


def test_a_deadline_stops_retries_before_the_wait_would_pass_it(images):
    url = images.fault_url("flaky", n=9)
    pool, rec = pool_manager(maxsize=2), Recorder()
    policy = RetryPolicy(retries=9, backoff=1.0, max_backoff=3.0, deadline_s=5.0)
    error = failure(lambda: retrying(lambda n: get(pool, url), policy, FixedJitter(1.0), rec.sleep, rec.clock))
    assert rec.sleeps == [1.0, 2.0]  # a third wait of 3 s would end at 6 s, past the deadline
    assert (error.reason, error.attempts, images.hits(url)) == ("http_503", 3, 3)
    assert "5s deadline" in str(error)


def test_a_reason_may_have_fewer_retries_than_the_rest():
    rec, calls = Recorder(), []

    def attempt(n: int):
        calls.append(n)
        raise HttpError("malformed_response", "not JSON", retryable=True)

    policy = RetryPolicy(retries=5, backoff=0.1, max_backoff=1.0, reason_retries={"malformed_response": 1})
    error = failure(lambda: retrying(attempt, policy, random.Random(0), rec.sleep, rec.clock))
    assert (error.attempts, calls, len(rec.sleeps)) == (2, [1, 2], 1)
