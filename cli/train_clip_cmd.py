"""``visinstruct train-clip --config FILE [--out DIR] [--set KEY=VALUE]``; several processes: ``torchrun ... -m
visinstruct.cli.main train-clip ...``."""

from __future__ import annotations

import argparse
import json
import os

from visinstruct.configs import ClipTrainConfig, load


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("train-clip", help="train a CLIP (or LiT) model on shards, for the filter to use",
                            description="Contrastive training of an open_clip model on our shards: full CLIP, LiT "
                                        "(image tower locked) or the reverse. Writes a checkpoint open_clip and "
                                        "`visinstruct filter` load. Under torchrun, one process per device (DDP).")
    parser.add_argument("--config", required=True, help="YAML file (see `visinstruct config show train-clip`)")
    parser.add_argument("--out", help="output folder (overrides out)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key (repeatable), e.g. --set steps=200")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    overrides = list(args.overrides) + ([f"out={args.out}"] if args.out else [])
    cfg = load(ClipTrainConfig, args.config, overrides)
    from visinstruct.trainer.clip_train import train  # torch and open_clip load only for this command

    summary = train(cfg)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for all
        return 0
    if summary["eval"] is not None:
        print(json.dumps({"step": summary["step"], "seconds": round(summary["seconds"], 1), **summary["eval"]}))
    print(f"train-clip: step {summary['step']}, checkpoint {summary['checkpoint']} "
          f"(model.name {cfg.model.name}, model.config_file {summary['config_file']})")
    return 0
