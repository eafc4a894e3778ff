"""``visinstruct generate --config FILE [--input SHARDS] [--out DIR] [beam options]``."""

from __future__ import annotations

import argparse

from visinstruct.cli.checks import expected_errors, preflight
from visinstruct.cli.filter_cmd import SHARDS_HELP
from visinstruct.cli.jobs import FlagKeys, add_run_arguments, finish, load_job
from visinstruct.configs import GenerateConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "generate",
        help="write LLaVA-style conversations for shards with an LLM",
        description="Turn captions, boxes and tags into conversations, detailed descriptions and "
        "complex-reasoning Q&A (or caption-only data), check every reply, and write "
        "shards whose JSON carries them. Unknown options go to Beam.",
    )
    add_run_arguments(parser, "generate", FlagKeys("input", "write.path"), SHARDS_HELP, set_example="llm_fraction=0.5")
    parser.set_defaults(run=run, accepts_beam_args=True)


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    from visinstruct.cli.report import format_llm_usage, format_report
    from visinstruct.pipelines import generate

    cfg, inputs = load_job(GenerateConfig, args)
    preflight(cfg, beam_args)
    with expected_errors():
        report = generate.run(cfg, inputs, beam_args)
    print(format_report(report))
    print(format_llm_usage(report))
    return finish("generate", report, "generate")
