"""``visinstruct eval --checkpoint C (--input SHARDS | --questions FILE) [--out DIR]``: how good a trained model is,
and whether it looks at the image (the ablations), or a CLIP's retrieval and zero-shot accuracy."""

from __future__ import annotations

import argparse
import json

from visinstruct.cli.errors import UserError
from visinstruct.cli.jobs import FlagKeys, add_run_arguments, load_run, quoted
from visinstruct.configs import EvalConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "eval",
        help="evaluate a checkpoint: answers with the image vs blank, shuffled or no image; CLIP retrieval",
        description="Ask a checkpoint (`visinstruct train`'s, or any transformers image-text-to-text model) "
        "every question of held-out shards or a question file, with its image and under each ablation "
        "(blank, shuffled, no image); score exact match and token F1 by question type, with bootstrap "
        "intervals, and the difference the image makes. A `visinstruct train-clip` run gets retrieval "
        "recall@k and zero-shot classification instead. Prints a table; --out writes eval.json, "
        "answers.jsonl and errors.html.",
    )
    parser.add_argument("--checkpoint", help="a train or train-clip run, a model folder, or a hub name (checkpoint)")
    parser.add_argument("--questions", help="a question file instead of shards: JSON or JSONL (sets questions)")
    add_run_arguments(
        parser,
        "eval",
        FlagKeys("input", "out"),
        "held-out shards: a folder, a glob or a brace pattern of .tar files",
        config_required=False,
        set_example="ablations=[blank]",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    flags = [
        quoted(key, value) for key, value in (("checkpoint", args.checkpoint), ("questions", args.questions)) if value
    ]
    cfg = load_run(EvalConfig, args, flags)
    from visinstruct.cli.eval_report import format_report, write_outputs
    from visinstruct.trainer import vqa_eval  # torch and transformers load only here

    try:
        if vqa_eval.is_clip_run(cfg.checkpoint):
            report, records, found = vqa_eval.evaluate_clip(cfg), [], None
        else:
            report, records, found = vqa_eval.evaluate(cfg)
    except vqa_eval.EvalDataError as e:
        raise UserError(str(e)) from None
    if cfg.out is not None:
        write_outputs(cfg, report, records, found)
    print(json.dumps(report, indent=1) if args.json else format_report(report, cfg.out))
    return 0
