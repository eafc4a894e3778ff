"""``visinstruct build``: ingest, curation, CLIP filter and generation composed in one Beam graph.

Graph (each stage optional but the first)::

    Ingest -> (shard paths) -> CurateShards (in place) -> FilterShards (in place) -> GenerateShards (in place)
    -> DecontaminateShards (in place: generated questions against the benchmarks) -> ShardStats

or, from existing shards (``ingest: null``, ``input: ...``), the first stage that runs writes into ``out``::

    tar paths -> CurateShards | FilterShards | GenerateShards (into out) -> ... (in place) -> ShardStats

Each stage hands the next the paths of the shards it finished, and rewrites them where they are: no image bytes
are shuffled between stages and no intermediate copy of the dataset is written. Each shard's index keeps one row
per input row across all stages; each stage's drops go to that stage's dead-letter table. A shard counts as
complete only once the last stage has written its stats, so an interrupted build redoes unfinished shards.

The config is the stage configs it runs; this module wires them: ingest writes to ``out`` and every later stage
rewrites the shards there (the config loader refuses a stage section that sets its own input or output).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace

import apache_beam as beam

from visinstruct.configs import BuildConfig, CurateConfig, GenerateConfig, OutputConfig
from visinstruct.pipelines.cost import MILLION, Prices, estimate, gpu_stages_of
from visinstruct.pipelines.curate import CurateShards, DecontaminateShards, add_curation
from visinstruct.pipelines.filter import FilterShards
from visinstruct.pipelines.generate import TOKEN_COUNTERS, GenerateShards, parts_rejected
from visinstruct.pipelines.ingest import Ingest, remove_empty_staging
from visinstruct.pipelines.options import pipeline_options
from visinstruct.pipelines.report import (
    column_values,
    counter_value,
    dead_letter_reasons,
    input_rows,
    quantiles,
    summarize,
    write_report,
)
from visinstruct.transforms.curate_stages import DECONTAM_STAGE
from visinstruct.transforms.layout import shard_in
from visinstruct.transforms.plans import scorer_defaults
from visinstruct.transforms.timing import BUSY_US

INGEST_STAGES = ("read", "download", "decode", "dedup")


def checks_generated_questions(cfg: BuildConfig) -> bool:
    """Whether generated conversations are checked against benchmark questions (a ``decontam`` stage after
    generate): curation has benchmarks with questions and the build generates."""
    contamination = cfg.curate.decontaminate if cfg.curate else None
    return bool(cfg.generate and contamination and any(b.questions for b in contamination.benchmarks))


def stages_of(cfg: BuildConfig) -> list[str]:
    return (
        (["ingest"] if cfg.ingest else [])
        + (["curate"] if cfg.curate else [])
        + (["filter"] if cfg.filter else [])
        + (["generate"] if cfg.generate else [])
        + ([DECONTAM_STAGE] if checks_generated_questions(cfg) else [])
    )


def curate_config(cfg: BuildConfig, out: str) -> CurateConfig:
    """The curate stage's config in a build: writing to ``out``, semantic dedup embedding with the filter's CLIP
    unless it names its own."""
    curate = replace(cfg.curate, write=OutputConfig(out))
    semdedup = curate.semdedup
    if semdedup is not None and semdedup.embedding == "clip" and semdedup.model is None and cfg.filter is not None:
        curate = replace(curate, semdedup=replace(semdedup, model=cfg.filter.model))
    return curate


def generate_config(cfg: BuildConfig, out: str) -> GenerateConfig:
    """The generate stage's config in a build: writing to ``out``, its grounding check scoring with the filter's
    CLIP unless it names its own."""
    generate = replace(cfg.generate, write=OutputConfig(out))
    grounding = generate.grounding
    if grounding is not None and grounding.model is None and cfg.filter is not None:
        model = replace(cfg.filter.model, **scorer_defaults())  # the filter's RunInference keys do not apply
        generate = replace(generate, grounding=replace(grounding, model=model))
    return generate


class Build(beam.PTransform):
    """The whole build: ``PBegin`` -> ``ShardStats`` of the last stage, one per shard.

    ``inputs`` are the tars to start from when ``cfg.ingest`` is null (the CLI resolves ``cfg.input`` into them);
    the first stage writes them to ``out`` as shards numbered in their order.
    """

    def __init__(self, cfg: BuildConfig, inputs: list[str] | None = None):
        super().__init__()
        if cfg.ingest is None and not inputs:
            raise ValueError("a build from existing shards needs the input tars")
        self.cfg, self.inputs = cfg, inputs or []

    def expand(self, pbegin):
        cfg, out = self.cfg, self.cfg.out
        positions = {}
        if cfg.ingest is not None:
            ingest_cfg = replace(cfg.ingest, write=replace(cfg.ingest.write, path=out))
            stats = pbegin | "Ingest" >> Ingest(ingest_cfg, complete_at={stages_of(cfg)[-1]})
            paths = stats | "IngestedShards" >> beam.Map(lambda s: shard_in(out, s.shard).tar)
        else:
            positions = {path: i for i, path in enumerate(self.inputs)}
            paths = pbegin | "InputShards" >> beam.Create(self.inputs) | "SpreadShards" >> beam.Reshuffle()
        if cfg.curate:
            stats = paths | "Curate" >> CurateShards(curate_config(cfg, out), positions)
            paths = stats | "CuratedShards" >> beam.Map(lambda s: shard_in(out, s.shard).tar)
            positions = {}  # later stages rewrite curation's output in place
        if cfg.filter:
            stats = paths | "Filter" >> FilterShards(replace(cfg.filter, write=OutputConfig(out)), positions)
            paths = stats | "FilteredShards" >> beam.Map(lambda s: shard_in(out, s.shard).tar)
            positions = {}  # generation rewrites the filter's output in place
        if cfg.generate:
            stats = paths | "Generate" >> GenerateShards(generate_config(cfg, out), positions)
            if checks_generated_questions(cfg):
                paths = stats | "GeneratedShards" >> beam.Map(lambda s: shard_in(out, s.shard).tar)
                stats = paths | "Decontaminate" >> DecontaminateShards(cfg.curate.decontaminate, out)
        return stats


def stage_counts(out_dir: str, stages: list[str], inputs: int) -> list[dict]:
    """Rows into and out of each stage, from the dead-letter tables (which stage dropped what, and why).

    ``inputs`` are the rows that reached the first stage (a build from existing shards starts from their samples).
    """
    dropped: dict[str, Counter] = {stage: Counter() for stage in stages}
    for by, reasons in dead_letter_reasons(out_dir).items():
        stage = "ingest" if by in INGEST_STAGES else by
        if stage in dropped:
            dropped[stage].update(reasons)
    counts, remaining = [], inputs
    for stage in stages:
        out = remaining - sum(dropped[stage].values())
        reasons = dict(dropped[stage].most_common())
        rates = {reason: round(n / remaining, 4) for reason, n in reasons.items()} if remaining else {}
        counts.append(
            {"stage": stage, "in": remaining, "out": out, "dropped_by_reason": reasons, "rate_by_reason": rates}
        )
        remaining = out
    return counts


def clip_distribution(out_dir: str) -> dict | None:
    """Quantiles of the CLIP scores in the indexes (kept and dropped pairs alike)."""
    found = quantiles([s for s in column_values(out_dir, "clip_score") if s is not None])
    return None if found is None else {"pairs": found.pop("count"), **found}


def run(cfg: BuildConfig, beam_args: list[str] | None = None, inputs: list[str] | None = None) -> dict:
    """Run the build; returns the run report (also written next to the shards: ``layout.report_path``).

    ``inputs``: the tars to start from when ``cfg.ingest`` is null.
    """
    rows_before = input_rows(inputs) if inputs else None  # read first: the build may rewrite them in place
    start = time.monotonic()
    p = beam.Pipeline(options=pipeline_options(beam_args))
    _ = p | "Build" >> Build(cfg, inputs)
    result = p.run()
    result.wait_until_finish()
    seconds = time.monotonic() - start
    out, stages = cfg.out, stages_of(cfg)
    if cfg.ingest is not None:
        remove_empty_staging(out)
    report = summarize(out, stage=stages[-1])
    rows_read = counter_value(result, stages[0], "rows_read")  # rows into the first stage
    if cfg.ingest is not None:  # every row read is in the index, written or rejected
        accounted = rows_read is None or rows_read == report["inputs"]
    else:  # the input shards' rows, earlier rejections included, all end in the output's index
        accounted = rows_before is None or rows_before == report["inputs"]
        report["inputs_before"] = rows_before
        if report["shards"] < len(inputs):  # an input shard it could not read at all: a dead letter, no output
            report["shards_unwritten"] = len(inputs) - report["shards"]
            accounted = False
    first_in = report["inputs"] if cfg.ingest is not None or rows_read is None else rows_read
    report.update(
        stages=stage_counts(out, stages, first_in),
        rows_read=rows_read,
        accounted=accounted,
        carried_rejections=report["inputs"] - first_in,
        seconds=round(seconds, 1),
        rows_per_second=round(report["inputs"] / seconds, 2) if seconds else None,
        clip=clip_distribution(out),
        **{name: counter_value(result, "generate", name) or 0 for name in TOKEN_COUNTERS},
    )
    if cfg.curate is not None:
        add_curation(report, result, out)
    if cfg.generate is not None:
        report["parts_rejected"] = parts_rejected(result)
    for stage in report["stages"]:  # seconds of work per stage, summed over workers (stages overlap in one graph)
        busy_s = (counter_value(result, stage["stage"], BUSY_US) or 0) / 1e6
        stage.update(
            busy_seconds=round(busy_s, 3), rows_per_busy_second=round(stage["in"] / busy_s, 1) if busy_s else None
        )
    report["stages_add_up"] = report["stages"][-1]["out"] == report["written"]
    if report["inputs"]:  # what a job of a million pairs would cost at this run's measured rates
        report["cost"] = estimate(report, MILLION, Prices(), gpu_stages_of(cfg))
    write_report(out, report)
    return report
