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
        help="drop unusable pairs: NSFW images, bad captions, near-copies, benchmark overlap; record faces",
        description="Curate a set of shards: score every image for NSFW content (open_nsfw) and find faces "
        "(optionally blurred); repair mojibake, keep allowed languages and lengths, drop captions that say "
        "nothing (file names, URLs, boilerplate, repeated words); with semdedup, drop near-copies by image "
        "embedding; with decontaminate, drop images and conversations that copy a benchmark. Writes curated "
        "shards and a dead-letter row with its reason for every pair dropped. The defaults need no config "
        "file. Unknown options go to Beam.",
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
    from visinstruct.cli.report import curation_lines, format_report
    from visinstruct.pipelines import curate

    cfg, inputs = load_job(CurateConfig, args)
    preflight(cfg, beam_args)
    with expected_errors():
        report = curate.run(cfg, inputs, beam_args)
    print(format_report(report))
    for line in curation_lines(report):
        print(line)
    return finish("curate", report, "curate")
