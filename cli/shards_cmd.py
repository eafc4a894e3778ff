"""``visinstruct ls|stats|show|validate|export|gallery|remove PATH``: commands over a folder, glob or brace list.

The work is done by plain functions in :mod:`visinstruct.cli.shards` (ls), :mod:`~visinstruct.cli.show`,
:mod:`~visinstruct.cli.stats`, :mod:`~visinstruct.cli.validate`, :mod:`~visinstruct.cli.export`,
:mod:`~visinstruct.cli.gallery` and :mod:`~visinstruct.cli.remove`; they load only when a command runs, and Beam
(about 2 s to import) only for a remote PATH (``gs://...``), so that ``--help`` and ``ls`` of a local folder are
quick. Only ``remove`` changes a dataset.

Flags follow the pipeline commands': shards are the positional PATH (as img2dataset and webdataset users write
them), and a command that writes a dataset or a page writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile

from visinstruct.cli.errors import UserError

PATH_HELP = (
    "shards: a folder, a .tar file, a glob ('shards/*.tar') or a brace pattern "
    "('shards/{00000..00099}.tar'); local or any Beam filesystem (gs://...). Quote globs and braces."
)
REPORT_JSON_HELP = "print the report as JSON"


def _command(
    sub: argparse._SubParsersAction, name: str, run, *, help: str, description: str, json_help: str, options=None
) -> None:
    """Register one shard tool: its positional PATH, the options ``options(parser)`` adds, ``--json``, its runner."""
    parser = sub.add_parser(name, help=help, description=description)
    parser.add_argument("path", metavar="PATH", help=PATH_HELP)
    if options is not None:
        options(parser)
    parser.add_argument("--json", action="store_true", help=json_help)
    parser.set_defaults(run=run)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``ls``, ``stats``, ``show``, ``validate``, ``export``, ``gallery`` and ``remove``."""
    _command(
        sub,
        "ls",
        run_ls,
        help="list shards: samples written, inputs, rejected, size, complete, stages run",
        description="One line per shard, from the parquet indexes (tars are counted only when a shard has no index).",
        json_help="print JSON instead of a table",
    )
    _command(
        sub,
        "stats",
        run_stats,
        help="dataset summary from the parquet indexes (never opens a tar)",
        description="Counts, rejections by stage and reason, image sizes, caption lengths, CLIP "
        "scores and conversation kinds, read from the indexes and dead-letter tables.",
        json_help="print JSON instead of the report",
    )
    _command(
        sub,
        "show",
        run_show,
        help="print one sample and write its image to a file",
        description="Pick a sample by KEY, by --index over written samples in shard order, or "
        "--random; the first sample when none is given.",
        json_help="print JSON instead of text",
        options=_show_options,
    )
    _command(
        sub,
        "validate",
        run_validate,
        help="check shards against the format; exit status 1 on any problem",
        description="Stream every tar (safe member names, complete samples, JSON schema, "
        "images decode) and compare it with its parquet index and stats file.",
        json_help="print JSON (every problem) instead of text",
    )
    _command(
        sub,
        "export",
        run_export,
        help="write samples as LLaVA's training JSON + images, a parquet table, or a Hugging Face dataset",
        description="--format llava: OUT/llava.json (a list of {id, image, conversations}) and "
        "OUT/images/KEY.EXT, for LLaVA's --data_path and --image_folder; only "
        "samples with a valid conversation, unless --caption-only. --format "
        "parquet: OUT/samples.parquet, one row per written sample, image bytes "
        "included. --format hf: a Hugging Face dataset in OUT (datasets.load_from_disk) and as parquet files in "
        "OUT/parquet, with an Image column holding the image bytes unchanged and conversations as "
        "[{from, value}]; needs the datasets package.",
        json_help=REPORT_JSON_HELP,
        options=_export_options,
    )
    _command(
        sub,
        "gallery",
        run_gallery,
        help="an HTML page of thumbnails, captions, scores, conversations and rejections, and a PNG contact sheet",
        description="Samples are spread evenly over the dataset (or picked with --seed); "
        "the page is one self-contained file.",
        json_help=REPORT_JSON_HELP,
        options=_gallery_options,
    )
    _command(
        sub,
        "remove",
        run_remove,
        help="takedown: remove samples by URL or sha256, rewriting only their shards",
        description="Lists hold one entry a line (blank lines and # comments skipped). URLs "
        "match exactly after stripping whitespace, sha256 digests in any case. "
        "A removed sample keeps an index row with status 'takedown' and a "
        "dead-letter row from the stage remove, so counts still add up.",
        json_help=REPORT_JSON_HELP,
        options=_remove_options,
    )


def _show_options(show: argparse.ArgumentParser) -> None:
    show.add_argument("key", metavar="KEY", nargs="?", help="sample key, e.g. 000420007")
    pick = show.add_mutually_exclusive_group()
    pick.add_argument("--index", type=int, metavar="N", help="the N-th written sample (from 0)")
    pick.add_argument("--random", action="store_true", help="a random sample (see --seed)")
    show.add_argument("--seed", type=int, metavar="S", help="seed for --random, to show the same sample again")
    show.add_argument(
        "--save-images",
        metavar="DIR",
        default=os.path.join(tempfile.gettempdir(), "visinstruct-show"),
        help="folder to save the sample's image in (default: %(default)s)",
    )


def _export_options(export: argparse.ArgumentParser) -> None:
    export.add_argument("--out", metavar="OUT", help="folder to write to, required (refused when it holds files)")
    export.add_argument("old_out", nargs="?", metavar="OUT", help=argparse.SUPPRESS)  # refused: see run_export
    export.add_argument("--format", choices=("llava", "parquet", "hf"), default="llava", help="default: %(default)s")
    export.add_argument(
        "--caption-only",
        action="store_true",
        help="llava: a sample without a conversation but with a caption is exported as "
        "'<image>\\nDescribe the image briefly.' answered by its caption",
    )
    export.add_argument("--overwrite", action="store_true", help="write into OUT even when it holds files")


def _gallery_options(gallery: argparse.ArgumentParser) -> None:
    gallery.add_argument("-o", "--out", metavar="HTML", default="gallery.html", help="the page (default: %(default)s)")
    gallery.add_argument("--sheet", metavar="PNG", help="contact sheet path (default: the page's name with .png)")
    gallery.add_argument(
        "--limit",
        type=int,
        default=48,
        metavar="N",
        help="show at most N samples and N rejected rows (default: %(default)s)",
    )
    gallery.add_argument("--seed", type=int, metavar="S", help="pick samples at random with this seed")
    gallery.add_argument("--thumb", type=int, default=160, metavar="PX", help="thumbnail size (default: %(default)s)")


def _remove_options(remove: argparse.ArgumentParser) -> None:
    remove.add_argument("--urls", metavar="FILE", help="file of URLs (or local paths) to remove")
    remove.add_argument("--sha256", metavar="FILE", help="file of sha256 digests of the original image bytes")
    remove.add_argument("--dry-run", action="store_true", help="report what would be removed, change nothing")


class _Counter:
    """``validate: 12/100 shards`` rewritten in place on stderr; silent unless stderr is a terminal."""

    def __init__(self, command: str, args: argparse.Namespace):
        self.command = command
        self.enabled = sys.stderr.isatty() and not getattr(args, "quiet", False)

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        end = "\n" if done == total else ""
        print(f"\r{self.command}: {done}/{total} shards", end=end, file=sys.stderr, flush=True)


def _user_errors(function):
    """Run ``function``; a :class:`ShardError` (no shards, a bad key, an unreadable index) becomes a user error."""
    from visinstruct.transforms.layout import ShardError

    try:
        return function()
    except ShardError as e:
        raise UserError(str(e)) from e


def _resolve(args: argparse.Namespace) -> list[str]:
    from visinstruct.transforms.layout import resolve_shards

    return _user_errors(lambda: resolve_shards(args.path))


def run_ls(args: argparse.Namespace, beam_args: list[str]) -> int:
    from visinstruct.cli.shards import format_listing, list_shards

    paths = _resolve(args)
    rows = _user_errors(lambda: list_shards(paths, _Counter("ls", args)))
    print(json.dumps(rows, indent=1) if args.json else format_listing(rows))
    return 0


def run_stats(args: argparse.Namespace, beam_args: list[str]) -> int:
    from visinstruct.cli.stats import dataset_stats, format_stats

    paths = _resolve(args)
    stats = _user_errors(lambda: dataset_stats(paths, _Counter("stats", args)))
    print(json.dumps(stats, indent=1) if args.json else format_stats(stats))
    return 0


def run_show(args: argparse.Namespace, beam_args: list[str]) -> int:
    from visinstruct.cli.show import format_sample, show_sample

    if args.key is not None and (args.index is not None or args.random):
        raise UserError("give a KEY, --index or --random, not several")
    if args.seed is not None and not args.random:
        raise UserError("--seed goes with --random")
    # An unseeded --random still gets a seed, printed, so the same sample can be shown again.
    seed = (args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)) if args.random else None
    paths = _resolve(args)
    sample = _user_errors(
        lambda: show_sample(paths, key=args.key, index=args.index, random_seed=seed, out_dir=args.save_images)
    )
    sample["seed"] = seed
    print(json.dumps(sample, indent=1, ensure_ascii=False) if args.json else format_sample(sample))
    return 0


def run_validate(args: argparse.Namespace, beam_args: list[str]) -> int:
    from visinstruct.cli.validate import format_report, validate

    paths = _resolve(args)
    report = validate(paths, _Counter("validate", args))
    print(json.dumps(report.to_dict(), indent=1) if args.json else format_report(report))
    return 0 if report.ok else 1


def run_export(args: argparse.Namespace, beam_args: list[str]) -> int:
    from visinstruct.cli.export import export_hf, export_llava, export_parquet, format_export

    if args.old_out is not None:
        raise UserError(f"the output folder is --out now: visinstruct export {args.path} --out {args.old_out}")
    if args.out is None:
        raise UserError(f"needs an output folder: visinstruct export {args.path} --out DIR")
    if args.caption_only and args.format != "llava":
        raise UserError("--caption-only goes with --format llava")
    paths = _resolve(args)
    progress = _Counter("export", args)
    if args.format == "llava":
        report = _user_errors(lambda: export_llava(paths, args.out, args.caption_only, args.overwrite, progress))
    elif args.format == "hf":
        report = _user_errors(lambda: export_hf(paths, args.out, args.overwrite, progress))
    else:
        report = _user_errors(lambda: export_parquet(paths, args.out, args.overwrite, progress))
    print(json.dumps(report, indent=1) if args.json else format_export(report))
    return 1 if report["unread"] else 0  # indexed samples that could not be read: the export is incomplete


def run_gallery(args: argparse.Namespace, beam_args: list[str]) -> int:
    from visinstruct.cli.gallery import gallery

    if args.limit < 1 or args.thumb < 16:
        raise UserError("--limit must be at least 1 and --thumb at least 16")
    sheet = args.sheet or os.path.splitext(args.out)[0] + ".png"
    paths = _resolve(args)
    report = _user_errors(
        lambda: gallery(paths, args.out, sheet, args.limit, args.seed, args.thumb, _Counter("gallery", args))
    )
    sheet_note = f"; contact sheet {report['sheet']}" if report["sheet"] else ""
    unread = (
        (
            f"\nNOT READ: {report['unread']} of the samples picked could not be read from their tars "
            f"({report['unread_reason']}); run validate"
        )
        if report["unread"]
        else ""
    )
    print(
        json.dumps(report, indent=1)
        if args.json
        else f"{report['html']}: {report['shown']} of {report['written']} "
        f"samples, {report['rejected_shown']} of {report['rejected']} rejected rows{sheet_note}{unread}"
    )
    return 1 if report["unread"] else 0


def run_remove(args: argparse.Namespace, beam_args: list[str]) -> int:
    from visinstruct.cli.remove import format_removal, load_takedown, remove_samples

    takedown = _user_errors(lambda: load_takedown(args.urls, args.sha256))
    paths = _resolve(args)
    report = _user_errors(lambda: remove_samples(paths, takedown, _Counter("remove", args), args.dry_run))
    print(json.dumps(report, indent=1) if args.json else format_removal(report))
    return 0
