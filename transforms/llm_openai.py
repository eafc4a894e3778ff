"""Chat completions from any OpenAI-compatible endpoint: a plain client, no Beam.

One client serves vLLM and TGI servers, Ollama and hosted APIs alike (``POST {base_url}/chat/completions``, no
streaming). What a generation stage that sends millions of prompts needs:

- bounded concurrency: at most ``concurrency`` requests in flight per client, whichever threads call it;
- a total time limit per attempt (connect, headers and body together), so a server that drips bytes or stalls
  mid-answer is cut off at the limit;
- retries with exponential backoff and jitter for retryable failures only: timeouts, connection errors, 408,
  429 and 5xx gateway statuses, honouring Retry-After (and giving up at once when it asks for more than
  ``max_backoff``); 400/401/403/404 are final. A malformed 200 (not JSON, no ``choices``) is retried once only:
  a proxy that cut a body is transient, a server that speaks another protocol is not, and retrying it
  ``retries`` times would only multiply the cost;
- the API key read from an environment variable and kept out of every message, log line, repr and pickle.

Connections, the time limit, retries and reason codes come from the HTTP core (``http.py``); this module has what
is the protocol's own: the request and answer JSON, the key, ``finish_reason``. The client talks to a configured
server (often on localhost), so the SSRF policy of the image fetcher does not apply. Every failure becomes a
:class:`ChatResult` with a stable reason code, never an exception.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from visinstruct.transforms.http import (
    HttpError,
    RetryPolicy,
    attempt_deadline,
    pool_manager,
    read_capped,
    retrying,
    send,
    status_error,
)

if TYPE_CHECKING:
    from visinstruct.transforms.vision import PreparedImage

logger = logging.getLogger(__name__)

MALFORMED_RETRIES = 1  # see the module docstring
MAX_RESPONSE_BYTES = 16 * 2**20  # a chat completion is kilobytes; more means something is wrong
_SECRET_HEADER = re.compile(r"auth|key|token|secret|cookie", re.IGNORECASE)


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
        image: The image that the ``{"type": "image"}`` placeholder of ``messages`` stands for (kinds that see the
            image), or None. Backends render it (:mod:`visinstruct.transforms.vision`); this client sends
            ``messages`` as they are, so its caller renders them first (``vision.openai_messages``).
    """

    key: str
    messages: list[dict]
    max_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    image: PreparedImage | None = None


@dataclass(frozen=True)
class ChatResult:
    """The outcome of one request: ``text`` on success, else a stable ``reason`` code and a ``message``.

    Attributes:
        key: The request's sample key.
        text: The assistant's answer, or None on failure.
        prompt_tokens: ``usage.prompt_tokens`` of the answer (0 when the server reports no usage, or on failure).
        completion_tokens: ``usage.completion_tokens`` likewise.
        reason: None on success; else ``http_<status>``, ``timeout``, ``connection_error`` (refused, or the host
            does not resolve), ``ssl_error``, ``truncated`` (the answer was cut off), ``invalid_url``,
            ``malformed_response``, ``empty_completion``, ``invalid_request`` (the request could not be encoded) or
            ``internal_error``.
        message: A human-readable account of the failure (never containing the API key).
        attempts: How many HTTP attempts were made (0 when the request could not be encoded).
        finish_reason: ``choices[0].finish_reason`` (``"length"`` means the answer was cut at ``max_tokens``).
        image_tokens: The prompt's image tokens when the backend reports them (``usage.prompt_tokens_details.
            image_tokens``; a local model's count), else None. They are part of ``prompt_tokens``.
    """

    key: str
    text: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reason: str | None = None
    message: str | None = None
    attempts: int = 1
    finish_reason: str | None = None
    image_tokens: int | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


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
        self._policy = RetryPolicy(
            retries, backoff, max_backoff, reason_retries={"malformed_response": MALFORMED_RETRIES}
        )
        self._pool = pool_manager(maxsize=concurrency)
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
        tried = [0]

        def attempt(n: int) -> ChatResult:
            tried[0] = n
            try:
                return self._attempt(request.key, payload, n)
            except HttpError as e:  # scrubbed before anything logs it: error bodies may quote the key back
                raise e.with_message(self._scrub(str(e))) from None

        try:
            return retrying(attempt, self._policy, self._rng)
        except HttpError as e:
            logger.debug("chat %s: %s after %d attempt(s): %s", request.key, e.reason, e.attempts, e)
            return ChatResult(request.key, reason=e.reason, message=str(e), attempts=e.attempts)
        except Exception as e:  # a bug here must not take down the caller's whole bundle
            message = self._scrub(f"{type(e).__name__}: {e}")
            logger.error("chat %s: unexpected error: %s", request.key, message)
            return ChatResult(request.key, reason="internal_error", message=message, attempts=tried[0])

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

    def _attempt(self, key: str, payload: bytes, attempt: int) -> ChatResult:
        """One request and its whole answer within ``timeout``; a failure raises :class:`HttpError`."""
        with self._slots:  # bounds requests in flight across every thread that calls this client
            try:
                with attempt_deadline(self.timeout):
                    resp = send(self._pool, "POST", self.url, payload, self._headers)
                    try:
                        body = read_capped(resp, MAX_RESPONSE_BYTES, reason="malformed_response")
                    finally:
                        resp.release_conn()
            except HttpError as e:
                raise _as_server_error(e, self.url, self.timeout) from None
        if not 200 <= resp.status < 300:
            # Auth errors may quote (part of) the key back, as OpenAI's do: keep their bodies out of messages.
            raise status_error(resp.status, resp.headers, "" if resp.status in (401, 403) else _error_detail(body))
        return _parse_completion(key, body, attempt)

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def _as_server_error(error: HttpError, url: str, timeout: float) -> HttpError:
    """A transport failure as this client reports it: in terms of the configured server and its settings.

    A host that does not resolve is the server being unreachable, as a refused connection is (the endpoint's host
    is mistyped, or the server's DNS name is not up yet): ``connection_error``, retried like it. The image fetcher
    keeps ``dns_error`` apart because there a URL's dead host is that row's own fault.
    """
    if error.reason in ("connection_error", "dns_error"):
        return HttpError("connection_error", f"cannot connect to {url}: {error}", retryable=True)
    if error.reason == "timeout":
        return error.with_message(f"no complete answer within openai.timeout={timeout:g}s")
    return error.with_message(f"{url}: {error}")


def _parse_completion(key: str, body: bytes, attempt: int) -> ChatResult:
    """The answer of a 2xx body; raises ``HttpError`` for a malformed or empty one."""
    try:
        data = json.loads(body)
    except ValueError as e:  # UnicodeDecodeError included
        raise HttpError("malformed_response", f"answer is not JSON: {e}", retryable=True) from None
    try:
        choice = data["choices"][0]
        content, finish = choice["message"].get("content"), choice.get("finish_reason")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise HttpError("malformed_response", "answer has no choices[0].message", retryable=True) from None
    if isinstance(content, list):  # content parts, as some servers return them
        content = "".join(t for p in content if isinstance(p, dict) and isinstance(t := p.get("text"), str))
    if content is not None and not isinstance(content, str):
        raise HttpError("malformed_response", f"message content is a {type(content).__name__}", retryable=True)
    if not content or not content.strip():
        # Not retried: with the same prompt and seed, a server gives the same empty answer again.
        raise HttpError("empty_completion", f"empty assistant message (finish_reason={finish})")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    details = usage.get("prompt_tokens_details") if isinstance(usage.get("prompt_tokens_details"), dict) else {}
    return ChatResult(
        key,
        text=content,
        prompt_tokens=_count(usage.get("prompt_tokens")),
        completion_tokens=_count(usage.get("completion_tokens")),
        attempts=attempt,
        finish_reason=finish if isinstance(finish, str) else None,
        image_tokens=_count(details["image_tokens"]) if "image_tokens" in details else None,
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
