"""The RunInference handler for generation, and a persistent response cache.

:class:`GenerationHandler` takes a batch of :class:`~visinstruct.transforms.plans.Plan` (one per sample, a part
per kind asked) and asks the backend (:mod:`~visinstruct.transforms.backends`) for every part at once: first the
parts it can ask now, then, in two-pass runs, the text-only parts that read the kept re-caption. It checks every
reply (:mod:`~visinstruct.transforms.conversations`; a reply cut at the token limit is ``truncated_reply`` before
it is read), scores the replies of kinds that saw the image against it with CLIP when ``grounding`` is set
(``low_grounding``), asks once more with another seed for a rejected part, and keeps answers in a
:class:`ResponseCache` so reruns only pay for new samples. A request's cache key holds the image it carried (sha256
of the bytes sent and the settings that prepared them).

:data:`RETRYABLE_REASONS` and :data:`CONFIG_REASONS` say which generation reasons a rerun can fix by itself (the
server was down) and which need a changed config (wrong model name, too few tokens): a shard whose every row
failed for one of them is not finished work.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from functools import partial

import apache_beam as beam
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from visinstruct.configs import GenerateConfig
from visinstruct.schemas import IMAGE_TOKEN, Decision, SampleMeta, Turn
from visinstruct.transforms.backends import BACKENDS
from visinstruct.transforms.conversations import Bounds, copies_caption, read_reply
from visinstruct.transforms.grounding import passes
from visinstruct.transforms.guard import guarded
from visinstruct.transforms.http import RETRYABLE_REASONS as HTTP_RETRYABLE_REASONS
from visinstruct.transforms.llm_openai import ChatRequest, ChatResult
from visinstruct.transforms.plans import RECAPTION, Part, Plan, second_pass_part
from visinstruct.transforms.prompts import Templates, derive_seed, request_fingerprint
from visinstruct.transforms.shards import exists, join, read_bytes, write_bytes
from visinstruct.transforms.timing import busy
from visinstruct.transforms.vision import image_fingerprint

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


@dataclass(frozen=True)
class PartReply:
    """What asking for one part came to: the backend's result that was kept (or the last one), the decision on it
    (turns, or a drop with its reason), what it cost, and its CLIP agreement with the image when scored."""

    kind: str
    result: ChatResult
    decision: Decision[list[Turn]]
    attempts: int
    cached: bool
    seed: int | None
    grounding: float | None = None


@dataclass(frozen=True)
class Reply:
    """A plan's replies, one per part in the plan's order, and the kept re-caption (two-pass runs), if any."""

    parts: tuple[PartReply, ...]
    recaption: str | None = None


@dataclass
class Models:
    """What the handler loads once per worker: the backend, and the CLIP scorer of the grounding check."""

    backend: object
    scorer: object | None = None


class GenerationHandler(ModelHandler[Plan, Reply, Models]):
    """RunInference handler: cache lookup, batched generation in one or two passes, checking, one retry with
    another seed."""

    def __init__(self, cfg: GenerateConfig, templates: Templates, vision: bool = False):
        # Fixed batches: Beam's adaptive batching starts at one element and, with seconds per batch, stays small
        # (measured: batches of 1, 1, 2 instead of 4, 1.7x slower). An HTTP batch is the unit of concurrency, and
        # waits for its slowest request, so it spans four rounds of `openai.concurrency`.
        local = cfg.local
        size = local.batch_size if local else 4 * cfg.openai.concurrency
        super().__init__(min_batch_size=size, max_batch_size=size, large_model=local.large_model if local else False)
        self.cfg, self.templates, self.vision = cfg, templates, vision
        self.bounds = Bounds(cfg.min_chars, cfg.max_chars)

    def load_model(self) -> Models:
        scorer = None
        if self.cfg.grounding is not None:
            from visinstruct.transforms.grounding import GroundingScorer

            scorer = GroundingScorer(self.cfg.grounding)
            scorer.load()
        return Models(BACKENDS[self.cfg.backend](self.cfg, vision=self.vision), scorer)

    def get_metrics_namespace(self) -> str:
        return "generate"

    def run_inference(self, batch: Sequence[Plan], models: Models, inference_args=None) -> Iterable[PredictionResult]:
        with busy("generate"):
            replies = self._generate(models, list(batch))
        for plan, reply in zip(batch, replies):
            yield PredictionResult(plan, reply, self.cfg.model)

    def _generate(self, models: Models, batch: list[Plan]) -> list[Reply]:
        cache = ResponseCache(self.cfg.cache_dir)
        first = [(i, j) for i, plan in enumerate(batch) for j, part in enumerate(plan.parts) if part.request]
        replies = self._answer(models, batch, first, cache)
        recaptions = {i: recaption_text(r) for (i, j), r in replies.items() if batch[i].parts[j].kind == RECAPTION}
        recaptions = {i: text for i, text in recaptions.items() if text is not None}
        if self.cfg.recaption_first:
            second = []
            for i, plan in enumerate(batch):
                for j, part in enumerate(plan.parts):
                    if part.request is None and i in recaptions:
                        template = self.templates.kinds[part.kind]
                        built = second_pass_part(part, template, plan.meta, recaptions[i], self.cfg)
                        batch[i] = plan = replace(plan, parts=(*plan.parts[:j], built, *plan.parts[j + 1 :]))
                        second.append((i, j))
            replies.update(self._answer(models, batch, second, cache))
        out = []
        for i, plan in enumerate(batch):
            parts = tuple(
                replies.get((i, j)) or _not_asked(part, replies.get((i, 0))) for j, part in enumerate(plan.parts)
            )
            out.append(Reply(parts, recaptions.get(i)))
        return out

    def _answer(self, models: Models, batch: list[Plan], items: list[tuple[int, int]], cache) -> dict:
        """Replies for the parts ``items`` (``(plan index, part index)``), checked and scored, rejected ones asked
        once more with another seed when sampling."""
        parts = {item: batch[item[0]].parts[item[1]] for item in items}
        replies = self._ask_and_judge(models, batch, parts, cache, attempt=1)
        # Another seed changes nothing under greedy decoding (temperature 0), so only sampling runs retry.
        if self.cfg.retry_new_seed and self.cfg.temperature > 0:
            again = {
                item: _reseeded(parts[item], batch[item[0]].key) for item, r in replies.items() if not r.decision.kept
            }
            if again:
                replies.update(self._ask_and_judge(models, batch, again, cache, attempt=2))
        return replies

    def _ask_and_judge(self, models: Models, batch: list[Plan], parts: dict, cache, attempt: int) -> dict:
        items = list(parts)
        answers = self._ask(models.backend, [parts[item].request for item in items], cache)
        replies = {}
        for item, (result, cached) in zip(items, answers):
            plan, part = batch[item[0]], parts[item]
            decision = self._judge(plan, part, result)
            replies[item] = PartReply(part.kind, result, decision, attempt, cached, part.seed)
        if models.scorer is not None:
            replies.update(self._ground(models.scorer, batch, parts, replies))
        return replies

    def _ground(self, scorer, batch: list[Plan], parts: dict, replies: dict) -> dict:
        """The kept replies of parts that saw the image, scored against it; below the threshold ``low_grounding``.

        A description is scored as it is; question-answer pairs as one line each (``question: answer``), so that a
        short answer ("Two.") is scored with what it answers.
        """
        items = [item for item, r in replies.items() if r.decision.kept and parts[item].sees_image]
        if not items:
            return {}
        texts = [grounding_text(replies[item].decision.value, parts[item].format) for item in items]
        scores = scorer.scores([(batch[item[0]].image, text) for item, text in zip(items, texts)])
        threshold, out = self.cfg.grounding.threshold, {}
        for item, raw in zip(items, scores):
            score = None if math.isnan(raw) else round(float(raw), 4)  # NaN: the image or text could not be scored
            decision = replies[item].decision
            if not passes(raw, threshold):
                said = "could not be scored" if score is None else f"agrees with its image at {score:.3f} (CLIP)"
                decision = Decision.drop(
                    "low_grounding",
                    f"the reply {said}, under generate.grounding.threshold={threshold:g}",
                    {"grounding": score},
                )
            out[item] = replace(replies[item], decision=decision, grounding=score)
        return out

    def _ask(self, backend, requests: list[ChatRequest], cache: ResponseCache) -> list[tuple[ChatResult, bool]]:
        """Results for ``requests`` (from the cache where possible), each with whether it was cached."""
        fingerprints = [self._fingerprint(r) for r in requests]
        found = [cache.get(fp) for fp in fingerprints]
        missing = [i for i, r in enumerate(found) if r is None]
        if missing:
            beam.metrics.Metrics.counter(STAGE, "backend_calls").inc(len(missing))
            fresh = backend.generate([requests[i] for i in missing])
            if len(fresh) != len(missing):  # zip would lose samples quietly: fail the batch, each row dead-lettered
                raise RuntimeError(f"backend returned {len(fresh)} results for {len(missing)} requests")
            # tokens spent on every call, kept answer or not (the written samples' own counts are in their JSON)
            counter = beam.metrics.Metrics.counter
            counter(STAGE, "prompt_tokens_spent").inc(sum(r.prompt_tokens for r in fresh))
            counter(STAGE, "completion_tokens_spent").inc(sum(r.completion_tokens for r in fresh))
            counter(STAGE, "image_tokens_spent").inc(sum(r.image_tokens or 0 for r in fresh))
            for i, result in zip(missing, fresh):
                cache.put(fingerprints[i], result)
                found[i] = result
        return [(replace(r, key=q.key), i not in missing) for i, (q, r) in enumerate(zip(requests, found))]

    def _fingerprint(self, request: ChatRequest) -> str:
        image = image_fingerprint(request.image, self.cfg.image, detail=self.cfg.backend == "openai")
        return request_fingerprint(self.cfg.model, request.messages, _sampling(request), image)

    def _judge(self, plan: Plan, part: Part, result: ChatResult) -> Decision[list[Turn]]:
        """The decision on one result; what it raises becomes an ``internal_error`` drop for this part only."""
        # A kind that saw the image may name what no caption mentions: the made-up-object check is for text kinds.
        vocabulary = [] if part.sees_image else self.templates.object_vocabulary
        meta = part.context or plan.meta
        decision = guarded(
            STAGE,
            partial(judge_result, part, meta, result, vocabulary, self.bounds),
            plan.key,
            plan.meta.url or plan.meta.path,
        )
        return decision if isinstance(decision, Decision) else Decision.from_rejection(decision)


def judge_result(
    part: Part, meta: SampleMeta, result: ChatResult, vocabulary: list[str], bounds: Bounds
) -> Decision[list[Turn]]:
    """A backend's result as a decision: its failure, ``truncated_reply`` when cut at the limit, ``copies_caption``
    for a re-caption that repeats the web caption, else the reply's own checks."""
    if not result.ok:
        return Decision.drop(result.reason, result.message or result.reason)
    if result.finish_reason == "length":
        return Decision.drop(
            TRUNCATED,
            f"the reply was cut at the token limit ({part.request.max_tokens} tokens, generate.max_new_tokens)",
        )
    decision = read_reply(part.format, result.text, meta, part.question, vocabulary, bounds)
    if decision.kept and part.sees_image and part.format == "description":
        if copied := copies_caption(decision.value[-1].value, meta):
            return Decision.drop("copies_caption", f"the re-caption repeats the web caption: {copied!r}")
    return decision


def grounding_text(turns: list[Turn], fmt: str) -> str:
    """What of a reply the grounding check scores: a description's text, or each ``question: answer`` on a line."""
    if fmt == "description":
        return turns[-1].value
    pairs = zip(turns[0::2], turns[1::2])
    lines = [f"{q.value.replace(IMAGE_TOKEN, '').strip().rstrip('?')}: {a.value}" for q, a in pairs]
    return "\n".join(lines)


def recaption_text(reply: PartReply) -> str | None:
    """The kept re-caption's text (the description turn), or None when it was rejected."""
    return reply.decision.value[-1].value if reply.decision.kept else None


def _not_asked(part: Part, recaption: PartReply | None) -> PartReply:
    """A second-pass part that was never asked: the re-caption it reads was rejected."""
    why = recaption.decision.reason if recaption is not None else "missing"
    decision = Decision.drop("recaption_rejected", f"the re-caption this kind reads was rejected ({why})")
    return PartReply(
        part.kind,
        ChatResult(part.request.key if part.request else "", reason="recaption_rejected"),
        decision,
        0,
        False,
        part.seed,
    )


def _sampling(request: ChatRequest) -> dict:
    return {
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "seed": request.seed,
    }


def _reseeded(part: Part, key: str) -> Part:
    seed = derive_seed(part.seed or 0, key, "retry")
    return replace(part, seed=seed, request=replace(part.request, seed=seed))
