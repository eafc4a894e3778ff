"""``visinstruct build --config FILE [--input SHARDS] [--out DIR] [--set KEY=VALUE] [beam options]``: every stage
in one Beam graph."""

from __future__ import annotations

import argparse

from visinstruct.configs import BuildConfig, load


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "build",
        help="ingest, filter and generate in one Beam graph",
        description="URL lists (or folders, COCO, LLaVA JSON) to training-ready shards: ingest, "
        "CLIP filter and conversation generation composed in one pipeline; a null "
        "stage in the config is skipped, and --input starts from existing shards "
        "instead of ingesting. Unknown options go to Beam.",
    )
    parser.add_argument("--config", required=True, help="YAML file (see `visinstruct config show build`)")
    parser.add_argument(
        "--input",
        help="start from these shards (folder, glob or brace pattern of .tar files) "
        "instead of ingesting; sets read: null",
    )
    parser.add_argument("--out", help="output folder (overrides write.path)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable), e.g. --set filter.threshold=0.3",
    )
    parser.set_defaults(run=run, accepts_beam_args=True)


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    from visinstruct.cli.checks import expected_errors, preflight
    from visinstruct.cli.jobs import finish, input_shards
    from visinstruct.pipelines.build import format_build_report
    from visinstruct.pipelines.build import run as run_build

    overrides = list(args.overrides)
    overrides += ["read=null", f"input={args.input}"] if args.input else []
    overrides += [f"write.path={args.out}"] if args.out else []
    cfg = load(BuildConfig, args.config, overrides)
    inputs = input_shards(cfg.input) if cfg.input is not None else None
    preflight(cfg, beam_args)
    with expected_errors():
        report = run_build(cfg, beam_args, inputs)
    print(format_build_report(report))
    return finish("build", report, report["stages"][-1]["stage"], {"filter": "filter.", "generate": "generate."})
