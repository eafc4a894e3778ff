"""The ``visinstruct`` command: one subcommand per module in this package.

Each command module exposes ``add_parser(subparsers)`` and ``run(args, beam_args) -> int``. Arguments the
command does not know are Beam pipeline options (``--runner``, ``--project``...) and pass through untouched.
User errors (bad config, missing file) print one line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from visinstruct import __version__
from visinstruct.cli import (
    build_cmd,
    chat_cmd,
    config_cmd,
    demo_cmd,
    filter_cmd,
    generate_cmd,
    ingest_cmd,
    shards_cmd,
    train_clip_cmd,
    train_cmd,
)
from visinstruct.cli.errors import UserError
from visinstruct.configs import ConfigError

COMMANDS = [build_cmd, ingest_cmd, filter_cmd, generate_cmd, demo_cmd, config_cmd, shards_cmd, train_clip_cmd,
            train_cmd, chat_cmd]



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visinstruct",
        description="Build visual instruction-tuning datasets (the LLaVA recipe) with Apache Beam.",
        epilog="Options a command does not know are passed to Beam as pipeline options (e.g. --runner).",
    )
    parser.add_argument("--version", action="version", version=f"visinstruct {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level (Beam's progress too)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines, only the final report")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        register = getattr(module, "add_parsers", None) or module.add_parser  # a module may add several commands
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations (via img2dataset) phones home
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if beam_args and not getattr(args, "accepts_beam_args", False):
        parser.error(f"unrecognized arguments: {' '.join(beam_args)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.quiet:  # our own progress lines (one per shard), without Beam's INFO chatter
        logging.getLogger("visinstruct").setLevel(logging.INFO)
    try:
        return args.run(args, beam_args)
    except (ConfigError, UserError, FileNotFoundError) as e:
        print(f"visinstruct {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"visinstruct {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
