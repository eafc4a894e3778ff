"""``visinstruct cost``: what a build of any size would cost, from a build's run report.

The build report already holds the estimate for a million pairs at default prices (``cost``); this command scales
it to ``--pairs`` and prices it at ``--price NAME=VALUE`` (see :class:`~visinstruct.pipelines.cost.Prices`), with
the GPU stages the build recorded unless ``--gpu-stage`` names others (to price a CPU run's model stages as if they
had run on GPUs, measure on GPUs instead: their rates differ).
"""

from __future__ import annotations

import argparse
import json

from visinstruct.cli.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("cost", help="CPU/GPU hours and dollars of a build of any size, from its run report")
    parser.add_argument("report", help="a build's output folder, or its run report file")
    parser.add_argument("--pairs", default="1M", help="input pairs of the job to estimate: 1e6, 400M, 2B (default 1M)")
    parser.add_argument(
        "--price",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a rate: vcpu_hour, gpu_hour, utilization...",
    )
    parser.add_argument("--gpu-stage", action="append", default=None, help="a stage that runs on a GPU (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    from visinstruct.pipelines.cost import Prices, estimate, format_estimate, parse_pairs
    from visinstruct.transforms.layout import report_path

    path = args.report if args.report.endswith(".json") else report_path(args.report.rstrip("/"))
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the run report {path}: {e}") from None
    if not isinstance(report, dict) or not isinstance(report.get("stages"), list):
        raise UserError(f"{path} is not a build's run report (it has no per-stage figures); run visinstruct build")
    try:
        pairs, prices = parse_pairs(args.pairs), Prices.parse(args.price)
        recorded = (report.get("cost") or {}).get("gpu_stages", [])
        cost = estimate(report, pairs, prices, frozenset(args.gpu_stage if args.gpu_stage is not None else recorded))
    except ValueError as e:
        raise UserError(str(e)) from None
    print(json.dumps(cost, indent=1) if args.json else format_estimate(cost))
    return 0
