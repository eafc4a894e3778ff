"""Which samples a mix takes and under which keys, as plain functions: ``visinstruct mix``'s plan, judge and
rekeying (the pipeline is ``pipelines/mix.py``).

Each source's written keys (read from its parquet indexes, no tar opened) are ranked by
``(sha256(seed, source name, key), key, shard name)``; weights become counts by largest remainder over ``samples``,
capped by ``max_samples`` and, unless the source has ``repeat``, by what it has. A source of ``A`` samples asked for
``n`` gives each sample ``n // A`` copies (whole passes; 0 without ``repeat``) plus one more for the ``n % A``
smallest ranks (the partial pass, whose largest rank is the cutoff). The choice depends only on the seed, the names
and the keys.

Keys: output shards are numbered across the whole mix (sources in config order, each source's shards in number
order from its ``first_shard``), one per input shard; in output shard ``S`` the input rows, sorted by key, take
keys ``make_key(S, 0..rows-1)``, and the second and later copies of samples take the keys after them, in
(copy, row) order. Every key of the mix is unique; a written sample's JSON keeps its source key in
``"mix": {"source", "key", "copy"}``.
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

from visinstruct.configs import IngestConfig
from visinstruct.configs.mix import MixConfig, MixSourceConfig
from visinstruct.schemas import Decision, IndexRow, SampleMeta
from visinstruct.schemas.arrow import JsonDict
from visinstruct.schemas.keys import index_digits, make_key, shard_name
from visinstruct.transforms.layout import MIX_INGEST_DIR as INGEST_DIR
from visinstruct.transforms.layout import ShardError, index_of, resolve_shards, shard_files
from visinstruct.transforms.rewrite import Judge
from visinstruct.transforms.shards import exists, is_remote, join, match, read_table

STAGE = "mix"
NOT_IN_MIX = "not_in_mix"  # a written sample the mix did not choose
NOT_ENOUGH = "not_enough"  # a source has fewer written samples than asked
CAPPED = "max_samples"  # a weighted source's share is over its max_samples
PROVENANCE_KEY = "mix"  # the sample JSON's key holding {"source": NAME, "key": ORIGINAL, "copy": N}

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
    return shard_keys(tar)[0]


def shard_keys(tar: str) -> tuple[list[str], list[str]]:
    """A shard's written keys (in index order) and every key its index lists, written or not (sorted, each once:
    the rows its output shard keys), from one read of the index."""
    table = read_table(index_of(tar), IndexRow, ["key", "status"])
    keys, statuses = table.column("key").to_pylist(), table.column("status").to_pylist()
    return [k for k, status in zip(keys, statuses) if status == "success"], sorted(set(keys))


def cutoff(ranks: list[Rank], n: int) -> Rank | None:
    """The ``n``-th smallest rank (``None`` when ``n`` is 0): the samples ranked at most it are the ``n`` chosen."""
    return heapq.nsmallest(n, ranks)[-1] if n > 0 else None


@dataclass(frozen=True)
class SourcePlan:
    """What the mix takes from one source, under which shard numbers, and why it is fewer than asked when it is."""

    name: str
    input: str
    shards: list[str]  # in shard number order: the i-th becomes output shard first_shard + i
    available: int  # written samples in its indexes
    asked: int  # its count, or its share of the weighted total
    taken: int  # min(asked, max_samples) and, without repeat, available
    short: str | None  # why taken < asked: max_samples or not_enough
    cut: Rank | None  # the largest rank of the partial pass
    seed: int = 0  # the source's seed, or the mix's
    passes: int = 0  # whole passes: copies every written sample gives (0 without repeat)
    repeat: bool = False
    first_shard: int = 0  # the output shard number of its first shard
    slots: tuple[int, ...] = ()  # per shard: the keys its output shard needs (rows, plus copies after the first)

    @property
    def copies(self) -> int:
        """Samples written as a second or later copy of a sample (rows the output has beyond its input's)."""
        return self.taken - min(self.taken, self.available)

    def report(self, source: MixSourceConfig) -> dict:
        """Its row of ``mix_report.json`` (no paths of shards, no timings: the same config gives the same bytes)."""
        return {
            "name": self.name,
            "input": source.input if source.input is not None else source.ingest.read.path,
            "shards": len(self.shards),
            "first_shard": self.first_shard,
            "seed": self.seed,
            "weight": source.weight,
            "count": source.count,
            "max_samples": source.max_samples,
            "repeat": self.repeat,
            "available": self.available,
            "asked": self.asked,
            "taken": self.taken,
            "copies": self.copies,
            "short": self.short,
        }


def source_input(source: MixSourceConfig, out: str | None) -> str:
    """Where a source's shards are: its ``input``, or the folder mix ingests it into (``OUT/_ingest/<name>``)."""
    return source.input if source.input is not None else join(out or ".", INGEST_DIR, source.name)


def ingest_config(source: MixSourceConfig, out: str) -> IngestConfig:
    """The ingest a source with an ``ingest`` section runs first: its settings, written to ``OUT/_ingest/<name>``."""
    return replace(source.ingest, write=replace(source.ingest.write, path=source_input(source, out)))


def source_shards(source: MixSourceConfig, spec: str) -> list[str]:
    """The source's shards in number order, each complete (its index and ``_stats.json`` present);
    :class:`MixError` otherwise."""
    try:
        tars = [t for t in resolve_shards(spec) if exists(t)]
    except ShardError as e:
        raise MixError(f"source {source.name!r}: {e}") from None
    if not tars:
        raise MixError(f"source {source.name!r}: {spec} has no .tar shards")
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
    return sorted(tars, key=lambda t: shard_files(t).number)


def plan_source(
    source: MixSourceConfig, asked: int, seed: int, out: str | None = None, first_shard: int = 0
) -> SourcePlan:
    """Rank the source's written samples and take the ``asked`` smallest, capped by ``max_samples`` and (without
    ``repeat``) by what it has; with ``repeat``, whole passes and a partial one. ``seed`` is the mix's (the
    source's own wins); ``first_shard`` the output number of its first shard."""
    spec, seed = source_input(source, out), seed if source.seed is None else source.seed
    shards = source_shards(source, spec)
    ranked = []  # per shard: the ranks of its written samples, and how many rows its index has
    for tar in shards:
        written, rows = shard_keys(tar)
        name = shard_files(tar).name
        ranked.append(([(sample_hash(seed, source.name, key), key, name) for key in written], len(rows)))
    ranks = [rank for shard_ranks, _ in ranked for rank in shard_ranks]
    available = len(ranks)
    cap = asked if source.max_samples is None else min(asked, source.max_samples)
    taken = cap if source.repeat and available else min(cap, available)
    short = None
    if taken < asked:  # capped: max_samples bound it, not what the source has (which repeat makes no bound)
        capped = source.max_samples is not None and taken == source.max_samples
        short = CAPPED if capped and (source.max_samples < available or source.repeat and available) else NOT_ENOUGH
    passes, partial = divmod(taken, available) if source.repeat and available else (0, taken)
    cut = cutoff(ranks, partial)
    # a shard's keys: its rows, then the copies after each sample's first
    slots = [
        rows + sum(max(copies_of(*rank, passes, cut) - 1, 0) for rank in shard_ranks) for shard_ranks, rows in ranked
    ]
    return SourcePlan(
        source.name,
        spec,
        shards,
        available,
        asked,
        taken,
        short,
        cut,
        seed,
        passes,
        source.repeat,
        first_shard,
        tuple(slots),
    )


def copies_of(hash_: int, key: str, shard: str, passes: int, cut: Rank | None) -> int:
    """How many times a written sample is in the mix: the whole passes, plus one when the partial pass takes it."""
    return passes + (cut is not None and (hash_, key, shard) <= cut)


def check_output(out: str, plans: list[SourcePlan]) -> None:
    """Refuse an output that would overwrite a source (a source's own folder) or hold shards no source writes (an
    earlier mix's: they would read as part of this one)."""
    mine = {(p.name, shard_name(p.first_shard + i)) for p in plans for i in range(len(p.shards))}
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


def plan_mix(cfg: MixConfig) -> tuple[list[SourcePlan], int]:
    """Every source's plan, in config order, with shard numbers following one another, and the digits of the
    index part of every key of the mix (one width, so keys sort); :class:`MixError` for a source that cannot be
    read or an output that would overwrite one."""
    asked, plans, first = asked_counts(cfg), [], 0
    for source in cfg.sources:
        plans.append(plan_source(source, asked[source.name], cfg.seed, cfg.out, first))
        first += len(plans[-1].shards)
    if first > 10**5:
        raise MixError(f"the sources hold {first} shards; a mix numbers at most 100000")
    check_output(cfg.out, plans)
    return plans, index_digits(max((n for p in plans for n in p.slots), default=1) or 1)


def provenance(source: str, key: str, meta: SampleMeta) -> dict:
    """``{"source": NAME, "key": ORIGINAL}``; a sample of an earlier mix keeps that mix's record under ``earlier``."""
    earlier = meta.extra.get(PROVENANCE_KEY)
    return {"source": source, "key": key} | ({"earlier": earlier} if earlier is not None else {})


def mix_decision(
    source: str,
    seed: int,
    cut: Rank | None,
    written: set[str],
    shard: str,
    key: str,
    meta: SampleMeta,
    passes: int = 0,
):
    """Keep a sample the mix takes (every written one after a whole pass, else one ranked at most the cutoff) with
    its provenance in its JSON; drop any other as ``not_in_mix``."""
    taken = key in written and copies_of(sample_hash(seed, source, key), key, shard, passes, cut) > 0
    if taken:
        return Decision.keep(
            replace(meta, extra=JsonDict(meta.extra | {PROVENANCE_KEY: provenance(source, key, meta)}))
        )
    return Decision.drop(
        NOT_IN_MIX,
        f"sample {key} of source {source} is not among those chosen at seed {seed}",
        {"source": source, "seed": seed},
    )


class MixJudge:
    """The judge of one source's shards: per shard, its written keys (from its index) and :func:`mix_decision`.
    Picklable: it holds the source's name, the seed, the cutoff and the passes only."""

    def __init__(self, source: str, seed: int, cut: Rank | None, passes: int = 0):
        self.source, self.seed, self.cut, self.passes = source, seed, cut, passes

    def __call__(self, path: str, groups=None) -> Judge:
        written, shard = set(written_keys(path)), shard_files(path).name

        def judge(key, meta, members):
            return mix_decision(self.source, self.seed, self.cut, written, shard, key, meta, self.passes)

        return judge


class MixRekey:
    """The :class:`~visinstruct.transforms.rewrite.Rekey` of one input shard: its rows, sorted by key, take keys
    ``make_key(out_shard, 0..)``; the second and later copies of its samples the keys after them, in (copy, row)
    order; a key its index lacks (a sample only the tar holds) the next one free."""

    def __init__(self, plan: SourcePlan, path: str, out_shard: int, digits: int):
        self.out_shard, self.digits, self.repeat, self.source = out_shard, digits, plan.repeat, plan.name
        (written, rows), name = shard_keys(path), shard_files(path).name
        ordered = rows  # sorted, each once
        self.slots = {key: [i] for i, key in enumerate(ordered)}
        counts = {k: copies_of(sample_hash(plan.seed, plan.name, k), k, name, plan.passes, plan.cut) for k in written}
        self.next = len(ordered)
        for n in range(1, max(counts.values(), default=0)):
            for key in ordered:
                if counts.get(key, 0) > n:
                    self.slots[key].append(self.next)
                    self.next += 1

    def keys(self, key: str) -> list[str]:
        if key not in self.slots:  # not in the index: the tar's alone (it is no sample the mix takes)
            self.slots[key], self.next = [self.next], self.next + 1
        return [make_key(self.out_shard, slot, self.digits) for slot in self.slots[key]]

    def copy(self, meta: SampleMeta, key: str, n: int) -> SampleMeta:
        return copy_meta(meta, key, n, self.repeat)

    def carried(self, row: IndexRow, key: str) -> IndexRow:
        """A row rejected before the mix, under its new key: its source in ``mix_source``, its source key in the
        message (``source key K: why``), so it traces back to the row it was."""
        why = row.error_message or row.status
        return replace(row, key=key, mix_source=self.source, error_message=f"source key {row.key}: {why}"[:1000])


def copy_meta(meta: SampleMeta, key: str, n: int, repeat: bool) -> SampleMeta:
    """Copy ``n`` of a chosen sample under ``key``: its JSON's key, and ``copy`` in its mix record when its source
    repeats (``{"source", "key", "copy", "earlier"}``, in that order)."""
    record = dict(meta.extra.get(PROVENANCE_KEY) or {})
    if repeat:
        earlier = record.pop("earlier", None)
        record |= {"copy": n} | ({"earlier": earlier} if earlier is not None else {})
    return replace(meta, key=key, extra=JsonDict(meta.extra | {PROVENANCE_KEY: record}))
