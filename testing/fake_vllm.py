"""A stand-in for the ``vllm`` package, for tests of the vllm backend on machines without a GPU.

:func:`fake_vllm` makes a fresh module with ``LLM`` and ``SamplingParams``; a test installs it with
``monkeypatch.setitem(sys.modules, "vllm", fake_vllm(responder))``. It records what reaches the engine (the
constructor's keyword arguments, every ``chat`` call's messages and sampling parameters) and answers each
conversation with ``responder(messages, params)``, in outputs shaped like vLLM's ``RequestOutput``
(``.prompt_token_ids``, ``.outputs[0].text/.token_ids/.finish_reason``).

Token ids are the answer's UTF-8 bytes; a prompt's ids are its text parts' bytes, and
:data:`IMAGE_SEQ_LENGTH` copies of :data:`IMAGE_TOKEN_ID` per image, as vLLM expands a LLaVA prompt's image.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

IMAGE_TOKEN_ID = 300
IMAGE_SEQ_LENGTH = 16

Responder = Callable[[list[dict], Any], str | None]
"""``(messages, params) -> answer``; None drops that conversation's output (an engine losing a request)."""


@dataclass
class SamplingParams:
    """The sampling parameters the backend sets (vLLM's class has many more, with these names)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = 16
    seed: int | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class CompletionOutput:
    text: str
    token_ids: list[int]
    finish_reason: str


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]


@dataclass
class ChatCall:
    """One ``LLM.chat`` call as the engine received it."""

    messages: list[list[dict]]
    params: list[SamplingParams]
    kwargs: dict


def prompt_ids(messages: list[dict]) -> list[int]:
    """The fake engine's prompt token ids: text bytes, and the image tokens of every ``image_url`` part."""
    ids: list[int] = []
    for m in messages:
        content = m["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for part in parts:
            if part["type"] == "image_url":
                ids += [IMAGE_TOKEN_ID] * IMAGE_SEQ_LENGTH
            else:
                ids += list(part["text"].encode())
    return ids


def fake_vllm(responder: Responder) -> types.ModuleType:
    """A fresh fake ``vllm`` module answering with ``responder``; its engines are listed in ``module.engines``."""
    module = types.ModuleType("vllm")
    engines: list[Any] = []

    class LLM:
        def __init__(self, **kwargs):
            self.kwargs = kwargs
            self.calls: list[ChatCall] = []
            hf_config = types.SimpleNamespace(image_token_index=IMAGE_TOKEN_ID)
            self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(hf_config=hf_config))
            engines.append(self)

        def chat(self, messages, sampling_params, **kwargs) -> list[RequestOutput]:
            params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(messages)
            self.calls.append(ChatCall(messages, params, kwargs))
            outputs = []
            for conversation, p in zip(messages, params, strict=True):
                answer = responder(conversation, p)
                if answer is None:
                    continue
                ids = list(answer.encode())
                cut = ids[: p.max_tokens]
                finish = "length" if p.max_tokens is not None and len(ids) >= p.max_tokens else "stop"
                text = bytes(cut).decode(errors="ignore")
                outputs.append(RequestOutput(prompt_ids(conversation), [CompletionOutput(text, cut, finish)]))
            return outputs

    module.LLM = LLM
    module.SamplingParams = SamplingParams
    module.engines = engines
    return module
