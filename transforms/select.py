"""Keep pairs by score: an absolute threshold, a global top fraction, or both; and score distributions.

The top fraction is exact and deterministic across any number of workers, with bounded memory. Scores are
ranked by (score descending, key ascending), so ties go to the smaller key. With ``k = ceil(fraction * N)``:

1. a fine histogram of all scores (2^16 bins over [-1, 1]) finds the bin holding the k-th ranked score;
2. only the scores in that one bin are collected and sorted, giving the exact cutoff ``(score, key)``;
3. a pair is kept when it ranks at or before the cutoff.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import apache_beam as beam
import numpy as np

BINS = 1 << 16


def score_bin(score: float) -> int:
    """The histogram bin of a cosine similarity (clipped to [-1, 1])."""
    return min(BINS - 1, max(0, math.floor((score + 1.0) / 2.0 * BINS)))


def bin_low(index: int) -> float:
    return index / BINS * 2.0 - 1.0


class HistogramFn(beam.CombineFn):
    """Scores -> a numpy array of ``BINS`` counts."""

    def create_accumulator(self):
        return np.zeros(BINS, dtype=np.int64)

    def add_input(self, acc, score):
        acc[score_bin(score)] += 1
        return acc

    def merge_accumulators(self, accs):
        return sum(accs, np.zeros(BINS, dtype=np.int64))

    def extract_output(self, acc):
        return acc


def top_count(fraction: float, total: int) -> int:
    """How many pairs a top fraction keeps (rounded up; 0.3 of 10 is 3 despite float error)."""
    return min(total, math.ceil(round(fraction * total, 9)))


@dataclass(frozen=True)
class CutPlan:
    """Where the k-th ranked score lies: its bin, and how many of the kept pairs come from that bin."""

    bin: int
    need: int


def plan_cut(hist: np.ndarray, k: int) -> CutPlan | None:
    """The bin holding the k-th best score; ``None`` when nothing is kept."""
    if k <= 0:
        return None
    above = 0
    for index in range(BINS - 1, -1, -1):
        count = int(hist[index])
        if above + count >= k:
            return CutPlan(index, k - above)
        above += count
    return None


def exact_cut(in_bin: list[tuple[float, str]], need: int) -> tuple[float, str]:
    """The ``need``-th ranked ``(score, key)`` among the pairs of the cut bin."""
    ranked = sorted(in_bin, key=lambda sk: (-sk[0], sk[1]))
    return ranked[need - 1]


def ranks_within(score: float, key: str, cut: tuple[float, str] | None) -> bool:
    """Whether ``(score, key)`` ranks at or before the cutoff."""
    return cut is not None and (-score, key) <= (-cut[0], cut[1])


class TopFractionCut(beam.PTransform):
    """``(key, score)`` -> a singleton: the exact cutoff ``(score, key)`` of the top ``fraction``, or ``None``."""

    def __init__(self, fraction: float):
        super().__init__()
        self.fraction = fraction

    def expand(self, scores):
        values = scores | "ScoreOnly" >> beam.Map(lambda ks: ks[1])
        total = values | "Count" >> beam.combiners.Count.Globally()
        hist = values | "Histogram" >> beam.CombineGlobally(HistogramFn())
        plan = hist | "PlanCut" >> beam.Map(
            lambda h, n, f: plan_cut(h, top_count(f, n)), n=beam.pvalue.AsSingleton(total), f=self.fraction
        )
        in_bin = scores | "InCutBin" >> beam.Filter(
            lambda ks, p: p is not None and score_bin(ks[1]) == p.bin, p=beam.pvalue.AsSingleton(plan)
        )
        return (
            in_bin
            | "SwapToScoreKey" >> beam.Map(lambda ks: (ks[1], ks[0]))  # (score, key)
            | "CollectBin" >> beam.combiners.ToList()
            | "ExactCut"
            >> beam.Map(lambda items, p: exact_cut(items, p.need) if p else None, p=beam.pvalue.AsSingleton(plan))
        )


def distribution(hist: np.ndarray, thresholds: list[float], fractions: list[float]) -> dict:
    """A dry-run report from a score histogram: quantiles, counts kept per threshold, score per fraction."""
    total = int(hist.sum())
    if total == 0:
        return {"pairs": 0}
    cumulative_from_top = np.cumsum(hist[::-1])[::-1]  # pairs scoring in this bin or above
    nonzero = np.nonzero(hist)[0]
    centre = lambda b: round(bin_low(b) + 1.0 / BINS, 4)

    def quantile(q: float) -> float:
        return centre(int(np.searchsorted(np.cumsum(hist), math.ceil(q * total))))

    return {
        "pairs": total,
        "min": centre(int(nonzero[0])),
        "max": centre(int(nonzero[-1])),
        "quantiles": {f"p{int(q * 100)}": quantile(q) for q in (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)},
        "kept_by_threshold": {f"{t:.2f}": int(cumulative_from_top[score_bin(t)]) for t in thresholds},
        "threshold_for_fraction": {
            f"{f:.2f}": centre(plan.bin) for f in fractions if (plan := plan_cut(hist, top_count(f, total)))
        },
    }
