"""``visinstruct generate``: instruction-response conversations for every sample of a set of shards.

Graph (element shapes in comments)::

    tar paths -> PlanSamples -> plans (LLM) | direct results (caption-only) | rejections
    plans -> RunInference(GenerationHandler) -> (path, key, Judgement)
    (judgements, rejections) -> CoGroupByKey(path) -> RewriteShard -> ShardStats

Image bytes never leave the tar: the LLM reads text only (captions, boxes, tags) and each output shard is
written by re-reading its input tar.

Every per-sample step (planning and prompt building, reading the backend's result, judging, the writer's judge)
runs through :func:`visinstruct.transforms.guard.guarded`: what one sample raises becomes its ``internal_error``
dead-letter row and the bundle goes on.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from functools import partial

import apache_beam as beam
from apache_beam.ml.inference.base import RunInference

from visinstruct.configs import GenerateConfig
from visinstruct.pipelines.options import pipeline_options
from visinstruct.pipelines.report import check_inputs, counter_value, input_rows, summarize, write_report
from visinstruct.schemas import GenerationInfo, JsonDict, Rejection, SampleMeta
from visinstruct.transforms.guard import guarded
from visinstruct.transforms.llm import GenerationHandler, Outcome, Plan
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
from visinstruct.transforms.rewrite import Judgement, image_member, iter_samples, rewrite_shard, sample_meta
from visinstruct.transforms.timing import busy

log = logging.getLogger(__name__)
STAGE = "generate"
CAPTION_ONLY = "caption_only"
RAW_LIMIT = 100_000  # characters of a rejected reply kept in its dead-letter row (a reply may be megabytes)


def plan_sample(path: str, meta: SampleMeta, cfg: GenerateConfig, templates: Templates) -> Plan | Judgement:
    """What to do with one sample: an LLM plan, or a finished caption-only (or rejected) judgement."""
    if cfg.backend == CAPTION_ONLY or not uses_llm(meta.key, cfg.llm_fraction, cfg.seed):
        turns = caption_only(meta, templates, cfg.seed)
        if turns is None:
            return Judgement(
                rejection=Rejection(
                    STAGE, "no_caption", "caption-only data needs a caption", meta.key, meta.url or meta.path
                )
            )
        info = GenerationInfo(CAPTION_ONLY, CAPTION_ONLY, templates.sha256, derive_seed(cfg.seed, meta.key, "brief"))
        return Judgement(meta=replace(meta, conversations=turns, generation=info))
    kind = choose_kind(meta.key, cfg.kinds, cfg.seed)
    template = templates.kinds[kind]
    question = pick(template.questions, meta.key, cfg.seed, "question") if template.format == "description" else None
    messages = build_messages(template, meta)
    try:  # what no backend can send (lone surrogates from JSON escapes): this sample's problem, not the batch's
        json.dumps(messages, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        return Judgement(
            rejection=Rejection(
                STAGE,
                "bad_characters",
                f"the prompt cannot be encoded: {e}"[:500],
                meta.key,
                safe_text(meta.url or meta.path),
            )
        )
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


def judge_outcome(plan: Plan, outcome: Outcome, model: str, templates_sha: str) -> Judgement:
    """A generation outcome as the sample's judgement: conversations and provenance, or a dead-letter row."""
    result, verdict = outcome.result, outcome.verdict
    if verdict.turns is None:
        raw = result.text if isinstance(result.text, str) else None
        detail = JsonDict(
            {
                "raw": safe_text(raw, RAW_LIMIT),
                "raw_chars": len(raw or ""),
                "kind": plan.kind,
                "attempts": outcome.attempts,
                "seed": outcome.seed,
                "finish_reason": result.finish_reason,
            }
        )
        return Judgement(
            rejection=Rejection(
                STAGE,
                verdict.reason or "internal_error",
                safe_text(verdict.message or verdict.reason, 500),
                plan.key,
                safe_text(plan.meta.url or plan.meta.path),
                detail,
            )
        )
    info = GenerationInfo(
        plan.kind, model, templates_sha, outcome.seed or 0, result.prompt_tokens, result.completion_tokens
    )
    return Judgement(meta=replace(plan.meta, conversations=verdict.turns, generation=info))


def guarded_judgement(fn, key: str, url: str | None) -> Judgement:
    """``fn()``'s judgement, or this sample's ``internal_error`` dead-letter judgement when it raises."""
    out = guarded(STAGE, fn, key, safe_text(url))
    return out if isinstance(out, Judgement) else Judgement(rejection=out)


def judged(result, model: str, templates_sha: str) -> tuple[str, tuple[str, Judgement]]:
    """RunInference's ``PredictionResult`` as ``(path, (key, Judgement))``, guarded per sample."""
    plan = result.example
    judgement = guarded_judgement(
        partial(judge_outcome, plan, result.inference, model, templates_sha), plan.key, plan.meta.url or plan.meta.path
    )
    return plan.path, (plan.key, judgement)


def crashed_batch(failure) -> list[tuple[str, tuple[str, Judgement]]]:
    """RunInference's ``(failed batch of plans, exception)`` as one dead-letter judgement per sample."""
    plans, error = failure
    message = f"{type(error).__name__}: {error}"[:500] if isinstance(error, BaseException) else str(error)[:500]
    return [
        (
            p.path,
            (
                p.key,
                Judgement(rejection=Rejection(STAGE, "inference_error", message, p.key, p.meta.url or p.meta.path)),
            ),
        )
        for p in plans
    ]


class PlanSamples(beam.DoFn):
    """``tar path`` -> ``Plan``; tagged ``done``: ``(path, (key, Judgement))`` for caption-only and rejections."""

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
                plan = guarded(STAGE, partial(self._plan, path, key, members), key)
            if isinstance(plan, Rejection):
                plan = Judgement(rejection=plan)
            if isinstance(plan, Judgement):
                yield beam.pvalue.TaggedOutput("done", (path, (key, plan)))
            else:
                yield plan

    def _plan(self, path: str, key: str, members: dict) -> Plan | Judgement:
        """One sample's plan, or its judgement when it has no usable metadata or image, or needs no LLM."""
        try:
            meta = sample_meta(key, members)
        except ValueError as e:
            return Judgement(rejection=Rejection(STAGE, "bad_metadata", safe_text(str(e), 500), key))
        if image_member(members) is None:
            return Judgement(
                rejection=Rejection(
                    STAGE, "no_image", "sample has no image member", key, safe_text(meta.url or meta.path)
                )
            )
        return plan_sample(path, meta, self.cfg, self.templates)


class _RewriteShard(beam.DoFn):
    def __init__(self, cfg: GenerateConfig, positions: dict[str, int]):
        self.cfg, self.positions = cfg, positions

    def process(self, element):
        path, groups = element
        judgements = dict(groups["judgements"])

        def lookup(key: str, meta: SampleMeta) -> Judgement:
            return judgements.get(key) or Judgement(
                rejection=Rejection(STAGE, "not_generated", "no result reached the writer", key, meta.url or meta.path)
            )

        def judge(key: str, meta: SampleMeta) -> Judgement:
            return guarded_judgement(partial(lookup, key, meta), key, meta.url or meta.path)

        with busy(STAGE):
            stats = rewrite_shard(path, self.positions.get(path), self.cfg.write.path, STAGE, judge)
        for reason, count in stats.rejected_by_reason.items():
            beam.metrics.Metrics.counter(STAGE, f"dropped_{reason}").inc(count)
        tokens = [j.meta.generation for j in judgements.values() if j.meta is not None and j.meta.generation]
        beam.metrics.Metrics.counter(STAGE, "prompt_tokens").inc(sum(g.prompt_tokens for g in tokens))
        beam.metrics.Metrics.counter(STAGE, "completion_tokens").inc(sum(g.completion_tokens for g in tokens))
        log.info("shard %05d: %d conversations from %d samples", stats.shard, stats.written, stats.inputs)
        yield stats


class GenerateShards(beam.PTransform):
    """Tar paths -> ``ShardStats`` of the shards written (``write.path``; it may be the input folder itself)."""

    def __init__(self, cfg: GenerateConfig, positions: dict[str, int] | None = None):
        super().__init__()
        self.cfg, self.positions = cfg, positions or {}
        self.templates = load_templates(cfg.templates)  # fail at construction on a bad file or unknown kind
        unknown = set(cfg.kinds) - set(self.templates.kinds)
        if unknown:
            raise ValueError(f"kinds {sorted(unknown)} have no template in {cfg.templates or 'the bundled file'}")

    def _generate(self, plans, sha: str) -> list:
        """Plans -> ``(path, (key, Judgement))`` from the LLM, and from batches that crashed."""
        cfg = self.cfg
        inference = RunInference(GenerationHandler(cfg, self.templates.object_vocabulary))
        if cfg.accelerator:  # a GPU for this step only
            inference = inference.with_resource_hints(accelerator=cfg.accelerator)
        results, failed = plans | "GenerateWithLLM" >> inference.with_exception_handling()
        generated = results | "Judge" >> beam.Map(judged, cfg.model, sha)  # (path, (key, Judgement))
        return [generated, failed.failed_inferences | "FailedBatches" >> beam.FlatMap(crashed_batch)]

    def expand(self, paths):
        cfg, sha = self.cfg, self.templates.sha256
        planned = paths | "PlanSamples" >> beam.ParDo(PlanSamples(cfg)).with_outputs("done", main="plans")
        judgements = [planned.done]
        if cfg.backend != CAPTION_ONLY:  # RunInference loads its model even for an empty input
            judgements += self._generate(planned.plans, sha)
        judgements = tuple(judgements) | "AllJudgements" >> beam.Flatten()  # (path, (key, Judgement))
        every_shard = paths | "EveryShard" >> beam.Map(lambda p: (p, p))
        return (
            {"judgements": judgements, "paths": every_shard}
            | "JoinByShard" >> beam.CoGroupByKey()  # (path, {"judgements": [(key, J)], "paths": [path]})
            | "RewriteShard" >> beam.ParDo(_RewriteShard(cfg, self.positions))
        )


class Generate(beam.PTransform):
    """The whole generation stage over a list of tars: ``PBegin`` -> ``ShardStats``."""

    def __init__(self, cfg: GenerateConfig, inputs: list[str]):
        super().__init__()
        self.cfg, self.inputs = cfg, inputs
        self.shards = GenerateShards(cfg, {path: i for i, path in enumerate(inputs)})

    def expand(self, pbegin):
        return (
            pbegin
            | "Shards" >> beam.Create(self.inputs)
            | "SpreadShards" >> beam.Reshuffle()
            | "GenerateShards" >> self.shards
        )


# Calls to the backend and the tokens they spent (cached answers cost nothing), and the tokens of written samples.
TOKEN_COUNTERS = (
    "backend_calls",
    "prompt_tokens_spent",
    "completion_tokens_spent",
    "prompt_tokens",
    "completion_tokens",
)


def run(cfg: GenerateConfig, inputs: list[str], beam_args: list[str] | None = None) -> dict:
    """Run generation over tar paths; returns the run report (with tokens spent)."""
    if cfg.write is None:
        raise ValueError("generate needs write.path (the output folder)")
    rows_before = input_rows(inputs)  # read before the run: it may rewrite these shards in place
    p = beam.Pipeline(options=pipeline_options(beam_args))
    _ = p | "Generate" >> Generate(cfg, inputs)
    result = p.run()
    result.wait_until_finish()
    report = check_inputs(summarize(cfg.write.path, stage=STAGE, result=result), rows_before, len(inputs))
    for name in TOKEN_COUNTERS:
        report[name] = counter_value(result, STAGE, name) or 0
    write_report(cfg.write.path, report)
    return report
