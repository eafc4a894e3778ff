"""``visinstruct config``: list every key of a config, or check a YAML file before a run.

``config check [KIND] PATH`` loads the file into its config class and then runs the checks a command runs before
anything starts (:mod:`visinstruct.cli.checks`: inputs exist, models known, checkpoints and caches present),
printing ``ok`` or one line per problem (exit status 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from visinstruct.cli.errors import UserError
from visinstruct.cli.jobs import add_set_argument
from visinstruct.configs import CONFIGS, ConfigError, describe, load

RUNS = ("ingest", "filter", "generate", "curate", "build")  # the configs a pipeline command runs: the narrowest first


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("config", help="show config keys or check a config file")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = actions.add_parser("show", help="every key of a config with its type, default and description")
    show.add_argument("name", choices=sorted(CONFIGS))
    actions.add_parser("reference", help="every key of every config as Markdown (CONFIG.md)")
    check = actions.add_parser(
        "check",
        help="check a YAML file, and what a run needs (inputs, models), before running it",
        description="Load the file into its config class, then check what the command "
        "would check before anything runs: input files and shards exist, the "
        "CLIP model and pretrained tag are known, checkpoints are present, hub "
        "models are cached when HF_HUB_OFFLINE is set. Prints ok, or one line "
        "per problem and exit status 2.",
    )
    check.add_argument(
        "name",
        nargs="?",
        choices=sorted(CONFIGS),
        help="which config the file is (default: its folder's name, else the first that loads)",
    )
    check.add_argument("path")
    add_set_argument(check, "download.threads=8")
    check.add_argument(
        "--remote",
        action="store_true",
        help="the run's workers are remote (Dataflow): skip the checks of this machine's model cache",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    if args.action == "reference":
        from visinstruct.configs.reference import markdown_reference

        print(markdown_reference(CONFIGS), end="")
        return 0
    if args.action == "check":
        return check(args.name, args.path, args.overrides, local=not args.remote)
    cls = CONFIGS[args.name]
    if args.action == "show":
        rows = describe(cls)
        width = max(len(r[0]) for r in rows)
        for key, type_name, default, doc in rows:
            if type_name == "section":
                print(f"{key}:{' ' * (width - len(key))}  [{doc}]")
            else:
                print(f"{key:<{width}}  {doc} ({type_name}; default {default})")
        return 0


def _kind_of(path: str, overrides: list[str]) -> str:
    """The config a file is: its folder's name (``configs/build/x.yaml``), else the first of RUNS it loads as."""
    folder = Path(path).parent.name
    if folder in CONFIGS:
        return folder
    for name in RUNS:
        try:
            load(CONFIGS[name], path, overrides)
        except ConfigError:
            continue
        return name
    load(CONFIGS["build"], path, overrides)  # the file itself is the problem (missing, not YAML): say so
    raise UserError(
        f"{path}: not a {', '.join(RUNS)} config as it stands; name the kind to see why: "
        f"visinstruct config check KIND {path}"
    )


def check(name: str | None, path: str, overrides: list[str], local: bool = True) -> int:
    """Load ``path`` and print ``ok``, or each problem a run would hit on one line of stderr (exit status 2).

    ``local``: the run's models load on this machine, so its model cache must hold them when offline.
    """
    from visinstruct.cli.checks import problems

    name = name or _kind_of(path, overrides)
    cfg = load(CONFIGS[name], path, overrides)
    found = problems(cfg, local)
    for problem in found:
        print(f"visinstruct config: error: {path}: {problem}", file=sys.stderr)
    if found:
        return 2
    print(f"{path}: ok ({CONFIGS[name].__name__})")
    return 0
