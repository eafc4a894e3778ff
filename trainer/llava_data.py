"""LLaVA training samples from our shards: a conversation becomes token ids and labels; batches are padded.

A sample's conversation is its ``.json`` member's LLaVA ``conversations`` or, for caption-only data (stage 1), its
caption as one exchange: ``<image>\\n{caption_prompt}`` -> caption. Every LLaVA row shape trains: one image, none
(a text-only conversation: no image tokens, no pixel values) or several (``KEY.0.jpg``, ``KEY.1.png``...: the n-th
``<image>`` placeholder, in turn order, is the n-th image). A sample whose placeholders do not match its images is
skipped and counted (``image_mismatch``), as is one with no conversation (``no_conversation``).

:class:`ConversationEncoder` renders a conversation with a chat template (the tokenizer's own, a named one, or Jinja
text from the config) and tokenizes it; the labels are -100 (ignored by the loss) everywhere except on the
assistant's turns, which include the template's end-of-turn tokens so that the model learns to stop. System
text, human turns, role headers and image tokens carry no loss.
Each ``<image>`` token becomes ``image_seq_length`` copies, as transformers' ``LlavaProcessor`` expands it, so
training sees the very ids that inference builds; the batch's images, stacked in order, fill those tokens in order
(``LlavaForConditionalGeneration`` scatters image features into the image tokens of the flattened batch).

Where each assistant turn lies in the rendered text comes from rendering prefixes of the conversation: turn ``i``
spans from the end of ``render(messages[:i], add_generation_prompt=True)`` to the end of ``render(messages[:i+1])``.
That holds for any template that renders a conversation as the concatenation of its turns (ChatML, Llama, Vicuna
and most others); a template that does not is refused with a message, rather than masked wrongly.

The streaming itself (shards split over processes and workers, shuffle buffers, resampling, resumable position) is
``trainer.data.ShardStream``'s: :func:`make_stream` only supplies the per-sample conversation, the image processor
and this encoder.
"""

from __future__ import annotations

import bisect
import collections
import functools
import itertools
import json
from collections.abc import Callable
from typing import Any

import torch

from visinstruct.schemas import IMAGE_TOKEN, Turn, conversation_problems
from visinstruct.trainer.data import ShardStream, Skip, caption_of, iterate_once, shard_list, stream_sources
from visinstruct.transforms.layout import image_members

IGNORE_INDEX = -100  # label of a token without loss (torch's cross_entropy default ignore_index)
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}  # LLaVA's "from" -> chat template roles

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# LLaVA v1's conversation format ("vicuna_v1"): SYSTEM USER: ... ASSISTANT: ...</s>USER: ...
VICUNA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + ' ' }}"
    "{% elif message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
TEMPLATES = {"chatml": CHATML_TEMPLATE, "vicuna": VICUNA_TEMPLATE}


def resolve_template(template: str | None, tokenizer) -> str:
    """The Jinja text of a chat template: a named one, the text given, or (None) the tokenizer's own."""
    if template is None:
        if not tokenizer.chat_template:
            raise ValueError("the tokenizer has no chat template: set text.chat_template (e.g. chatml)")
        return tokenizer.chat_template
    return TEMPLATES.get(template, template)


def conversation_of(
    sample: dict[str, Any],
    source: str = "auto",
    caption: str = "auto",
    caption_prompt: str = "Describe the image briefly.",
) -> list[dict[str, str]] | Skip:
    """A raw sample's LLaVA conversation, or why it has none usable (the stream then skips it, counting the reason).

    Args:
        sample: a raw webdataset sample (member extension -> bytes).
        source: ``conversation`` (the ``.json`` member's), ``caption`` (the caption as one exchange, for a
            single-image sample) or ``auto`` (the conversation, else the caption).
        caption: where a caption comes from (``trainer.data.caption_of``).
        caption_prompt: the human turn of a caption exchange, after ``<image>``.

    Returns:
        ``[{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}, ...]`` with one ``<image>``
        per image member (none for a text-only sample); a conversation that is not valid training data for the
        sample's images (``schemas.conversation_problems``) counts as none. ``Skip("image_mismatch")`` when the
        sample's conversation has another number of placeholders than it has images (and no caption stands in),
        else ``Skip("no_conversation")``.
    """
    images, mismatch = len(image_members(sample)), False
    if source in ("auto", "conversation") and sample.get("json") is not None:
        raw = json.loads(sample["json"]).get("conversations") or []
        turns = [Turn(str(t.get("from", "")), str(t.get("value", ""))) for t in raw if isinstance(t, dict)]
        if turns and len(turns) == len(raw):
            if not conversation_problems(turns, images=images):
                return [{"from": t.role, "value": t.value} for t in turns]
            mismatch = sum(t.value.count(IMAGE_TOKEN) for t in turns) != images
    if source in ("auto", "caption") and images == 1:
        text = caption_of(sample, caption)
        if text:
            return [{"from": "human", "value": f"{IMAGE_TOKEN}\n{caption_prompt}"}, {"from": "gpt", "value": text}]
    return Skip("image_mismatch" if mismatch else "no_conversation")


class ConversationEncoder:
    """LLaVA conversations -> ``input_ids`` and ``labels`` (loss on assistant turns only); batches padded.

    Args:
        tokenizer: a fast tokenizer that knows ``<image>`` as one special token.
        template: Jinja chat template text (:func:`resolve_template`).
        image_token_id: the id of ``<image>``.
        image_seq_length: image tokens per image (the model config's ``image_seq_length``).
        system: a system message put before every conversation, or None.
        max_length: longer samples are cut at the end, before the first image whose tokens do not all fit (that
            image and those after it are left out).
    """

    def __init__(
        self,
        tokenizer,
        template: str,
        image_token_id: int,
        image_seq_length: int,
        system: str | None = None,
        max_length: int = 1024,
    ):
        if max_length <= image_seq_length:
            raise ValueError(f"max_length {max_length} leaves no room after {image_seq_length} image tokens")
        self.tokenizer, self.template, self.system, self.max_length = tokenizer, template, system, max_length
        self.image_token_id, self.image_seq_length = image_token_id, image_seq_length

    def messages(self, turns: list[dict[str, str]]) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        return system + [{"role": ROLES[t["from"]], "content": t["value"]} for t in turns]

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def assistant_spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of its assistant turns (end-of-turn tokens included).

        Raises:
            ValueError: the template does not render a conversation as the concatenation of its turns.
        """
        text, spans = self.render(messages), []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start, end = self.render(messages[:i], add_generation_prompt=True), self.render(messages[: i + 1])
            if not (end.startswith(start) and text.startswith(end)):
                raise ValueError(
                    "the chat template does not render a conversation turn after turn, so the "
                    "assistant's turns cannot be located: set text.chat_template (e.g. chatml)"
                )
            spans.append((len(start), len(end)))
        return text, spans

    def encode(self, turns: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of one conversation, each image token expanded, cut at ``max_length`` (never
        inside an image's tokens: the count of image tokens is always a multiple of ``image_seq_length``)."""
        text, spans = self.assistant_spans(self.messages(turns))
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        starts = [s for s, _ in spans]
        ids, labels, cut = [], [], self.max_length
        for token, (offset, _) in zip(encoded["input_ids"], encoded["offset_mapping"]):
            if token == self.image_token_id:
                if len(ids) + self.image_seq_length > self.max_length:
                    cut = min(cut, len(ids))  # this image does not fit whole: cut before it
                ids += [token] * self.image_seq_length
                labels += [IGNORE_INDEX] * self.image_seq_length
                continue
            span = bisect.bisect_right(starts, offset) - 1  # the last assistant turn starting at or before it
            ids.append(token)
            labels.append(token if span >= 0 and offset < spans[span][1] else IGNORE_INDEX)
        return ids[:cut], labels[:cut]

    def __call__(self, conversations: list[list[dict[str, str]]]) -> dict[str, torch.Tensor]:
        """A padded batch: ``input_ids``, ``attention_mask`` and ``labels``, each ``[B, longest]``, and ``images``
        ``[B]``: the images each sample's tokens hold (fewer than it has when ``max_length`` cut some off)."""
        encoded = [self.encode(turns) for turns in conversations]
        longest = max(len(ids) for ids, _ in encoded)
        batch = {
            "input_ids": torch.full((len(encoded), longest), self.tokenizer.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(encoded), longest), dtype=torch.long),
            "labels": torch.full((len(encoded), longest), IGNORE_INDEX, dtype=torch.long),
            "images": torch.tensor(
                [ids.count(self.image_token_id) // self.image_seq_length for ids, _ in encoded], dtype=torch.long
            ),
        }
        for row, (ids, labels) in enumerate(encoded):  # right padding: positions stay 0.. for every sample
            batch["input_ids"][row, : len(ids)] = torch.tensor(ids)
            batch["attention_mask"][row, : len(ids)] = 1
            batch["labels"][row, : len(ids)] = torch.tensor(labels)
        return batch


def pixel_values(image_processor, image) -> torch.Tensor:
    """One PIL image as the vision tower's input, ``[3, H, W]``."""
    return image_processor(images=image, return_tensors="pt")["pixel_values"][0]


def model_inputs(batch: dict[str, Any], device: str | torch.device = "cpu") -> dict[str, torch.Tensor | None]:
    """A stream batch as ``LlavaForConditionalGeneration``'s arguments and the labels: ``input_ids``,
    ``attention_mask``, ``labels`` and ``pixel_values``, the images whose tokens are in ``input_ids``, in order.

    The model fills the image tokens of the flattened batch with the images' features in order and refuses a
    different count, so ``pixel_values`` leaves out the images that ``max_length`` cut off, and is None when no
    token of the batch is an image's (text-only samples alone).
    """
    text = batch["text"]
    kept, given = text["images"].tolist(), batch.get("image_counts")
    pixels = batch["image"]
    if given is None:  # a batch built by hand: one image per sample
        given = [1] * len(kept) if pixels is not None else [0] * len(kept)
    if sum(kept) == 0:
        pixels = None
    elif kept != given:
        firsts = [0, *itertools.accumulate(given)]
        pixels = pixels[[first + i for first, n in zip(firsts, kept) for i in range(n)]]
    return {
        "input_ids": text["input_ids"].to(device),
        "attention_mask": text["attention_mask"].to(device),
        "labels": text["labels"].to(device),
        "pixel_values": None if pixels is None else pixels.to(device),
    }


def encoder_for(model, processor, text_cfg) -> ConversationEncoder:
    """The encoder of a model and its processor, with the text section of the config (template, system, length)."""
    return ConversationEncoder(
        processor.tokenizer,
        resolve_template(text_cfg.chat_template, processor.tokenizer),
        model.config.image_token_id,
        model.config.image_seq_length,
        text_cfg.system,
        text_cfg.max_length,
    )


def _conversations(cfg) -> Callable[[dict[str, Any]], Any]:
    return functools.partial(
        conversation_of, source=cfg.text.source, caption=cfg.data.caption, caption_prompt=cfg.text.caption_prompt
    )


def make_stream(cfg, processor, encoder: ConversationEncoder, rank: int, world_size: int) -> ShardStream:
    """The endless training stream of ``cfg.data``: batches ``{"key", "image", "text": encoder's batch, ...}``."""
    d = cfg.data
    return ShardStream(
        stream_sources(d),
        d.batch_size,
        functools.partial(pixel_values, processor.image_processor),
        encoder,
        _conversations(cfg),
        cfg.seed,
        d.shard_shuffle,
        d.shuffle_buffer,
        d.resampled,
        d.num_workers,
        rank,
        world_size,
    )


def held_out_batches(cfg, processor, encoder: ConversationEncoder, skipped: collections.Counter | None = None):
    """One pass over ``cfg.eval.shards`` (its first ``max_samples``), in ``eval.batch_size`` batches; samples
    skipped counted in ``skipped`` by reason, when given."""
    return iterate_once(
        shard_list(cfg.eval.shards),
        cfg.eval.batch_size,
        functools.partial(pixel_values, processor.image_processor),
        encoder,
        _conversations(cfg),
        limit=cfg.eval.max_samples,
        skipped=skipped,
    )
