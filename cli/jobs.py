"""What the commands that rewrite shards (filter, generate) share: input, output and config arguments."""

from __future__ import annotations

import argparse

from visinstruct.cli.errors import UserError
from visinstruct.configs import load


def add_job_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--config", required=True, help=f"YAML file (see `visinstruct config show {name}`)")
    parser.add_argument("--input", help="input shards: a folder, a glob or a brace pattern of .tar files")
    parser.add_argument("--out", help="output folder (overrides write.path)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable)",
    )
    parser.set_defaults(accepts_beam_args=True)


def load_job(cls: type, args: argparse.Namespace):
    """The job's config (with ``--input``/``--out`` applied) and its input tars, or a one-line UserError."""
    overrides = list(args.overrides)
    if args.input:
        overrides.append(f"input={args.input}")
    if args.out:
        overrides.append(f"write.path={args.out}")
    cfg = load(cls, args.config, overrides)
    if not cfg.input or cfg.write is None:
        raise UserError("needs input shards (input: or --input) and an output folder (write.path: or --out)")
    return cfg, input_shards(cfg.input)


def input_shards(spec: str) -> list[str]:
    """The tars an ``input:`` spec names (folder, glob or brace pattern), or a one-line UserError when none."""
    from visinstruct.cli.shards import ShardError, resolve_shards
    from visinstruct.transforms.shards import exists

    try:
        inputs = [p for p in resolve_shards(spec) if exists(p)]
    except ShardError as e:
        raise UserError(str(e)) from None
    if not inputs:
        raise UserError(f"{spec}: no .tar shards to read")
    return inputs


def add_train_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """``--config``, ``--out`` and ``--set`` of the training commands."""
    parser.add_argument("--config", required=True, help=f"YAML file (see `visinstruct config show {name}`)")
    parser.add_argument("--out", help="output folder (overrides out)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key (repeatable), e.g. --set steps=200",
    )


def load_train(cls: type, args: argparse.Namespace):
    """A training config with ``--out`` and ``--set`` applied."""
    return load(cls, args.config, list(args.overrides) + ([f"out={args.out}"] if args.out else []))


def is_main_process() -> bool:
    """Under torchrun only rank 0 prints the summary."""
    import os

    return os.environ.get("RANK", "0") == "0"


def finish(command: str, report: dict, stage: str, prefixes: dict[str, str] | None = None) -> int:
    """The exit status of a pipeline command: 0, or 1 with one line on stderr saying what failed and what to change.

    A run that wrote nothing or whose rows do not add up has failed, whatever Beam says (see ``failure_summary``).
    """
    import sys

    from visinstruct.pipelines.report import failure_summary

    line = failure_summary(report, stage, prefixes)
    if line is None:
        return 0
    print(f"visinstruct {command}: failed: {line}", file=sys.stderr)
    return 1
