"""``visinstruct mix``: a new shard set holding exactly the samples chosen from several of ours.

Plan (before the pipeline, from the sources' parquet indexes alone; no tar is opened)::

    each source's written keys -> rank = (sha256(seed, source name, key), key, shard name)
    weights -> counts by largest remainder over ``samples`` -> capped by what the source has and ``max_samples``
    the count's smallest rank -> the source's cutoff: a sample is in the mix when its rank is at most the cutoff

Graph (one branch per source; element shapes in comments)::

    tar paths -> Spread -> (path, {}) -> RewriteShard(mix judge) -> ShardStats   into OUT/<source name>/

The choice depends only on the seed, the source's name and its keys: not on shard order, workers or runner. Every
input row is accounted for: a written sample left out is a ``not_in_mix`` dead letter; rows earlier stages rejected
are carried. A chosen sample keeps its members; its JSON gains ``"mix": {"source": NAME}`` (provenance). No source
is upsampled: one asked for more than it has gives what it has, and ``mix_report.json`` says so. A sample drawn
from an earlier mix keeps that mix's record: ``"mix": {"source": NAME, "earlier": {"source": ...}}``.
"""

from __future__ import annotations

import json
from collections import Counter

import apache_beam as beam

from visinstruct.configs.mix import MixConfig
from visinstruct.pipelines.options import pipeline_options
from visinstruct.pipelines.report import check_inputs, dead_letter_reasons, input_rows, summarize, write_report
from visinstruct.transforms.mix import MIX_REPORT, NOT_IN_MIX, STAGE, MixError, MixJudge, SourcePlan, plan_mix
from visinstruct.transforms.rewrite_stage import RewriteShard
from visinstruct.transforms.shards import join, write_bytes


class MixSource(beam.PTransform):
    """A source's tar paths -> the :class:`ShardStats` of its shards rewritten into ``OUT/<name>``."""

    def __init__(self, plan: SourcePlan, out: str, seed: int):
        super().__init__()
        self.plan, self.out, self.seed = plan, out, seed

    def expand(self, pbegin):
        plan = self.plan
        positions = {path: i for i, path in enumerate(plan.shards)}
        judge = MixJudge(plan.name, self.seed, plan.cut)
        return (
            pbegin
            | "Shards" >> beam.Create(plan.shards)
            | "SpreadShards" >> beam.Reshuffle()
            | "NoGroups" >> beam.Map(lambda path: (path, {}))  # (path, groups) as RewriteShard takes it
            | "RewriteShard" >> beam.ParDo(RewriteShard(STAGE, join(self.out, plan.name), positions, judge))
        )


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


def run(cfg: MixConfig, beam_args: list[str] | None = None, pipeline: beam.Pipeline | None = None) -> dict:
    """Plan the mix, write it into ``cfg.out`` (``OUT/<source>/`` shards, ``run_report.json``, ``mix_report.json``);
    returns the run report with the mix report under ``mix``. :class:`MixError` before anything runs when the
    sources or the output folder do not allow the mix."""
    if not cfg.out:
        raise MixError("mix needs an output folder (out: or --out)")
    plans = plan_mix(cfg)
    before = {p.name: (input_rows(p.shards), len(p.shards)) for p in plans}
    p = pipeline or beam.Pipeline(options=pipeline_options(beam_args))
    for plan in plans:
        _ = p | f"Mix[{plan.name}]" >> MixSource(plan, cfg.out, cfg.seed)
    result = p.run()
    result.wait_until_finish()
    parts, lost = {}, {}
    for plan in plans:
        folder = join(cfg.out, plan.name)
        parts[plan.name] = check_inputs(summarize(folder, stage=STAGE), *before[plan.name])
        write_report(folder, parts[plan.name])
        drops = dead_letter_reasons(folder)[STAGE]  # this run's dead letters: not_in_mix, and any sample it lost
        lost[plan.name] = {reason: n for reason, n in sorted(drops.items()) if reason != NOT_IN_MIX}
    report = combine(cfg.out, parts)
    report["mix"] = mix_report(cfg, plans, parts, lost)
    write_report(cfg.out, report)
    write_bytes(join(cfg.out, MIX_REPORT), (json.dumps(report["mix"], indent=1) + "\n").encode())
    return report
