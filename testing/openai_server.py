"""A loopback OpenAI-protocol chat server with scripted answers and real faults, for tests, benchmarks and the demo.

It speaks the parts of the OpenAI HTTP API that our client uses (``POST /v1/chat/completions`` without streaming,
``GET /v1/models``), so the client is tested against real sockets, statuses, headers and delays, not mocks.
Standard library only.

Usage::

    with OpenAIServer(latency=0.05) as srv:
        client = OpenAIChatClient(srv.base_url, "tiny")
        client.complete(ChatRequest("k1", [{"role": "user", "content": "hello [[fault:429:1]]"}]))

Faults are chosen by a marker in the text of the last user message; a count ``N`` makes only the first N requests
with that marker and that message text fail (then the answer comes), so samples with different texts never share a
counter. Without ``N`` every such request fails.

  ``[[fault:STATUS[:N[:S]]]]``  that HTTP status (any three digits: 400, 401, 429, 500, 503, ...) with an
                               OpenAI-style JSON error; ``Retry-After: S`` when S is given (429 defaults to 1)
  ``[[fault:slow:S[:N]]]``      status and headers at once, then the answer's bytes in pieces over S seconds: at least
                               10, and at most 0.25 s apart (as far as the answer's bytes go), so a per-read timeout
                               longer than that never trips while the whole answer takes S seconds
  ``[[fault:hang[:N]]]``        reads the request and never answers, until ``stop()``
  ``[[fault:drop[:N]]]``        closes the connection without answering
  ``[[fault:malformed[:N]]]``   200 with a body that is not valid JSON
  ``[[fault:nochoices[:N]]]``   200 with valid JSON that has no ``choices``
  ``[[fault:empty[:N]]]``       200 with an empty assistant message
  ``[[fault:nousage[:N]]]``     200 with a normal answer but no ``usage`` block
  ``[[fault:leak[:N]]]``        500 whose error message quotes the request's Authorization header back, as careless
                               proxies' debug pages do (for checking that a client keeps keys out of its messages)

Answers come from ``responder(request_json) -> str``; the default echoes the last user message with its markers
removed. ``usage`` counts whitespace-separated words, and an answer longer than ``max_tokens`` words is cut there
with ``finish_reason: "length"``.

Images arrive as ``image_url`` content parts: :func:`image_urls` lists a request's, and :func:`request_images` (or
``ChatRequestRecord.images``) decodes their ``data:`` URIs, so a test can check that the bytes a model was shown
are the sample's own.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from visinstruct.testing.loopback import CLIENT_GONE, LoopbackService, QuietHandler

FAULT_MARKER = re.compile(r"\[\[fault:([a-z0-9]+)((?::[0-9.]+)*)\]\]")
_SLOW_PIECES = 10
_SLOW_MAX_GAP = 0.25


def drip_pieces(data: bytes, seconds: float) -> list[bytes]:
    """``data`` cut into the near-equal pieces a ``slow`` fault sends over ``seconds``: at least 10, and enough for
    one every 0.25 s, as far as the bytes go (a piece holds one byte at least)."""
    n = min(len(data), max(_SLOW_PIECES, math.ceil(seconds / _SLOW_MAX_GAP)))
    return [data[len(data) * i // n : len(data) * (i + 1) // n] for i in range(n)]


@dataclasses.dataclass
class ChatRequestRecord:
    """One request as the server saw it.

    Attributes:
        path: The request target (``/v1/chat/completions``).
        method: ``POST`` or ``GET``.
        headers: Request headers (a later duplicate replaces an earlier one).
        json: The parsed JSON body, or None (no body, or not JSON).
        start: ``time.monotonic()`` when the request had arrived.
        end: ``time.monotonic()`` when the server was done with it (None while in flight).
    """

    path: str
    method: str
    headers: dict[str, str]
    json: Any
    start: float
    end: float | None = None

    @property
    def images(self) -> list[tuple[str, bytes]]:
        """The request's images, decoded from their data URIs: ``(mime, bytes)`` in message order."""
        return request_images(self.json) if isinstance(self.json, dict) else []


def message_text(message: dict) -> str:
    """The text of a chat message whose content is a string or a list of OpenAI content parts."""
    content = message.get("content")
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


def last_user_text(body: dict) -> str:
    """The text of the last ``user`` message of a chat request, or ``""``."""
    users = [m for m in body.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
    return message_text(users[-1]) if users else ""


def image_urls(body: dict) -> list[dict]:
    """The ``image_url`` objects (``{"url": ..., "detail": ...}``) of every message of a request, in order."""
    return [
        part.get("image_url") or {}
        for m in body.get("messages") or []
        if isinstance(m, dict) and isinstance(m.get("content"), list)
        for part in m["content"]
        if isinstance(part, dict) and part.get("type") == "image_url"
    ]


def decode_data_uri(url: str) -> tuple[str, bytes]:
    """``(mime, bytes)`` of a base64 ``data:`` URI; ValueError for anything else (an https URL, bad base64)."""
    match = re.fullmatch(r"data:([\w.+-]+/[\w.+-]+);base64,(.*)", url or "", re.DOTALL)
    if match is None:
        raise ValueError(f"not a base64 data URI: {str(url)[:40]!r}")
    try:
        return match.group(1), base64.b64decode(match.group(2), validate=True)
    except binascii.Error as e:
        raise ValueError(f"bad base64 in a data URI: {e}") from e


def request_images(body: dict) -> list[tuple[str, bytes]]:
    """The images a request carries, decoded: ``(mime, bytes)`` per ``image_url`` part, in order."""
    return [decode_data_uri(image.get("url", "")) for image in image_urls(body)]


def echo_responder(body: dict) -> str:
    """The default answer: the last user message without fault markers, prefixed so it differs from the prompt."""
    return "Echo: " + " ".join(FAULT_MARKER.sub(" ", last_user_text(body)).split())


def word_count(text: str) -> int:
    """Whitespace-separated words: the server's stand-in for tokens."""
    return len(text.split())


class _Handler(QuietHandler):
    def do_GET(self) -> None:  # http.server's naming
        self._serve(None)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        self._serve(body if isinstance(body, dict) else None, bad_json=bool(raw) and not isinstance(body, dict))

    def _serve(self, body: dict | None, bad_json: bool = False) -> None:
        app = self.server.app
        record = app._begin(self.path, self.command, dict(self.headers.items()), body)
        try:
            self._route(app, body, bad_json)
        except CLIENT_GONE:
            raise
        except Exception as e:  # a responder's bug: every route calls it before sending, so a 500 still fits
            self._error(500, f"the responder raised {e!r}", "server_error")
        finally:
            app._end(record)

    def _route(self, app: OpenAIServer, body: dict | None, bad_json: bool) -> None:
        if app.require_key is not None and self.headers.get("Authorization") != f"Bearer {app.require_key}":
            return self._error(401, "Incorrect API key provided.", "invalid_request_error")
        if app.latency > 0 and app._stopping.wait(app.latency):
            self.close_connection = True
            return
        if self.command == "GET" and self.path == "/v1/models":
            return self._json(
                200,
                {
                    "object": "list",
                    "data": [{"id": app.model, "object": "model", "created": 0, "owned_by": "visinstruct"}],
                },
            )
        if self.command != "POST" or self.path != "/v1/chat/completions":
            return self._error(404, f"no route for {self.command} {self.path}", "not_found_error")
        if bad_json or body is None or not isinstance(body.get("messages"), list):
            return self._error(400, "the body must be a JSON object with a messages list", "invalid_request_error")
        fault = app._fault_for(body)
        if fault is None:
            return self._json(200, app._completion(body))
        kind, args = fault
        getattr(self, f"_fault_{kind}" if not kind.isdigit() else "_fault_status")(app, body, kind, args)

    # -- faults: each takes the app, the request body, the fault kind and its numeric arguments ---------------------

    def _fault_status(self, app: OpenAIServer, body: dict, kind: str, args: list[str]) -> None:
        status = int(kind)
        retry_after = args[1] if len(args) > 1 else ("1" if status == 429 else None)
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        self._error(status, f"scripted fault {status}", "server_error" if status >= 500 else "api_error", headers)

    def _fault_slow(self, app: OpenAIServer, body: dict, kind: str, args: list[str]) -> None:
        data = json.dumps(app._completion(body)).encode()
        seconds = float(args[0]) if args else 3.0
        pieces = drip_pieces(data, seconds)
        self._start(200, len(data))
        for piece in pieces:
            if app._stopping.wait(seconds / len(pieces)):
                self.close_connection = True
                return
            self.wfile.write(piece)
            self.wfile.flush()

    def _fault_hang(self, app: OpenAIServer, body: dict, kind: str, args: list[str]) -> None:
        app._stopping.wait()
        self.close_connection = True

    def _fault_drop(self, app: OpenAIServer, body: dict, kind: str, args: list[str]) -> None:
        self.close_connection = True  # nothing written: the client reads EOF instead of a status line

    def _fault_malformed(self, app: OpenAIServer, body: dict, kind: str, args: list[str]) -> None:
        self._send(200, b'{"id": "chatcmpl-broken", "choices": [{"message": {"content": "unterminated')

    def _fault_nochoices(self, app: OpenAIServer, body: dict, kind: str, args: list[str]) -> None:
        self._json(200, {"id": "chatcmpl-nochoices", "object": "chat.completion", "model": body.get("model")})

    def _fault_empty(self, app: OpenAIServer, body: dict, kind: str, args: list[str]) -> None:
        self._json(200, app._completion(body, answer=""))

    def _fault_nousage(self, app: OpenAIServer, body: dict, kind: str, args: list[str]) -> None:
        completion = app._completion(body)
        del completion["usage"]
        self._json(200, completion)

    def _fault_leak(self, app: OpenAIServer, body: dict, kind: str, args: list[str]) -> None:
        quoted = self.headers.get("Authorization", "(none)")
        self._error(500, f"upstream failed; request headers were: Authorization: {quoted}", "server_error")

    # -- plumbing ----------------------------------------------------------------------------------------------------

    def _start(self, status: int, length: int, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(length))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()

    def _send(self, status: int, data: bytes, headers: dict | None = None) -> None:
        self._start(status, len(data), headers)
        self.wfile.write(data)

    def _json(self, status: int, obj: Any, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, status: int, message: str, kind: str, headers: dict | None = None) -> None:
        self._json(status, {"error": {"message": message, "type": kind, "code": status}}, headers)


class OpenAIServer(LoopbackService):
    """A threaded OpenAI-protocol server on an ephemeral loopback port; see the module docstring for its faults.

    Attributes:
        responder: ``(request_json) -> str`` giving each answer; may change while running.
        latency: Seconds every response waits before it starts; may change while running.
        require_key: When set, requests whose ``Authorization`` is not ``Bearer <require_key>`` get a 401.
        model: The model id ``/v1/models`` lists (any model name is accepted in requests).
        port: The bound port, once started.
    """

    handler = _Handler

    FAULT_KINDS = ("slow", "hang", "drop", "malformed", "nochoices", "empty", "nousage", "leak")

    def __init__(
        self,
        responder: Callable[[dict], str] | None = None,
        latency: float = 0.0,
        require_key: str | None = None,
        model: str = "visinstruct-test",
        host: str = "127.0.0.1",
    ):
        """Prepares the server; ``start()`` (or ``with``) binds it.

        Args:
            responder: Makes the answer from the request JSON; default ``echo_responder``.
            latency: Seconds added before every response.
            require_key: The only bearer token accepted, or None to accept any (or none).
            model: The model id that ``GET /v1/models`` reports.
            host: An IPv4 loopback address: the server never listens anywhere a stranger could reach.

        Raises:
            ValueError: If ``host`` is not an IPv4 loopback address.
        """
        super().__init__(host)
        self.responder = responder or echo_responder
        self.latency, self.require_key, self.model = latency, require_key, model
        self._log: list[ChatRequestRecord] = []
        self._counts: dict[tuple[str, str], int] = {}
        self._in_flight = self._peak = self._completions = 0
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``, the base URL an OpenAI client takes."""
        if self.port is None:
            raise RuntimeError("OpenAIServer has no port before start()")
        return f"http://{self.host}:{self.port}/v1"

    def generate_settings(self, **openai: Any) -> dict[str, Any]:
        """The ``generate`` config keys that point the openai backend at this server, asked once (no retry, no second
        seed, no API key); ``openai`` adds or changes keys of the ``openai:`` section."""
        section = {"endpoint": self.base_url, "retries": 0, "api_key_env": None, **openai}
        return {"backend": "openai", "model": "m", "retry_new_seed": False, "openai": section}

    # -- request log -------------------------------------------------------------------------------------------------

    @property
    def requests(self) -> list[ChatRequestRecord]:
        """A snapshot of every request since start or ``reset()``, in arrival order."""
        with self._lock:
            return list(self._log)

    @property
    def calls(self) -> int:
        """How many ``POST /v1/chat/completions`` requests arrived since start or ``reset()``."""
        with self._lock:
            return self._completions

    @property
    def peak_in_flight(self) -> int:
        """The most requests the server was handling at once since start or ``reset()``."""
        with self._lock:
            return self._peak

    def reset(self) -> None:
        """Forgets logged requests, call counts, the in-flight peak and the fault counters."""
        with self._lock:
            self._log.clear()
            self._counts.clear()
            self._completions, self._peak = 0, self._in_flight

    def _begin(self, path: str, method: str, headers: dict, body: Any) -> ChatRequestRecord:
        record = ChatRequestRecord(path, method, headers, body, time.monotonic())
        with self._lock:
            self._log.append(record)
            self._completions += method == "POST" and path == "/v1/chat/completions"
            self._in_flight += 1
            self._peak = max(self._peak, self._in_flight)
        return record

    def _end(self, record: ChatRequestRecord) -> None:
        with self._lock:
            record.end = time.monotonic()
            self._in_flight -= 1

    # -- answers and faults ------------------------------------------------------------------------------------------

    def _fault_for(self, body: dict) -> tuple[str, list[str]] | None:
        """The fault this request gets, as ``(kind, args)``, or None when it gets the answer."""
        text = last_user_text(body)
        match = FAULT_MARKER.search(text)
        if match is None:
            return None
        kind, args = match.group(1), [a for a in match.group(2).split(":") if a]
        if not (kind.isdigit() and len(kind) == 3) and kind not in self.FAULT_KINDS:
            return None  # an unknown marker is just text
        count_arg = 0 if kind.isdigit() else (1 if kind == "slow" else 0)  # slow's first number is its seconds
        if len(args) <= count_arg:
            return kind, args  # no count: every time
        with self._lock:
            seen = self._counts[match.group(0), text] = self._counts.get((match.group(0), text), 0) + 1
        return (kind, args) if seen <= int(float(args[count_arg])) else None

    def _completion(self, body: dict, answer: str | None = None) -> dict:
        """A chat.completion object answering ``body``; the responder's answer unless ``answer`` is given."""
        text = self.responder(body) if answer is None else answer
        words, finish = text.split(), "stop"
        limit = body.get("max_tokens")
        if isinstance(limit, int) and len(words) > limit:
            text, finish = " ".join(words[:limit]), "length"
        prompt = sum(word_count(message_text(m)) for m in body["messages"] if isinstance(m, dict))
        completion = word_count(text)
        return {
            "id": f"chatcmpl-{self.calls}",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model", self.model),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        }
