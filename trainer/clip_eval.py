"""Held-out evaluation of a CLIP model: recall@k both ways, how well its cosine tells pairs from mismatches, and
zero-shot classification (class names through prompt templates, their embeddings averaged, as in CLIP's paper).

Captions repeat in datasets such as easy-VQA ("a blue circle" describes many images), so a retrieval counts as
correct when the retrieved caption is the query's caption as text (image to text: the gallery is the distinct
captions), or the retrieved image's caption is the query text (text to image). With unique captions this is the
usual definition. The AUC is what the filter needs: the probability that an image scores higher with its own
caption than with a shuffled one, the shuffled captions being those of other samples, never equal to its own.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from visinstruct.configs.eval import ZERO_SHOT_TEMPLATES


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve: P(a positive scores above a negative), ties counting one half (Mann-Whitney U)."""
    positive, negative = np.asarray(positive, np.float64), np.sort(np.asarray(negative, np.float64))
    if not len(positive) or not len(negative):
        raise ValueError("auc needs at least one positive and one negative score")
    below = np.searchsorted(negative, positive, side="left")
    ties = np.searchsorted(negative, positive, side="right") - below
    return float((below + ties / 2).sum() / (len(positive) * len(negative)))


def retrieval_recall(image: np.ndarray, text: np.ndarray, captions: list[str], ks: Iterable[int] = (1, 5)) -> dict:
    """Recall@k from images to captions and from captions to images (see the module docstring for duplicates).

    Args:
        image, text: ``[N, D]`` L2-normalised embeddings; row ``i`` of both is sample ``i``.
        captions: the ``N`` captions (equal strings are equal captions).

    Returns:
        ``{"image_to_text_r1": ..., "text_to_image_r1": ..., ...}`` for each k, as fractions.
    """
    # one text embedding per distinct caption (its first sample's), and each sample's caption as an index into them
    _, first, index = np.unique(np.asarray(captions, dtype=object), return_index=True, return_inverse=True)
    to_text = np.argsort(-(image @ text[first].T), axis=1, kind="stable")  # [N, distinct]
    to_image = np.argsort(-(text @ image.T), axis=1, kind="stable")  # [N, N]
    result = {}
    for k in ks:
        result[f"image_to_text_r{k}"] = float((to_text[:, :k] == index[:, None]).any(axis=1).mean())
        result[f"text_to_image_r{k}"] = float((index[to_image[:, :k]] == index[:, None]).any(axis=1).mean())
    return result


def shuffled_pairs(captions: list[str], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(i, j)`` of sample ``i``'s image with sample ``j``'s caption, ``j`` a random other sample whose
    caption differs from ``i``'s. Samples with no such ``j`` (every caption alike) are left out.
    """
    captions_array = np.asarray(captions, dtype=object)
    rng = np.random.default_rng(seed)
    n = len(captions)
    images, texts = [], []
    for i, j in enumerate(rng.permutation(n)):
        for step in range(n):  # the permutation's pick, or the next sample along with another caption
            candidate = (j + step) % n
            if captions_array[candidate] != captions_array[i]:
                images.append(i)
                texts.append(candidate)
                break
    return np.array(images, dtype=int), np.array(texts, dtype=int)


def separating_threshold(positive: np.ndarray, negative: np.ndarray) -> tuple[float, float]:
    """The score threshold that best tells positives (kept when ``score >= threshold``) from negatives.

    Best means the highest balanced accuracy, ``(kept positives + dropped negatives) / 2`` as fractions, so the
    answer does not lean on how many of each there are. The threshold sits halfway between the two scores it
    separates. Returns ``(threshold, balanced_accuracy)``.
    """
    positive, negative = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    if not len(positive) or not len(negative):
        raise ValueError("separating_threshold needs at least one positive and one negative score")
    candidates = np.unique(np.concatenate([positive, negative]))
    cuts = np.concatenate([[candidates[0] - 1e-3], (candidates[1:] + candidates[:-1]) / 2, [candidates[-1] + 1e-3]])
    kept = 1.0 - np.searchsorted(np.sort(positive), cuts, side="left") / len(positive)
    dropped = np.searchsorted(np.sort(negative), cuts, side="left") / len(negative)
    balanced = (kept + dropped) / 2
    best = int(np.argmax(balanced))  # the lowest threshold among equals: keep more when it costs nothing
    return float(cuts[best]), float(balanced[best])


def matching_scores(image: np.ndarray, text: np.ndarray, captions: list[str], seed: int = 0) -> tuple:
    """Cosines of matching pairs, and of the same images with shuffled, different captions."""
    images, texts = shuffled_pairs(captions, seed)
    return (image * text).sum(axis=1), (image[images] * text[texts]).sum(axis=1)


@torch.no_grad()
def embed(model: torch.nn.Module, batches: Iterable[dict], device: str, dtype: torch.dtype) -> tuple:
    """Normalised image and text embeddings (float32 numpy) and the captions of batches from ``trainer.data``."""
    images, texts, captions = [], [], []
    device_type = torch.device(device).type  # autocast wants "cuda", not "cuda:1"
    for batch in batches:
        with torch.autocast(device_type=device_type, dtype=dtype, enabled=dtype != torch.float32):
            image = model.encode_image(batch["image"].to(device), normalize=True)
            text = model.encode_text(batch["text"].to(device), normalize=True)
        images.append(image.float().cpu().numpy())
        texts.append(text.float().cpu().numpy())
        captions += batch["caption"]
    if not captions:
        raise ValueError("no held-out sample to evaluate on (do the eval shards have images and captions?)")
    return np.concatenate(images), np.concatenate(texts), captions


def evaluate_embeddings(
    image: np.ndarray, text: np.ndarray, captions: list[str], seed: int = 0, ks: Iterable[int] = (1, 5)
) -> dict:
    """Every metric of the module on embeddings: recall@k both ways (``ks``), ``matching_auc`` (the AUC of the
    cosine of matching pairs against the same images with shuffled, different captions), the filter threshold that
    best separates matching from shuffled pairs (``threshold``, with its ``threshold_balanced_accuracy``), and the
    sample count."""
    matching, mismatched = matching_scores(image, text, captions, seed)
    threshold, accuracy = separating_threshold(matching, mismatched)
    return {
        **retrieval_recall(image, text, captions, ks),
        "matching_auc": auc(matching, mismatched),
        "threshold": round(threshold, 4),
        "threshold_balanced_accuracy": accuracy,
        "samples": len(captions),
    }


PROMPT_TEMPLATES = ZERO_SHOT_TEMPLATES  # CLIP-paper style prompts (configs/eval.py: zero_shot.templates' default)


def class_embeddings(
    encode_text: Callable[[list[str]], np.ndarray], classes: Sequence[str], templates: Sequence[str] = PROMPT_TEMPLATES
) -> np.ndarray:
    """One unit embedding per class: its prompts (each template filled with the class name) embedded, each
    normalised, averaged and normalised again (CLIP's prompt ensembling). ``encode_text`` maps texts to ``[n, D]``."""
    if not classes or not templates:
        raise ValueError("zero-shot classification needs classes and prompt templates")
    rows = []
    for name in classes:
        prompts = np.asarray(encode_text([template.format(name) for template in templates]), np.float64)
        prompts /= np.linalg.norm(prompts, axis=1, keepdims=True)
        mean = prompts.mean(axis=0)
        rows.append(mean / np.linalg.norm(mean))
    return np.stack(rows).astype(np.float32)


def zero_shot(image: np.ndarray, classes: np.ndarray, labels: Sequence[int], names: Sequence[str]) -> dict:
    """Zero-shot accuracy of unit image embeddings ``[N, D]`` against unit class embeddings ``[C, D]``: each image
    is given its most similar class (the first on a tie); ``labels`` are the true class indices. Returns the overall
    accuracy, each class's (by name, over its images) and the count."""
    labels = np.asarray(labels)
    if len(labels) != len(image) or not len(labels):
        raise ValueError(f"zero_shot needs one label per image, got {len(labels)} for {len(image)}")
    predicted = np.argmax(image @ classes.T, axis=1)
    right = predicted == labels
    per_class = {name: float(right[labels == c].mean()) for c, name in enumerate(names) if (labels == c).any()}
    return {"accuracy": float(right.mean()), "per_class": per_class, "samples": int(len(labels))}


_WORD = re.compile(r"\w+")


def _words(text: str) -> str:
    """Text as its lower-case words between spaces: a phrase is found in it as a whole (any script's letters)."""
    return " " + " ".join(_WORD.findall(text.lower())) + " "


def class_labels(captions: Sequence[str], classes: Sequence[str]) -> list[int | None]:
    """Each caption's class: the index of the one class name it contains as a whole word or phrase (any case),
    or None when it names none of them or several."""
    labels = []
    for caption in captions:
        text = _words(caption)
        hits = [i for i, name in enumerate(classes) if _words(name) in text]
        labels.append(hits[0] if len(hits) == 1 else None)
    return labels


def load_run(checkpoint: str, device: str = "cpu"):
    """A ``train-clip`` run's model (eval mode), its eval transform and tokenizer, from its ``model.pt`` alone."""
    import json
    import tempfile
    from pathlib import Path

    import open_clip

    from visinstruct.trainer.clip_tower import load_clip_checkpoint

    saved = load_clip_checkpoint(checkpoint)
    weights = Path(checkpoint) if Path(checkpoint).suffix == ".pt" else Path(checkpoint) / "model.pt"
    name = saved.get("model_name") or "visinstruct-clip"
    with tempfile.TemporaryDirectory() as folder:  # open_clip takes a config as a JSON file named after the model
        config = Path(folder) / f"{name}.json"
        config.write_text(json.dumps(saved["model_config"]))
        open_clip.add_model_config(str(config))
    model, _, transform = open_clip.create_model_and_transforms(name, pretrained=str(weights), device=device)
    return model.eval(), transform, open_clip.get_tokenizer(name)


def evaluate_run(cfg) -> dict:
    """``visinstruct eval`` of a CLIP (``cfg``: an ``EvalConfig``): recall@k both ways, the matching AUC and
    threshold, and zero-shot accuracy per class set of ``cfg.zero_shot``, on ``cfg.input``'s image-caption pairs.
    A class set reports how many samples its captions could not label (none or several of its names)."""
    from visinstruct.trainer.data import iterate_once, shard_list
    from visinstruct.transforms.devices import pick_device, pick_dtype

    device = pick_device(cfg.device)
    model, transform, tokenizer = load_run(cfg.checkpoint, device)
    dtype = pick_dtype(cfg.dtype, device)
    batches = iterate_once(
        shard_list(cfg.input), cfg.batch_size, transform, tokenizer, cfg.zero_shot.caption, limit=cfg.max_samples
    )
    try:
        image, text, captions = embed(model, batches, device, dtype)
    except ValueError as e:  # no sample with an image and a caption
        from visinstruct.trainer.eval_questions import EvalDataError

        raise EvalDataError(f"{cfg.input}: {e}") from None
    report = evaluate_embeddings(image, text, captions, seed=cfg.seed, ks=cfg.zero_shot.recall_k)

    @torch.no_grad()
    def encode(texts: list[str]) -> np.ndarray:
        return model.encode_text(tokenizer(texts).to(device), normalize=True).float().cpu().numpy()

    zero = {}
    for set_name, names in cfg.zero_shot.classes.items():
        labels = class_labels(captions, names)
        kept = [i for i, label in enumerate(labels) if label is not None]
        if not kept:
            zero[set_name] = {"samples": 0, "unlabelled": len(labels)}
            continue
        result = zero_shot(
            image[kept], class_embeddings(encode, names, cfg.zero_shot.templates), [labels[i] for i in kept], names
        )
        zero[set_name] = {**result, "chance": 1 / len(names), "unlabelled": len(labels) - len(kept)}
    return {"retrieval": report, "zero_shot": zero, "templates": list(cfg.zero_shot.templates)}
