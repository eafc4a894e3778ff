"""``visinstruct config``: list every key of a config, or check a YAML file against its config class."""

from __future__ import annotations

import argparse

from visinstruct.configs import CONFIGS, describe, load


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("config", help="show config keys or check a config file")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = actions.add_parser("show", help="every key of a config with its type, default and description")
    show.add_argument("name", choices=sorted(CONFIGS))
    actions.add_parser("reference", help="every key of every config as Markdown (CONFIG.md)")
    check = actions.add_parser("check", help="load a YAML file and report the first problem, if any")
    check.add_argument("name", choices=sorted(CONFIGS))
    check.add_argument("path")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a key (repeatable), e.g. --set download.threads=8")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    if args.action == "reference":
        from visinstruct.configs.reference import markdown_reference

        print(markdown_reference(CONFIGS), end="")
        return 0
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
    load(cls, args.path, args.overrides)
    print(f"{args.path}: ok ({cls.__name__})")
    return 0
