"""The OpenAI-compatible chat client against a real loopback OpenAI-protocol server with scripted faults."""

import json
import logging
import math
import pickle
import threading
import time

import pytest
import urllib3

from visinstruct.testing.openai_server import OpenAIServer, drip_pieces
from visinstruct.transforms.llm_openai import ChatRequest, ChatResult, OpenAIChatClient

pytestmark = pytest.mark.timeout(60)

KEY = "sk-test-SECRET123"


@pytest.fixture
def server():
    with OpenAIServer() as srv:
        yield srv


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    return KEY


def client(srv: OpenAIServer, **overrides) -> OpenAIChatClient:
    # a generous default limit: a loopback answer takes milliseconds, but a busy CI machine can stall it for seconds
    settings = dict(timeout=10.0, retries=2, backoff=0.01, max_backoff=5.0, concurrency=4) | overrides
    return OpenAIChatClient(srv.base_url, "tiny-chat", **settings)


def ask(text: str, key: str = "k0", **fields) -> ChatRequest:
    return ChatRequest(
        key, [{"role": "system", "content": "You describe images."}, {"role": "user", "content": text}], **fields
    )


def test_valid_answers_land_with_token_counts(server, api_key):
    with client(server) as c:
        result = c.complete(ask("What is in the picture?", key="s00001", max_tokens=64, temperature=0.2, seed=7))
    assert result == ChatResult(
        "s00001",
        text="Echo: What is in the picture?",
        prompt_tokens=8,
        completion_tokens=6,
        attempts=1,
        finish_reason="stop",
    )
    (record,) = server.requests
    assert record.headers["Authorization"] == f"Bearer {KEY}"
    assert record.json == {
        "model": "tiny-chat",
        "messages": ask("x").messages[:1] + [{"role": "user", "content": "What is in the picture?"}],
        "max_tokens": 64,
        "temperature": 0.2,
        "top_p": 1.0,
        "n": 1,
        "seed": 7,
    }


def test_content_parts_no_seed_and_a_cut_answer(server):
    parts = [{"type": "text", "text": "one two three four five"}, {"type": "image_url", "image_url": {"url": "x"}}]
    with client(server, api_key_env=None) as c:
        result = c.complete(ChatRequest("k", [{"role": "user", "content": parts}], max_tokens=3))
    assert (result.text, result.finish_reason, result.completion_tokens) == ("Echo: one two", "length", 3)
    assert "seed" not in server.requests[0].json and "Authorization" not in server.requests[0].headers


@pytest.mark.parametrize(
    "marker, reason, attempts",
    [
        ("[[fault:500:1]]", None, 2),  # one 500, then the answer
        ("[[fault:503:2]]", None, 3),
        ("[[fault:drop:1]]", None, 2),  # connection closed without an answer, then the answer
        ("[[fault:malformed:1]]", None, 2),  # a malformed 200 is retried once
        ("[[fault:nousage]]", None, 1),  # no usage block: the answer lands with 0 tokens
        ("[[fault:500]]", "http_500", 3),  # retries + 1 attempts, then given up
        ("[[fault:502]]", "http_502", 3),
        ("[[fault:drop]]", "connection_error", 3),
        ("[[fault:401]]", "http_401", 1),  # not retried
        ("[[fault:400]]", "http_400", 1),
        ("[[fault:404]]", "http_404", 1),
        ("[[fault:malformed]]", "malformed_response", 2),  # retried once only
        ("[[fault:nochoices]]", "malformed_response", 2),
        ("[[fault:empty]]", "empty_completion", 1),  # not retried: the same prompt gives the same empty answer
    ],
)
def test_each_fault_ends_answered_after_retry_or_with_its_reason(server, marker, reason, attempts):
    # none of these faults waits for the client's timeout: a generous one keeps a slow, busy machine from turning
    # an answer into a timeout and one attempt more
    with client(server, timeout=10.0) as c:
        result = c.complete(ask(f"Describe it {marker}"))
    assert (result.reason, result.attempts) == (reason, attempts), result.message
    assert server.calls == attempts
    if reason is None:
        assert result.text == "Echo: Describe it" and result.message is None
    else:
        assert result.text is None and result.message and (result.prompt_tokens, result.completion_tokens) == (0, 0)


def test_429_waits_for_retry_after_then_succeeds(server):
    with client(server, backoff=0.01) as c:
        result = c.complete(ask("Describe it [[fault:429:1:1]]"))
    assert (result.ok, result.attempts) == (True, 2)
    first, second = server.requests
    assert second.start - first.end >= 0.95  # Retry-After: 1, although the backoff alone would be 10 ms


def test_429_asking_for_more_than_max_backoff_gives_up_at_once(server):
    start = time.monotonic()
    with client(server, max_backoff=30.0) as c:
        result = c.complete(ask("Describe it [[fault:429:1:600]]"))
    assert (result.reason, result.attempts, server.calls) == ("http_429", 1, 1)
    assert "Retry-After 600s exceeds max_backoff=30s" in result.message
    # no wait at all: neither the 600 s asked nor the 30 s max_backoff (the bound leaves a stalled machine room)
    assert time.monotonic() - start < 15.0


def test_a_slow_answer_drips_its_bytes_at_most_a_quarter_second_apart():
    answer = bytes(range(256)) + b"x" * 21  # as long as the server's answer to the test below (277 bytes)
    pieces = drip_pieces(answer, 60.0)
    assert b"".join(pieces) == answer and all(pieces)
    assert 60.0 / len(pieces) <= 0.5 / 2  # a client waiting 0.5 s per read would never time out
    assert len(drip_pieces(answer, 0.9)) == 10 and len(drip_pieces(b"ab", 60.0)) == 2


@pytest.mark.parametrize("marker", ["[[fault:hang]]", "[[fault:slow:60]]"])
def test_hanging_and_dripping_answers_end_as_timeout_at_the_limit(server, marker):
    start = time.monotonic()
    with client(server, timeout=0.5, retries=0) as c:
        result = c.complete(ask(f"Describe it {marker}"))
    elapsed = time.monotonic() - start
    assert (result.reason, result.attempts) == ("timeout", 1), result.message
    assert result.message == "no complete answer within openai.timeout=0.5s"  # the key to raise
    # one total limit, although the slow answer sends a piece every 0.25 s for 60 s (the test above): a per-read
    # timeout would wait for all of them. The bound leaves a stalled CI machine 14 s.
    assert 0.45 <= elapsed < 15.0


def test_timeouts_are_retried_and_a_slow_answer_within_the_limit_lands(server):
    with client(server, timeout=0.3, retries=1) as c:
        hung = c.complete(ask("Describe it [[fault:hang]]"))
    # the limit bounds the whole answer, not less: an answer dripping for 0.9 s (a piece every 0.3 s, longer than the
    # hung request's whole limit) lands within a 30 s limit (4 s was once too little for two CI runs on 2 cores)
    with client(server, timeout=30.0, retries=0) as c:
        slow = c.complete(ChatRequest("k", [{"role": "user", "content": "go [[fault:slow:0.9]]"}]))
    assert (hung.reason, hung.attempts) == ("timeout", 2)
    assert (slow.text, slow.attempts) == ("Echo: go", 1)


@pytest.mark.parametrize("endpoint", ["stopped", "http://nonexistent-host.invalid:1/v1"])
def test_an_unreachable_server_is_a_retried_connection_error_naming_the_endpoint(endpoint):
    """Nothing listening and a host that does not resolve (a mistyped endpoint) are one thing: no server there."""
    if endpoint == "stopped":
        with OpenAIServer() as srv:
            endpoint = srv.base_url  # nothing listens there once the server stopped
    with OpenAIChatClient(endpoint, "m", api_key_env=None, retries=1, backoff=0.01) as c:
        result = c.complete(ask("hello"))
    assert (result.reason, result.attempts) == ("connection_error", 2)
    assert result.message.startswith(f"cannot connect to {endpoint.rstrip('/')}/chat/completions: ")


def test_complete_all_keeps_order_bounds_concurrency_and_counts_add_up(server):
    server.latency = 0.1
    markers = ["", "[[fault:500:1]]", "[[fault:401]]", "", "[[fault:empty]]", "", "[[fault:503:1]]", ""] * 2
    requests = [ask(f"sample {i} {m}", key=f"s{i:05d}") for i, m in enumerate(markers)]
    with client(server, concurrency=3) as c:
        results = c.complete_all(requests)
    assert [r.key for r in results] == [r.key for r in requests]
    assert [r.text for r in results if r.ok] == [
        f"Echo: sample {i}" for i, m in enumerate(markers) if "401" not in m and "empty" not in m
    ]
    failed = [r.reason for r in results if not r.ok]
    assert sorted(failed) == ["empty_completion"] * 2 + ["http_401"] * 2
    assert len(results) == sum(r.ok for r in results) + len(failed) == len(requests)
    assert server.calls == sum(r.attempts for r in results) == len(requests) + 4  # four answered after one retry
    assert server.peak_in_flight == 3 == _max_overlap(server)


def test_concurrency_bound_holds_across_caller_threads(server):
    server.latency = 0.1
    with client(server, concurrency=2) as c:
        threads = [
            threading.Thread(target=c.complete_all, args=([ask(f"t{t} {i}") for i in range(4)],)) for t in range(3)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert server.calls == 12 and server.peak_in_flight == 2


def _max_overlap(srv: OpenAIServer) -> int:
    events = sorted([(r.start, 1) for r in srv.requests] + [(r.end, -1) for r in srv.requests])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def test_api_key_is_sent_but_never_written(server, api_key, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="urllib3")
    texts = [
        "fine",
        "[[fault:500:1]]",
        "[[fault:500]]",
        "[[fault:leak]]",
        "[[fault:401]]",
        "[[fault:hang]]",
        "[[fault:malformed]]",
        "[[fault:drop]]",
        "[[fault:429:1:99]]",
    ]
    c = client(server, timeout=3.0, retries=1)  # the hang costs 2 x 3 s; the other answers come at once
    results = c.complete_all([ask(t, key=f"s{i}") for i, t in enumerate(texts)])
    server.stop()  # now nothing listens: connection refused
    results.append(c.complete(ask("after stop", key="refused")))
    c.close()
    assert [r.reason for r in results] == [
        None,
        None,
        "http_500",
        "http_500",
        "http_401",
        "timeout",
        "malformed_response",
        "connection_error",
        "http_429",
        "connection_error",
    ]
    assert "Authorization: Bearer ***" in results[3].message  # the server quoted the key back; it was scrubbed
    assert all(r.headers.get("Authorization") == f"Bearer {KEY}" for r in server.requests)
    captured = capsys.readouterr()
    written = [repr(c), str(c), pickle.dumps(c).decode("latin-1"), caplog.text, captured.out, captured.err]
    written += [repr(r) for r in results] + [json.dumps(r.__dict__) for r in results]
    assert caplog.records and not [w for w in written if KEY in w or "SECRET123" in w]


def test_missing_key_variable_warns_once_by_name_and_sends_no_header(server, monkeypatch, caplog):
    monkeypatch.delenv("VISINSTRUCT_TEST_NO_KEY", raising=False)
    with caplog.at_level(logging.WARNING):
        c = client(server, api_key_env="VISINSTRUCT_TEST_NO_KEY")
    assert [r.getMessage() for r in caplog.records if "VISINSTRUCT_TEST_NO_KEY" in r.getMessage()] != []
    assert len(caplog.records) == 1
    assert c.complete(ask("hi")).ok and "Authorization" not in server.requests[0].headers
    c.close()


def test_server_requiring_a_key_refuses_others_without_retry(server, api_key, monkeypatch):
    server.require_key = "sk-other"
    with client(server) as c:
        assert (c.complete(ask("hi")).reason, server.calls) == ("http_401", 1)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-other")
    with client(server) as c:
        assert c.complete(ask("hi")).ok


def test_unencodable_request_is_rejected_without_a_call(server):
    with client(server) as c:
        nan = c.complete(ask("hi", temperature=math.nan))
        obj = c.complete(ChatRequest("k", [{"role": "user", "content": {1, 2}}]))
    assert (nan.reason, nan.attempts, obj.reason, server.calls) == ("invalid_request", 0, "invalid_request", 0)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="base_url"):
        OpenAIChatClient("127.0.0.1:8000/v1", "m")
    with pytest.raises(ValueError, match="concurrency"):
        OpenAIChatClient("http://127.0.0.1:8000/v1", "m", concurrency=0)


def test_server_lists_models_and_stops_quickly_with_a_hanging_answer():
    srv = OpenAIServer(model="tiny-chat").start()
    models = urllib3.request("GET", f"{srv.base_url}/models", retries=False).json()
    assert [m["id"] for m in models["data"]] == ["tiny-chat"]
    c = client(srv, timeout=30.0, retries=0)
    outcome = []
    waiter = threading.Thread(target=lambda: outcome.append(c.complete(ask("[[fault:hang]]"))))
    waiter.start()
    while srv.calls == 0:
        time.sleep(0.01)
    start = time.monotonic()
    srv.stop()
    waiter.join(timeout=15.0)
    assert time.monotonic() - start < 10.0
    assert outcome and outcome[0].reason == "connection_error"  # the cut connection, well before the 30 s limit
    c.close()
