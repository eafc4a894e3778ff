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

from visinstruct.configs import EvalConfig, TextConfig
from visinstruct.trainer import eval_questions, vqa_metrics
from visinstruct.trainer.eval_questions import EvalDataError, Question, Questions

log = logging.getLogger(__name__)


IMAGE = "image"  # the condition every ablation is compared with
DEFAULT_CAPTION_PROMPT = TextConfig.caption_prompt  # what the trainer's caption samples ask
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


def askable(model, processor, found: Questions, cfg: EvalConfig) -> Counter:
    """Drop the questions this model cannot be asked, by reason: its chat template refuses the conversation
    (``template_error``), or the prompt, image tokens and answer would not fit its context (``too_long``).
    Returns the counts; one such question must not end the evaluation of the rest."""
    from visinstruct.trainer.chat import prompt_text

    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    limit = getattr(text_config, "max_position_embeddings", None)
    image_tokens = getattr(model.config, "image_seq_length", 0) or 0
    dropped, kept = Counter(), []
    for question in found.items:
        try:
            text = prompt_text(processor, question.messages(), cfg.system)
        except Exception:  # jinja2's TemplateError, or a template's raise_exception() on roles it does not take
            dropped["template_error"] += 1
            continue
        if limit and len(processor.tokenizer(text)["input_ids"]) + image_tokens + cfg.max_new_tokens > limit:
            dropped["too_long"] += 1
            continue
        kept.append(question)
    found.items = kept
    if not kept:
        raise EvalDataError(f"no question this model can be asked: {dict(dropped)}")
    return dropped


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
    paired difference of the headline metric between the image and the ablation; the majority-answer floor (the
    most common answer of each type among these questions). Intervals resample images, each with its questions."""
    types = sorted(Counter(q.type for q in questions))
    groups = {ALL: list(range(len(questions)))} | {
        t: [i for i, q in enumerate(questions) if q.type == t] for t in types
    }
    judged_by = {t: vqa_metrics.headline([questions[i].references for i in groups[t]], cfg.scorer) for t in types}
    metric = {i: judged_by[q.type] for i, q in enumerate(questions)}
    interval = {"confidence": cfg.confidence, "rounds": cfg.bootstrap, "seed": cfg.seed}
    clusters = {g: [questions[i].image for i in members] for g, members in groups.items()}

    def headline(condition: str, members: list[int]) -> list[float]:
        return [scores[condition][i][metric[i]] for i in members]

    conditions = {
        condition: {
            group: {
                "score": vqa_metrics.mean_interval(headline(condition, members), **interval, clusters=clusters[group]),
                **{
                    name: vqa_metrics.mean_interval(
                        [per[i][name] for i in members], **interval, clusters=clusters[group]
                    )
                    for name in ("exact", "f1")
                },
            }
            for group, members in groups.items()
        }
        for condition, per in scores.items()
    }
    differences = {
        condition: {
            group: vqa_metrics.paired_difference(
                headline(IMAGE, members), headline(condition, members), **interval, clusters=clusters[group]
            )
            for group, members in groups.items()
        }
        for condition in scores
        if condition != IMAGE
    }
    majority = vqa_metrics.majority_answers([(q.type, q.references) for q in questions])
    floor = [score(q, majority[q.type]) for q in questions]
    return {
        "headline": judged_by,
        "interval": {**interval, "resampled": "images"},
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
    if cfg.zero_shot.classes:
        raise EvalDataError(
            "zero_shot.classes is for a train-clip checkpoint; this one is answered question by question"
        )
    text = trained_text(cfg.checkpoint)
    caption_prompt = cfg.caption_prompt or text.get("caption_prompt") or DEFAULT_CAPTION_PROMPT
    if cfg.system is None and text.get("system") is not None:
        cfg = dataclasses.replace(cfg, system=text["system"])
    found = read_questions(cfg, caption_prompt)
    if not found.items:
        skipped = ", ".join(f"{r} {n}" for r, n in found.skipped.most_common()) or "nothing read"
        raise EvalDataError(f"no question to ask: {found.samples} samples read; skipped: {skipped}")
    if ALL in {q.type for q in found.items}:
        raise EvalDataError(f"a question category may not be called {ALL!r}: the report uses it for every question")
    stand_in = eval_questions.shuffled_images([q.image for q in found.items], cfg.seed)
    conditions = [IMAGE, *(a for a in cfg.ablations if a != "shuffled" or stand_in)]
    if "shuffled" in cfg.ablations and not stand_in:
        log.warning("eval: one image only, so no shuffled-image condition")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from visinstruct.transforms.devices import pick_device, pick_dtype

    device = pick_device(cfg.device)
    model, processor = load_checkpoint(cfg.checkpoint, device=device, dtype=pick_dtype(cfg.dtype, device))
    unasked = askable(model, processor, found, cfg)
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
        "unaskable": dict(unasked.most_common()),
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
