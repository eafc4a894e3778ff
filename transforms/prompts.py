"""Prompt templates and per-sample plans for conversation generation: plain functions, no Beam.

Everything a sample gets is derived from its key and the base seed, so the same input and config give the same
plan (kind, seed, question) on any runner, in any order.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from visinstruct.configs import CONFIG_DIR
from visinstruct.schemas import IMAGE_TOKEN, SampleMeta, Turn
from visinstruct.transforms.vision import user_parts

DEFAULT_TEMPLATES = CONFIG_DIR / "prompts" / "llava.yaml"


@dataclass(frozen=True)
class KindTemplate:
    name: str
    system: str
    context: str  # "none", "captions" or "captions_and_boxes"
    format: str  # "qa" or "description"
    examples: list[dict]
    questions: list[str]
    image: bool = False  # the model sees the image (a vision backend); ``user`` is the text under it
    user: str = "{context}"


@dataclass(frozen=True)
class Templates:
    kinds: dict[str, KindTemplate]
    brief_questions: list[str]
    object_vocabulary: list[str]
    sha256: str  # of the template file's text: provenance of every generated sample


def load_templates(path: str | Path | None = None) -> Templates:
    """Read a template file (default: the bundled ``configs/prompts/llava.yaml``)."""
    path = Path(path or DEFAULT_TEMPLATES)
    text = path.read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    rules = data.get("rules", "").strip()
    kinds = {}
    for name, spec in data["kinds"].items():
        kinds[name] = KindTemplate(
            name=name,
            system=spec["system"].replace("{rules}", rules).strip(),
            context=spec.get("context", "captions"),
            format=spec.get("format", "qa"),
            examples=list(spec.get("examples", [])),
            questions=list(spec.get("questions", [])),
            image=bool(spec.get("image", False)),
            user=spec.get("user", "{context}").strip(),
        )
        problem = _template_problem(kinds[name])
        if problem:
            raise ValueError(f"{path}: kind {name!r} {problem}")
    return Templates(
        kinds,
        list(data["brief_questions"]),
        [w.lower() for w in data.get("object_vocabulary", [])],
        hashlib.sha256(text.encode()).hexdigest(),
    )


def _template_problem(kind: KindTemplate) -> str | None:
    if kind.format not in ("qa", "description"):
        return f"has format {kind.format!r}: use qa or description"
    if kind.context not in ("none", "captions", "captions_and_boxes"):
        return f"has context {kind.context!r}: use none, captions or captions_and_boxes"
    if kind.format == "description" and not kind.questions:
        return "has format 'description' but no questions to draw from"
    if not kind.image and kind.context == "none":
        return "sees neither the image nor a context: give it 'image: true' or a context"
    if kind.image and kind.examples:
        return "sees the image, so its worked examples (text only) would mislead it: remove them"
    return None


def derive_seed(base: int, key: str, salt: str = "") -> int:
    """A 31-bit seed from the base seed and the sample key (stable across runs and machines)."""
    return int(hashlib.sha256(f"{base}:{key}:{salt}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def _unit(base: int, key: str, salt: str) -> float:
    return derive_seed(base, key, salt) / 0x80000000


def choose_kind(key: str, weights: dict[str, float], base: int, salt: str = "kind") -> str:
    """A kind drawn by weight, deterministically per key."""
    names = sorted(k for k, w in weights.items() if w > 0)
    total = sum(weights[k] for k in names)
    point, acc = _unit(base, key, salt) * total, 0.0
    for name in names:
        acc += weights[name]
        if point < acc:
            return name
    return names[-1]


def choose_kinds(key: str, weights: dict[str, float], base: int, count: int) -> list[str]:
    """``count`` distinct kinds drawn by weight without replacement (fewer when fewer have a weight), per key.

    The first is :func:`choose_kind`'s, so ``count: 1`` plans what it always planned.
    """
    left, chosen = {k: w for k, w in weights.items() if w > 0}, []
    while left and len(chosen) < count:
        salt = "kind" if not chosen else f"kind{len(chosen)}"
        chosen.append(choose_kind(key, left, base, salt))
        del left[chosen[-1]]
    return chosen


def uses_llm(key: str, fraction: float, base: int) -> bool:
    """Whether this sample goes to the LLM (else it gets caption-only data); a stable subset of ``fraction``."""
    return fraction >= 1.0 or _unit(base, key, "llm") < fraction


def pick(items: list[str], key: str, base: int, salt: str) -> str:
    return items[derive_seed(base, key, salt) % len(items)]


def format_context(meta: SampleMeta, with_boxes: bool) -> str:
    """What the model is told about the image: captions, then (optionally) objects with boxes, then tags."""
    captions = [c for c in [meta.caption, *meta.captions] if c]
    if not with_boxes:
        return "\n".join(captions)
    lines = ["Captions:", *captions]
    if meta.boxes:
        lines.append("Objects:")
        lines += [f"{b.category}: [{', '.join(f'{v:.2f}' for v in b.bbox)}]" for b in meta.boxes]
    if meta.tags:
        lines.append("Tags: " + ", ".join(meta.tags))
    return "\n".join(lines)


def build_messages(template: KindTemplate, meta: SampleMeta) -> list[dict]:
    """OpenAI-style chat messages: system, worked examples as earlier turns, then this sample's context.

    A kind that sees the image gets its user message as parts: the image placeholder, then ``user`` with
    ``{context}`` filled in (see :mod:`visinstruct.transforms.vision`).
    """
    messages = [{"role": "system", "content": template.system}]
    for example in template.examples:
        messages.append({"role": "user", "content": example["context"].strip()})
        messages.append({"role": "assistant", "content": example["reply"].strip()})
    context = "" if template.context == "none" else format_context(meta, template.context == "captions_and_boxes")
    text = template.user.replace("{context}", context).strip()
    messages.append({"role": "user", "content": user_parts(text) if template.image else text})
    return messages


def caption_only(meta: SampleMeta, templates: Templates, base: int) -> list[Turn] | None:
    """Stage-1 data with no LLM: a brief-description instruction drawn per key, answered by the caption."""
    if not meta.caption or not meta.caption.strip():
        return None
    question = pick(templates.brief_questions, meta.key, base, "brief")
    return [Turn("human", f"{IMAGE_TOKEN}\n{question}"), Turn("gpt", meta.caption.strip())]


def request_fingerprint(model: str, messages: list[dict], sampling: dict, image: dict | None = None) -> str:
    """The cache key of one generation: model, exact prompt and sampling parameters (seed included), and for a kind
    that sees the image, the image sent (its sha256) and the settings that prepared it."""
    key = {"model": model, "messages": messages, "sampling": sampling}
    if image is not None:  # text-only requests keep the keys they always had (old caches stay valid)
        key["image"] = image
    blob = json.dumps(key, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
