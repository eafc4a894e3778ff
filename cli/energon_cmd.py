"""``visinstruct energon DIR [DIR ...] [--val-fraction F] [--blend FILE [--weight W ...]]``: Megatron-Energon's
metadata for dataset folders, from their parquet indexes, so energon loads them with no ``energon prepare``.

The work is :mod:`visinstruct.transforms.energon`'s; like the other shard tools, this command never imports Beam
for a local folder.
"""

from __future__ import annotations

import argparse
import json
import sys

from visinstruct.cli.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "energon",
        help="write Megatron-Energon's metadata (.nv-meta/) so energon loads the shards without `energon prepare`",
        description="Reads each dataset folder's parquet indexes (never the tars, unless an index lacks member "
        "offsets) and writes NNNNN.tar.idx beside each tar and .nv-meta/ (info, splits, sample type, sqlite "
        "index). Samples load as CaptioningSample, or as SimilarityInterleavedSample (images and the LLaVA "
        "turns) when any has a conversation or other than one image. --blend also writes an energon "
        "metadataset YAML blending the folders by weight.",
    )
    parser.add_argument("folders", nargs="+", metavar="DIR", help="dataset folders (local or gs://...)")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="put the last round(F x shards) shards of each folder in a val split (default: all train)",
    )
    parser.add_argument("--blend", metavar="FILE", help="also write a metadataset YAML blending the folders")
    parser.add_argument(
        "--weight",
        type=float,
        action="append",
        metavar="W",
        help="blend weight of each DIR, in order (default: each folder's written samples)",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    from visinstruct.transforms.energon import write_blend, write_metadata
    from visinstruct.transforms.layout import ShardError

    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val-fraction must be within [0, 1), got {args.val_fraction}")
    if args.weight is not None and args.blend is None:
        raise UserError("--weight goes with --blend")
    if args.weight is not None and len(args.weight) != len(args.folders):
        raise UserError(f"give one --weight per DIR: {len(args.folders)} folders, {len(args.weight)} weights")
    if args.weight is not None and any(not w > 0 for w in args.weight):
        raise UserError("blend weights must be positive")
    try:
        written = [write_metadata(folder, args.val_fraction, _progress(folder, args)) for folder in args.folders]
        blend = None
        if args.blend is not None:
            weights = args.weight or [summary["samples"] for summary in written]
            blend = write_blend(args.blend, [(s["folder"], w) for s, w in zip(written, weights, strict=True)])
    except ShardError as e:
        raise UserError(str(e)) from e
    if args.json:
        print(json.dumps({"datasets": written, "blend": blend, "blend_path": args.blend}, indent=1))
        return 0
    for summary in written:
        splits = ", ".join(f"{name} {len(shards)}" for name, shards in summary["splits"].items())
        print(
            f"{summary['folder']}: {summary['samples']} samples in {summary['shards']} shards "
            f"as {summary['sample_type']} (shards: {splits})"
        )
    if blend is not None:
        print(f"{args.blend}: blend of {len(written)} datasets, splits {', '.join(blend['splits'])}")
    return 0


def after_run(folder: str) -> None:
    """``write.energon``: the metadata of the folder a run just wrote, and one line saying so."""
    from visinstruct.transforms.energon import write_metadata
    from visinstruct.transforms.layout import ShardError

    try:
        summary = write_metadata(folder)
    except ShardError as e:
        raise UserError(f"write.energon: {e}") from e
    print(f"energon metadata: {summary['samples']} samples in {summary['shards']} shards as {summary['sample_type']}")


def _progress(folder: str, args: argparse.Namespace):
    """``energon DIR: 12/100 shards`` rewritten in place on stderr; silent unless stderr is a terminal."""
    if not sys.stderr.isatty() or getattr(args, "quiet", False):
        return None

    def show(done: int, total: int) -> None:
        end = "\n" if done == total else ""
        print(f"\renergon {folder}: {done}/{total} shards", end=end, file=sys.stderr, flush=True)

    return show
