"""Ask a checkpoint about images: ``visinstruct chat --checkpoint C --image I "prompt"``, ``visinstruct eval``, the
benchmarks.

The prompt is built as training built it: the checkpoint's own chat template (saved with it) renders the
conversation so far, the last turn the user's, and the assistant's header; the processor expands each ``<image>`` to
the image tokens (a conversation may have one image, several, the n-th for its n-th ``<image>``, or none); greedy
decoding stops at the template's end-of-turn token. Our checkpoints' templates take a message's
content as text with ``<image>`` in it; a template that iterates typed content items (``{"type": "image"}``, as the
Hugging Face hub's LLaVA and most image-text-to-text models do) gets the image as an item instead, so any
transformers image-text-to-text checkpoint can be asked the same way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from PIL import Image

from visinstruct.schemas import IMAGE_TOKEN
from visinstruct.trainer.llava_model import load_checkpoint

__all__ = ["answer", "answers", "generate", "load_checkpoint", "prompt_text"]
_IMAGE_MARK = re.compile(re.escape(IMAGE_TOKEN) + r"\n?")
# a template that reads content items' "type": item['type'], item.type, or selectattr('type', ...) as the hub's LLaVA
_TYPED = re.compile(r"""['"]type['"]|\.type\b""")


def _with_images(messages: list[dict[str, str]], images: int) -> list[dict[str, str]]:
    """The messages with ``images`` ``<image>`` marks. One: exactly once, where the conversation put its first, else
    first in the first user turn. Several: the conversation's own when it has that many, else all first in the
    first user turn. None: nowhere."""
    stripped = [{**m, "content": _IMAGE_MARK.sub("", m["content"])} for m in messages]
    if images == 0:
        return stripped
    if images > 1:
        if sum(m["content"].count(IMAGE_TOKEN) for m in messages) == images:
            return [dict(m) for m in messages]
        first = next(i for i, m in enumerate(messages) if m["role"] == "user")
        stripped[first]["content"] = f"{IMAGE_TOKEN}\n" * images + stripped[first]["content"]
        return stripped
    placed = next((i for i, m in enumerate(messages) if IMAGE_TOKEN in m["content"]), None)
    if placed is None:
        placed = next(i for i, m in enumerate(messages) if m["role"] == "user")
        stripped[placed]["content"] = f"{IMAGE_TOKEN}\n{stripped[placed]['content']}"
    else:  # keep the conversation's own placement, the first mark only
        content = messages[placed]["content"]
        at = content.index(IMAGE_TOKEN)
        stripped[placed]["content"] = (
            content[:at] + IMAGE_TOKEN + _IMAGE_MARK.sub("", content[at + len(IMAGE_TOKEN) :])
        )
    return stripped


def _typed(message: dict[str, str]) -> dict:
    """A message as typed content items: an image item where each ``<image>`` stood, text items around them."""
    pieces = message["content"].split(IMAGE_TOKEN)
    if len(pieces) == 1:
        return {"role": message["role"], "content": [{"type": "text", "text": message["content"]}]}
    items = [{"type": "text", "text": pieces[0]}] if pieces[0].strip() else []
    for piece in pieces[1:]:
        items.append({"type": "image"})
        if piece.lstrip("\n"):
            items.append({"type": "text", "text": piece.lstrip("\n")})
    return {"role": message["role"], "content": items}


def prompt_text(
    processor, prompt: str | list[dict[str, str]], system: str | None = None, image: bool | int = True
) -> str:
    """The text the model continues: the conversation (a user prompt, or ``[{"role", "content"}]`` messages ending
    with the user's) with the image once, ``image`` images when a number (0: none; false: none), and the
    assistant's header."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if system is not None:
        messages = [{"role": "system", "content": system}] + messages
    messages = _with_images(messages, int(image))
    template = getattr(processor, "chat_template", None) or processor.tokenizer.chat_template
    rendered = [_typed(m) for m in messages] if template and _TYPED.search(template) else messages
    return processor.tokenizer.apply_chat_template(
        rendered, chat_template=template, tokenize=False, add_generation_prompt=True
    )


def generate(
    model,
    processor,
    conversations: Sequence[str | list[dict[str, str]]],
    images: Sequence[Image.Image | Sequence[Image.Image]] | None,
    max_new_tokens: int = 64,
    system: str | None = None,
) -> list[str]:
    """Greedy answers to a batch of conversations, each with its image or images, or all without (``images``
    None).

    Args:
        model: an image-text-to-text model (:func:`load_checkpoint`).
        processor: its processor.
        conversations: user prompts, or messages ``[{"role": "user" | "assistant", "content"}]`` ending with the
            user's turn.
        images: per conversation an image, or a list of images (the n-th for its n-th ``<image>``, or first in
            its first user turn; an empty list for none); or None to ask without images (no image tokens at all).
        max_new_tokens: the longest answer, in tokens.
        system: a system message, or None for the template's default.

    Returns:
        The decoded answers, special tokens removed and whitespace stripped.
    """
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"  # generation continues every row from its last real token
    if tokenizer.pad_token is None:  # many hub LMs have none; padding is masked out of attention anyway
        tokenizer.pad_token = tokenizer.eos_token
    each = [[] for _ in conversations] if images is None else [_image_list(i) for i in images]
    texts = [prompt_text(processor, c, system, image=len(i)) for c, i in zip(conversations, each)]
    flat = [image.convert("RGB") for i in each for image in i]  # the processor fills image tokens in order
    if not flat:
        inputs = processor(text=texts, padding=True, return_tensors="pt")
    else:
        inputs = processor(images=flat, text=texts, padding=True, return_tensors="pt")
    inputs = inputs.to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return [
        text.strip()
        for text in tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    ]


def _image_list(images: Image.Image | Sequence[Image.Image]) -> list[Image.Image]:
    return [images] if isinstance(images, Image.Image) else list(images)


def answers(
    model,
    processor,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    system: str | None = None,
) -> list[str]:
    """Greedy answers to one prompt per image, in one batch (:func:`generate` with one user turn each)."""
    return generate(model, processor, list(prompts), list(images), max_new_tokens, system)


def answer(
    model, processor, image: Image.Image, prompt: str, max_new_tokens: int = 64, system: str | None = None
) -> str:
    """The greedy answer to one prompt about one image (:func:`answers` for one)."""
    return answers(model, processor, [image], [prompt], max_new_tokens, system)[0]
