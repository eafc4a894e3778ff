"""``visinstruct mix --config FILE [--out DIR] [--set KEY=VALUE] [beam options]``: a new shard set drawn from
several sources (shard sets, or inputs ingested first) by exact counts or weights, under keys unique across the
mix, with each sample's source and a report of what was taken."""

from __future__ import annotations

import argparse
import sys

from visinstruct.cli.errors import UserError
from visinstruct.cli.jobs import FlagKeys, add_run_arguments, finish, load_run
from visinstruct.configs import MixConfig

INPUT_HELP = "not taken by mix: each source names its own shards or input (sources[].input or sources[].ingest)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "mix",
        help="mix shard sets by exact counts or weights into a new shard set, with provenance",
        description="Draw samples from several sources (shard sets of ours or img2dataset's, or LLaVA JSON, Hugging "
        "Face datasets and other inputs ingested first into OUT/_ingest/<source>/), each with a weight or an "
        "exact count, into OUT/<source>/ shards numbered across the mix, each sample under a new key unique in "
        "the mix; its JSON names its source and source key, the samples not chosen are not_in_mix dead letters, "
        "and OUT/mix_report.json says what each source had, was asked and gave. The choice is a seeded hash of "
        "(seed, source, key): the same config gives the same bytes. A source with repeat: true gives copies when "
        "asked for more than it has. Unknown options go to Beam.",
    )
    add_run_arguments(parser, "mix", FlagKeys("sources", "out"), INPUT_HELP, set_example="samples=1000")
    parser.set_defaults(run=run, accepts_beam_args=True)


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    from visinstruct.cli.checks import expected_errors
    from visinstruct.cli.report import format_report
    from visinstruct.pipelines import mix

    if args.input:
        raise UserError(
            "mix takes no --input: each source names its own in the config (sources[].input or sources[].ingest)"
        )
    cfg = load_run(MixConfig, args)
    if not cfg.out:
        raise UserError("needs an output folder (out: or --out)")
    check_ingests(cfg, beam_args)
    try:
        with expected_errors():
            report = mix.run(cfg, beam_args)
    except mix.MixError as e:
        raise UserError(str(e)) from None
    print(format_report(report))
    print(format_mix(report["mix"]))
    status = finish("mix", report, mix.STAGE)
    if status == 0 and cfg.energon:
        write_energon(cfg.out, report["mix"])
    line = mix.shortfall(report["mix"])
    if status == 0 and line is not None:
        print(f"visinstruct mix: failed: {line}", file=sys.stderr)
        return 1
    return status


def write_energon(out: str, mix: dict) -> None:
    """``energon: true``: each source folder's energon metadata and ``OUT/energon.yaml`` blending them."""
    from visinstruct.transforms.energon import write_mix_metadata
    from visinstruct.transforms.shards import join

    done = write_mix_metadata(out, [(join(out, s["name"]), s["written"]) for s in mix["sources"]])
    samples = sum(summary["samples"] for summary in done["sources"].values())
    print(f"energon metadata: {samples} samples in {len(done['sources'])} source folders, blended by {done['blend']}")


def check_ingests(cfg: MixConfig, beam_args: list[str]) -> None:
    """Ingest's own checks (inputs exist...) for every source mix ingests, before anything runs: one line."""
    from visinstruct.cli.checks import preflight
    from visinstruct.transforms.mix import ingest_config

    for source in cfg.sources:
        if source.ingest is not None:
            try:
                preflight(ingest_config(source, cfg.out), beam_args)
            except UserError as e:
                raise UserError(f"source {source.name!r}: ingest: {e}") from None


def format_mix(mix: dict) -> str:
    """Per source: written samples it had, asked, taken, and why fewer; then the totals."""
    width = max(len(s["name"]) for s in mix["sources"])
    lines = [f"  {'source':<{width}}  {'available':>9}  {'asked':>8}  {'taken':>8}  {'written':>8}"]
    for s in mix["sources"]:
        why = ""
        if s["short"] == "max_samples":
            why = f"  (capped at max_samples {s['max_samples']})"
        elif s["short"] == "not_enough":
            why = f"  (not enough: it has {s['available']}{'' if s['repeat'] else '; repeat: true to give copies'})"
        elif s["copies"]:
            why = f"  ({s['copies']} copies: repeat)"
        lines.append(
            f"  {s['name']:<{width}}  {s['available']:>9}  {s['asked']:>8}  {s['taken']:>8}  {s['written']:>8}{why}"
        )
    for s in mix["sources"]:
        if "ingest" in s:
            done = s["ingest"]
            lines.append(
                f"  {s['name']}: ingested {done['inputs']} rows of {s['input']} into {done['folder']}/: "
                f"{done['written']} samples, {done['rejected']} rejected"
            )
    lines.append(f"  mix: {mix['written']} samples written of {mix['asked']} asked (seed {mix['seed']})")
    return "\n".join(lines)
