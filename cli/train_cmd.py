"""``visinstruct train --config FILE [--out DIR] [--set KEY=VALUE]``: the LLaVA-style reference trainer. Several
processes: ``torchrun --nproc_per_node=N -m visinstruct.cli.main train ...``."""

from __future__ import annotations

import argparse
import json

from visinstruct.configs import LlavaTrainConfig, load


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("train", help="train a LLaVA-style model on shards (transformers' Llava)",
                            description="Train transformers' LlavaForConditionalGeneration (vision tower, MLP "
                                        "projector, causal LM) on our shards: stage 1 the projector on captions, "
                                        "stage 2 the projector and LM on conversations, loss on the assistant's "
                                        "turns only. Writes OUT/model, which transformers, vLLM and `visinstruct "
                                        "chat` load; a rerun continues from OUT/resume.pt. Under torchrun, one "
                                        "process per device (DDP).")
    parser.add_argument("--config", required=True, help="YAML file (see `visinstruct config show train`)")
    parser.add_argument("--out", help="output folder (overrides out)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key (repeatable), e.g. --set steps=200")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    overrides = list(args.overrides) + ([f"out={args.out}"] if args.out else [])
    cfg = load(LlavaTrainConfig, args.config, overrides)
    from visinstruct.trainer.llava_train import train  # torch and transformers load only for this command

    summary = train(cfg)
    if summary["eval"] is not None:
        print(json.dumps({"step": summary["step"], "seconds": round(summary["seconds"], 1), **summary["eval"]}))
    print(f"train: step {summary['step']}, checkpoint {summary['checkpoint']} "
          f"(visinstruct chat --checkpoint {summary['checkpoint']} --image IMAGE \"...\")")
    return 0
