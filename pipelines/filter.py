"""``visinstruct filter``: score every image-text pair with CLIP and keep pairs by threshold and/or top fraction.

Graph (element shapes in comments)::

    tar paths -> ReadShardSamples -> DecodeForClip -> RunInference(CLIP) -> scores
    scores -> TopFractionCut (global, exact) -> Decide -> (shard, (key, Decision[ClipScore]))
    (decisions, rejections) -> CoGroupByKey(shard) -> RewriteShard -> ShardStats

Reads our shards and img2dataset's. ``dry_run`` writes nothing and reports the score distribution and what
each candidate threshold or fraction would keep, since thresholds do not carry over between models.
"""

from __future__ import annotations

import json

import apache_beam as beam
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from visinstruct.configs import FilterConfig
from visinstruct.pipelines.options import pipeline_options
from visinstruct.pipelines.report import check_inputs, input_rows, summarize, write_report
from visinstruct.schemas import ClipScore, Decision
from visinstruct.transforms.clip import make_handler
from visinstruct.transforms.filter_stages import (
    STAGE,
    DecodeForClip,
    ReadShardSamples,
    SplitUnscored,
    failed_batch_rejections,
    score_decision,
    shard_judge,
)
from visinstruct.transforms.rewrite_stage import RewriteShard
from visinstruct.transforms.select import HistogramFn, TopFractionCut, distribution
from visinstruct.transforms.shards import join, read_bytes, write_bytes

DRY_RUN_THRESHOLDS = [round(0.10 + 0.02 * i, 2) for i in range(16)]
DRY_RUN_FRACTIONS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
DRY_RUN_NAME = "filter_dry_run.json"


def decide(scored, cfg: FilterConfig, cut) -> tuple[str, tuple[str, Decision[ClipScore]]]:
    """``((path, key), ClipOutput)`` -> ``(path, (key, Decision))``: threshold first, then the top fraction."""
    (path, key), output = scored
    clip = ClipScore(output.score, cfg.model.name, cfg.model.pretrained)
    return path, (key, score_decision(key, output, cfg.threshold, cfg.top_fraction, cut, clip))


class ScorePairs(beam.PTransform):
    """Tar paths -> ``((path, key), ClipOutput)``, with a ``rejected`` side: ``(path, Rejection)``."""

    def __init__(self, cfg: FilterConfig):
        super().__init__()
        self.cfg = cfg

    def expand(self, paths):
        model = self.cfg.model
        handler = make_handler(model, with_embeddings=self.cfg.store_embeddings)
        read = paths | "ReadShardSamples" >> beam.ParDo(ReadShardSamples(carry=True)).with_outputs(
            "rejected", main="samples"
        )
        decoded = read.samples | "DecodeForClip" >> beam.ParDo(
            DecodeForClip(handler.preprocessor(), model.decode_threads)
        ).with_outputs("rejected", main="images")
        inference = RunInference(KeyedModelHandler(handler))
        if model.accelerator:  # a GPU for this step only; reading and writing stay on CPU workers
            inference = inference.with_resource_hints(accelerator=model.accelerator)
        results, failed = decoded.images | "ScoreWithClip" >> inference.with_exception_handling()
        outputs = (
            results
            | "Unwrap" >> beam.MapTuple(lambda key, result: (key, result.inference))
            | "SplitUnscored" >> beam.ParDo(SplitUnscored()).with_outputs("rejected", main="scored")
        )
        failures = failed.failed_inferences | "FailedBatches" >> beam.FlatMap(failed_batch_rejections)
        rejected = (read.rejected, decoded.rejected, outputs.rejected, failures) | "AllRejected" >> beam.Flatten()
        return outputs.scored, rejected  # ((path, key), ClipOutput), (path, Rejection)


class FilterShards(beam.PTransform):
    """Tar paths -> ``ShardStats`` of the filtered shards (``write.path``; it may be the input folder itself)."""

    def __init__(self, cfg: FilterConfig, positions: dict[str, int] | None = None):
        super().__init__()
        self.cfg, self.positions = cfg, positions or {}

    def expand(self, paths):
        cfg = self.cfg
        scored, rejected = paths | "Score" >> ScorePairs(cfg)
        cut = beam.pvalue.AsSingleton(paths.pipeline | "NoCut" >> beam.Create([None]))
        if cfg.top_fraction is not None:
            cut = beam.pvalue.AsSingleton(
                scored
                | "KeyScore" >> beam.Map(lambda s: (s[0][1], s[1].score))  # (key, score)
                | "TopFractionCut" >> TopFractionCut(cfg.top_fraction)
            )
        decisions = scored | "Decide" >> beam.Map(decide, cfg=cfg, cut=cut)  # (path, (key, Decision))
        every_shard = paths | "EveryShard" >> beam.Map(lambda p: (p, p))  # shards with no sample still get written
        return (
            {"decisions": decisions, "rejections": rejected, "paths": every_shard}
            | "JoinByShard" >> beam.CoGroupByKey()  # (path, {"decisions": [..], "rejections": [..], ...})
            | "RewriteShard" >> beam.ParDo(RewriteShard(STAGE, cfg.write.path, self.positions, shard_judge))
        )


class Filter(beam.PTransform):
    """The whole filter stage over a list of tars: ``PBegin`` -> ``ShardStats``."""

    def __init__(self, cfg: FilterConfig, inputs: list[str]):
        super().__init__()
        self.cfg, self.inputs = cfg, inputs

    def expand(self, pbegin):
        positions = {path: i for i, path in enumerate(self.inputs)}
        return (
            pbegin
            | "Shards" >> beam.Create(self.inputs)
            | "SpreadShards" >> beam.Reshuffle()
            | "FilterShards" >> FilterShards(self.cfg, positions)
        )


class ScoreDistribution(beam.PTransform):
    """Tar paths -> one dry-run report (dict), writing no shards."""

    def __init__(self, cfg: FilterConfig):
        super().__init__()
        self.cfg = cfg

    def expand(self, paths):
        scored, rejected = paths | "Score" >> ScorePairs(self.cfg)
        hist = scored | "Scores" >> beam.Map(lambda s: s[1].score) | "Histogram" >> beam.CombineGlobally(HistogramFn())
        failures = (
            rejected
            | "Reason" >> beam.Map(lambda r: r[1].reason)
            | "CountReasons" >> beam.combiners.Count.PerElement()
        )
        return hist | "Report" >> beam.Map(
            lambda h, failed: distribution(h, DRY_RUN_THRESHOLDS, DRY_RUN_FRACTIONS) | {"unscored": dict(failed)},
            failed=beam.pvalue.AsList(failures),
        )


def run(cfg: FilterConfig, inputs: list[str], beam_args: list[str] | None = None, dry_run: bool = False) -> dict:
    """Run the filter on tar paths; returns the run report, or the score distribution when ``dry_run``."""
    if cfg.write is None:
        raise ValueError("filter needs write.path (the output folder; a dry run writes its report there)")
    rows_before = input_rows(inputs)  # read before the run: it may rewrite these shards in place
    p = beam.Pipeline(options=pipeline_options(beam_args))
    if dry_run:
        path = join(cfg.write.path, DRY_RUN_NAME)
        _ = (
            p
            | "Shards" >> beam.Create(inputs)
            | "ScoreDistribution" >> ScoreDistribution(cfg)
            | "WriteReport" >> beam.Map(lambda r: write_bytes(path, (json.dumps(r, indent=1) + "\n").encode()))
        )
        p.run().wait_until_finish()
        return json.loads(read_bytes(path))
    _ = p | "Filter" >> Filter(cfg, inputs)
    result = p.run()
    result.wait_until_finish()
    report = check_inputs(summarize(cfg.write.path, stage="filter", result=result), rows_before, len(inputs))
    write_report(cfg.write.path, report)
    return report
