"""``visinstruct ingest [--config FILE] [--input URLS] [--out DIR] [img2dataset options] [--set KEY=VALUE]``.

The simple case needs no YAML: ``visinstruct ingest --url-list urls.parquet --out shards/``. img2dataset's option
names are accepted where we have the setting (:data:`IMG2DATASET`, each mapped to its config key and parsed like a
``--set`` value); an img2dataset option we do not honour is refused with one line saying why (:data:`REFUSED`),
never ignored.
"""

from __future__ import annotations

import argparse

from visinstruct.cli.errors import UserError
from visinstruct.cli.jobs import FlagKeys, add_run_arguments, quoted
from visinstruct.configs import IngestConfig

# img2dataset's option -> our config key. url_list and output_folder are --input and --out themselves.
IMG2DATASET = {
    "input_format": "read.format",
    "url_col": "read.url_col",
    "caption_col": "read.caption_col",
    "save_additional_columns": "read.save_additional_columns",
    "image_size": "resize.image_size",
    "resize_mode": "resize.resize_mode",
    "resize_only_if_bigger": "resize.resize_only_if_bigger",
    "min_image_size": "resize.min_image_size",
    "max_image_area": "resize.max_image_area",
    "max_aspect_ratio": "resize.max_aspect_ratio",
    "encode_format": "resize.encode_format",
    "encode_quality": "resize.encode_quality",
    "downscale_interpolation": "resize.downscale_interpolation",
    "upscale_interpolation": "resize.upscale_interpolation",
    "number_sample_per_shard": "write.shard_size",
    "timeout": "download.timeout",
    "retries": "download.retries",
    "thread_count": "download.threads",
    "disallowed_header_directives": "download.optout_values",
}
_PARALLELISM = "Beam runs the workers: --direct_num_workers N locally, --max_num_workers N on Dataflow"
_ALWAYS = "visinstruct always does this"
# img2dataset's options visinstruct does not honour, and why.
REFUSED = {
    "processes_count": _PARALLELISM,
    "distributor": _PARALLELISM,
    "subjob_size": _PARALLELISM,
    "output_format": "visinstruct writes webdataset shards only (`visinstruct export --format parquet` after)",
    "incremental_mode": "a rerun resumes by default (write.resume; --set write.resume=false starts over)",
    "compute_hash": f"{_ALWAYS}: every sample's sha256 is in the index",
    "verify_hash": "no hash column is checked against the downloaded bytes",
    "bbox_col": "boxes are objects with a category: read.boxes_col (--set read.boxes_col=COLUMN)",
    "clip_col": "CLIP scores come from `visinstruct filter`",
    "extract_exif": "EXIF is not extracted",
    "enable_wandb": "progress goes to the log and the run report, not wandb",
    "wandb_project": "progress goes to the log and the run report, not wandb",
    "oom_shard_count": "shard names are always 5-digit numbers",
    "max_shard_retry": "Beam retries failed bundles; write.retry_failed re-downloads retryable failures",
    "skip_reencode": "images are always decoded and re-encoded (the check that they are images)",
    "disable_all_reencoding": "images are always decoded and re-encoded (the check that they are images)",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "ingest",
        help="download, validate, resize, dedup and shard image-text pairs",
        description="Read URL lists, folders, COCO or LLaVA JSON; write WebDataset shards with "
        "a parquet index, stats and dead-letter tables. Without --config, --input and --out are "
        "enough (img2dataset's option names work too). Unknown options go to Beam.",
    )
    add_run_arguments(
        parser,
        "ingest",
        FlagKeys("read.path", "write.path"),
        "the URL list, folder, COCO or LLaVA JSON to read",
        config_required=False,
        input_aliases=("--url-list", "--url_list"),
        out_aliases=("--output_folder",),
        set_example="download.threads=16",
    )
    options = parser.add_argument_group("img2dataset's options (each sets the config key it names)")
    for name, key in IMG2DATASET.items():
        options.add_argument(f"--{name}", dest=f"i2d_{name}", metavar="VALUE", help=f"sets {key}")
    options.add_argument(
        "--user_agent_token",
        metavar="TOKEN",
        help="sets download.user_agent_token: appended to the User-Agent as '(compatible; TOKEN)', and "
        "X-Robots-Tag directives addressed to TOKEN are honoured, as img2dataset does",
    )
    for name in REFUSED:  # accepted by the parser only to be refused with the reason
        parser.add_argument(f"--{name}", dest=f"refused_{name}", help=argparse.SUPPRESS)
    parser.set_defaults(run=run, accepts_beam_args=True)


def img2dataset_overrides(args: argparse.Namespace) -> list[str]:
    """``KEY=VALUE`` overrides for the img2dataset options given; a one-line UserError for one we do not honour."""
    for name, why in REFUSED.items():
        if getattr(args, f"refused_{name}") is not None:
            raise UserError(f"--{name} is img2dataset's and visinstruct does not honour it: {why}")
    given = {key: getattr(args, f"i2d_{name}") for name, key in IMG2DATASET.items()}
    overrides = [f"{key}={value}" for key, value in given.items() if value is not None]
    if args.user_agent_token is not None:  # text as it is: a token such as 1.0 must not become a number
        overrides.append(quoted("download.user_agent_token", args.user_agent_token))
    return overrides


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    from visinstruct.cli.checks import expected_errors, preflight
    from visinstruct.cli.jobs import finish, load_run
    from visinstruct.cli.report import format_report
    from visinstruct.pipelines.ingest import run as run_ingest  # Beam loads only when a pipeline runs

    overrides = img2dataset_overrides(args)
    if args.config is None and not args.input:
        raise UserError("needs an input: --input (or --url-list) FILE, or a --config file with read.path")
    cfg = load_run(IngestConfig, args, overrides)
    preflight(cfg, beam_args)
    with expected_errors():
        report = run_ingest(cfg, beam_args)
    print(format_report(report))
    status = finish("ingest", report, "ingest")
    if status == 0 and cfg.write.energon:
        from visinstruct.cli.energon_cmd import after_run

        after_run(cfg.write.path)
    return status
