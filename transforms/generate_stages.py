"""The per-sample steps of ``visinstruct generate`` around RunInference: plan, read the replies, judge the shard.

Image bytes leave the tar only for kinds that see the image: planning reads each sample's text (captions, boxes,
tags) and, for those kinds, prepares its image (:func:`~visinstruct.transforms.vision.prepare_image`: the shard's
bytes as they are when they fit); the writer's judge re-reads the input tar. A sample's parts (one per kind
asked) join into one conversation when at least one is kept (:func:`judge_reply`).

Every per-sample step (planning and prompt building, reading the backend's result, judging, the writer's judge)
runs through :func:`visinstruct.transforms.guard.guarded`: what one sample raises becomes its ``internal_error``
dead-letter row and the bundle goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import TypeVar

import apache_beam as beam

from visinstruct.configs import GenerateConfig
from visinstruct.schemas import IMAGE_TOKEN, Decision, Dropped, GenerationInfo, Rejection, SampleMeta, Turn
from visinstruct.transforms import worker
from visinstruct.transforms.guard import guarded
from visinstruct.transforms.layout import image_member
from visinstruct.transforms.llm import PartReply, Reply
from visinstruct.transforms.plans import Plan, needs_image, plan_parts, sample_sees_image, with_caption
from visinstruct.transforms.prompts import Templates, caption_only, derive_seed, load_templates, uses_llm
from visinstruct.transforms.rewrite import Judge, iter_samples, sample_meta
from visinstruct.transforms.timing import busy
from visinstruct.transforms.vision import PreparedImage, prepare_image

STAGE = "generate"
CAPTION_ONLY = "caption_only"
T = TypeVar("T")
RAW_LIMIT = 100_000  # characters of a rejected reply kept in its dead-letter row (a reply may be megabytes)


def plan_sample(
    path: str, meta: SampleMeta, cfg: GenerateConfig, templates: Templates, image: PreparedImage | None = None
) -> Plan | Decision[SampleMeta]:
    """What to do with one sample: an LLM plan, or its finished decision (caption-only data, or a drop)."""
    if cfg.backend == CAPTION_ONLY or not uses_llm(meta.key, cfg.llm_fraction, cfg.seed):
        turns = caption_only(meta, templates, cfg.seed)
        if turns is None:
            return Decision.drop("no_caption", "caption-only data needs a caption")
        info = GenerationInfo(CAPTION_ONLY, CAPTION_ONLY, templates.sha256, derive_seed(cfg.seed, meta.key, "brief"))
        return Decision.keep(replace(meta, conversations=turns, generation=info))
    return plan_parts(path, meta, cfg, templates, image)


def safe_text(text: str | None, limit: int | None = None) -> str | None:
    """``text`` as valid UTF-8 (lone surrogates written as ``\\udxxx``), cut to ``limit`` characters."""
    if text is None:
        return None
    text = text[:limit] if limit is not None else text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def judge_reply(plan: Plan, reply: Reply, model: str, templates_sha: str, recaption_caption: str = "keep"):
    """The replies as the sample's decision: the kept parts' turns joined into one conversation with provenance, or,
    when no written part was kept, a drop with the first rejected part's reason, keeping its raw reply.

    Returns ``Decision[SampleMeta]``.
    """
    written = [r for part, r in zip(plan.parts, reply.parts) if part.written]
    kept = [r for r in written if r.decision.kept]
    if not kept:
        first = next(r for r in reply.parts if not r.decision.kept)
        detail = _raw_detail(first)
        if len(reply.parts) > 1:
            detail["parts"] = [_part_record(r) for r in reply.parts]
        return Decision.drop(first.decision.reason, safe_text(first.decision.message or first.decision.reason), detail)
    # What this row cost: its kept parts, and the re-caption asked first when a kept text-only kind read it.
    fed = any(r.decision.kept and not part.sees_image for part, r in zip(plan.parts, reply.parts))
    paid = [(part, r) for part, r in zip(plan.parts, reply.parts) if r.decision.kept or (not part.written and fed)]
    spent, saw = [r for _, r in paid], any(part.sees_image for part, _ in paid)
    image_tokens = [r.result.image_tokens for r in spent if r.result.image_tokens is not None]
    groundings = [r.grounding for r in spent if r.grounding is not None]
    info = GenerationInfo(
        "+".join(r.kind for r in kept),
        model,
        templates_sha,
        kept[0].seed or 0,
        sum(r.result.prompt_tokens for r in spent),
        sum(r.result.completion_tokens for r in spent),
        image_tokens=sum(image_tokens) if image_tokens else None,
        image=plan.image.provenance() if plan.image is not None and saw else None,
        parts=[_part_record(r) for r in reply.parts] if len(reply.parts) > 1 else [],
        recaption=reply.recaption if not all(p.written for p in plan.parts) else None,  # else a turn already
        grounding=min(groundings) if groundings else None,
    )
    meta = with_caption(plan.meta, reply.recaption, recaption_caption)
    return Decision.keep(replace(meta, conversations=join_turns([r.decision.value for r in kept]), generation=info))


def join_turns(conversations: list[list[Turn]]) -> list[Turn]:
    """Several kinds' turns as one multi-turn conversation: the image token opens only the first human turn."""
    turns = list(conversations[0])
    for more in conversations[1:]:
        first = more[0]
        text = first.value.removeprefix(f"{IMAGE_TOKEN}\n").replace(IMAGE_TOKEN, "").strip()
        turns += [replace(first, value=text), *more[1:]]
    return turns


def _raw_detail(reply: PartReply) -> dict:
    raw = reply.result.text if isinstance(reply.result.text, str) else None
    return {
        "raw": safe_text(raw, RAW_LIMIT),
        "raw_chars": len(raw or ""),
        "kind": reply.kind,
        "attempts": reply.attempts,
        "seed": reply.seed,
        "finish_reason": reply.result.finish_reason,
    }


def _part_record(reply: PartReply) -> dict:
    """One part's line in ``generation.parts``: what was asked and what it cost, and why it was rejected."""
    record = {
        "kind": reply.kind,
        "seed": reply.seed,
        "prompt_tokens": reply.result.prompt_tokens,
        "completion_tokens": reply.result.completion_tokens,
    }
    if reply.result.image_tokens is not None:
        record["image_tokens"] = reply.result.image_tokens
    if reply.grounding is not None:
        record["grounding"] = reply.grounding
    if not reply.decision.kept:
        record["reason"] = reply.decision.reason
    return record


def guarded_decision(fn: Callable[[], T], key: str, url: str | None) -> T | Decision:
    """``fn()``, or this sample's ``internal_error`` drop when it raises."""
    out = guarded(STAGE, fn, key, safe_text(url))
    return Decision.from_rejection(out) if isinstance(out, Rejection) else out


def judged(
    result, model: str, templates_sha: str, recaption_caption: str = "keep"
) -> tuple[str, tuple[str, Decision[SampleMeta]]]:
    """RunInference's ``PredictionResult`` as ``(path, (key, Decision))``, guarded per sample."""
    plan = result.example
    for part in result.inference.parts:
        if not part.decision.kept:
            beam.metrics.Metrics.counter(STAGE, f"part_rejected_{part.decision.reason}").inc()
    decision = guarded_decision(
        partial(judge_reply, plan, result.inference, model, templates_sha, recaption_caption),
        plan.key,
        plan.meta.url or plan.meta.path,
    )
    return plan.path, (plan.key, decision)


def crashed_batch(failure) -> list[tuple[str, tuple[str, Decision[SampleMeta]]]]:
    """RunInference's ``(failed batch of plans, exception)`` as one ``inference_error`` drop per sample."""
    plans, error = failure
    message = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
    return [(p.path, (p.key, Decision.drop("inference_error", message))) for p in plans]


class PlanSamples(beam.DoFn):
    """``tar path`` -> ``Plan``; tagged ``done``: ``(path, (key, Decision))`` for caption-only data and drops."""

    def __init__(self, cfg: GenerateConfig):
        self.cfg = cfg
        self.rows_read = beam.metrics.Metrics.counter(STAGE, "rows_read")

    def setup(self):
        worker.settle()
        self.templates = load_templates(self.cfg.templates)
        self.vision = needs_image(self.cfg, self.templates)

    def process(self, path):
        for key, members in iter_samples(path, STAGE):
            if key is None:  # a truncated tar: the writer reads it the same way and records it
                continue
            self.rows_read.inc()
            with busy(STAGE):
                plan = guarded_decision(partial(self._plan, path, key, members), key, None)
            if isinstance(plan, Decision):
                yield beam.pvalue.TaggedOutput("done", (path, (key, plan)))
            else:
                yield plan

    def _plan(self, path: str, key: str, members: dict) -> Plan | Decision[SampleMeta]:
        """One sample's plan, or its decision when it has no usable metadata or image, or needs no LLM."""
        try:
            meta = sample_meta(key, members)
        except ValueError as e:
            return Decision.drop("bad_metadata", safe_text(str(e)))
        member = image_member(members)
        if member is None:
            return Decision.drop("no_image", "sample has no image member")
        image, cfg = None, self.cfg
        asks = cfg.backend != CAPTION_ONLY and uses_llm(meta.key, cfg.llm_fraction, cfg.seed)  # caption-only: no image
        if self.vision and asks and sample_sees_image(meta.key, cfg, self.templates):
            try:
                image = prepare_image(members[member], self.cfg.image)
            except Dropped as e:
                return e.decision
        return plan_sample(path, meta, self.cfg, self.templates, image)


def generate_judge(decisions: dict[str, Decision[SampleMeta]]) -> Judge:
    """Generation as a judge of one shard: each sample's decision, or ``not_generated`` when none reached it."""

    def judge(key: str, meta: SampleMeta, members: dict[str, bytes]) -> Decision[SampleMeta]:
        return decisions.get(key) or Decision.drop("not_generated", "no result reached the writer")

    return judge


def count_tokens(decisions: dict[str, Decision[SampleMeta]]) -> None:
    """``prompt_tokens`` and ``completion_tokens``: the tokens of the conversations kept for this shard."""
    kept = [d.value.generation for d in decisions.values() if d.kept and d.value.generation]
    beam.metrics.Metrics.counter(STAGE, "prompt_tokens").inc(sum(g.prompt_tokens for g in kept))
    beam.metrics.Metrics.counter(STAGE, "completion_tokens").inc(sum(g.completion_tokens for g in kept))
    beam.metrics.Metrics.counter(STAGE, "image_tokens").inc(sum(g.image_tokens or 0 for g in kept))


def shard_judge(path: str, groups) -> Judge:
    """The judge of one shard from its ``CoGroupByKey`` groups (``decisions``: ``(key, Decision)``); counts the
    tokens of the conversations it keeps on the way."""
    decisions = dict(groups["decisions"])
    count_tokens(decisions)
    return generate_judge(decisions)
