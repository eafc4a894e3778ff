"""The arguments every pipeline and training command shares, defined once: ``--config``, ``--input``, ``--out``
and ``--set``, and how they fill the command's config.

``--input`` and ``--out`` mean the same thing everywhere (what the command reads, where it writes); each command
says which config key they set (:class:`FlagKeys`), and ``--help`` names it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from visinstruct.cli.errors import UserError
from visinstruct.configs import ConfigError, apply_overrides, from_dict, load

TRAINING_SHARDS = "training shards: a folder, a glob or a brace pattern of .tar files"


@dataclass(frozen=True)
class FlagKeys:
    """The config keys ``--input`` and ``--out`` set; ``input_clears``: keys ``--input`` sets to null too (a build
    that starts from shards drops its ingest section)."""

    input: str
    out: str
    input_clears: tuple[str, ...] = ()


def add_run_arguments(
    parser: argparse.ArgumentParser,
    name: str,
    keys: FlagKeys,
    input_help: str,
    *,
    config_required: bool = True,
    input_aliases: tuple[str, ...] = (),
    out_aliases: tuple[str, ...] = (),
    set_example: str = "KEY=VALUE",
) -> None:
    """``--config``, ``--input``, ``--out`` and ``--set`` for command ``name``, whose config takes them at ``keys``."""
    parser.add_argument("--config", required=config_required, help=f"YAML file (see `visinstruct config show {name}`)")
    parser.add_argument("--input", *input_aliases, dest="input", help=f"{input_help} (sets {keys.input})")
    parser.add_argument("--out", *out_aliases, dest="out", help=f"output folder (sets {keys.out})")
    add_set_argument(parser, set_example)
    parser.set_defaults(flag_keys=keys)


def add_set_argument(parser: argparse.ArgumentParser, example: str) -> None:
    """``--set KEY=VALUE`` (repeatable): a config key on the command line, its value parsed as YAML."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config key (repeatable), e.g. --set {example}",
    )


def quoted(key: str, value: str) -> str:
    """An override setting ``key`` to the text ``value`` as it is (JSON is YAML: a path never turns into a number)."""
    return f"{key}={json.dumps(value)}"


def load_run(cls: type, args: argparse.Namespace, flag_overrides: list[str] | None = None):
    """The command's config: the ``--config`` file (or defaults), then ``flag_overrides``, ``--set``, ``--input``
    and ``--out`` in that order, checked once by the loader."""
    keys: FlagKeys = args.flag_keys
    overrides = list(flag_overrides or []) + list(args.overrides)
    if args.input:
        overrides += [f"{key}=null" for key in keys.input_clears] + [quoted(keys.input, args.input)]
    if args.out:
        overrides.append(quoted(keys.out, args.out))
    if args.config is not None:
        return load(cls, args.config, overrides)
    try:
        return from_dict(cls, apply_overrides({}, overrides), "command line")
    except ConfigError as e:
        raise UserError(str(e)) from None


def load_job(cls: type, args: argparse.Namespace):
    """A rewriting stage's config and its input tars, or a one-line UserError when either is missing."""
    cfg = load_run(cls, args)
    if not cfg.input or cfg.write is None:
        raise UserError("needs input shards (input: or --input) and an output folder (write.path: or --out)")
    return cfg, input_shards(cfg.input)


def input_shards(spec: str) -> list[str]:
    """The tars an ``input:`` spec names (folder, glob or brace pattern), or a one-line UserError when none."""
    from visinstruct.transforms.layout import TAR_SUFFIX, ShardError, resolve_shards
    from visinstruct.transforms.shards import exists

    try:
        inputs = [p for p in resolve_shards(spec) if exists(p)]
    except ShardError as e:
        raise UserError(str(e)) from None
    if not inputs:
        raise UserError(f"{spec}: no {TAR_SUFFIX} shards to read")
    return inputs


def add_training_parser(sub: argparse._SubParsersAction, name: str, run, *, help: str, description: str) -> None:
    """A trainer's command ``name``: ``--config``, ``--input`` (its training shards, ``data.shards``), ``--out``,
    ``--set``, and ``run``."""
    parser = sub.add_parser(name, help=help, description=description)
    add_run_arguments(parser, name, FlagKeys("data.shards", "out"), TRAINING_SHARDS, set_example="steps=200")
    parser.set_defaults(run=run)


def print_training_eval(summary: dict) -> bool:
    """Print a trainer's held-out evaluation (one JSON line, when it ran) and say whether this process prints the
    rest of the summary: under torchrun only rank 0 prints, the others return False having printed nothing."""
    import os

    if os.environ.get("RANK", "0") != "0":
        return False
    if summary["eval"] is not None:
        print(json.dumps({"step": summary["step"], "seconds": round(summary["seconds"], 1), **summary["eval"]}))
    if summary.get("skipped"):  # samples the model could not take (no image for a caption model, placeholders off)
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(summary["skipped"].items()))
        print(f"skipped samples (not trained on): {reasons}")
    return True


def finish(command: str, report: dict, stage: str, prefixes: dict[str, str] | None = None) -> int:
    """The exit status of a pipeline command: 0, or 1 with one line on stderr saying what failed and what to change.

    A run that wrote nothing or whose rows do not add up has failed, whatever Beam says (see ``failure_summary``).
    """
    from visinstruct.pipelines.report import failure_summary

    line = failure_summary(report, stage, prefixes)
    if line is None:
        return 0
    print(f"visinstruct {command}: failed: {line}", file=sys.stderr)
    return 1
