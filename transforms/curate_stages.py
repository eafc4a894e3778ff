"""The per-sample step of ``visinstruct curate``: a shard's judge that checks every caption's quality.

The check itself is :func:`visinstruct.transforms.text_quality.check_caption` (a plain function of a caption and the
config); this module turns its ``Decision[str]`` into the rewrite's ``Decision[SampleMeta]``: a repaired caption is
written (the rewrite then rewrites the ``.txt`` member too), a drop keeps the check's reason, message and detail.
No model runs here, so the judge needs no ``CoGroupByKey`` groups: each shard is judged as it is rewritten.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import apache_beam as beam

from visinstruct.configs import TextQualityConfig
from visinstruct.schemas import Decision, SampleMeta
from visinstruct.transforms.rewrite import Judge

STAGE = "curate"
FIXED_MOJIBAKE = "fixed_mojibake"  # counter: captions written repaired (ftfy)


def caption_decision(meta: SampleMeta, checked: Decision[str]) -> tuple[Decision[SampleMeta], bool]:
    """The sample's decision from its caption's check, and whether its caption was repaired.

    A caption kept as it is keeps the sample's members untouched (``Decision.keep()``), so its bytes stay the same.
    """
    if not checked.kept:
        return Decision.drop(checked.reason, checked.message or checked.reason, checked.detail), False
    if checked.value == meta.caption:
        return Decision.keep(), False
    return Decision.keep(replace(meta, caption=checked.value)), True


def caption_judge(cfg: TextQualityConfig) -> Judge:
    """Text quality as a judge of one shard; counts ``curate/fixed_mojibake`` for every caption it repairs."""
    from visinstruct.transforms.text_quality import check_caption  # imported where the judge is made (a worker)

    fixed = beam.metrics.Metrics.counter(STAGE, FIXED_MOJIBAKE)

    def judge(key: str, meta: SampleMeta, members: dict[str, bytes]) -> Decision[SampleMeta]:
        decision, repaired = caption_decision(meta, check_caption(meta.caption, cfg))
        if repaired:
            fixed.inc()
        return decision

    return judge


def shard_judge(cfg: TextQualityConfig, path: str, groups: Mapping[str, Iterable[Any]]) -> Judge:
    """:class:`~visinstruct.transforms.rewrite_stage.RewriteShard`'s ``make_judge`` (bind ``cfg`` with
    ``functools.partial``): every shard gets the same caption judge; the groups carry nothing for it."""
    return caption_judge(cfg)
