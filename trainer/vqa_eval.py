"""``visinstruct eval``: a checkpoint answers held-out questions with the image, and again without it.

The questions come from shards or a question file (:mod:`~visinstruct.trainer.eval_questions`). Each is asked, in
batches and greedily, under the condition ``image`` and under each ablation: ``blank`` (a white image of the same
size), ``shuffled`` (another sample's image, the same stand-in for every question of an image) and ``none`` (no
image tokens). Every answer is scored by exact match and token F1 (:mod:`~visinstruct.trainer.vqa_metrics`); per
question type the headline metric's mean gets a bootstrap interval, and so does the paired difference between the
image and each ablation: the proof that the image is used is ``image - blank`` above zero, its interval too. The
majority answer of each type (from the questions asked) is the floor a model that ignores the image can reach.

A ``train-clip`` checkpoint is evaluated as a CLIP instead (:func:`evaluate_clip`): retrieval recall@k both ways
on the held-out pairs, the matching AUC, and zero-shot classification for the configured class sets.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from visinstruct.configs import EvalConfig
from visinstruct.trainer import eval_questions, vqa_metrics
from visinstruct.trainer.eval_questions import Question, Questions

log = logging.getLogger(__name__)


class EvalDataError(ValueError):
    """The data gives nothing to evaluate (every sample skipped), or not what the checkpoint needs."""


IMAGE = "image"  # the condition every ablation is compared with
DEFAULT_CAPTION_PROMPT = "Describe the image briefly."
ALL = "all"


def is_clip_run(checkpoint: str) -> bool:
    """Whether ``checkpoint`` is a ``train-clip`` run (a folder with model.pt, or the .pt file)."""
    path = Path(checkpoint)
    return path.suffix == ".pt" or (path / "model.pt").is_file()


def trained_text(checkpoint: str) -> dict[str, Any]:
    """The ``text`` section of the training config a checkpoint of ours carries (empty for other models)."""
    import yaml

    from visinstruct.trainer.llava_model import checkpoint_dir

    try:
        saved = checkpoint_dir(checkpoint) / "train_config.yaml"
    except FileNotFoundError:
        return {}
    if not saved.is_file():
        return {}
    return (yaml.safe_load(saved.read_text()) or {}).get("text") or {}


def read_questions(cfg: EvalConfig, caption_prompt: str) -> Questions:
    """The questions of ``cfg.input`` or ``cfg.questions``, cut to ``max_questions``."""
    if cfg.input is not None:
        from visinstruct.trainer.data import shard_list

        found = eval_questions.from_shards(shard_list(cfg.input), cfg.source, caption_prompt, cfg.max_samples)
    else:
        found = eval_questions.from_file(cfg.questions, cfg.image_root, caption_prompt, cfg.max_samples)
    if cfg.max_questions is not None and len(found.items) > cfg.max_questions:
        found.not_asked = len(found.items) - cfg.max_questions
        found.items = found.items[: cfg.max_questions]
    return found


def _dtype(cfg: EvalConfig) -> torch.dtype:
    if cfg.dtype == "bf16" or (cfg.dtype == "auto" and cfg.device.startswith("cuda")):
        return torch.bfloat16
    return torch.float32


def ask(model, processor, found: Questions, condition: str, cfg: EvalConfig, stand_in: dict[str, str]) -> list[str]:
    """Every question's greedy answer under ``condition``, in batches of ``cfg.batch_size``."""
    from visinstruct.trainer.chat import generate

    said = []
    for start in range(0, len(found.items), cfg.batch_size):
        batch = found.items[start : start + cfg.batch_size]
        images = None if condition == "none" else [_image(found, q, condition, stand_in) for q in batch]
        said += generate(model, processor, [q.messages() for q in batch], images, cfg.max_new_tokens, cfg.system)
    return said


def _image(found: Questions, question: Question, condition: str, stand_in: dict[str, str]):
    if condition == "shuffled":
        return found.image(stand_in[question.image])
    image = found.image(question.image)
    return eval_questions.blank_like(image) if condition == "blank" else image


def score(question: Question, answer: str) -> dict[str, float]:
    """Both metrics of one answer."""
    return {
        "exact": vqa_metrics.exact_match(answer, question.references),
        "f1": vqa_metrics.token_f1(answer, question.references),
    }


def summarize(questions: list[Question], scores: dict[str, list[dict[str, float]]], cfg: EvalConfig) -> dict[str, Any]:
    """Per condition and type (and ``all``): each metric's mean with its interval; per ablation and type, the
    paired difference of the headline metric between the image and the ablation; the majority-answer floor."""
    types = sorted(Counter(q.type for q in questions))
    groups = {ALL: list(range(len(questions)))} | {
        t: [i for i, q in enumerate(questions) if q.type == t] for t in types
    }
    metric = {i: vqa_metrics.headline(q.type, cfg.scorer) for i, q in enumerate(questions)}
    interval = {"confidence": cfg.confidence, "rounds": cfg.bootstrap, "seed": cfg.seed}

    def headline(condition: str, members: list[int]) -> list[float]:
        return [scores[condition][i][metric[i]] for i in members]

    conditions = {
        condition: {
            group: {
                "score": vqa_metrics.mean_interval(headline(condition, members), **interval),
                **{
                    name: vqa_metrics.mean_interval([per[i][name] for i in members], **interval)
                    for name in ("exact", "f1")
                },
            }
            for group, members in groups.items()
        }
        for condition, per in scores.items()
    }
    differences = {
        condition: {
            group: vqa_metrics.paired_difference(headline(IMAGE, members), headline(condition, members), **interval)
            for group, members in groups.items()
        }
        for condition in scores
        if condition != IMAGE
    }
    majority = vqa_metrics.majority_answers([(q.type, q.references) for q in questions])
    floor = [score(q, majority[q.type]) for q in questions]
    return {
        "headline": {t: vqa_metrics.headline(t, cfg.scorer) for t in types},
        "interval": interval,
        "conditions": conditions,
        "image_minus": differences,
        "majority": {
            "answers": majority,
            **{group: sum(floor[i][metric[i]] for i in members) / len(members) for group, members in groups.items()},
        },
    }


def evaluate(cfg: EvalConfig) -> tuple[dict[str, Any], list[dict[str, Any]], Questions]:
    """Ask, score and summarize (see the module docstring).

    Returns:
        ``(report, records, questions)``: the report (what eval.json holds), one record per question (its
        answers and scores under every condition: answers.jsonl) and the questions with their images.

    Raises:
        EvalDataError: no question could be asked (every sample skipped, and why).
    """
    from visinstruct.trainer.chat import load_checkpoint

    started = time.monotonic()
    text = trained_text(cfg.checkpoint)
    caption_prompt = cfg.caption_prompt or text.get("caption_prompt") or DEFAULT_CAPTION_PROMPT
    if cfg.system is None and text.get("system") is not None:
        cfg = dataclasses.replace(cfg, system=text["system"])
    found = read_questions(cfg, caption_prompt)
    if not found.items:
        skipped = ", ".join(f"{r} {n}" for r, n in found.skipped.most_common()) or "nothing read"
        raise EvalDataError(f"no question to ask: {found.samples} samples read; skipped: {skipped}")
    stand_in = eval_questions.shuffled_images([q.image for q in found.items], cfg.seed)
    conditions = [IMAGE, *(a for a in cfg.ablations if a != "shuffled" or stand_in)]
    if "shuffled" in cfg.ablations and not stand_in:
        log.warning("eval: one image only, so no shuffled-image condition")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model, processor = load_checkpoint(cfg.checkpoint, device=cfg.device, dtype=_dtype(cfg))
    loaded = time.monotonic()
    said, seconds = {}, {}
    for condition in conditions:
        at = time.monotonic()
        said[condition] = ask(model, processor, found, condition, cfg, stand_in)
        seconds[condition] = round(time.monotonic() - at, 2)
        log.info("eval: %d questions asked with %s in %.1f s", len(found.items), condition, seconds[condition])
    scores = {c: [score(q, a) for q, a in zip(found.items, said[c])] for c in conditions}
    report = {
        "checkpoint": cfg.checkpoint,
        "kind": "vlm",
        "data": cfg.input if cfg.input is not None else cfg.questions,
        "samples": found.samples,
        "images": len({q.image for q in found.items}),
        "questions": len(found.items),
        "skipped": dict(found.skipped.most_common()),
        "not_asked": found.not_asked,
        "types": dict(sorted(Counter(q.type for q in found.items).items())),
        "scorer": cfg.scorer,
        **summarize(found.items, scores, cfg),
        "seconds": {"load": round(loaded - started, 2), **seconds, "total": round(time.monotonic() - started, 2)},
    }
    records = [
        {
            "id": q.id,
            "image": q.image,
            "type": q.type,
            "question": q.text,
            "context_turns": len(q.context),
            "references": list(q.references),
            "answers": {c: said[c][i] for c in conditions},
            "scores": {c: scores[c][i] for c in conditions},
            **({"shuffled_image": stand_in[q.image]} if "shuffled" in said else {}),
        }
        for i, q in enumerate(found.items)
    ]
    return report, records, found


def evaluate_clip(cfg: EvalConfig) -> dict[str, Any]:
    """A ``train-clip`` checkpoint on held-out shards: retrieval recall@k both ways, the matching AUC and the
    separating threshold, and zero-shot accuracy for each class set of ``cfg.zero_shot``."""
    from visinstruct.trainer.clip_eval import evaluate_run

    if cfg.input is None:
        raise EvalDataError("a CLIP checkpoint is evaluated on held-out shards of image-caption pairs (--input)")
    return {"checkpoint": cfg.checkpoint, "kind": "clip", "data": cfg.input, **evaluate_run(cfg)}
