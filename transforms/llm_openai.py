"""Chat completions from any OpenAI-compatible endpoint: a plain client, no Beam.

One client serves vLLM and TGI servers, Ollama and hosted APIs alike (``POST {base_url}/chat/completions``, no
streaming). What a generation stage that sends millions of prompts needs:

- bounded concurrency: at most ``concurrency`` requests in flight per client, whichever threads call it;
- a total time limit per attempt (connect, headers and body together), enforced on every socket read, so a
  server that drips bytes or stalls mid-answer is cut off at the limit;
- retries with exponential backoff and jitter for retryable failures only: timeouts, connection errors, 408,
  429 and 5xx gateway statuses, honouring Retry-After (and giving up at once when it asks for more than
  ``max_backoff``); 400/401/403/404 are final. A malformed 200 (not JSON, no ``choices``) is retried once only:
  a proxy that cut a body is transient, a server that speaks another protocol is not, and retrying it
  ``retries`` times would only multiply the cost;
- the API key read from an environment variable and kept out of every message, log line, repr and pickle.

Every failure becomes a :class:`ChatResult` with a stable reason code, never an exception.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import NewConnectionError

from visinstruct.transforms.fetch import RETRYABLE_STATUS, parse_retry_after  # noqa: F401 - llm.py imports it here

logger = logging.getLogger(__name__)

MALFORMED_RETRIES = 1  # see the module docstring
MAX_RESPONSE_BYTES = 16 * 2**20  # a chat completion is kilobytes; more means something is wrong
_SECRET_HEADER = re.compile(r"auth|key|token|secret|cookie", re.IGNORECASE)
_CHUNK = 64 * 1024
_LOCAL = threading.local()  # .deadline: the monotonic time the running attempt of this thread must end by


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion to ask for.

    Attributes:
        key: The sample key; it comes back in the result and names the sample in messages.
        messages: OpenAI chat messages, ``[{"role": "system"|"user"|"assistant", "content": str | parts}]``.
        max_tokens: The most tokens the answer may have.
        temperature: Sampling temperature; 0 asks for greedy decoding.
        top_p: Nucleus sampling mass.
        seed: Sent as ``seed`` when not None (servers that support it then sample reproducibly).
    """

    key: str
    messages: list[dict]
    max_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class ChatResult:
    """The outcome of one request: ``text`` on success, else a stable ``reason`` code and a ``message``.

    Attributes:
        key: The request's sample key.
        text: The assistant's answer, or None on failure.
        prompt_tokens: ``usage.prompt_tokens`` of the answer (0 when the server reports no usage, or on failure).
        completion_tokens: ``usage.completion_tokens`` likewise.
        reason: None on success; else ``http_<status>``, ``timeout``, ``connection_error``, ``malformed_response``,
            ``empty_completion``, ``invalid_request`` (the request could not be encoded) or ``internal_error``.
        message: A human-readable account of the failure (never containing the API key).
        attempts: How many HTTP attempts were made (0 when the request could not be encoded).
        finish_reason: ``choices[0].finish_reason`` (``"length"`` means the answer was cut at ``max_tokens``).
    """

    key: str
    text: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reason: str | None = None
    message: str | None = None
    attempts: int = 1
    finish_reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


class _AttemptError(Exception):
    """A failed attempt; ``retryable`` says whether another attempt may succeed."""

    def __init__(self, reason: str, message: str, retryable: bool = False, retry_after: float | None = None):
        super().__init__(message)
        self.reason, self.retryable, self.retry_after = reason, retryable, retry_after


@functools.cache
def _deadline_socket_class(cls: type) -> type:
    """A subclass of a socket class whose reads stop at the calling thread's attempt deadline.

    A socket timeout bounds each read, not the whole answer: a server sending a byte every few seconds would
    never trip it. Setting the timeout to the time left before every read bounds the total, for the status
    line and headers as well as the body (http.client reads through ``recv_into``).
    """

    def recv_into(self, buffer, *args):
        deadline = getattr(_LOCAL, "deadline", None)
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the attempt's time limit has passed")
            self.settimeout(remaining)
        return cls.recv_into(self, buffer, *args)

    # No new slots: the layout stays the same, so an existing socket object can take this class.
    return type(f"Deadline{cls.__name__}", (cls,), {"__slots__": (), "recv_into": recv_into})


def _arm(conn: HTTPConnection) -> None:
    # urllib3's SSLTransport (TLS inside a TLS proxy) is not a socket: it keeps the plain per-read timeout.
    if isinstance(conn.sock, socket.socket):
        conn.sock.__class__ = _deadline_socket_class(type(conn.sock))


class _DeadlineHTTPConnection(HTTPConnection):
    def connect(self) -> None:
        super().connect()
        _arm(self)


class _DeadlineHTTPSConnection(HTTPSConnection):
    def connect(self) -> None:
        super().connect()  # the socket is the TLS one by now
        _arm(self)


class _DeadlineHTTPPool(HTTPConnectionPool):
    ConnectionCls = _DeadlineHTTPConnection


class _DeadlineHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _DeadlineHTTPSConnection


class OpenAIChatClient:
    """Thread-safe client for an OpenAI-compatible chat endpoint; create one per worker (it holds connections).

    Pickling it carries the constructor arguments only: the unpickled copy reads the key from its own
    environment, so a key never travels inside a pickled pipeline.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        concurrency: int = 8,
        extra_headers: dict[str, str] | None = None,
    ):
        """Reads the API key and prepares the connection pool and worker threads.

        Args:
            base_url: The API root, e.g. ``http://127.0.0.1:8000/v1`` or ``https://api.openai.com/v1``.
            model: The ``model`` field of every request.
            api_key_env: The environment variable holding the API key, sent as ``Authorization: Bearer``; None
                for servers that need no key. An unset variable sends no header and logs one warning.
            timeout: Seconds one attempt may take in all: connecting, waiting, and reading the whole answer.
            retries: Further attempts after a retryable failure (so at most ``retries + 1`` attempts).
            backoff: The first retry's base delay in seconds; it doubles with every retry, with jitter.
            max_backoff: The longest delay; a Retry-After asking for more ends the request at once.
            concurrency: The most requests in flight at once, and the threads ``complete_all`` uses.
            extra_headers: More headers for every request (e.g. an organisation id). Values of headers whose
                name mentions auth, key, token, secret or cookie are kept out of messages like the key.

        Raises:
            ValueError: If ``base_url`` is not an http(s) URL or a number is out of range.
        """
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be an http(s) URL such as http://127.0.0.1:8000/v1, not {base_url!r}")
        if timeout <= 0 or retries < 0 or backoff < 0 or max_backoff < 0 or concurrency < 1:
            raise ValueError("need timeout > 0, retries >= 0, backoff >= 0, max_backoff >= 0 and concurrency >= 1")
        self._args = (
            base_url,
            model,
            api_key_env,
            timeout,
            retries,
            backoff,
            max_backoff,
            concurrency,
            dict(extra_headers or {}),
        )
        self.base_url, self.model, self.api_key_env = base_url.rstrip("/"), model, api_key_env
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        self.concurrency = concurrency
        self.url = f"{self.base_url}/chat/completions"
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "visinstruct"}
        headers.update(extra_headers or {})
        secrets = [v for k, v in (extra_headers or {}).items() if _SECRET_HEADER.search(k) and v]
        key = os.environ.get(api_key_env) if api_key_env else None
        if api_key_env and not key:
            logger.warning(
                "environment variable %s is not set: requests go without an Authorization header", api_key_env
            )
        if key:
            headers["Authorization"] = f"Bearer {key}"
            secrets.append(key)
        self._has_key = bool(key)
        self._headers = headers
        self._secrets = tuple(sorted(set(secrets), key=len, reverse=True))  # longest first: no partial leftovers
        self._slots = threading.BoundedSemaphore(concurrency)
        self._rng = random.Random()
        self._pool = urllib3.PoolManager(num_pools=4, maxsize=concurrency, block=False)
        self._pool.pool_classes_by_scheme = {"http": _DeadlineHTTPPool, "https": _DeadlineHTTPSPool}
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="llm-openai")

    def __repr__(self) -> str:
        key = f"from ${self.api_key_env}" if self._has_key else "none"
        return (
            f"OpenAIChatClient(base_url={self.base_url!r}, model={self.model!r}, api_key={key}, "
            f"timeout={self.timeout}, retries={self.retries}, concurrency={self.concurrency})"
        )

    def __reduce__(self):
        return self.__class__, self._args

    def __enter__(self) -> OpenAIChatClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stops the worker threads and closes pooled connections."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._pool.clear()

    def complete_all(self, requests: list[ChatRequest]) -> list[ChatResult]:
        """Runs many requests, at most ``concurrency`` at once; results in the order of ``requests``."""
        return list(self._executor.map(self.complete, requests))

    def complete(self, request: ChatRequest) -> ChatResult:
        """Runs one request with retries; never raises."""
        try:
            payload = self._payload(request)
        except (TypeError, ValueError) as e:
            return ChatResult(
                request.key,
                reason="invalid_request",
                attempts=0,
                message=self._scrub(f"cannot encode the request as JSON: {e}"),
            )
        attempt = malformed = 0
        while True:
            attempt += 1
            try:
                return self._attempt(request.key, payload, attempt)
            except _AttemptError as e:
                malformed += e.reason == "malformed_response"
                retry = e.retryable and attempt <= self.retries and malformed <= MALFORMED_RETRIES
                delay = self._delay(attempt, e.retry_after) if retry else None
                message = self._scrub(str(e))
                if retry and delay is None:
                    message += f" (Retry-After {e.retry_after:.0f}s exceeds max_backoff={self.max_backoff:g}s)"
                if delay is None:
                    logger.debug("chat %s: %s after %d attempt(s): %s", request.key, e.reason, attempt, message)
                    return ChatResult(request.key, reason=e.reason, message=message, attempts=attempt)
                logger.debug(
                    "chat %s: attempt %d: %s: %s; retrying in %.2fs", request.key, attempt, e.reason, message, delay
                )
                time.sleep(delay)
            except Exception as e:  # noqa: BLE001 - a bug here must not take down the caller's whole bundle
                message = self._scrub(f"{type(e).__name__}: {e}")
                logger.error("chat %s: unexpected error: %s", request.key, message)
                return ChatResult(request.key, reason="internal_error", message=message, attempts=attempt)

    # -- one attempt -------------------------------------------------------------------------------------------------

    def _payload(self, request: ChatRequest) -> bytes:
        body = {
            "model": self.model,
            "messages": request.messages,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "n": 1,
        }
        if request.seed is not None:
            body["seed"] = request.seed
        return json.dumps(body, ensure_ascii=False, allow_nan=False).encode()

    def _delay(self, attempt: int, retry_after: float | None) -> float | None:
        """Seconds to wait before the next attempt, or None when Retry-After asks for more than max_backoff."""
        delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        delay *= 0.5 + self._rng.random() / 2  # jitter: retries from many workers do not arrive together
        if retry_after is None:
            return delay
        return None if retry_after > self.max_backoff else max(delay, retry_after)

    def _attempt(self, key: str, payload: bytes, attempt: int) -> ChatResult:
        with self._slots:  # bounds requests in flight across every thread that calls this client
            _LOCAL.deadline = time.monotonic() + self.timeout
            try:
                status, headers, body = self._exchange(payload)
            finally:
                _LOCAL.deadline = None
        if not 200 <= status < 300:
            raise self._status_error(status, headers, body)
        return _parse_completion(key, body, attempt)

    def _exchange(self, payload: bytes) -> tuple[int, urllib3.HTTPHeaderDict, bytes]:
        """One HTTP exchange within the thread's deadline: status, headers and the whole body."""
        try:
            resp = self._pool.request(
                "POST",
                self.url,
                body=payload,
                headers=self._headers,
                retries=False,
                redirect=False,
                preload_content=False,
                timeout=urllib3.Timeout(connect=self.timeout, read=self.timeout),
            )
        except urllib3.exceptions.HTTPError as e:
            raise self._transport_error(e) from None
        try:
            chunks, size = [], 0
            while chunk := resp.read1(_CHUNK):
                size += len(chunk)
                if size > MAX_RESPONSE_BYTES:
                    resp.close()
                    raise _AttemptError("malformed_response", f"answer exceeds {MAX_RESPONSE_BYTES} bytes")
                chunks.append(chunk)
            return resp.status, resp.headers, b"".join(chunks)
        except urllib3.exceptions.HTTPError as e:
            resp.close()
            raise self._transport_error(e) from None
        finally:
            resp.release_conn()

    def _status_error(self, status: int, headers: urllib3.HTTPHeaderDict, body: bytes) -> _AttemptError:
        retryable = status in RETRYABLE_STATUS
        # Auth errors may quote (part of) the key back, as OpenAI's do: keep their bodies out of messages.
        detail = "" if status in (401, 403) else _error_detail(body)
        message = self._scrub(f"HTTP {status}" + (f": {detail}" if detail else ""))
        retry_after = parse_retry_after(headers.get("Retry-After")) if retryable else None
        return _AttemptError(f"http_{status}", message, retryable, retry_after)

    def _transport_error(self, e: Exception) -> _AttemptError:
        """A urllib3 exception as a retryable attempt error; its text names host and port, never headers."""
        inner = getattr(e, "reason", None)  # MaxRetryError and friends wrap the real error
        cause = inner if isinstance(inner, Exception) else e
        # NewConnectionError subclasses ConnectTimeoutError in urllib3 2.x: test it before the timeouts.
        if isinstance(cause, NewConnectionError):
            text = re.sub(r"^\w*Connection\w*\(host=[^)]*\): ", "", str(cause))
            return _AttemptError("connection_error", self._scrub(f"cannot connect to {self.url}: {text}"), True)
        if isinstance(cause, (urllib3.exceptions.TimeoutError, TimeoutError)):
            return _AttemptError("timeout", f"no complete answer within {self.timeout:g}s", True)
        text = re.sub(r"\w*Connection\w*\(host=[^)]*\): ", "", str(cause))
        return _AttemptError("connection_error", self._scrub(f"{type(cause).__name__}: {text}"), True)

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def _parse_completion(key: str, body: bytes, attempt: int) -> ChatResult:
    """The answer of a 2xx body; raises ``_AttemptError`` for a malformed or empty one."""
    try:
        data = json.loads(body)
    except ValueError as e:  # UnicodeDecodeError included
        raise _AttemptError("malformed_response", f"answer is not JSON: {e}", retryable=True) from None
    try:
        choice = data["choices"][0]
        content, finish = choice["message"].get("content"), choice.get("finish_reason")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise _AttemptError("malformed_response", "answer has no choices[0].message", retryable=True) from None
    if isinstance(content, list):  # content parts, as some servers return them
        content = "".join(t for p in content if isinstance(p, dict) and isinstance(t := p.get("text"), str))
    if content is not None and not isinstance(content, str):
        raise _AttemptError("malformed_response", f"message content is a {type(content).__name__}", retryable=True)
    if not content or not content.strip():
        # Not retried: with the same prompt and seed, a server gives the same empty answer again.
        raise _AttemptError("empty_completion", f"empty assistant message (finish_reason={finish})")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return ChatResult(
        key,
        text=content,
        prompt_tokens=_count(usage.get("prompt_tokens")),
        completion_tokens=_count(usage.get("completion_tokens")),
        attempts=attempt,
        finish_reason=finish if isinstance(finish, str) else None,
    )


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _error_detail(body: bytes, limit: int = 200) -> str:
    """The ``error.message`` of an OpenAI-style error body, else the start of the body as text."""
    try:
        error = json.loads(body).get("error")
        text = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        text = None
    if not isinstance(text, str):
        text = body[: limit * 4].decode("utf-8", "replace")
    text = " ".join(text.split())
    return text[:limit] + ("..." if len(text) > limit else "")
