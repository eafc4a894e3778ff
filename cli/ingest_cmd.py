"""``visinstruct ingest --config FILE [--set KEY=VALUE] [beam options]``."""

from __future__ import annotations

import argparse

from visinstruct.configs import IngestConfig, load


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "ingest",
        help="download, validate, resize, dedup and shard image-text pairs",
        description="Read URL lists, folders, COCO or LLaVA JSON; write WebDataset shards with "
        "a parquet index, stats and dead-letter tables. Unknown options go to Beam.",
    )
    parser.add_argument("--config", required=True, help="YAML file (see `visinstruct config show ingest`)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable), e.g. --set download.threads=16",
    )
    parser.set_defaults(run=run, accepts_beam_args=True)


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    from visinstruct.cli.checks import expected_errors, preflight
    from visinstruct.cli.jobs import finish
    from visinstruct.pipelines.ingest import run as run_ingest  # Beam loads only when a pipeline runs
    from visinstruct.pipelines.report import format_report

    cfg = load(IngestConfig, args.config, args.overrides)
    preflight(cfg, beam_args)
    with expected_errors():
        report = run_ingest(cfg, beam_args)
    print(format_report(report))
    return finish("ingest", report, "ingest")
