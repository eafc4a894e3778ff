"""``visinstruct train --config FILE [--input SHARDS] [--out DIR] [--set KEY=VALUE]``: the LLaVA-style reference
trainer. Several processes: ``torchrun --nproc_per_node=N -m visinstruct.cli.main train ...``."""

from __future__ import annotations

import argparse
import json

from visinstruct.cli.jobs import TRAINING_SHARDS, FlagKeys, add_run_arguments, is_main_process, load_run
from visinstruct.configs import LlavaTrainConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train",
        help="train a LLaVA-style model on shards (transformers' Llava)",
        description="Train transformers' LlavaForConditionalGeneration (vision tower, MLP "
        "projector, causal LM) on our shards: stage 1 the projector on captions, "
        "stage 2 the projector and LM on conversations, loss on the assistant's "
        "turns only. Writes OUT/model, which transformers, vLLM and `visinstruct "
        "chat` load; a rerun continues from OUT/resume.pt. Under torchrun, one "
        "process per device (DDP).",
    )
    add_run_arguments(parser, "train", FlagKeys("data.shards", "out"), TRAINING_SHARDS, set_example="steps=200")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    cfg = load_run(LlavaTrainConfig, args)
    from visinstruct.trainer.llava_train import train  # torch and transformers load only for this command

    summary = train(cfg)
    if not is_main_process():
        return 0
    if summary["eval"] is not None:
        print(json.dumps({"step": summary["step"], "seconds": round(summary["seconds"], 1), **summary["eval"]}))
    print(
        f"train: step {summary['step']}, checkpoint {summary['checkpoint']} "
        f'(visinstruct chat --checkpoint {summary["checkpoint"]} --image IMAGE "...")'
    )
    return 0
