"""``visinstruct train-clip --config FILE [--input SHARDS] [--out DIR] [--set KEY=VALUE]``; several processes:
``torchrun ... -m visinstruct.cli.main train-clip ...``."""

from __future__ import annotations

import argparse

from visinstruct.cli.jobs import add_training_parser, load_run, print_training_eval
from visinstruct.configs import ClipTrainConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    add_training_parser(
        sub,
        "train-clip",
        run,
        help="train a CLIP (or LiT) model on shards, for the filter to use",
        description="Contrastive training of an open_clip model on our shards: full CLIP, LiT "
        "(image tower locked) or the reverse. Writes a checkpoint open_clip and "
        "`visinstruct filter` load. Under torchrun, one process per device (DDP).",
    )


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    cfg = load_run(ClipTrainConfig, args)
    from visinstruct.trainer.clip_train import train  # torch and open_clip load only for this command

    summary = train(cfg)
    if not print_training_eval(summary):
        return 0
    print(
        f"train-clip: step {summary['step']}, checkpoint {summary['checkpoint']} "
        f"(model.name {cfg.model.name}, model.config_file {summary['config_file']})"
    )
    if summary["eval"] is not None:
        print(
            f"train-clip: filter.threshold {summary['eval']['threshold']} best separates held-out matching pairs "
            f"from shuffled ones ({summary['eval']['threshold_balanced_accuracy']:.1%} balanced accuracy)"
        )
    return 0
