"""The loopback fault server: every fault really happens on the socket, seen through plain HTTP clients."""

import http.client
import io
import socket
import threading
import time
import urllib.robotparser
from urllib.parse import urlsplit

import pytest
import requests
from PIL import Image

from visinstruct.testing.server import (
    DEFAULT_ROBOTS_TXT,
    DEFAULT_SIZE,
    FAULT_PATHS,
    ImageServer,
    corrupt_jpeg,
    encode_test_image,
    sniff_content_type,
)

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def srv():
    with ImageServer() as server:
        yield server


@pytest.fixture()
def client():
    # trust_env=False: a proxy from the environment must never sit between the client and the loopback server.
    with requests.Session() as session:
        session.trust_env = False
        yield session


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def raw_get(url: str, timeout: float = 5.0) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
    return conn, conn.getresponse()


# -- images ----------------------------------------------------------------------------------------------------------


def test_encode_test_image_is_deterministic_real_and_sized():
    for fmt, pil_format in (("jpeg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")):
        data = encode_test_image(fmt)
        encode_test_image.cache_clear()
        assert encode_test_image(fmt) == data
        image = decode(data)
        assert (image.format, image.size) == (pil_format, DEFAULT_SIZE)
    assert decode(encode_test_image("JPG", size=(20, 10))).size == (20, 10)
    assert sniff_content_type(encode_test_image("png")) == "image/png"
    assert sniff_content_type(encode_test_image("gif")) == "image/gif"
    assert sniff_content_type(b"<html>") is None


@pytest.mark.parametrize(
    ("path", "content_type", "pil_format"),
    [
        ("/image.jpg", "image/jpeg", "JPEG"),
        ("/image.png", "image/png", "PNG"),
        ("/image.webp", "image/webp", "WEBP"),
    ],
)
def test_default_images_decode_with_the_right_size(srv, client, path, content_type, pil_format):
    response = client.get(srv.url(path), timeout=5)
    assert response.status_code == 200 and response.headers["Content-Type"] == content_type
    assert int(response.headers["Content-Length"]) == len(response.content)
    image = decode(response.content)
    assert (image.format, image.size) == (pil_format, DEFAULT_SIZE)


def test_add_and_add_image_register_resources(srv, client):
    png = encode_test_image("png", size=(10, 7))
    url = srv.add_image("/mine/x.png", png)
    assert url == srv.url("/mine/x.png")
    response = client.get(url, timeout=5)
    assert response.headers["Content-Type"] == "image/png" and decode(response.content).size == (10, 7)
    srv.add("data/blob", b"abc", "application/x-thing", {"X-Custom": "yes"})
    response = client.get(srv.url("/data/blob"), timeout=5)
    assert (response.content, response.headers["Content-Type"], response.headers["X-Custom"]) == (
        b"abc",
        "application/x-thing",
        "yes",
    )
    with pytest.raises(ValueError, match="not JPEG, PNG, WebP or GIF"):
        srv.add_image("/bad.jpg", b"hello")


def test_head_sends_headers_without_a_body(srv):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    conn.request("HEAD", "/image.jpg")
    head = conn.getresponse()
    assert head.status == 200 and int(head.getheader("Content-Length")) == len(srv.images["jpeg"])
    assert head.read() == b""
    conn.close()


# -- statuses, retries ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "status"), [("404", 404), ("500", 500), ("503", 503)])
def test_status_faults(srv, client, name, status):
    response = client.get(srv.fault_url(name), timeout=5)
    assert response.status_code == status
    assert str(status) in response.text and len(response.content) < 100


def test_unknown_path_is_404_and_bad_numbers_are_400(srv, client):
    assert client.get(srv.url("/no/such/thing.jpg"), timeout=5).status_code == 404
    assert client.get(srv.fault_url("flaky", n=1, status="abc"), timeout=5).status_code == 400


def test_flaky_fails_n_times_then_serves_the_image(srv, client):
    url = srv.fault_url("flaky", n=2)
    assert [client.get(url, timeout=5).status_code for _ in range(2)] == [503, 503]
    response = client.get(url, timeout=5)
    assert response.status_code == 200 and response.content == srv.images["jpeg"]
    assert client.get(url, timeout=5).status_code == 200
    # A fresh token starts a fresh counter, and the failure status is configurable.
    other = srv.fault_url("flaky", n=1, status=500)
    assert other != url and "status=500" in other
    assert [client.get(other, timeout=5).status_code for _ in range(2)] == [500, 200]


def test_rate_limit_sends_retry_after_then_the_image(srv, client):
    url = srv.fault_url("429", n=2, retry_after=3)
    for _ in range(2):
        response = client.get(url, timeout=5)
        assert response.status_code == 429 and response.headers["Retry-After"] == "3"
    response = client.get(url, timeout=5)
    assert response.status_code == 200 and "Retry-After" not in response.headers
    assert decode(response.content).size == DEFAULT_SIZE
    assert client.get(srv.fault_url("429", n=1), timeout=5).headers["Retry-After"] == "1"


# -- time: slow, hang, latency, stop ---------------------------------------------------------------------------------


def test_slow_body_takes_at_least_the_given_time(srv, client):
    start = time.monotonic()
    response = client.get(srv.fault_url("slow", seconds=0.4, pieces=4), timeout=5)
    elapsed = time.monotonic() - start
    assert elapsed >= 0.4
    assert response.status_code == 200 and decode(response.content).size == DEFAULT_SIZE


def test_slow_body_trips_a_client_read_timeout(srv, client):
    # Two pieces 30 s apart: the headers come at once, then the body stalls far longer than the 0.3 s read timeout.
    start = time.monotonic()
    with pytest.raises(requests.exceptions.ConnectionError, match="(?i)timed out"):
        client.get(srv.fault_url("slow", seconds=60, pieces=2), timeout=0.3)
    assert time.monotonic() - start < 15.0  # well before the second piece, with room for a stalled machine


def test_hang_times_the_client_out(srv, client):
    start = time.monotonic()
    with pytest.raises(requests.exceptions.ReadTimeout):
        client.get(srv.fault_url("hang"), timeout=0.5)
    assert 0.5 <= time.monotonic() - start < 15.0  # the hang lasts until the server stops: any bound tells them apart


def test_latency_delays_every_response(client):
    with ImageServer(latency=0.2) as slow_server:
        for path in ("/image.jpg", "/status/404"):
            start = time.monotonic()
            client.get(slow_server.url(path), timeout=5)
            assert time.monotonic() - start >= 0.2


def test_stop_returns_quickly_with_hang_and_slow_in_flight():
    server = ImageServer().start()
    outcomes = []

    def fetch(url):
        try:
            outcomes.append(raw_get(url, timeout=20)[1].read())
        except (OSError, http.client.HTTPException) as err:
            outcomes.append(err)

    urls = [server.fault_url("hang"), server.fault_url("slow", seconds=20)]
    clients = [threading.Thread(target=fetch, args=(url,), daemon=True) for url in urls]
    for client in clients:
        client.start()
    deadline = time.monotonic() + 5
    while len(server.requests) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(server.requests) == 2
    start = time.monotonic()
    server.stop()
    assert time.monotonic() - start < 10.0  # not the 20 s the slow answer would take
    for client in clients:
        client.join(timeout=3)
    # Both clients were cut off (no response, a short body) long before their 20 s timeout.
    assert len(outcomes) == 2 and all(isinstance(outcome, Exception) for outcome in outcomes), outcomes


# -- broken bodies ---------------------------------------------------------------------------------------------------


def test_truncated_body_is_shorter_than_its_content_length(srv, client):
    conn, response = raw_get(srv.fault_url("truncated"))
    promised = int(response.getheader("Content-Length"))
    assert promised == len(srv.images["jpeg"])
    with pytest.raises(http.client.IncompleteRead) as err:
        response.read()
    assert 0 < len(err.value.partial) < promised
    conn.close()
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        client.get(srv.fault_url("truncated"), timeout=5)


def test_corrupt_bodies_claim_jpeg_but_do_not_decode(srv, client):
    garbled = client.get(srv.fault_url("corrupt"), timeout=5)
    assert garbled.headers["Content-Type"] == "image/jpeg" and garbled.content[:3] == b"\xff\xd8\xff"
    assert len(garbled.content) == len(srv.images["jpeg"]) and garbled.content != srv.images["jpeg"]
    assert Image.open(io.BytesIO(garbled.content)).format == "JPEG"  # the headers survive: only decoding fails
    with pytest.raises(OSError):
        decode(garbled.content)
    noise = client.get(srv.fault_url("random"), timeout=5)
    assert noise.headers["Content-Type"] == "image/jpeg" and len(noise.content) == 2048
    with pytest.raises(OSError):
        decode(noise.content)


@pytest.mark.parametrize("size", [(64, 48), (8, 8), (300, 200)])
def test_corrupt_jpeg_fails_to_decode_at_any_size(size):
    for seed in range(5):
        with pytest.raises(OSError):
            decode(corrupt_jpeg(encode_test_image("jpeg", size=size), seed=seed))


def test_html_and_wrong_content_types_are_what_they_claim(srv, client):
    page = client.get(srv.fault_url("html"), timeout=5)
    assert page.headers["Content-Type"].startswith("text/html") and page.text.lower().startswith("<!doctype html")
    for name, content_type in (("text_plain", "text/plain"), ("octet_stream", "application/octet-stream")):
        response = client.get(srv.fault_url(name), timeout=5)
        assert response.headers["Content-Type"] == content_type
        assert response.content == srv.images["jpeg"] and decode(response.content).size == DEFAULT_SIZE


# -- redirects -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hops", [1, 3])
def test_redirect_chain_ends_at_the_image_after_n_hops(srv, client, hops):
    response = client.get(srv.fault_url("redirect", n=hops), timeout=5)
    assert len(response.history) == hops and all(r.status_code == 302 for r in response.history)
    assert response.url == srv.url("/image.jpg") and response.content == srv.images["jpeg"]


def test_redirect_status_is_configurable(srv, client):
    response = client.get(srv.fault_url("redirect", n=1, status=301), timeout=5, allow_redirects=False)
    assert response.status_code == 301 and response.headers["Location"] == srv.url("/image.jpg")


def test_redirect_loop_is_detected_by_the_client(srv, client):
    first = client.get(srv.fault_url("redirect_loop"), timeout=5, allow_redirects=False)
    assert first.status_code == 302 and first.headers["Location"] == srv.url("/loop/b")
    client.max_redirects = 5
    with pytest.raises(requests.exceptions.TooManyRedirects):
        client.get(srv.fault_url("redirect_loop"), timeout=5)


def test_redirect_to_another_server(srv, client):
    with ImageServer() as other:
        target = other.url("/image.png")
        response = client.get(srv.fault_url("redirect_to", url=target), timeout=5)
        assert response.url == target and len(response.history) == 1
        assert response.headers["Content-Type"] == "image/png" and other.hits("/image.png") == 1
    assert client.get(srv.url("/redirect-to"), timeout=5).status_code == 400


# -- huge bodies -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "has_length"), [("huge", True), ("huge_stream", False)])
def test_huge_body_delivers_at_least_the_promised_size(srv, client, name, has_length):
    promised = 3 * 2**20
    with client.get(srv.fault_url(name, megabytes=3), timeout=5, stream=True) as response:
        assert ("Content-Length" in response.headers) is has_length
        if has_length:
            assert int(response.headers["Content-Length"]) == promised
        else:
            assert response.headers["Connection"] == "close"
        received, head = 0, b""
        for chunk in response.iter_content(256 * 1024):
            head = head or chunk[:3]
            received += len(chunk)
            if received >= promised:
                break
    assert received >= promised and head == b"\xff\xd8\xff"


def test_client_hanging_up_early_leaves_no_traceback(capfd):
    server = ImageServer().start()
    for path in ("/huge/64", "/huge-stream/64", "/slow/2?pieces=20"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        # Hung up mid-body: the server's next writes hit a reset or a broken pipe.
    time.sleep(0.3)
    server.stop()
    time.sleep(0.1)
    assert capfd.readouterr().err == ""


# -- opt-out, robots.txt ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "tag"),
    [
        ("noai", "noai"),
        ("noimageai", "googlebot: noimageai"),
        ("noindex", "noindex"),
    ],
)
def test_optout_headers_come_with_a_real_image(srv, client, name, tag):
    response = client.get(srv.fault_url(name), timeout=5)
    assert response.headers["X-Robots-Tag"] == tag and decode(response.content).size == DEFAULT_SIZE


def test_robots_txt_disallows_private_and_is_configurable(client):
    with ImageServer() as server:
        response = client.get(server.fault_url("robots"), timeout=5)
        assert response.status_code == 200 and response.text == DEFAULT_ROBOTS_TXT
        rules = urllib.robotparser.RobotFileParser()
        rules.parse(response.text.splitlines())
        assert not rules.can_fetch("anybot", server.fault_url("private"))
        assert rules.can_fetch("anybot", server.url("/image.jpg"))
        assert client.get(server.fault_url("private"), timeout=5).content == server.images["jpeg"]
        server.robots_txt = "User-agent: *\nDisallow: /\n"
        assert client.get(server.url("/robots.txt"), timeout=5).text == "User-agent: *\nDisallow: /\n"
        server.robots_txt = None
        assert client.get(server.url("/robots.txt"), timeout=5).status_code == 404


# -- request log, URLs, binding --------------------------------------------------------------------------------------


def test_request_log_records_every_request(client):
    with ImageServer() as server:
        before = time.monotonic()
        client.get(server.url("/image.jpg"), headers={"X-Test": "one"}, timeout=5)
        client.head(server.url("/image.jpg"), timeout=5)
        client.get(server.url("/status/404?x=1"), timeout=5)
        after = time.monotonic()
        records = server.requests
        assert [(r.method, r.path) for r in records] == [
            ("GET", "/image.jpg"),
            ("HEAD", "/image.jpg"),
            ("GET", "/status/404?x=1"),
        ]
        assert records[0].headers["X-Test"] == "one" and records[0].client[0] == "127.0.0.1"
        assert before <= records[0].time <= records[1].time <= records[2].time <= after
        assert server.hits("/image.jpg") == 2 and server.hits(server.url("/image.jpg")) == 2
        assert server.hits("/status/404") == 1 and server.hits("/status/404?x=2") == 0
        server.reset_log()
        assert server.requests == [] and server.hits("/image.jpg") == 0


def test_log_is_thread_safe_under_concurrent_clients():
    with ImageServer() as server:

        def fetch_many():
            with requests.Session() as session:
                session.trust_env = False
                for _ in range(10):
                    session.get(server.url("/image.png"), timeout=5)

        threads = [threading.Thread(target=fetch_many) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert server.hits("/image.png") == 40


def test_fault_url_names_and_tokens(srv):
    assert set(FAULT_PATHS) >= {
        "404",
        "500",
        "flaky",
        "429",
        "slow",
        "hang",
        "truncated",
        "corrupt",
        "random",
        "html",
        "text_plain",
        "octet_stream",
        "redirect",
        "redirect_loop",
        "redirect_to",
        "huge",
        "huge_stream",
        "noai",
        "noimageai",
        "noindex",
        "private",
        "robots",
    }
    assert srv.fault_url("flaky") != srv.fault_url("flaky")  # a fresh token, so a fresh counter, every call
    assert srv.fault_url("flaky", token="t1", n=4) == srv.url("/flaky/4/t1")
    assert srv.fault_url("redirect_to", url="http://127.0.0.1:1/a b") == srv.url(
        "/redirect-to?url=http%3A%2F%2F127.0.0.1%3A1%2Fa+b"
    )
    with pytest.raises(KeyError):
        srv.fault_url("no-such-fault")
    with pytest.raises(ValueError, match="url="):
        srv.fault_url("redirect_to")


def test_binds_only_loopback(srv):
    assert srv.url("/x") == f"http://127.0.0.1:{srv.port}/x"
    for host in ("0.0.0.0", "192.168.1.1", "example.com", "::1"):
        with pytest.raises(ValueError, match="loopback"):
            ImageServer(host=host)
    with pytest.raises(RuntimeError):
        ImageServer().url("/x")
