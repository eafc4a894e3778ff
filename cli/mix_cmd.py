"""``visinstruct mix --config FILE [--out DIR] [--set KEY=VALUE] [beam options]``: a new shard set drawn from
several of ours by exact counts or weights, with each sample's source and a report of what was taken."""

from __future__ import annotations

import argparse
import sys

from visinstruct.cli.errors import UserError
from visinstruct.cli.jobs import FlagKeys, add_run_arguments, finish, load_run
from visinstruct.configs import MixConfig

INPUT_HELP = "not taken by mix: each source names its own shards (sources[].input in the config)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "mix",
        help="mix shard sets by exact counts or weights into a new shard set, with provenance",
        description="Draw samples from several shard sets of ours (each a source with a weight or an exact count) "
        "into OUT/<source>/ shards; each chosen sample's JSON names its source, the others are not_in_mix dead "
        "letters, and OUT/mix_report.json says what each source had, was asked and gave. The choice is a seeded "
        "hash of (seed, source, key): the same config gives the same bytes. No source is upsampled. Unknown "
        "options go to Beam.",
    )
    add_run_arguments(parser, "mix", FlagKeys("sources", "out"), INPUT_HELP, set_example="samples=1000")
    parser.set_defaults(run=run, accepts_beam_args=True)


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    from visinstruct.cli.report import format_report
    from visinstruct.pipelines import mix

    if args.input:
        raise UserError("mix takes no --input: each source names its shards in the config (sources[].input)")
    cfg = load_run(MixConfig, args)
    if not cfg.out:
        raise UserError("needs an output folder (out: or --out)")
    try:
        report = mix.run(cfg, beam_args)
    except mix.MixError as e:
        raise UserError(str(e)) from None
    print(format_report(report))
    print(format_mix(report["mix"]))
    status = finish("mix", report, mix.STAGE)
    line = mix.shortfall(report["mix"])
    if status == 0 and line is not None:
        print(f"visinstruct mix: failed: {line}", file=sys.stderr)
        return 1
    return status


def format_mix(mix: dict) -> str:
    """Per source: written samples it had, asked, taken, and why fewer; then the totals."""
    width = max(len(s["name"]) for s in mix["sources"])
    lines = [f"  {'source':<{width}}  {'available':>9}  {'asked':>8}  {'taken':>8}  {'written':>8}"]
    for s in mix["sources"]:
        why = ""
        if s["short"] == "max_samples":
            why = f"  (capped at max_samples {s['max_samples']})"
        elif s["short"] == "not_enough":
            why = f"  (not enough: it has {s['available']}; no upsampling)"
        lines.append(
            f"  {s['name']:<{width}}  {s['available']:>9}  {s['asked']:>8}  {s['taken']:>8}  {s['written']:>8}{why}"
        )
    lines.append(f"  mix: {mix['written']} samples written of {mix['asked']} asked (seed {mix['seed']})")
    return "\n".join(lines)
