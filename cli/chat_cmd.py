"""``visinstruct chat --checkpoint C --image I "prompt"``: ask a checkpoint of ``visinstruct train`` about an image."""

from __future__ import annotations

import argparse
from pathlib import Path

from visinstruct.cli.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "chat",
        help="ask a trained LLaVA checkpoint about an image",
        description="Greedy answer of a checkpoint written by `visinstruct train` (its output "
        "folder or OUT/model) to a prompt about one image, with the chat template "
        "it was trained with.",
    )
    parser.add_argument("prompt", help="the question or instruction")
    parser.add_argument("--checkpoint", required=True, help="a run's output folder, or its model/ folder")
    parser.add_argument("--image", required=True, help="an image file")
    parser.add_argument("--system", help="a system message (default: none, or the template's own)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest answer, in tokens (default 128)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1...")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    if not Path(args.image).is_file():
        raise UserError(f"{args.image}: no such image file")
    from PIL import Image, UnidentifiedImageError
    from transformers.utils import logging as hf_logging

    from visinstruct.trainer.chat import answer, load_checkpoint  # torch and transformers load only here

    hf_logging.disable_progress_bar()  # the answer is the output; a loading bar is noise
    try:
        image = Image.open(args.image).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{args.image}: not an image Pillow can read ({e})") from None
    model, processor = load_checkpoint(args.checkpoint, device=args.device)
    print(answer(model, processor, image, args.prompt, args.max_new_tokens, args.system))
    return 0
