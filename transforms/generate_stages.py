"""The per-sample steps of ``visinstruct generate`` around RunInference: plan, read the reply, judge the shard.

Image bytes never leave the tar: planning reads each sample's text (captions, boxes, tags) and the writer's judge
re-reads the input tar. Every per-sample step (planning and prompt building, reading the backend's result, judging,
the writer's judge) runs through :func:`visinstruct.transforms.guard.guarded`: what one sample raises becomes its
``internal_error`` dead-letter row and the bundle goes on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import TypeVar

import apache_beam as beam

from visinstruct.configs import GenerateConfig
from visinstruct.schemas import Decision, GenerationInfo, Rejection, SampleMeta
from visinstruct.transforms.guard import guarded
from visinstruct.transforms.layout import image_member
from visinstruct.transforms.llm import Plan, Reply
from visinstruct.transforms.llm_openai import ChatRequest
from visinstruct.transforms.prompts import (
    Templates,
    build_messages,
    caption_only,
    choose_kind,
    derive_seed,
    load_templates,
    pick,
    uses_llm,
)
from visinstruct.transforms.rewrite import Judge, iter_samples, sample_meta
from visinstruct.transforms.timing import busy

STAGE = "generate"
CAPTION_ONLY = "caption_only"
T = TypeVar("T")
RAW_LIMIT = 100_000  # characters of a rejected reply kept in its dead-letter row (a reply may be megabytes)


def plan_sample(path: str, meta: SampleMeta, cfg: GenerateConfig, templates: Templates) -> Plan | Decision[SampleMeta]:
    """What to do with one sample: an LLM plan, or its finished decision (caption-only data, or a drop)."""
    if cfg.backend == CAPTION_ONLY or not uses_llm(meta.key, cfg.llm_fraction, cfg.seed):
        turns = caption_only(meta, templates, cfg.seed)
        if turns is None:
            return Decision.drop("no_caption", "caption-only data needs a caption")
        info = GenerationInfo(CAPTION_ONLY, CAPTION_ONLY, templates.sha256, derive_seed(cfg.seed, meta.key, "brief"))
        return Decision.keep(replace(meta, conversations=turns, generation=info))
    kind = choose_kind(meta.key, cfg.kinds, cfg.seed)
    template = templates.kinds[kind]
    question = pick(template.questions, meta.key, cfg.seed, "question") if template.format == "description" else None
    messages = build_messages(template, meta)
    try:  # what no backend can send (lone surrogates from JSON escapes): this sample's problem, not the batch's
        json.dumps(messages, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        return Decision.drop("bad_characters", f"the prompt cannot be encoded: {e}")
    request = ChatRequest(
        key=meta.key,
        messages=messages,
        max_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        seed=derive_seed(cfg.seed, meta.key),
    )
    return Plan(path, meta.key, kind, template.format, question, meta, request)


def safe_text(text: str | None, limit: int | None = None) -> str | None:
    """``text`` as valid UTF-8 (lone surrogates written as ``\\udxxx``), cut to ``limit`` characters."""
    if text is None:
        return None
    text = text[:limit] if limit is not None else text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def judge_reply(plan: Plan, reply: Reply, model: str, templates_sha: str) -> Decision[SampleMeta]:
    """The LLM's reply as the sample's decision: conversations and provenance, or a drop keeping the raw reply."""
    result, decision = reply.result, reply.decision
    if not decision.kept:
        raw = result.text if isinstance(result.text, str) else None
        detail = {
            "raw": safe_text(raw, RAW_LIMIT),
            "raw_chars": len(raw or ""),
            "kind": plan.kind,
            "attempts": reply.attempts,
            "seed": reply.seed,
            "finish_reason": result.finish_reason,
        }
        return Decision.drop(decision.reason, safe_text(decision.message or decision.reason), detail)
    info = GenerationInfo(
        plan.kind, model, templates_sha, reply.seed or 0, result.prompt_tokens, result.completion_tokens
    )
    return Decision.keep(replace(plan.meta, conversations=decision.value, generation=info))


def guarded_decision(fn: Callable[[], T], key: str, url: str | None) -> T | Decision:
    """``fn()``, or this sample's ``internal_error`` drop when it raises."""
    out = guarded(STAGE, fn, key, safe_text(url))
    return Decision.from_rejection(out) if isinstance(out, Rejection) else out


def judged(result, model: str, templates_sha: str) -> tuple[str, tuple[str, Decision[SampleMeta]]]:
    """RunInference's ``PredictionResult`` as ``(path, (key, Decision))``, guarded per sample."""
    plan = result.example
    decision = guarded_decision(
        partial(judge_reply, plan, result.inference, model, templates_sha), plan.key, plan.meta.url or plan.meta.path
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
        self.templates = load_templates(self.cfg.templates)

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
        if image_member(members) is None:
            return Decision.drop("no_image", "sample has no image member")
        return plan_sample(path, meta, self.cfg, self.templates)


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


def shard_judge(path: str, groups) -> Judge:
    """The judge of one shard from its ``CoGroupByKey`` groups (``decisions``: ``(key, Decision)``); counts the
    tokens of the conversations it keeps on the way."""
    decisions = dict(groups["decisions"])
    count_tokens(decisions)
    return generate_judge(decisions)
