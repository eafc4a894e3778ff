"""How right an answer is, and how sure we are of a mean: the scoring half of ``visinstruct eval``.

Answers and references are compared after :func:`normalize_answer` (VQA's habits: case, punctuation, articles and
number words do not count). :func:`exact_match` is VQA accuracy: with fewer than three references, 1 when the answer
equals any of them; with three or more (VQA's annotators), ``min(1, equal / 3)``. :func:`token_f1` is the
bag-of-tokens F1 of SQuAD, the best over the references, for free-form answers. A question's type is its
category when the data names one, else its answer type (:func:`answer_type`: ``yes/no``, ``number``, ``other``
for short answers, ``free-form`` for longer ones); each type has a headline score (:func:`headline`): F1 for
free-form answers, exact match for the rest.

Confidence intervals are bootstrap percentiles over questions, seeded: :func:`mean_interval` for a mean, and
:func:`paired_difference` for the difference between two conditions asked the same questions (with the image
against without), which is tighter than comparing two separate intervals.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence

import numpy as np

NUMBER_WORDS = {
    w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve".split())
}
ARTICLES = {"a", "an", "the"}
FREE_FORM_WORDS = 4  # a reference of this many words or more is a free-form answer (scored by token F1)
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_PUNCTUATION = re.compile(r"[^\w\s.]|(?<!\d)\.|\.(?!\d)")  # a full stop survives only inside a number (3.5)


def normalize_answer(text: str) -> str:
    """An answer as VQA compares it: lower case, no punctuation (a decimal point stays), number words as digits,
    no articles, single spaces. ``"Two."`` and ``"2"`` normalise alike, as do ``"A red circle!"`` and ``"red circle"``.
    """
    text = _THOUSANDS.sub("", text.lower())
    text = _PUNCTUATION.sub(" ", text.replace("'", ""))
    words = [NUMBER_WORDS.get(w, w) for w in text.split()]
    return " ".join(w for w in words if w not in ARTICLES)


def exact_match(answer: str, references: Sequence[str]) -> float:
    """VQA accuracy of ``answer`` against ``references`` (see the module docstring)."""
    if not references:
        raise ValueError("exact_match needs at least one reference answer")
    said = normalize_answer(answer)
    equal = sum(said == normalize_answer(r) for r in references)
    if len(references) >= 3:
        return min(1.0, equal / 3)
    return float(equal > 0)


def token_f1(answer: str, references: Sequence[str]) -> float:
    """The best bag-of-words F1 of ``answer`` against any reference, both normalised; two empty texts score 1."""
    if not references:
        raise ValueError("token_f1 needs at least one reference answer")
    said = normalize_answer(answer).split()
    best = 0.0
    for reference in references:
        truth = normalize_answer(reference).split()
        if not said or not truth:
            best = max(best, float(said == truth))
            continue
        common = sum((collections.Counter(said) & collections.Counter(truth)).values())
        if common:
            precision, recall = common / len(said), common / len(truth)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def answer_type(references: Sequence[str]) -> str:
    """VQA's answer type of a question from its most common reference: ``yes/no``, ``number`` or ``other``; a
    reference of :data:`FREE_FORM_WORDS` words or more makes it ``free-form``."""
    if not references:
        raise ValueError("answer_type needs at least one reference answer")
    common = collections.Counter(normalize_answer(r) for r in references).most_common(1)[0][0]
    if common in ("yes", "no"):
        return "yes/no"
    if re.fullmatch(r"\d+(\.\d+)?", common):
        return "number"
    return "free-form" if len(common.split()) >= FREE_FORM_WORDS else "other"


def headline(question_type: str, scorer: str = "auto") -> str:
    """The metric a type is judged by: ``scorer`` when it is ``exact`` or ``f1``; ``auto``: F1 for free-form
    answers, exact match otherwise."""
    if scorer != "auto":
        return scorer
    return "f1" if question_type == "free-form" else "exact"


def _resample(n: int, rounds: int, seed: int) -> np.ndarray:
    """``[rounds, n]`` indices of bootstrap resamples of ``n`` items, the same for the same arguments."""
    return np.random.default_rng(seed).integers(0, n, size=(rounds, n))


def mean_interval(scores: Sequence[float], confidence: float = 0.95, rounds: int = 1000, seed: int = 0) -> dict:
    """The mean of per-question scores with a bootstrap percentile interval: ``{"mean", "low", "high", "n"}``.

    One question gives an interval of zero width, which says only that there is nothing to resample.
    """
    values = np.asarray(scores, np.float64)
    if not len(values):
        raise ValueError("mean_interval needs at least one score")
    means = values[_resample(len(values), rounds, seed)].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"mean": float(values.mean()), "low": float(low), "high": float(high), "n": int(len(values))}


def paired_difference(
    first: Sequence[float], second: Sequence[float], confidence: float = 0.95, rounds: int = 1000, seed: int = 0
) -> dict:
    """``mean(first) - mean(second)`` over the same questions, with a bootstrap interval that resamples questions
    (both scores of a question together)."""
    a, b = np.asarray(first, np.float64), np.asarray(second, np.float64)
    if len(a) != len(b) or not len(a):
        raise ValueError(f"paired_difference needs two equally long, non-empty score lists, got {len(a)}, {len(b)}")
    return mean_interval(a - b, confidence, rounds, seed)


def majority_answers(questions: Sequence[tuple[str, Sequence[str]]]) -> dict[str, str]:
    """The most common normalised first reference of each question type, from ``(type, references)`` pairs; ties
    go to the answer that sorts first, so the baseline does not depend on question order."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for kind, references in questions:
        counts[kind][normalize_answer(references[0])] += 1
    return {kind: min(c, key=lambda answer: (-c[answer], answer)) for kind, c in counts.items()}
