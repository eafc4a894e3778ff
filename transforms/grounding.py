"""The CLIP agreement check of replies from kinds that see the image (``generate.grounding``).

A reply is split into sentences; each is scored against the sample's image with the filter's CLIP handler
(:mod:`visinstruct.transforms.clip`), and the reply's score is the mean of its sentence scores. A reply scoring
below ``grounding.threshold`` is dropped as ``low_grounding``.

CLIP reads short captions (77 tokens), not paragraphs: scoring a whole reply would read its first sentence or two
only, so a hallucination further on would go unseen. Sentences are each within what the text encoder takes.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from visinstruct.configs import GroundingConfig
from visinstruct.transforms.clip import ClipHandler, ClipOutput, Example, make_handler
from visinstruct.transforms.vision import PreparedImage

log = logging.getLogger(__name__)
MAX_WORDS = 60  # about what fits in CLIP's 77 tokens (most English words are one BPE token, some two)
# After ., ! or ? followed by whitespace (so "3.5" and "gpt-4.1" stay whole), or at a line break.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n")
_WORD = re.compile(r"\w")


def _cut(text: str) -> str:
    """``text`` with its whitespace normalised and at most :data:`MAX_WORDS` words."""
    return " ".join(text.split()[:MAX_WORDS])


def sentences(text: str, limit: int = 8) -> list[str]:
    """The first ``limit`` sentences of a reply, each cut to what a CLIP text encoder takes.

    Pieces without a letter or digit ("...", "-") are not sentences. A reply that has text but no sentence is
    scored as a whole (cut); a blank reply has nothing to score and gives ``[]``.
    """
    found = [_cut(piece) for piece in _SENTENCE_END.split(text)]
    found = [s for s in found if _WORD.search(s)]
    if not found:
        return [_cut(text)] if text.strip() else []
    return found[:limit]


def passes(score: float, threshold: float) -> bool:
    """Whether a reply's grounding score is at least ``threshold``; NaN (nothing scored) never passes."""
    return score >= threshold  # False for NaN


def _mean(scores: Sequence[float]) -> float:
    return math.fsum(scores) / len(scores) if scores else math.nan


class GroundingScorer:
    """Scores replies against their images; holds its config only until :meth:`load` (so it pickles small)."""

    passes = staticmethod(passes)

    def __init__(self, cfg: GroundingConfig):
        self.cfg = cfg
        self._handler: ClipHandler | None = None
        self._model: Any = None
        self._preprocess: Callable | None = None

    def __getstate__(self) -> dict:
        return {"cfg": self.cfg, "_handler": None, "_model": None, "_preprocess": None}

    def load(self) -> None:
        """Load the CLIP model (once; later calls do nothing)."""
        if self._model is None:
            handler = make_handler(self.cfg.model)
            self._preprocess, self._model = handler.preprocessor(), handler.load_model()
            self._handler = handler

    def scores(self, items: Sequence[tuple[PreparedImage, str]]) -> list[float]:
        """Each reply's grounding score: the mean CLIP score of its sentences against its image.

        The mean, not the minimum: one hallucinated sentence among true ones lowers the mean in proportion, and
        a reply mostly made up falls below the threshold; the minimum would judge a reply by its one worst
        sentence, and single CLIP scores of short plain sentences ("It is a photo.") are noisy.

        All items' sentences are scored together, in chunks of ``model.max_batch_size``; each image is decoded
        and preprocessed once. A reply without text, or whose image or sentences cannot be scored, gets NaN.
        """
        self.load()
        examples: list[Example] = []
        owners: list[int] = []  # the item each example comes from
        for i, (image, text) in enumerate(items):
            parts = sentences(text or "")
            if not parts:
                continue
            try:
                pixels = self._preprocess(image.pil())
            except Exception as e:  # this item's image alone: its score is NaN, the others go on
                log.warning("grounding: image of item %d did not preprocess: %s: %s", i, type(e).__name__, e)
                continue
            examples += [(pixels, sentence) for sentence in parts]
            owners += [i] * len(parts)
        per_item: list[list[float]] = [[] for _ in items]
        for owner, output in zip(owners, self._score(examples)):
            per_item[owner].append(output.score)
        return [_mean(scores) for scores in per_item]

    def _score(self, examples: list[Example]) -> list[ClipOutput]:
        """Score in chunks; a chunk that fails is scored example by example (a failing one gets NaN)."""
        size = self.cfg.model.max_batch_size
        outputs: list[ClipOutput] = []
        for start in range(0, len(examples), size):
            chunk = examples[start : start + size]
            try:
                outputs += self._handler._score(chunk, self._model)
            except Exception:
                log.warning("grounding: a batch of %d failed; scoring one by one", len(chunk), exc_info=True)
                outputs += [self._handler._score_alone(example, self._model) for example in chunk]
        return outputs
