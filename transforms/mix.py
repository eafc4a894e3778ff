"""Which samples a mix takes, as plain functions: ``visinstruct mix``'s plan and judge (the pipeline is
``pipelines/mix.py``).

Each source's written keys (read from its parquet indexes, no tar opened) are ranked by
``(sha256(seed, source name, key), key, shard name)``; weights become counts by largest remainder over ``samples``,
capped by what the source has and ``max_samples``; the count's smallest rank is the source's cutoff, and a sample is
in the mix when its rank is at most the cutoff. The choice depends only on the seed, the names and the keys.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
from collections import Counter
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import PurePosixPath as Path

from visinstruct.configs.mix import MixConfig, MixSourceConfig
from visinstruct.schemas import Decision, IndexRow, SampleMeta
from visinstruct.schemas.arrow import JsonDict
from visinstruct.transforms.layout import ShardError, index_of, resolve_shards, shard_files
from visinstruct.transforms.rewrite import Judge
from visinstruct.transforms.shards import exists, is_remote, join, match, read_table

STAGE = "mix"
NOT_IN_MIX = "not_in_mix"  # a written sample the mix did not choose
NOT_ENOUGH = "not_enough"  # a source has fewer written samples than asked
CAPPED = "max_samples"  # a weighted source's share is over its max_samples
MIX_REPORT = "mix_report.json"
PROVENANCE_KEY = "mix"  # the sample JSON's key holding {"source": NAME}

Rank = tuple[int, str, str]  # (hash, key, shard name): unique within a source, whatever its keys


class MixError(ValueError):
    """A mix that cannot run as configured (no shards, an incomplete shard, an output over a source): one line."""


def sample_hash(seed: int, source: str, key: str) -> int:
    """A sample's place in its source's draw: the first 8 bytes of sha256 over ``[seed, source, key]`` (JSON, so no
    two triples share a text), the same on every machine and Python (unlike ``hash()``)."""
    text = json.dumps([seed, source, key], ensure_ascii=True, separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def largest_remainder(weights: list[float], total: int) -> list[int]:
    """``total`` split in proportion to ``weights``: each gets the floor of its exact share, and the units left go
    to the largest remainders (ties: the earlier weight), so the parts sum to ``total`` exactly."""
    exact = [Fraction(w) * total / sum(Fraction(x) for x in weights) for w in weights]
    parts = [int(share) for share in exact]  # floor: shares are >= 0
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - parts[i]), i))
    for i in by_remainder[: total - sum(parts)]:
        parts[i] += 1
    return parts


def asked_counts(cfg: MixConfig) -> dict[str, int]:
    """What each source is asked for: its count, or its largest-remainder share of what the counts leave of
    ``samples``."""
    asked = {s.name: s.count for s in cfg.sources if s.count is not None}
    weighted = [s for s in cfg.sources if s.weight is not None]
    if weighted:
        shares = largest_remainder([s.weight for s in weighted], cfg.samples - sum(asked.values()))
        asked |= {s.name: n for s, n in zip(weighted, shares)}
    return asked


def written_keys(tar: str) -> list[str]:
    """The keys a shard's index lists as written (status ``success``), read from the index alone."""
    table = read_table(index_of(tar), IndexRow, ["key", "status"])
    return [
        k
        for k, status in zip(table.column("key").to_pylist(), table.column("status").to_pylist())
        if status == "success"
    ]


def cutoff(ranks: list[Rank], n: int) -> Rank | None:
    """The ``n``-th smallest rank (``None`` when ``n`` is 0): the samples ranked at most it are the ``n`` chosen."""
    return heapq.nsmallest(n, ranks)[-1] if n > 0 else None


@dataclass(frozen=True)
class SourcePlan:
    """What the mix takes from one source, and why it is fewer than asked when it is."""

    name: str
    input: str
    shards: list[str]
    available: int  # written samples in its indexes
    asked: int  # its count, or its share of the weighted total
    taken: int  # min(asked, available, max_samples)
    short: str | None  # why taken < asked: max_samples or not_enough
    cut: Rank | None  # the largest rank taken

    def report(self, source: MixSourceConfig) -> dict:
        """Its row of ``mix_report.json`` (no paths of shards, no timings: the same config gives the same bytes)."""
        return {
            "name": self.name,
            "input": self.input,
            "shards": len(self.shards),
            "weight": source.weight,
            "count": source.count,
            "max_samples": source.max_samples,
            "available": self.available,
            "asked": self.asked,
            "taken": self.taken,
            "short": self.short,
        }


def source_shards(source: MixSourceConfig) -> list[str]:
    """The source's shards, each complete (its index and ``_stats.json`` present); :class:`MixError` otherwise."""
    try:
        tars = [t for t in resolve_shards(source.input) if exists(t)]
    except ShardError as e:
        raise MixError(f"source {source.name!r}: {e}") from None
    if not tars:
        raise MixError(f"source {source.name!r}: {source.input} has no .tar shards")
    for tar in tars:
        files = shard_files(tar)
        if files.number is None:
            raise MixError(f"source {source.name!r}: {tar} is not named like a shard of ours (00042.tar)")
        if not exists(files.index) or not exists(files.stats):
            raise MixError(
                f"source {source.name!r}: {tar} is incomplete (no {Path(files.index).name} or "
                f"{Path(files.stats).name}): finish the run that writes it"
            )
    names = Counter(shard_files(t).name for t in tars)
    twice = sorted(n for n, c in names.items() if c > 1)
    if twice:
        raise MixError(
            f"source {source.name!r}: two shards are named {twice[0]}.tar (from different folders); they would be "
            "written to one file: make each folder a source of its own"
        )
    return tars


def plan_source(source: MixSourceConfig, asked: int, seed: int) -> SourcePlan:
    """Rank the source's written samples and take the ``asked`` smallest, capped by what it has and ``max_samples``."""
    shards = source_shards(source)
    ranks = [
        (sample_hash(seed, source.name, key), key, shard_files(tar).name)
        for tar in shards
        for key in written_keys(tar)
    ]
    cap = len(ranks) if source.max_samples is None else min(len(ranks), source.max_samples)
    taken = min(asked, cap)
    short = None
    if taken < asked:
        short = CAPPED if source.max_samples is not None and source.max_samples < len(ranks) else NOT_ENOUGH
    return SourcePlan(source.name, source.input, shards, len(ranks), asked, taken, short, cutoff(ranks, taken))


def check_output(out: str, plans: list[SourcePlan]) -> None:
    """Refuse an output that would overwrite a source (a source's own folder) or hold shards no source writes (an
    earlier mix's: they would read as part of this one)."""
    mine = {(p.name, shard_files(t).name) for p in plans for t in p.shards}
    targets = [join(out, p.name) for p in plans]
    for plan in plans:
        for tar in plan.shards:
            if any(_same_folder(shard_files(tar).folder, target) for target in targets):
                raise MixError(
                    f"--out {out} would rewrite source {plan.name!r} while reading it: choose another output folder"
                )
    for found in match(join(out, "*", "*.tar")):
        folder = shard_files(found.path).folder
        key = (folder.rstrip("/").rpartition("/")[2], shard_files(found.path).name)
        if key not in mine:
            raise MixError(f"{found.path} is not part of this mix (an earlier one?): use an empty output folder")


def _same_folder(a: str, b: str) -> bool:
    if is_remote(a) or is_remote(b):
        return a.rstrip("/") == b.rstrip("/")
    return os.path.abspath(a) == os.path.abspath(b)


def plan_mix(cfg: MixConfig) -> list[SourcePlan]:
    """Every source's plan, in config order; :class:`MixError` for a source that cannot be read or an output that
    would overwrite one."""
    asked = asked_counts(cfg)
    plans = [plan_source(s, asked[s.name], cfg.seed) for s in cfg.sources]
    check_output(cfg.out, plans)
    return plans


def provenance(source: str, meta: SampleMeta) -> dict:
    """``{"source": NAME}``; a sample of an earlier mix keeps that mix's record under ``earlier``."""
    earlier = meta.extra.get(PROVENANCE_KEY)
    return {"source": source} | ({"earlier": earlier} if earlier is not None else {})


def mix_decision(source: str, seed: int, cut: Rank | None, written: set[str], shard: str, key: str, meta: SampleMeta):
    """Keep a sample ranked at most the cutoff, with its provenance in its JSON; drop any other as ``not_in_mix``."""
    rank = (sample_hash(seed, source, key), key, shard)
    if key in written and cut is not None and rank <= cut:
        return Decision.keep(replace(meta, extra=JsonDict(meta.extra | {PROVENANCE_KEY: provenance(source, meta)})))
    return Decision.drop(
        NOT_IN_MIX,
        f"not among the samples of source {source} chosen at seed {seed}",
        {"source": source, "seed": seed},
    )


class MixJudge:
    """The ``make_judge`` of :class:`RewriteShard` for one source: per shard, its written keys (from its index) and
    :func:`mix_decision`. Picklable: it holds the source's name, the seed and the cutoff only."""

    def __init__(self, source: str, seed: int, cut: Rank | None):
        self.source, self.seed, self.cut = source, seed, cut

    def __call__(self, path: str, groups) -> Judge:
        written, shard = set(written_keys(path)), shard_files(path).name
        return lambda key, meta, members: mix_decision(self.source, self.seed, self.cut, written, shard, key, meta)
