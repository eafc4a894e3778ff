"""``visinstruct train --config FILE [--input SHARDS] [--out DIR] [--set KEY=VALUE]``: the LLaVA-style reference
trainer. Several processes: ``torchrun --nproc_per_node=N -m visinstruct.cli.main train ...``."""

from __future__ import annotations

import argparse

from visinstruct.cli.jobs import add_training_parser, load_run, print_training_eval
from visinstruct.configs import LlavaTrainConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    add_training_parser(
        sub,
        "train",
        run,
        help="train a LLaVA-style model on shards (transformers' Llava)",
        description="Train transformers' LlavaForConditionalGeneration (vision tower, MLP "
        "projector, causal LM) on our shards: stage 1 the projector on captions, "
        "stage 2 the projector and LM on conversations, loss on the assistant's "
        "turns only. Writes OUT/model, which transformers, vLLM and `visinstruct "
        "chat` load; a rerun continues from OUT/resume.pt. Under torchrun, one "
        "process per device (DDP).",
    )


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    cfg = load_run(LlavaTrainConfig, args)
    from visinstruct.trainer.llava_train import train  # torch and transformers load only for this command

    summary = train(cfg)
    if not print_training_eval(summary):
        return 0
    print(
        f"train: step {summary['step']}, checkpoint {summary['checkpoint']} "
        f'(visinstruct chat --checkpoint {summary["checkpoint"]} --image IMAGE "...")'
    )
    return 0
