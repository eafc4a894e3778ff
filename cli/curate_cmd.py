"""``visinstruct curate [--config FILE] --input SHARDS --out DIR [--set KEY=VALUE] [beam options]``."""

from __future__ import annotations

import argparse

from visinstruct.cli.checks import expected_errors, preflight
from visinstruct.cli.filter_cmd import SHARDS_HELP
from visinstruct.cli.jobs import FlagKeys, add_run_arguments, finish, load_job
from visinstruct.configs import CurateConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "curate",
        help="drop pairs whose caption is unusable (mojibake, wrong language, file names, URLs...)",
        description="Check every caption of a set of shards: repair mojibake, keep allowed languages and "
        "lengths, drop captions that say nothing (file names, URLs, boilerplate, repeated words); "
        "write curated shards and a dead-letter row with its reason for every pair dropped. The "
        "defaults need no config file. Unknown options go to Beam.",
    )
    add_run_arguments(
        parser,
        "curate",
        FlagKeys("input", "write.path"),
        SHARDS_HELP,
        config_required=False,
        set_example="text.languages=[en]",
    )
    parser.set_defaults(run=run, accepts_beam_args=True)


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    from visinstruct.cli.report import format_report
    from visinstruct.pipelines import curate

    cfg, inputs = load_job(CurateConfig, args)
    preflight(cfg, beam_args)
    with expected_errors():
        report = curate.run(cfg, inputs, beam_args)
    print(format_report(report))
    if report.get("fixed_mojibake"):
        print(f"  captions repaired (mojibake): {report['fixed_mojibake']}")
    return finish("curate", report, "curate")
