"""Typed config of ``visinstruct eval``: how good a trained model is, and whether it uses the image.

``visinstruct config show eval`` prints every key. ``--checkpoint``, ``--input``, ``--questions`` and ``--out`` set
the keys of the same names; everything else is ``--set KEY=VALUE`` or a YAML file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from visinstruct.configs.loader import opt
from visinstruct.configs.stages import _positive

Ablation = Literal["blank", "shuffled", "none"]
ZERO_SHOT_TEMPLATES = ("a photo of a {}.", "a {}.", "a picture of a {}.", "an image of a {}.")


@dataclass
class ZeroShotConfig:
    """A CLIP checkpoint's evaluation: retrieval recall@k on the held-out pairs, and zero-shot classification."""

    classes: dict[str, list[str]] = opt(
        factory=dict,
        doc="class sets for zero-shot classification, e.g. {shape: [circle, rectangle, triangle]}: a sample's "
        "class is the one name of the set its caption contains as a word (samples naming none or several are "
        "left out, and counted)",
    )
    templates: list[str] = opt(
        factory=lambda: list(ZERO_SHOT_TEMPLATES),
        doc="prompt templates ({} is the class name); each class's embedding is the mean of its prompts' (CLIP's "
        "prompt ensembling)",
    )
    recall_k: list[int] = opt(factory=lambda: [1, 5], doc="k of the retrieval recall@k, both ways")
    caption: Literal["auto", "txt", "conversation"] = opt(
        "auto", "the caption of a sample: its .txt, the first gpt turn, or auto (txt, else the conversation)"
    )

    def __post_init__(self):
        for name, classes in self.classes.items():
            if len(classes) < 2 or len({c.lower() for c in classes}) != len(classes):
                raise ValueError(f"zero_shot.classes.{name}: needs two or more class names, each named once")
        if not self.templates or any("{}" not in t for t in self.templates):
            raise ValueError("zero_shot.templates: every template needs {} where the class name goes")
        for k in self.recall_k:
            _positive("recall_k", k)


@dataclass
class EvalConfig:
    """A checkpoint asked held-out questions, with the image and without it."""

    checkpoint: str = opt(
        doc="a `visinstruct train` run (or its model/ folder), any transformers image-text-to-text model (folder "
        "or hub name), or a `visinstruct train-clip` run (then: retrieval and zero-shot, see zero_shot)"
    )
    input: str | None = opt(
        None,
        "held-out shards (folder, glob or brace pattern): every assistant turn of a sample's conversation is a "
        "question, the turns before it its context; a caption-only sample asks caption_prompt",
    )
    questions: str | None = opt(
        None,
        "or a question file (JSON list or JSONL): LLaVA training entries (image, conversations), or one question "
        "each: image, text|question|prompt, answer|answers (VQA's annotator list too), optional category and "
        "question_id",
    )
    image_root: str | None = opt(None, "where a question file's relative image paths start (default: its folder)")
    out: str | None = opt(None, "folder for eval.json, answers.jsonl and errors.html (null: print only)")
    ablations: list[Ablation] = opt(
        factory=lambda: ["blank", "shuffled", "none"],
        doc="conditions asked besides the real image: blank (a white image of the same size), shuffled (another "
        "sample's image), none (no image tokens at all)",
    )
    scorer: Literal["auto", "exact", "f1"] = opt(
        "auto",
        "headline metric: exact (VQA accuracy after normalisation), f1 (token F1), or auto (F1 for free-form "
        "answers, exact for yes/no, number and other); both are always reported",
    )
    source: Literal["auto", "conversation", "caption"] = opt(
        "auto",
        "questions from shards: conversations, captions (one question each), or auto (conversation, else caption)",
    )
    caption_prompt: str | None = opt(
        None, "the question a caption answers (null: the checkpoint's training text.caption_prompt, else its default)"
    )
    system: str | None = opt(None, "a system message before every conversation (null: the checkpoint's training one)")
    batch_size: int = opt(32, "questions per generate() call")
    max_new_tokens: int = opt(32, "longest answer, in tokens")
    max_samples: int | None = opt(None, "read at most this many samples (images) of the input")
    max_questions: int | None = opt(None, "ask at most this many questions")
    device: str = opt("cpu", "cpu, cuda, cuda:1...")
    dtype: Literal["auto", "fp32", "bf16"] = opt("auto", "weights' dtype: auto is bf16 on CUDA, fp32 on the CPU")
    confidence: float = opt(0.95, "confidence level of the bootstrap intervals")
    bootstrap: int = opt(1000, "bootstrap resamples per interval")
    seed: int = opt(0, "seed of the shuffled images and of the bootstrap")
    errors: int = opt(48, "wrong answers (with the image) shown on errors.html")
    zero_shot: ZeroShotConfig = opt(factory=ZeroShotConfig, doc="for a train-clip checkpoint")

    def __post_init__(self):
        if (self.input is None) == (self.questions is None):
            raise ValueError("give exactly one of 'input' (held-out shards, --input) and 'questions' (--questions)")
        if self.image_root is not None and self.questions is None:
            raise ValueError("'image_root' is where a question file's images are; shards (input) hold their own")
        for name in ("batch_size", "max_new_tokens", "bootstrap"):
            _positive(name, getattr(self, name))
        for name in ("max_samples", "max_questions", "errors"):
            _positive(name, getattr(self, name), allow_zero=name == "errors")
        if not 0 < self.confidence < 1:
            raise ValueError(f"'confidence' must be between 0 and 1, got {self.confidence}")
        if len(set(self.ablations)) != len(self.ablations):
            raise ValueError(f"'ablations' names a condition twice: {self.ablations}")
