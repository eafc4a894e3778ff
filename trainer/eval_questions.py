"""The questions ``visinstruct eval`` asks: read from held-out shards or a question file, every one accounted for.

From shards (or LLaVA training JSON), every assistant turn of a conversation is a question: the human turn before
it is asked, the turns before that are its context (the true earlier answers, as training saw them), and the
assistant's text is the reference. A caption-only sample is one question, ``caption_prompt``, answered by its
caption (stage 1's exchange). A question file may instead hold one question per entry, as LLaVA's and VQA's
evaluation files do: ``image``, ``text`` (or ``question``, ``prompt``), ``answer`` or ``answers`` (VQA's list of
annotators' answers, plain or ``{"answer": ...}``), and optionally ``category`` and ``question_id``.

Nothing is lost silently: a sample or entry that cannot become questions (no image, an image that does not decode,
no reference answer, malformed JSON) is counted under a reason in :attr:`Questions.skipped`, and the run goes on.
Images are kept as their encoded bytes and decoded per batch, so a large evaluation holds compressed images only.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from visinstruct.schemas import Dropped
from visinstruct.trainer.llava_data import ROLES, conversation_of
from visinstruct.trainer.vqa_metrics import answer_type
from visinstruct.transforms.images import decode_rgb
from visinstruct.transforms.layout import image_member
from visinstruct.transforms.shards import read_bytes

log = logging.getLogger(__name__)


class EvalDataError(ValueError):
    """The data gives nothing to evaluate, or cannot be read as what it claims to be: one line for the user."""


QUESTION_KEYS = ("text", "question", "prompt")
ANSWER_KEYS = ("answers", "answer", "gt_answer", "label")
CATEGORY_KEYS = ("category", "question_type")


@dataclass(frozen=True)
class Question:
    """One question: ``id`` unique in the run, ``image`` the key of its image in :attr:`Questions.images`,
    ``context`` the earlier turns (``{"role", "content"}``), ``type`` its category or answer type."""

    id: str
    image: str
    context: tuple[dict[str, str], ...]
    text: str
    references: tuple[str, ...]
    type: str

    def messages(self) -> list[dict[str, str]]:
        """The conversation the model continues: the context, then this question as the user's turn."""
        return [*self.context, {"role": "user", "content": self.text}]


@dataclass
class Questions:
    """The questions, their images (encoded bytes by image key) and what was skipped, by reason."""

    items: list[Question] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)
    skipped: collections.Counter = field(default_factory=collections.Counter)
    samples: int = 0  # samples or entries read: each one gave questions or is counted in ``skipped``
    not_asked: int = 0  # questions beyond ``max_questions``

    def add_image(self, key: str, data: bytes | None) -> bool:
        """Keep an image if it decodes; otherwise count the sample as skipped and say False."""
        if data is None:
            self.skipped["no_image"] += 1
            return False
        try:
            decode_rgb(data)
        except Dropped as e:
            self.skipped[e.reason] += 1
            return False
        self.images[key] = data
        return True

    def image(self, key: str) -> Image.Image:
        return decode_rgb(self.images[key])


def conversation_questions(
    sample_id: str, image: str, turns: list[dict[str, str]], category: str | None = None
) -> list[Question]:
    """One question per assistant turn of a LLaVA conversation (``[{"from", "value"}]``)."""
    questions, messages = (
        [],
        [{"role": ROLES.get(t.get("from"), "user"), "content": t.get("value", "")} for t in turns],
    )
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i == 0 or messages[i - 1]["role"] != "user":
            continue
        references = (message["content"].strip(),)
        if not references[0]:
            continue
        questions.append(
            Question(
                id=f"{sample_id}-{len(questions)}",
                image=image,
                context=tuple(m for m in messages[: i - 1] if m["role"] != "system"),
                text=messages[i - 1]["content"],
                references=references,
                type=category or answer_type(references),
            )
        )
    return questions


def from_shards(urls: list[str], source: str, caption_prompt: str, max_samples: int | None = None) -> Questions:
    """The questions of held-out shards (see the module docstring); a sample that raises is skipped, counted."""
    import webdataset as wds

    found = Questions()

    def unreadable(error: Exception) -> bool:  # a damaged tar: counted, and the rest is read
        log.warning("eval: unreadable shard data skipped: %s: %s", type(error).__name__, error)
        found.skipped["unreadable_shard"] += 1
        return True

    stems = [PurePosixPath(u).stem for u in urls]
    names = {u: s if stems.count(s) == 1 else u.removesuffix(".tar") for u, s in zip(urls, stems)}
    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=unreadable))
    for sample in itertools.islice(iter(pipeline), max_samples):
        found.samples += 1
        key = f"{names.get(sample.get('__url__', ''), sample.get('__url__', ''))}/{sample['__key__']}"
        try:
            turns = conversation_of(sample, source=source, caption_prompt=caption_prompt)
            if turns is None:
                found.skipped["no_conversation"] += 1
                continue
            questions = conversation_questions(key, key, turns)
            if not questions:
                found.skipped["no_question"] += 1
                continue
            member = image_member(sample)
            if found.add_image(key, sample[member] if member else None):
                found.items += questions
        except Exception as e:  # one sample's surprise is one skipped sample, not a failed evaluation
            log.warning("eval: sample %s skipped: %s: %s", key, type(e).__name__, e)
            found.skipped["internal_error"] += 1
    return found


def _references(entry: dict[str, Any]) -> tuple[str, ...]:
    for name in ANSWER_KEYS:
        value = entry.get(name)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        texts = [str(v.get("answer", "")) if isinstance(v, dict) else str(v) for v in values]
        return tuple(t.strip() for t in texts if t.strip())
    return ()


def read_entries(path: str) -> Iterator[Any]:
    """The entries of a question file: a JSON list, or JSON Lines (one entry per line; a bad line is yielded as
    None, to be counted). A file that is neither (not UTF-8, a broken JSON list, one JSON object such as VQA's
    questions file) raises :class:`EvalDataError`."""
    try:
        text = read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as e:
        raise EvalDataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{path}: not valid JSON ({e})") from None
        yield from entries
        return
    if stripped.startswith("{") and "\n" in stripped.rstrip():
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # JSON Lines, one object per line
        if isinstance(whole, dict):
            raise EvalDataError(
                f"{path}: one JSON object, not a list of questions or JSON Lines (VQA's questions and annotations "
                "files: join them into one entry per question, with image, question and answers)"
            )
    for line in text.splitlines():
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                yield None


def from_file(path: str, image_root: str | None, caption_prompt: str, max_samples: int | None = None) -> Questions:
    """The questions of a question file (see the module docstring); images are read relative to ``image_root``
    (default: the file's folder), on any filesystem Beam knows."""
    root = image_root if image_root is not None else str(PurePosixPath(path).parent)
    found, seen_ids = Questions(), set()
    for index, entry in enumerate(itertools.islice(read_entries(path), max_samples)):
        found.samples += 1
        try:
            if not isinstance(entry, dict):
                found.skipped["malformed_entry"] += 1
                continue
            entry_id = str(entry.get("question_id", entry.get("id", index)))
            if entry_id in seen_ids:  # ids name questions in answers.jsonl: a repeated one gets its position
                entry_id = f"{entry_id}#{index}"
            seen_ids.add(entry_id)
            questions = _entry_questions(entry, entry_id, caption_prompt)
            if not questions:
                found.skipped["no_question" if entry.get("conversations") else "no_reference"] += 1
                continue
            name, key = entry.get("image"), questions[0].image
            if key not in found.images:  # an image several entries ask about is read once
                data = None
                if isinstance(name, str) and name:
                    image_path = name if "://" in name or name.startswith("/") else f"{root.rstrip('/')}/{name}"
                    try:
                        data = read_bytes(image_path)
                    except (OSError, ValueError):
                        found.skipped["image_missing"] += 1
                        continue
                if not found.add_image(key, data):
                    continue
            found.items += questions
        except Exception as e:  # one entry's surprise is one skipped entry
            log.warning("eval: entry %d skipped: %s: %s", index, type(e).__name__, e)
            found.skipped["internal_error"] += 1
    return found


def _entry_questions(entry: dict[str, Any], entry_id: str, caption_prompt: str) -> list[Question]:
    image = str(entry.get("image"))  # questions about one file share its image (and its shuffled stand-in)
    category = next((str(entry[k]) for k in CATEGORY_KEYS if entry.get(k) is not None), None)
    if entry.get("conversations"):
        return conversation_questions(entry_id, image, entry["conversations"], category)
    text = next((str(entry[k]) for k in QUESTION_KEYS if entry.get(k)), None)
    references = _references(entry)
    if text is None or not references:
        return []
    return [Question(entry_id, image, (), text, references, category or answer_type(references))]


def shuffled_images(keys: list[str], seed: int = 0) -> dict[str, str]:
    """Each image key mapped to another one: a seeded permutation's cycle, so no image is its own stand-in and each
    stands in once. Fewer than two images give an empty mapping (nothing to shuffle)."""
    distinct = sorted(set(keys))
    if len(distinct) < 2:
        return {}
    order = [distinct[i] for i in np.random.default_rng(seed).permutation(len(distinct))]
    return {key: order[(i + 1) % len(order)] for i, key in enumerate(order)}


def blank_like(image: Image.Image) -> Image.Image:
    """A white RGB image of the same size: what the model sees when it is shown nothing."""
    return Image.new("RGB", image.size, "white")


__all__ = ["Question", "Questions", "blank_like", "from_file", "from_shards", "shuffled_images"]
