"""``visinstruct mix``: a new shard set holding exactly the samples chosen from several sources, under keys
unique across the whole mix.

First, a source with an ``ingest`` section (LLaVA JSON, a Hugging Face dataset...) is ingested into
``OUT/_ingest/<name>/`` by the ingest pipeline (resumable like any ingest: a rerun skips its complete shards; its
``run_report.json`` stays there). Then the plan, from the sources' parquet indexes alone (no tar is opened)::

    each source's written keys -> rank = (sha256(seed, source name, key), key, shard name)
    weights -> counts by largest remainder over ``samples`` -> capped by ``max_samples`` (and what it has, unless
    it repeats) -> whole passes (repeat) and a partial pass: the smallest ranks up to the cutoff
    output shard numbers: sources in config order, each source's shards in number order

Graph (one branch per source; element shapes in comments)::

    tar paths -> Spread -> MixShard (rewrite_shard with the mix judge and rekey) -> ShardStats  into OUT/<name>/

The choice depends only on the seeds, the sources' names and their keys: not on shard order, workers or runner.
Keys: in output shard ``S`` the input rows, sorted by key, become ``make_key(S, 0..)`` and the second and later
copies of a sample the keys after them, so every key of the mix is unique (``validate``/``export`` over
``OUT/*/*.tar``). A chosen sample keeps its members (renamed, ``KEY.0.jpg`` too); its JSON gains
``"mix": {"source": NAME, "key": ORIGINAL}`` (and ``"copy": N`` for a source with ``repeat``; a sample of an
earlier mix keeps that record under ``earlier``). Every input row is accounted for in its output shard's index,
under its new key: a written sample left out is a ``not_in_mix`` row, rows earlier stages rejected are carried; the
dead letters of this run keep the source key (what names the row in its source). A source with ``repeat`` adds one
index row per extra copy, so ``inputs`` = its input rows + ``copies`` (``mix_report.json`` says how many).
"""

from __future__ import annotations

import json
import logging
from collections import Counter

import apache_beam as beam

from visinstruct.configs.mix import MixConfig
from visinstruct.pipelines.options import pipeline_options
from visinstruct.pipelines.report import check_inputs, dead_letter_reasons, input_rows, summarize, write_report
from visinstruct.transforms.layout import MIX_INGEST_DIR as INGEST_DIR
from visinstruct.transforms.layout import MIX_REPORT
from visinstruct.transforms.mix import (
    NOT_IN_MIX,
    STAGE,
    MixError,
    MixJudge,
    MixRekey,
    SourcePlan,
    ingest_config,
    plan_mix,
)
from visinstruct.transforms.rewrite import rewrite_shard
from visinstruct.transforms.rewrite_stage import count_drops
from visinstruct.transforms.shards import join, write_bytes
from visinstruct.transforms.timing import busy

log = logging.getLogger(__name__)


class MixShard(beam.DoFn):
    """A source's tar path -> the :class:`ShardStats` of its output shard (number ``first_shard + i``), rewritten
    with the mix judge under the mix's keys."""

    def __init__(self, plan: SourcePlan, out_dir: str, digits: int):
        self.plan, self.out_dir, self.digits = plan, out_dir, digits
        self.numbers = {path: plan.first_shard + i for i, path in enumerate(plan.shards)}

    def process(self, path):
        plan, number, dropped = self.plan, self.numbers[path], Counter()
        judge = MixJudge(plan.name, plan.seed, plan.cut, plan.passes)(path)
        rekey = MixRekey(plan, path, number, self.digits)
        with busy(STAGE):
            stats = rewrite_shard(path, None, self.out_dir, STAGE, judge, dropped, rekey=rekey, out_shard=number)
        count_drops(STAGE, dropped)
        log.info("mix: %s %s -> shard %05d: %d written of %d", plan.name, path, number, stats.written, stats.inputs)
        yield stats


class MixSource(beam.PTransform):
    """A source's tar paths -> the :class:`ShardStats` of its shards rewritten into ``OUT/<name>``."""

    def __init__(self, plan: SourcePlan, out: str, digits: int):
        super().__init__()
        self.plan, self.out, self.digits = plan, out, digits

    def expand(self, pbegin):
        plan = self.plan
        return (
            pbegin
            | "Shards" >> beam.Create(plan.shards)
            | "SpreadShards" >> beam.Reshuffle()  # tar path
            | "MixShard" >> beam.ParDo(MixShard(plan, join(self.out, plan.name), self.digits))
        )  # ShardStats


def combine(out: str, parts: dict[str, dict]) -> dict:
    """The run report of the whole mix from each source folder's (``summarize`` + ``check_inputs``)."""
    reasons: Counter = Counter()
    for part in parts.values():
        reasons.update(part["rejected_by_reason"])
    report = {"stage": STAGE, "output": out}
    for name in ("shards", "inputs", "written", "rejected", "tar_bytes"):
        report[name] = sum(part[name] for part in parts.values())
    report["rejected_by_reason"] = dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    report["shard_stats"] = [s | {"source": name} for name, part in parts.items() for s in part["shard_stats"]]
    if all("inputs_before" in part for part in parts.values()):
        report["inputs_before"] = sum(part["inputs_before"] for part in parts.values())
    unwritten = sum(part.get("shards_unwritten", 0) for part in parts.values())
    if unwritten:
        report["shards_unwritten"] = unwritten
    copies = sum(part.get("copies", 0) for part in parts.values())
    if copies:
        report["copies"] = copies
    report["accounted"] = all(part.get("accounted", True) for part in parts.values())
    return report


def mix_report(cfg: MixConfig, plans: list[SourcePlan], parts: dict[str, dict], lost: dict[str, dict]) -> dict:
    """``mix_report.json``: per source what it had, was asked, gave and why fewer; ``written`` from its shards, and
    ``lost``: this run's drops other than ``not_in_mix`` by reason (a chosen sample the tar did not give...)."""
    rows = []
    for source, plan in zip(cfg.sources, plans):
        rows.append(plan.report(source) | {"written": parts[plan.name]["written"], "lost": lost[plan.name]})
    return {
        "seed": cfg.seed,
        "samples": cfg.samples,
        "asked": sum(p.asked for p in plans),
        "taken": sum(p.taken for p in plans),
        "copies": sum(p.copies for p in plans),
        "written": sum(r["written"] for r in rows),
        "sources": rows,
    }


def shortfall(mix: dict) -> str | None:
    """One line naming the sources that wrote fewer samples than the plan chose (a sample the index lists that its
    tar does not give), or ``None``: the counts a mix promises are exact, so a shortfall fails the run."""
    short = [s for s in mix["sources"] if s["written"] != s["taken"]]
    if not short:
        return None
    parts = [
        f"source {s['name']} wrote {s['written']} of the {s['taken']} samples chosen "
        f"(lost: {', '.join(f'{r} {n}' for r, n in s['lost'].items()) or 'none recorded'})"
        for s in short
    ]
    return "; ".join(parts) + " - run `visinstruct validate` on those sources, repair or rebuild them, and mix again"


def ingest_sources(cfg: MixConfig, beam_args: list[str] | None) -> dict[str, dict]:
    """Ingest every source with an ``ingest`` section into ``OUT/_ingest/<name>`` (one ingest pipeline each, which
    skips the shards a run before finished); their run reports by source name. :class:`MixError` for one that
    wrote nothing."""
    from visinstruct.pipelines import ingest

    reports = {}
    for source in cfg.sources:
        if source.ingest is None:
            continue
        report = ingest.run(ingest_config(source, cfg.out), beam_args)
        if not report["written"]:
            reasons = ", ".join(f"{r} {n}" for r, n in list(report["rejected_by_reason"].items())[:3]) or "no rows"
            raise MixError(f"source {source.name!r}: its ingest wrote no samples ({reasons}); see {report['output']}")
        reports[source.name] = report
    return reports


def run(cfg: MixConfig, beam_args: list[str] | None = None, pipeline: beam.Pipeline | None = None) -> dict:
    """Ingest the sources that need it, plan the mix, write it into ``cfg.out`` (``OUT/<source>/`` shards,
    ``run_report.json``, ``mix_report.json``); returns the run report with the mix report under ``mix``.
    :class:`MixError` before the mix runs when the sources or the output folder do not allow it."""
    if not cfg.out:
        raise MixError("mix needs an output folder (out: or --out)")
    ingested = ingest_sources(cfg, beam_args)
    plans, digits = plan_mix(cfg)
    before = {p.name: input_rows(p.shards) for p in plans}
    p = pipeline or beam.Pipeline(options=pipeline_options(beam_args))
    for plan in plans:
        _ = p | f"Mix[{plan.name}]" >> MixSource(plan, cfg.out, digits)
    result = p.run()
    result.wait_until_finish()
    parts, lost = {}, {}
    for plan in plans:
        folder, rows = join(cfg.out, plan.name), before[plan.name]
        part = summarize(folder, stage=STAGE) | ({"copies": plan.copies} if plan.copies else {})
        # a repeating source's index holds a row per extra copy: its inputs are its rows plus those copies
        parts[plan.name] = check_inputs(part, None if rows is None else rows + plan.copies, len(plan.shards))
        write_report(folder, parts[plan.name])
        drops = dead_letter_reasons(folder)[STAGE]  # this run's dead letters: not_in_mix, and any sample it lost
        lost[plan.name] = {reason: n for reason, n in sorted(drops.items()) if reason != NOT_IN_MIX}
    report = combine(cfg.out, parts)
    report["mix"] = mix_report(cfg, plans, parts, lost)
    for row in report["mix"]["sources"]:
        if row["name"] in ingested:
            done = ingested[row["name"]]  # its folder relative to OUT, so two outputs of one config match
            row["ingest"] = {"folder": f"{INGEST_DIR}/{row['name']}"} | {
                k: done[k] for k in ("inputs", "written", "rejected")
            }
    write_report(cfg.out, report)
    write_bytes(join(cfg.out, MIX_REPORT), (json.dumps(report["mix"], indent=1) + "\n").encode())
    return report
