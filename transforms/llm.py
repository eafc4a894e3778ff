"""LLM backends behind one interface, a persistent response cache, and the RunInference handler for generation.

Backends take :class:`ChatRequest` batches and return :class:`ChatResult` lists (never raising per sample: what
one row's result handling raises becomes that row's ``internal_error`` result), each with its ``finish_reason``
(``"length"`` when the answer was cut at the token limit):

- ``transformers``: any causal LM by hub id, local folder or ``.gguf`` file, its chat template, batched
  generation. Sampling is seeded per sample (each row draws from its own generator), so a sample's answer does
  not depend on which samples share its batch;
- ``vllm``: the vllm package on GPU workers, with per-request seeds;
- ``openai``: any OpenAI-compatible endpoint (:mod:`visinstruct.transforms.llm_openai`).

:class:`GenerationHandler` checks every reply (:mod:`~visinstruct.transforms.conversations`), optionally asks
once more with another seed, and keeps answers in a :class:`ResponseCache` so reruns only pay for new samples.
A reply cut at the token limit is rejected as ``truncated_reply`` before it is read.

:data:`RETRYABLE_REASONS` and :data:`CONFIG_REASONS` say which generation reasons a rerun can fix by itself (the
server was down) and which need a changed config (wrong model name, too few tokens): a shard whose every row
failed for one of them is not finished work.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import partial

import apache_beam as beam
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from visinstruct.configs import GenerateConfig
from visinstruct.schemas import Decision, SampleMeta, Turn
from visinstruct.transforms.conversations import Bounds, read_reply
from visinstruct.transforms.devices import pick_device, pick_dtype
from visinstruct.transforms.guard import guarded
from visinstruct.transforms.http import RETRYABLE_REASONS as HTTP_RETRYABLE_REASONS
from visinstruct.transforms.llm_openai import ChatRequest, ChatResult, OpenAIChatClient
from visinstruct.transforms.prompts import derive_seed, request_fingerprint
from visinstruct.transforms.shards import exists, join, read_bytes, write_bytes
from visinstruct.transforms.timing import busy

log = logging.getLogger(__name__)
STAGE = "generate"
TRUNCATED = "truncated_reply"

# A rerun with the same config may succeed: the server was down or unreachable (its host not resolving included,
# see ``llm_openai``), slow, overloaded, cut or garbled an answer or its TLS handshake, or a whole batch crashed
# (RunInference's ``inference_error``).
RETRYABLE_REASONS = frozenset({"malformed_response", "inference_error", *HTTP_RETRYABLE_REASONS})
# The config is wrong for this server or model: a bad request, key, endpoint or model name, or a token limit
# too small for the answers (every reply cut short), or an endpoint the client cannot send to. (``ssl_error`` is
# in the set above whether the handshake was cut or the certificate does not verify: either way nothing answered.)
CONFIG_REASONS = frozenset({"http_400", "http_401", "http_403", "http_404", "http_422", "invalid_url", TRUNCATED})


@dataclass(frozen=True)
class Plan:
    """One sample's generation job: where it comes from, what to ask, and how to read the reply."""

    path: str
    key: str
    kind: str
    format: str  # "qa" or "description"
    question: str | None  # the instruction of a description kind
    meta: SampleMeta
    request: ChatRequest


@dataclass(frozen=True)
class Reply:
    """What asking the LLM for a plan came to: the backend's result that was kept (or the last one), the
    decision on it (turns, or a drop with its reason), and what it cost."""

    result: ChatResult
    decision: Decision[list[Turn]]
    attempts: int
    cached: bool
    seed: int | None


class ResponseCache:
    """Replies stored one small JSON file each, by request fingerprint, on any Beam filesystem."""

    def __init__(self, folder: str | None):
        self.folder = folder

    def _path(self, fingerprint: str) -> str:
        return join(self.folder, fingerprint[:2], f"{fingerprint}.json")

    def get(self, fingerprint: str) -> ChatResult | None:
        """The stored reply, or None when there is none or it cannot be read (then it is asked for again)."""
        if not self.folder or not exists(self._path(fingerprint)):
            return None
        try:
            return ChatResult(**json.loads(read_bytes(self._path(fingerprint))))
        except (ValueError, TypeError, OSError) as e:  # a cut or foreign file costs one call, not the batch
            log.warning("response cache: ignoring %s: %s: %s", self._path(fingerprint), type(e).__name__, e)
            return None

    def put(self, fingerprint: str, result: ChatResult) -> None:
        if self.folder and result.ok:  # failures are not cached: a rerun should try them again
            try:
                write_bytes(self._path(fingerprint), json.dumps(result.__dict__).encode())
            except (ValueError, OSError) as e:  # lone surrogates, a full disk: the answer is still used
                log.warning("response cache: cannot store %s: %s: %s", fingerprint, type(e).__name__, e)


class TransformersBackend:
    """A local causal LM: batched generation with its chat template, CPU or GPU."""

    def __init__(self, cfg: GenerateConfig):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg, local = cfg, cfg.transformers
        if local.threads:
            import torch

            torch.set_num_threads(local.threads)
        device = pick_device(local.device)
        dtype = pick_dtype(local.precision, device)
        source, extra = cfg.model, {}
        if cfg.model.endswith(".gguf"):  # transformers reads GGUF (with the gguf package) from its folder
            source, extra = os.path.dirname(cfg.model) or ".", {"gguf_file": os.path.basename(cfg.model)}
        self.tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        self.tokenizer.padding_side = "left"  # generation continues from the right end of every row
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra).to(device).eval()
        self.device = device
        self.stops = _stop_ids(self.tokenizer.eos_token_id, self.model.generation_config.eos_token_id)

    def generate(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        import torch
        from transformers import LogitsProcessorList

        texts = [
            self.tokenizer.apply_chat_template(r.messages, tokenize=False, add_generation_prompt=True)
            for r in requests
        ]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        sampler = PerRowSampler([r.seed or 0 for r in requests], requests[0].temperature, requests[0].top_p)
        with torch.inference_mode():
            out = self.model.generate(
                **batch,
                max_new_tokens=max(r.max_tokens for r in requests),
                do_sample=False,
                logits_processor=LogitsProcessorList([sampler]) if sampler.active else None,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        width = batch["input_ids"].shape[1]

        def result(i: int, request: ChatRequest) -> ChatResult:
            new, finish = _cut(out[i, width:].tolist(), self.stops, request.max_tokens)
            text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
            return ChatResult(
                request.key,
                text,
                int(batch["attention_mask"][i].sum()),
                len(new),
                None if text else "empty_completion",
                None if text else "empty reply",
                finish_reason=finish,
            )

        return per_sample(requests, result)


def _stop_ids(*ids) -> frozenset[int]:
    """Token ids that end a generation: the tokenizer's EOS and the model's (an int or a list, or None)."""
    flat = [i for v in ids for i in (v if isinstance(v, (list, tuple)) else [v])]
    return frozenset(i for i in flat if isinstance(i, int))


def _cut(tokens: list[int], stops: frozenset[int], limit: int) -> tuple[list[int], str]:
    """A row's answer tokens and finish reason: ``stop`` at a stop token, ``length`` when it ran to ``limit``."""
    end = next((i for i, t in enumerate(tokens[:limit]) if t in stops), None)
    if end is not None:
        return tokens[:end], "stop"
    return tokens[:limit], "length" if len(tokens) >= limit else "stop"


def per_sample(requests: Sequence[ChatRequest], make: Callable[[int, ChatRequest], ChatResult]) -> list[ChatResult]:
    """``make(i, request)`` for every request; what one row raises becomes that row's ``internal_error`` result."""
    results = []
    for i, request in enumerate(requests):
        out = guarded(STAGE, partial(make, i, request), request.key)
        results.append(
            out if isinstance(out, ChatResult) else ChatResult(request.key, reason=out.reason, message=out.message)
        )
    return results


class PerRowSampler:
    """Temperature/top-p sampling with one generator per row, as a logits processor under greedy search.

    Each step it draws a token per row from that row's own ``torch.Generator`` and leaves only that token
    possible, so greedy search picks it. A row's tokens depend on its seed alone, not on its batch.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.active = temperature > 0
        self.temperature, self.top_p = temperature, top_p
        if self.active:
            import torch

            self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids, scores):
        import torch

        probs = torch.softmax(scores.float() / self.temperature, dim=-1).cpu()
        out = torch.full_like(scores, float("-inf"))
        for row, generator in enumerate(self.generators):
            p, order = probs[row].sort(descending=True)
            keep = p.cumsum(0) - p < self.top_p  # the smallest prefix whose mass reaches top_p
            token = order[keep][torch.multinomial(p[keep], 1, generator=generator)]
            out[row, token] = 0.0
        return out


class VllmBackend:
    """vLLM on a GPU worker (``pip install visinstruct[gpu]``); seeds are per request."""

    def __init__(self, cfg: GenerateConfig):
        try:
            from vllm import LLM
        except ImportError:
            raise ImportError("backend 'vllm' needs the gpu extra: pip install 'visinstruct[gpu]'") from None
        self.llm = LLM(model=cfg.model, seed=cfg.seed)

    def generate(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        from vllm import SamplingParams

        params = [
            SamplingParams(temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens, seed=r.seed)
            for r in requests
        ]
        outputs = self.llm.chat([r.messages for r in requests], params, use_tqdm=False)
        if len(outputs) != len(requests):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(requests)} requests")

        def result(i: int, request: ChatRequest) -> ChatResult:
            completion = outputs[i].outputs[0]
            text = completion.text.strip()
            # vLLM's finish_reason is "stop" or "length", as OpenAI's (CompletionOutput.finish_reason)
            return ChatResult(
                request.key,
                text,
                len(outputs[i].prompt_token_ids),
                len(completion.token_ids),
                None if text else "empty_completion",
                None if text else "empty reply",
                finish_reason=completion.finish_reason,
            )

        return per_sample(requests, result)


class OpenAIBackend:
    """Any OpenAI-compatible endpoint, with bounded concurrency and retries (see ``llm_openai``)."""

    def __init__(self, cfg: GenerateConfig):
        server = cfg.openai
        if not server.endpoint:
            raise ValueError("backend 'openai' needs openai.endpoint (e.g. http://127.0.0.1:8000/v1)")
        self.client = OpenAIChatClient(
            server.endpoint,
            cfg.model,
            api_key_env=server.api_key_env,
            timeout=server.timeout,
            retries=server.retries,
            concurrency=server.concurrency,
        )

    def generate(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        return self.client.complete_all(list(requests))


BACKENDS = {"transformers": TransformersBackend, "vllm": VllmBackend, "openai": OpenAIBackend}


class GenerationHandler(ModelHandler[Plan, Reply, object]):
    """RunInference handler: cache lookup, batched generation, checking, one retry with another seed."""

    def __init__(self, cfg: GenerateConfig, vocabulary: list[str]):
        # Fixed batches: Beam's adaptive batching starts at one element and, with seconds per batch, stays small
        # (measured: batches of 1, 1, 2 instead of 4, 1.7x slower). An HTTP batch is the unit of concurrency, and
        # waits for its slowest request, so it spans four rounds of `openai.concurrency`.
        local = cfg.local
        size = local.batch_size if local else 4 * cfg.openai.concurrency
        super().__init__(min_batch_size=size, max_batch_size=size, large_model=local.large_model if local else False)
        self.cfg, self.vocabulary = cfg, vocabulary
        self.bounds = Bounds(cfg.min_chars, cfg.max_chars)

    def load_model(self):
        return BACKENDS[self.cfg.backend](self.cfg)

    def get_metrics_namespace(self) -> str:
        return "generate"

    def _ask(self, backend, plans: list[Plan], cache: ResponseCache) -> list[tuple[ChatResult, bool]]:
        """Replies for ``plans`` (from the cache where possible), each with whether it was cached."""
        fingerprints = [request_fingerprint(self.cfg.model, p.request.messages, _sampling(p.request)) for p in plans]
        found = [cache.get(fp) for fp in fingerprints]
        missing = [i for i, r in enumerate(found) if r is None]
        if missing:
            beam.metrics.Metrics.counter("generate", "backend_calls").inc(len(missing))
            fresh = backend.generate([plans[i].request for i in missing])
            if len(fresh) != len(missing):  # zip would lose samples quietly: fail the batch, each row dead-lettered
                raise RuntimeError(f"backend returned {len(fresh)} results for {len(missing)} requests")
            # tokens spent on every call, kept answer or not (the written samples' own counts are in their JSON)
            beam.metrics.Metrics.counter("generate", "prompt_tokens_spent").inc(sum(r.prompt_tokens for r in fresh))
            beam.metrics.Metrics.counter("generate", "completion_tokens_spent").inc(
                sum(r.completion_tokens for r in fresh)
            )
            for i, result in zip(missing, fresh):
                cache.put(fingerprints[i], result)
                found[i] = result
        return [(replace(r, key=p.key), i not in missing) for i, (p, r) in enumerate(zip(plans, found))]

    def _judge(self, plan: Plan, result: ChatResult) -> Decision[list[Turn]]:
        """The decision on one result; what it raises becomes an ``internal_error`` drop for this plan only."""
        decision = guarded(
            STAGE,
            partial(judge_result, plan, result, self.vocabulary, self.bounds),
            plan.key,
            plan.meta.url or plan.meta.path,
        )
        return decision if isinstance(decision, Decision) else Decision.from_rejection(decision)

    def run_inference(self, batch: Sequence[Plan], backend, inference_args=None) -> Iterable[PredictionResult]:
        with busy("generate"):
            replies = self._generate(backend, batch)
        for plan, reply in zip(batch, replies):
            yield PredictionResult(plan, reply, self.cfg.model)

    def _generate(self, backend, batch: Sequence[Plan]) -> list[Reply]:
        cache = ResponseCache(self.cfg.cache_dir)
        answers = self._ask(backend, list(batch), cache)
        replies = [Reply(r, self._judge(p, r), 1, cached, p.request.seed) for p, (r, cached) in zip(batch, answers)]
        # Another seed changes nothing under greedy decoding (temperature 0), so only sampling runs retry.
        retrying = self.cfg.retry_new_seed and self.cfg.temperature > 0
        retry = [i for i, r in enumerate(replies) if not r.decision.kept] if retrying else []
        if retry:
            again = [_reseeded(batch[i]) for i in retry]
            for i, plan, (result, cached) in zip(retry, again, self._ask(backend, again, cache)):
                replies[i] = Reply(result, self._judge(plan, result), 2, cached, plan.request.seed)
        return replies


def judge_result(plan: Plan, result: ChatResult, vocabulary: list[str], bounds: Bounds) -> Decision[list[Turn]]:
    """A backend's result as a decision: its failure, ``truncated_reply`` when cut at the limit, else the reply's."""
    if not result.ok:
        return Decision.drop(result.reason, result.message or result.reason)
    if result.finish_reason == "length":
        return Decision.drop(
            TRUNCATED,
            f"the reply was cut at the token limit ({plan.request.max_tokens} tokens, generate.max_new_tokens)",
        )
    return read_reply(plan.format, result.text, plan.meta, plan.question, vocabulary, bounds)


def _sampling(request: ChatRequest) -> dict:
    return {
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "seed": request.seed,
    }


def _reseeded(plan: Plan) -> Plan:
    seed = derive_seed(plan.request.seed or 0, plan.key, "retry")
    return replace(plan, request=replace(plan.request, seed=seed))
