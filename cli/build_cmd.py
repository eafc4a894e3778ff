"""``visinstruct build --config FILE [--input SHARDS] [--out DIR] [--set KEY=VALUE] [beam options]``: every stage
in one Beam graph."""

from __future__ import annotations

import argparse

from visinstruct.cli.jobs import FlagKeys, add_run_arguments
from visinstruct.configs import BuildConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "build",
        help="ingest, filter and generate in one Beam graph",
        description="URL lists (or folders, COCO, LLaVA JSON) to training-ready shards: ingest, "
        "CLIP filter and conversation generation composed in one pipeline; the config holds each "
        "stage's own config (a null stage is skipped), and --input starts from existing shards "
        "instead of ingesting. Unknown options go to Beam.",
    )
    add_run_arguments(
        parser,
        "build",
        FlagKeys("input", "out", input_clears=("ingest",)),
        "start from these shards (folder, glob or brace pattern of .tar files) instead of ingesting; "
        "sets ingest: null",
        set_example="filter.threshold=0.3",
    )
    parser.set_defaults(run=run, accepts_beam_args=True)


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    from visinstruct.cli.checks import expected_errors, preflight
    from visinstruct.cli.jobs import finish, input_shards, load_run
    from visinstruct.cli.report import format_build_report
    from visinstruct.pipelines.build import run as run_build
    from visinstruct.pipelines.report import BUILD_PREFIXES

    cfg = load_run(BuildConfig, args)
    inputs = input_shards(cfg.input) if cfg.input is not None else None
    preflight(cfg, beam_args)
    with expected_errors():
        report = run_build(cfg, beam_args, inputs)
    print(format_build_report(report))
    status = finish("build", report, report["stages"][-1]["stage"], BUILD_PREFIXES)
    if status == 0 and cfg.ingest is not None and cfg.ingest.write.energon:
        from visinstruct.cli.energon_cmd import after_run

        after_run(cfg.out)
    return status
