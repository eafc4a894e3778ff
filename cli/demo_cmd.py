"""``visinstruct demo --out DIR [beam options]``: every stage on bundled data, offline (what `make demo` runs)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("demo", help="run the stages end to end on bundled data from a loopback server")
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    parser.set_defaults(run=run, accepts_beam_args=True)


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    from visinstruct.pipelines.demo import run_demo  # needs the dev extra (easy-vqa, scikit-image)

    reports = run_demo(args.out, beam_args)
    return 0 if all(r.get("accounted", True) for r in reports.values()) else 1
