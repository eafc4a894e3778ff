"""``visinstruct curate``: drop the pairs whose caption is unusable, each with its reason; repair mojibake.

Graph (element shapes in comments)::

    tar paths -> (path, {}) -> RewriteShard(caption judge) -> ShardStats

No model runs, so nothing is grouped: each shard's judge (:mod:`visinstruct.transforms.curate_stages`) checks every
caption while :class:`~visinstruct.transforms.rewrite_stage.RewriteShard` rewrites the shard, as filter and generate
write theirs (index row for every input row, dead letters in ``rejected/curate-*.parquet``).
"""

from __future__ import annotations

from functools import partial

import apache_beam as beam

from visinstruct.configs import CurateConfig
from visinstruct.pipelines.options import pipeline_options
from visinstruct.pipelines.report import check_inputs, counter_value, input_rows, summarize, write_report
from visinstruct.transforms.curate_stages import FIXED_MOJIBAKE, STAGE, shard_judge
from visinstruct.transforms.rewrite_stage import RewriteShard
from visinstruct.transforms.text_quality import unknown_languages


def no_groups(path: str) -> tuple[str, dict]:
    """A tar path as ``RewriteShard``'s ``(path, groups)``: the caption judge needs nothing grouped."""
    return path, {}


class CurateShards(beam.PTransform):
    """Tar paths -> ``ShardStats`` of the shards written (``write.path``; it may be the input folder itself)."""

    def __init__(self, cfg: CurateConfig, positions: dict[str, int] | None = None):
        super().__init__()
        if cfg.write is None or not cfg.write.path:
            raise ValueError("curate needs write.path (the output folder)")
        if cfg.text.languages and (unknown := unknown_languages(cfg.text.languages)):
            raise ValueError(f"curate: text.languages {unknown} are not languages py3langid knows (ISO 639-1)")
        self.cfg, self.positions = cfg, positions or {}

    def expand(self, paths):
        make_judge = partial(shard_judge, self.cfg.text)
        return (
            paths
            | "ByShard" >> beam.Map(no_groups)  # (path, {})
            | "RewriteShard" >> beam.ParDo(RewriteShard(STAGE, self.cfg.write.path, self.positions, make_judge))
        )


class Curate(beam.PTransform):
    """The whole curation stage over a list of tars: ``PBegin`` -> ``ShardStats``."""

    def __init__(self, cfg: CurateConfig, inputs: list[str]):
        super().__init__()
        self.cfg, self.inputs = cfg, inputs
        self.shards = CurateShards(cfg, {path: i for i, path in enumerate(inputs)})

    def expand(self, pbegin):
        return (
            pbegin
            | "Shards" >> beam.Create(self.inputs)
            | "SpreadShards" >> beam.Reshuffle()
            | "CurateShards" >> self.shards
        )


def run(cfg: CurateConfig, inputs: list[str], beam_args: list[str] | None = None) -> dict:
    """Run curation over tar paths; returns the run report (with the captions repaired)."""
    if cfg.write is None or not cfg.write.path:
        raise ValueError("curate needs write.path (the output folder)")
    rows_before = input_rows(inputs)  # read before the run: it may rewrite these shards in place
    p = beam.Pipeline(options=pipeline_options(beam_args))
    _ = p | "Curate" >> Curate(cfg, inputs)
    result = p.run()
    result.wait_until_finish()
    report = check_inputs(summarize(cfg.write.path, stage=STAGE, result=result), rows_before, len(inputs))
    report[FIXED_MOJIBAKE] = counter_value(result, STAGE, FIXED_MOJIBAKE) or 0
    write_report(cfg.write.path, report)
    return report
