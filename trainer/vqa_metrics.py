"""How right an answer is, and how sure we are of a mean: the scoring half of ``visinstruct eval``.

Answers and references are compared after :func:`normalize_answer` (VQA's habits: case, punctuation, articles and
number words do not count). :func:`exact_match` is VQA accuracy: with ten or more references (VQA's annotators),
the mean over leaving out each annotator of ``min(1, agreeing / 3)``; with fewer (one reference, or acceptable
alternatives), 1 when the answer equals any of them. :func:`token_f1` is the
bag-of-tokens F1 of SQuAD, the best over the references, for free-form answers. A question's type is its
category when the data names one, else its answer type (:func:`answer_type`: ``yes/no``, ``number``, ``other``
for short answers, ``free-form`` for longer ones); each type has a headline score (:func:`headline`): F1 when
most of its answers are free-form, exact match otherwise.

Confidence intervals are bootstrap percentiles, seeded, resampling images (a question's cluster) with all their
questions: :func:`mean_interval` for a mean, and :func:`paired_difference` for the difference between two
conditions asked the same questions (with the image against without), which is tighter than comparing two
separate intervals.
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
VQA_ANNOTATORS = 10  # a question with this many references is scored as VQA scores its ten annotators' answers
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
    matches = [said == normalize_answer(r) for r in references]
    if len(references) >= VQA_ANNOTATORS:  # VQA: the mean, over leaving out each annotator, of min(1, agreeing / 3)
        agreeing = sum(matches)
        return sum(min(1.0, (agreeing - m) / 3) for m in matches) / len(matches)
    return float(any(matches))


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


def headline(references: Sequence[Sequence[str]], scorer: str = "auto") -> str:
    """The metric a question type is judged by, from its questions' references: ``scorer`` when it is ``exact`` or
    ``f1``; ``auto``: token F1 when most of its questions have free-form answers, exact match otherwise. Whatever the
    type is called (a dataset's own category such as ``detail``), long answers are never judged by exact match."""
    if scorer != "auto":
        return scorer
    free = sum(answer_type(r) == "free-form" for r in references)
    return "f1" if 2 * free > len(references) else "exact"


def mean_interval(
    scores: Sequence[float],
    confidence: float = 0.95,
    rounds: int = 1000,
    seed: int = 0,
    clusters: Sequence[str] | None = None,
) -> dict:
    """The mean of per-question scores with a bootstrap percentile interval: ``{"mean", "low", "high", "n"}``.

    Questions about one image are not independent (easy-VQA asks ten of each), so with ``clusters`` (each
    question's image) the bootstrap resamples images, each with all its questions; without, questions. One
    cluster gives an interval of zero width, which says only that there is nothing to resample.
    """
    values = np.asarray(scores, np.float64)
    if not len(values):
        raise ValueError("mean_interval needs at least one score")
    labels = np.arange(len(values)) if clusters is None else np.asarray(clusters, dtype=object)
    if len(labels) != len(values):
        raise ValueError(f"mean_interval: {len(labels)} clusters for {len(values)} scores")
    ids = np.unique(labels, return_inverse=True)[1]
    sums, sizes = np.bincount(ids, values), np.bincount(ids)
    rng, means = np.random.default_rng(seed), np.empty(rounds)
    for at in range(0, rounds, 100):  # 100 rounds at a time: memory stays small for large evaluations
        pick = rng.integers(0, len(sums), size=(min(100, rounds - at), len(sums)))
        means[at : at + len(pick)] = sums[pick].sum(axis=1) / sizes[pick].sum(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"mean": float(values.mean()), "low": float(low), "high": float(high), "n": int(len(values))}


def paired_difference(
    first: Sequence[float],
    second: Sequence[float],
    confidence: float = 0.95,
    rounds: int = 1000,
    seed: int = 0,
    clusters: Sequence[str] | None = None,
) -> dict:
    """``mean(first) - mean(second)`` over the same questions, with a bootstrap interval that resamples questions
    (or ``clusters``), both scores of a question together."""
    a, b = np.asarray(first, np.float64), np.asarray(second, np.float64)
    if len(a) != len(b) or not len(a):
        raise ValueError(f"paired_difference needs two equally long, non-empty score lists, got {len(a)}, {len(b)}")
    return mean_interval(a - b, confidence, rounds, seed, clusters)


def majority_answers(questions: Sequence[tuple[str, Sequence[str]]]) -> dict[str, str]:
    """The most common answer of each question type, from ``(type, references)`` pairs, a question's answer being
    its references' consensus (the most common normalised one); ties go to the answer that sorts first, so the
    baseline does not depend on question order."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for kind, references in questions:
        consensus = collections.Counter(normalize_answer(r) for r in references)
        counts[kind][min(consensus, key=lambda answer: (-consensus[answer], answer))] += 1
    return {kind: min(c, key=lambda answer: (-c[answer], answer)) for kind, c in counts.items()}
