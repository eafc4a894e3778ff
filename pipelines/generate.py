"""``visinstruct generate``: instruction-response conversations for every sample of a set of shards.

Graph (element shapes in comments)::

    tar paths -> PlanSamples -> plans (LLM) | (path, (key, Decision)) (caption-only data, drops)
    plans -> RunInference(GenerationHandler) -> (path, (key, Decision[SampleMeta]))
    (decisions, tar paths) -> CoGroupByKey(path) -> RewriteShard -> ShardStats

The per-sample steps (planning, reading a reply, the shard's judge) are in
:mod:`visinstruct.transforms.generate_stages`; this module wires them.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.ml.inference.base import RunInference

from visinstruct.configs import GenerateConfig
from visinstruct.pipelines.options import pipeline_options
from visinstruct.pipelines.report import check_inputs, counter_value, input_rows, summarize, write_report
from visinstruct.transforms.generate_stages import (
    CAPTION_ONLY,
    STAGE,
    PlanSamples,
    crashed_batch,
    judged,
    shard_judge,
)
from visinstruct.transforms.llm import GenerationHandler
from visinstruct.transforms.plans import check_kinds, needs_image
from visinstruct.transforms.prompts import load_templates
from visinstruct.transforms.rewrite_stage import RewriteShard


class GenerateShards(beam.PTransform):
    """Tar paths -> ``ShardStats`` of the shards written (``write.path``; it may be the input folder itself)."""

    def __init__(self, cfg: GenerateConfig, positions: dict[str, int] | None = None):
        super().__init__()
        self.cfg, self.positions = cfg, positions or {}
        self.templates = load_templates(cfg.templates)  # fail at construction on a bad file or unknown kind
        check_kinds(cfg, self.templates)

    def _generate(self, plans, sha: str) -> list:
        """Plans -> ``(path, (key, Decision))`` from the LLM, and from batches that crashed."""
        cfg = self.cfg
        handler = GenerationHandler(cfg, self.templates, needs_image(cfg, self.templates))
        inference = RunInference(handler)
        if cfg.local and cfg.local.accelerator:  # a GPU for this step only
            inference = inference.with_resource_hints(accelerator=cfg.local.accelerator)
        results, failed = plans | "GenerateWithLLM" >> inference.with_exception_handling()
        # (path, (key, Decision))
        generated = results | "Judge" >> beam.Map(judged, cfg.model, sha, cfg.recaption_caption)
        return [generated, failed.failed_inferences | "FailedBatches" >> beam.FlatMap(crashed_batch)]

    def expand(self, paths):
        cfg, sha = self.cfg, self.templates.sha256
        planned = paths | "PlanSamples" >> beam.ParDo(PlanSamples(cfg)).with_outputs("done", main="plans")
        decisions = [planned.done]
        if cfg.backend != CAPTION_ONLY:  # RunInference loads its model even for an empty input
            decisions += self._generate(planned.plans, sha)
        decisions = tuple(decisions) | "AllDecisions" >> beam.Flatten()  # (path, (key, Decision))
        every_shard = paths | "EveryShard" >> beam.Map(lambda p: (p, p))
        return (
            {"decisions": decisions, "paths": every_shard}
            | "JoinByShard" >> beam.CoGroupByKey()  # (path, {"decisions": [(key, Decision)], "paths": [path]})
            | "RewriteShard" >> beam.ParDo(RewriteShard(STAGE, cfg.write.path, self.positions, shard_judge))
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
    "image_tokens_spent",
    "image_tokens",
)
PART_PREFIX = "part_rejected_"  # counters of rejected parts by reason (a row may be written with some rejected)


def parts_rejected(result) -> dict[str, int]:
    """Rejected parts by reason, over written and dropped rows alike (the kinds asked per image)."""
    from apache_beam.metrics.metric import MetricsFilter

    counters = result.metrics().query(MetricsFilter().with_namespace(STAGE))["counters"]
    out: dict[str, int] = {}
    for c in counters:
        if c.key.metric.name.startswith(PART_PREFIX):
            reason = c.key.metric.name.removeprefix(PART_PREFIX)
            out[reason] = out.get(reason, 0) + (c.committed if c.committed is not None else c.attempted)
    return dict(sorted(out.items()))


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
    report["parts_rejected"] = parts_rejected(result)
    write_report(cfg.write.path, report)
    return report
