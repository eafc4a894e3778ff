"""``visinstruct filter --config FILE [--input SHARDS] [--out DIR] [--dry-run] [beam options]``."""

from __future__ import annotations

import argparse
import json
import sys

from visinstruct.cli.checks import expected_errors, preflight
from visinstruct.cli.errors import UserError
from visinstruct.cli.jobs import FlagKeys, add_run_arguments, finish, load_job
from visinstruct.configs import FilterConfig

SHARDS_HELP = "input shards: a folder, a glob or a brace pattern of .tar files"


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "filter",
        help="score image-text pairs with CLIP; keep by threshold or top fraction",
        description="Read shards (ours or img2dataset's), score every pair with CLIP through "
        "RunInference, write filtered shards and dead-letter rows. Unknown options "
        "go to Beam.",
    )
    add_run_arguments(parser, "filter", FlagKeys("input", "write.path"), SHARDS_HELP, set_example="threshold=0.3")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="write no shards; report the score distribution and what each threshold keeps",
    )
    parser.set_defaults(run=run, accepts_beam_args=True)


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    from visinstruct.cli.report import format_report
    from visinstruct.pipelines import filter as clip_filter

    cfg, inputs = load_job(FilterConfig, args)
    if cfg.threshold is None and cfg.top_fraction is None and not args.dry_run:
        raise UserError("set threshold and/or top_fraction, or use --dry-run to choose them")
    preflight(cfg, beam_args)
    with expected_errors():
        report = clip_filter.run(cfg, inputs, beam_args, dry_run=args.dry_run)
    if args.dry_run:
        print(format_distribution(report))
        if report.get("pairs"):
            return 0
        print("visinstruct filter: failed: no pair could be scored (the reasons are above)", file=sys.stderr)
        return 1
    print(format_report(report))
    return finish("filter", report, "filter")


def format_distribution(report: dict) -> str:
    if not report.get("pairs"):
        return f"filter --dry-run: no pair could be scored ({json.dumps(report.get('unscored', {}))})"
    lines = [
        f"filter --dry-run: {report['pairs']} pairs scored, min {report['min']:.4f}, max {report['max']:.4f}",
        "  quantiles: " + ", ".join(f"{k} {v:.4f}" for k, v in report["quantiles"].items()),
        "  threshold -> pairs kept:",
    ]
    lines += [f"    >= {t}: {n} ({n / report['pairs']:.0%})" for t, n in report["kept_by_threshold"].items()]
    lines.append("  top fraction -> threshold:")
    lines += [f"    {float(f):.0%}: {t:.4f}" for f, t in report["threshold_for_fraction"].items()]
    if report.get("unscored"):
        lines.append(f"  not scored: {json.dumps(report['unscored'])}")
    return "\n".join(lines)
