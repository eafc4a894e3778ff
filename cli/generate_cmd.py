"""``visinstruct generate --config FILE [--input SHARDS] [--out DIR] [beam options]``."""

from __future__ import annotations

import argparse

from visinstruct.cli.checks import expected_errors, preflight
from visinstruct.cli.jobs import add_job_arguments, finish, load_job
from visinstruct.configs import GenerateConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "generate",
        help="write LLaVA-style conversations for shards with an LLM",
        description="Turn captions, boxes and tags into conversations, detailed descriptions and "
        "complex-reasoning Q&A (or caption-only data), check every reply, and write "
        "shards whose JSON carries them. Unknown options go to Beam.",
    )
    add_job_arguments(parser, "generate")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    from visinstruct.pipelines import generate
    from visinstruct.pipelines.report import format_report

    cfg, inputs = load_job(GenerateConfig, args)
    preflight(cfg, beam_args)
    with expected_errors():
        report = generate.run(cfg, inputs, beam_args)
    print(format_report(report))
    print(
        f"  LLM calls: {report['backend_calls']}, tokens spent: {report['prompt_tokens_spent']} prompt + "
        f"{report['completion_tokens_spent']} completion ({report['completion_tokens']} completion tokens in "
        "written samples)"
    )
    return finish("generate", report, "generate")
