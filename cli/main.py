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
import traceback

from visinstruct import __version__
from visinstruct.cli import (
    build_cmd,
    chat_cmd,
    config_cmd,
    cost_cmd,
    curate_cmd,
    demo_cmd,
    energon_cmd,
    eval_cmd,
    filter_cmd,
    generate_cmd,
    ingest_cmd,
    mix_cmd,
    shards_cmd,
    train_clip_cmd,
    train_cmd,
)
from visinstruct.cli.errors import UserError
from visinstruct.cli.exit import exit_process
from visinstruct.configs import ConfigError

COMMANDS = [
    build_cmd,
    ingest_cmd,
    filter_cmd,
    generate_cmd,
    curate_cmd,
    mix_cmd,
    demo_cmd,
    config_cmd,
    cost_cmd,
    shards_cmd,
    energon_cmd,
    train_clip_cmd,
    train_cmd,
    chat_cmd,
    eval_cmd,
]


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
    """Entry point of the console script; returns the exit status.

    Called without ``argv`` (the console script), it ends the process through :func:`exit_process` once the command
    returned, so native libraries' teardown cannot abort a run that succeeded (see ``cli/exit.py``). Called with
    ``argv`` (tests, notebooks), it returns the status.
    """
    status = run_command(argv)
    if argv is None:
        exit_process(status)
    return status


def run_command(argv: list[str] | None) -> int:
    """Parse ``argv`` and run the command, turning expected errors into one line; returns the exit status."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations (via img2dataset) phones home
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if beam_args and not getattr(args, "accepts_beam_args", False):
        print(
            f"visinstruct {args.command}: error: unrecognized arguments: {' '.join(beam_args)} "
            f"(see visinstruct {args.command} --help)",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.quiet:  # our own progress lines (one per shard), without Beam's INFO chatter
        logging.getLogger("visinstruct").setLevel(logging.INFO)
    try:
        if beam_args:
            check_beam_args(args.command, beam_args, parser)
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
    except Exception as e:  # the last resort: a bug (ours or a library's) is one line unless -v asks for more
        if args.verbose:
            traceback.print_exc()
        lines = str(e).strip().splitlines() or [""]
        # an exception from a DataLoader worker reads "Caught X in DataLoader worker process 0." then the original
        first = (lines[-1] if lines[0].startswith("Caught ") and len(lines) > 1 else lines[0])[:300]
        print(
            f"visinstruct {args.command}: internal error: {type(e).__name__}: {first} "
            f"({'traceback above' if args.verbose else 'run with -v for the traceback'})",
            file=sys.stderr,
        )
        return 1


def check_beam_args(command: str, beam_args: list[str], parser: argparse.ArgumentParser) -> None:
    """Refuse options neither the command nor Beam knows, with a "did you mean" where one fits.

    Beam itself only logs "Discarding unparseable args" and runs on, so a mistyped flag (or an img2dataset habit
    such as ``--output_folder``) would silently send the output elsewhere.
    """
    from visinstruct.cli.suggest import unknown_option_message
    from visinstruct.pipelines.options import unknown_options

    unknown = unknown_options(beam_args)
    if unknown:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        flags = [s for a in sub.choices[command]._actions for s in a.option_strings]
        raise UserError(unknown_option_message(command, unknown[0], beam_args, flags))


if __name__ == "__main__":
    sys.exit(main())
