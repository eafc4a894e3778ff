"""``RewriteShard``: the one Beam step that writes a stage's shards, a judge per shard over :func:`rewrite_shard`.

A stage (filter, generate) groups its per-sample results by shard path with ``CoGroupByKey`` and hands each
``(path, groups)`` here with a ``make_judge(path, groups)`` that turns the groups into the shard's
:data:`~visinstruct.transforms.rewrite.Judge`. This step rewrites the shard, counts ``<stage>/dropped_<reason>``
from the dead letters the stage committed (never from stats: rows an earlier stage rejected are carried, not this
stage's drops), and yields the shard's stats. Kept apart from :mod:`~visinstruct.transforms.rewrite` so that
``remove``, which rewrites shards without a pipeline, does not import Beam.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import apache_beam as beam

from visinstruct.transforms.rewrite import Judge, rewrite_shard
from visinstruct.transforms.timing import busy

log = logging.getLogger(__name__)

# (shard path, the CoGroupByKey groups of that path) -> the judge of that shard; picklable (a function or object).
MakeJudge = Callable[[str, Mapping[str, Iterable[Any]]], Judge]


def count_drops(stage: str, dropped: Counter) -> None:
    """``<stage>/dropped_<reason>`` Beam counters from the drops a stage committed for one shard."""
    for reason, count in dropped.items():
        beam.metrics.Metrics.counter(stage, f"dropped_{reason}").inc(count)


class RewriteShard(beam.DoFn):
    """``(path, groups)`` from a ``CoGroupByKey`` -> the :class:`ShardStats` of the shard rewritten into ``out_dir``.

    Args:
        stage: names the dead-letter tables, the stats and the counters.
        out_dir: the output folder (it may be the input shards' own folder).
        positions: each input path's position, the shard id of a tar not named like a shard.
        make_judge: builds the shard's judge from its path and groups.
    """

    def __init__(self, stage: str, out_dir: str, positions: Mapping[str, int], make_judge: MakeJudge):
        self.stage, self.out_dir, self.positions, self.make_judge = stage, out_dir, dict(positions), make_judge

    def process(self, element):
        path, groups = element
        judge, dropped = self.make_judge(path, groups), Counter()
        with busy(self.stage):
            stats = rewrite_shard(path, self.positions.get(path), self.out_dir, self.stage, judge, dropped)
        count_drops(self.stage, dropped)
        log.info(
            "%s: shard %05d: %d written of %d, dropped %s",
            self.stage,
            stats.shard,
            stats.written,
            stats.inputs,
            dict(dropped),
        )
        yield stats
