"""Ask a trained checkpoint about images: ``visinstruct chat --checkpoint C --image I "prompt"``, and the benchmark.

The prompt is built as training built it: the checkpoint's own chat template (saved with it) renders a user turn
``<image>\\n{prompt}`` and the assistant's header; the processor expands ``<image>`` to the image tokens; greedy
decoding stops at the template's end-of-turn token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from visinstruct.schemas import IMAGE_TOKEN
from visinstruct.trainer.llava_model import load_checkpoint

__all__ = ["answer", "answers", "load_checkpoint", "prompt_text"]


def prompt_text(processor, prompt: str, system: str | None = None) -> str:
    """The text the model continues: a user turn with the image (``<image>`` first unless the prompt places it)."""
    content = prompt if IMAGE_TOKEN in prompt else f"{IMAGE_TOKEN}\n{prompt}"
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": content}
    ]
    return processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def answers(
    model,
    processor,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    system: str | None = None,
) -> list[str]:
    """Greedy answers to one prompt per image, in one batch.

    Args:
        model: a ``LlavaForConditionalGeneration`` (:func:`load_checkpoint`).
        processor: its ``LlavaProcessor``.
        images: RGB images, one per prompt.
        prompts: the user's questions.
        max_new_tokens: the longest answer, in tokens.
        system: a system message, or None for the template's default.

    Returns:
        The decoded answers, special tokens removed and whitespace stripped.
    """
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"  # generation continues every row from its last real token
    inputs = processor(
        images=[image.convert("RGB") for image in images],
        text=[prompt_text(processor, p, system) for p in prompts],
        padding=True,
        return_tensors="pt",
    ).to(model.device)
    with torch.inference_mode():
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return [
        text.strip()
        for text in tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    ]


def answer(
    model, processor, image: Image.Image, prompt: str, max_new_tokens: int = 64, system: str | None = None
) -> str:
    """The greedy answer to one prompt about one image (:func:`answers` for one)."""
    return answers(model, processor, [image], [prompt], max_new_tokens, system)[0]
