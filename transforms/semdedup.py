"""SemDeDup: near-copies of an image (re-encodes, crops, flips, recolours) found by their embeddings.

Only ``(key, path, embedding)`` records move; no image bytes. The work is bounded the way SemDeDup bounds it:

1. **Centroids** are fit on one worker over a sample that is the same on any runner and worker count: the
   ``cfg.sample`` embeddings whose keys have the smallest sha1 (:func:`sample_rank`), sorted by key, then a small
   spherical k-means (:func:`fit_centroids`).
2. Every embedding goes to its nearest centroid (:func:`nearest_centroid`), and the embeddings are grouped by
   cluster.
3. Within a cluster (:func:`cluster_duplicates`): identical vectors (the same bytes once normalised and rounded to
   float16) collapse first, in linear work, so 5,000 copies of a blank image cost 5,000 hashes and no products.
   Distinct vectors beyond ``cfg.max_cluster`` are split in halves along seeded random directions
   (:func:`split_parts`) until each part is small enough; then each part is compared pair by pair
   (:func:`greedy_duplicates`): in key order, a vector is a duplicate when it is at least ``cfg.threshold``
   cosine-similar to a kept vector of smaller key, and it names the smallest such key.

The price of bounded work is recall: two near-copies that fall in different clusters, or in different parts of a
split cluster, are never compared, so both are kept. SemDeDup accepts the same loss for clusters; a split halves
along a random direction through the part's mean, and near-copies sit close together, so few pairs straddle it.

Embeddings that are not finite, not a flat vector of numbers, or not of the sample's dimension are dropped with
reason ``bad_embedding`` (the embedder failed on that record; nothing can be compared). An all-zero embedding
(a model's features of a blank image can be all zero) is valid: it has no direction, so all zero vectors form a
cluster of their own, where they are exact duplicates of each other and the smallest key is kept.

The winner is always the smallest key and each cluster is judged whole by one worker, in key order, so the drops do
not depend on the runner, the input order or the number of workers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import numpy as np

from visinstruct.configs.curate import SemDedupConfig
from visinstruct.schemas import Decision

NEAR_DUPLICATE, BAD_EMBEDDING = "near_duplicate", "bad_embedding"
ZERO_CLUSTER = -1  # all-zero embeddings: no direction, no centroid
KMEANS_ITERATIONS = 30  # Lloyd iterations at most (it stops earlier when no assignment changes)
BLOCK = 256  # rows per matrix product in the greedy pass

Record = tuple[str, str, np.ndarray]  # (key, path, unit float32 embedding)
Drop = tuple[str, tuple[str, Decision]]  # (path, (key, drop))


@dataclass
class Work:
    """What one cluster cost: records seen, distinct vectors, parts after splitting, splits, and cosine pairs."""

    records: int = 0
    distinct: int = 0
    parts: int = 0
    splits: int = 0
    comparisons: int = 0


# Plain functions (called directly by the tests).


def unit_vector(embedding) -> np.ndarray | None:
    """``embedding`` as a flat float32 unit vector; all zeros stays all zeros; ``None`` when it is not a finite
    vector of numbers (NaN, infinity, a string, a matrix, an empty array)."""
    try:
        v = np.asarray(embedding, dtype=np.float32)
    except (TypeError, ValueError, OverflowError):
        return None
    if v.ndim != 1 or v.size == 0 or not np.isfinite(v).all():
        return None
    norm = float(np.linalg.norm(v.astype(np.float64)))
    return v if norm == 0 else (v / norm).astype(np.float32)


def bad_embedding(embedding, expected: int | None = None) -> Decision:
    """The ``bad_embedding`` drop of an embedding that is not a finite vector (or not ``expected`` long)."""
    shape = getattr(embedding, "shape", None)
    if expected is not None:
        message = f"embedding of shape {shape} where the sample's vectors have {expected} dimensions"
    else:
        message = f"embedding is not a finite vector of numbers (shape {shape}, type {type(embedding).__name__})"
    return Decision.drop(BAD_EMBEDDING, message, {"shape": list(shape) if shape is not None else None})


def vector_id(unit: np.ndarray) -> bytes:
    """The identity of a unit vector for exact-duplicate grouping: its float16 bytes (``+ 0`` folds -0 into 0)."""
    return (unit.astype(np.float16) + np.float16(0)).tobytes()


def sample_rank(key: str) -> tuple[int, str]:
    """The order the sample is drawn in: a key's sha1 (the same in every process, unlike ``hash``), then the key."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big"), key


def distinct_vectors(sample: Iterable[tuple[str, np.ndarray]]) -> np.ndarray:
    """The sample's distinct directions (float16-identical vectors once), in key order, as rows; zero vectors and
    vectors not of the most common dimension (ties: the smaller) are left out."""
    rows = [(k, v) for k, v in sample if v.ndim == 1 and v.size and v.any()]
    if not rows:
        return np.zeros((0, 0), np.float32)
    sizes = sorted({v.size for _, v in rows}, key=lambda s: (-sum(v.size == s for _, v in rows), s))
    seen: dict[bytes, np.ndarray] = {}
    for _, v in sorted(rows, key=lambda r: r[0]):
        if v.size == sizes[0]:
            seen.setdefault(vector_id(v), v)
    return np.stack(list(seen.values())).astype(np.float32)


def _normalised_rows(m: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    return (m / np.where(norms == 0, 1, norms)).astype(np.float32)


def kmeans_pp(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding on unit rows: each next centroid drawn with probability proportional to its squared
    distance from the nearest centroid chosen so far (uniformly among unchosen rows when all distances are 0)."""
    chosen = [int(rng.integers(len(points)))]
    nearest = np.maximum(2 - 2 * points @ points[chosen[0]], 0).astype(np.float64)
    for _ in range(1, k):
        nearest[chosen] = 0
        total = nearest.sum()
        if total > 0:
            pick = int(rng.choice(len(points), p=nearest / total))
        else:
            pick = int(rng.choice(np.setdiff1d(np.arange(len(points)), chosen)))
        chosen.append(pick)
        nearest = np.minimum(nearest, np.maximum(2 - 2 * points @ points[pick], 0))
    return points[chosen].copy()


def fit_centroids(points: np.ndarray, clusters: int, seed: int, iterations: int = KMEANS_ITERATIONS) -> np.ndarray:
    """Spherical k-means on unit rows: ``k = min(clusters, rows)`` unit centroids, k-means++ seeded with
    ``seed``; Lloyd iterations until no assignment changes (at most ``iterations``); an emptied cluster keeps its
    centroid. Rows should be distinct and in a fixed order (:func:`distinct_vectors`): the result is then
    deterministic."""
    if len(points) == 0:
        return np.zeros((0, points.shape[1] if points.ndim == 2 else 0), np.float32)
    rng = np.random.default_rng(seed)
    centroids = kmeans_pp(points, min(clusters, len(points)), rng)
    assigned = None
    for _ in range(iterations):
        new = np.argmax(points @ centroids.T, axis=1)
        if assigned is not None and np.array_equal(new, assigned):
            break
        assigned = new
        sums = np.zeros_like(centroids, dtype=np.float64)
        np.add.at(sums, assigned, points)
        filled = np.bincount(assigned, minlength=len(centroids)) > 0
        centroids[filled] = _normalised_rows(sums[filled])
    return centroids


def sample_centroids(sample: Iterable[Record], cfg: SemDedupConfig) -> np.ndarray:
    """The centroids from the drawn sample of records (:func:`distinct_vectors`, then :func:`fit_centroids`):
    ``cfg.clusters`` of them at most, and one per ``cfg.min_cluster`` distinct sampled vectors, so that a small
    dataset is not cut into clusters of one (which would compare nothing)."""
    points = distinct_vectors((key, unit) for key, _, unit in sample)
    return fit_centroids(points, min(cfg.clusters, max(1, len(points) // cfg.min_cluster)), cfg.seed)


def nearest_centroid(unit: np.ndarray, centroids: np.ndarray) -> int:
    """The cluster of one unit vector: the most cosine-similar centroid (the first on a tie); ``ZERO_CLUSTER`` for
    a zero vector. One vector at a time, so the rounding never depends on a batch."""
    if not unit.any():
        return ZERO_CLUSTER
    return int(np.argmax(centroids @ unit))


def split_parts(vectors: np.ndarray, keys: list[str], max_cluster: int, rng: np.random.Generator) -> list[list[int]]:
    """Row indices cut into parts of at most ``max_cluster``: a bigger part is halved at the median of its
    projection on a random direction through its mean (ties by key), recursively, a random-projection tree.
    Halving always shrinks a part, so this ends after about log2(n / max_cluster) levels."""
    parts, pending = [], [list(range(len(vectors)))]
    while pending:
        part = pending.pop()
        if len(part) <= max_cluster:
            parts.append(part)
            continue
        direction = rng.standard_normal(vectors.shape[1]).astype(np.float32)
        rows = vectors[part]
        projection = (rows - rows.mean(axis=0)) @ direction
        order = sorted(range(len(part)), key=lambda i: (float(projection[i]), keys[part[i]]))
        half = len(part) // 2
        pending += [sorted(part[i] for i in order[half:]), sorted(part[i] for i in order[:half])]
    return sorted(parts)


def greedy_duplicates(
    vectors: np.ndarray, threshold: float, block: int = BLOCK
) -> tuple[dict[int, tuple[int, float]], int]:
    """Greedy dedup of rows in key order: row ``i`` is a duplicate when its cosine with a kept row ``j < i`` is at
    least ``threshold``; it names the smallest such ``j``. Rows are compared in blocks by matrix products, each
    block with the rows kept before it and with itself. Returns ``{i: (j, cosine)}`` and the pairs computed."""
    duplicates: dict[int, tuple[int, float]] = {}
    kept: list[int] = []
    comparisons = 0
    for start in range(0, len(vectors), block):
        rows = vectors[start : start + block]
        before = rows @ vectors[kept].T if kept else np.zeros((len(rows), 0), np.float32)
        within = rows @ rows.T
        comparisons += before.size + within.size
        kept_within = np.zeros(len(rows), bool)
        for r in range(len(rows)):
            hits = np.flatnonzero(before[r] >= threshold)
            if hits.size:
                duplicates[start + r] = (kept[hits[0]], float(before[r, hits[0]]))
                continue
            hits = np.flatnonzero((within[r, :r] >= threshold) & kept_within[:r])
            if hits.size:
                duplicates[start + r] = (start + int(hits[0]), float(within[r, hits[0]]))
                continue
            kept_within[r] = True
        kept += [start + int(r) for r in np.flatnonzero(kept_within)]
    return duplicates, comparisons


def near_duplicate(kept: str, cosine: float) -> Decision:
    """The drop of a near-copy of ``kept``."""
    c = round(float(cosine), 4)
    return Decision.drop(NEAR_DUPLICATE, f"near-duplicate of {kept} (cosine {c})", {"kept": kept, "cosine": c})


def cluster_duplicates(records: Iterable[Record], cfg: SemDedupConfig, salt: int = 0) -> tuple[list[Drop], Work]:
    """The drops of one cluster's records and what finding them cost (:class:`Work`).

    Exact copies (:func:`vector_id`) collapse onto their smallest key, the representative, first; only the
    representatives are compared (:func:`split_parts`, :func:`greedy_duplicates`). A copy is then dropped for what
    its representative is: a kept representative is its ``kept`` key (cosine 1.0); a dropped one passes on its own
    match. That is what the greedy pass over every record would have found, at linear cost for the copies.
    ``salt`` (the cluster id) varies the split directions between clusters, deterministically.
    """
    work = Work()
    groups: dict[bytes, list[Record]] = {}
    for record in sorted(records, key=lambda r: (r[0], r[1])):  # by key, then path: the same order on any runner
        work.records += 1
        groups.setdefault(vector_id(record[2]), []).append(record)
    heads = sorted(groups.values(), key=lambda g: g[0][0])
    work.distinct = len(heads)
    keys = [g[0][0] for g in heads]
    vectors = np.stack([g[0][2] for g in heads]) if heads else np.zeros((0, 0), np.float32)
    rng = np.random.default_rng([cfg.seed, salt & 0xFFFFFFFF])
    parts = split_parts(vectors, keys, cfg.max_cluster, rng)
    work.parts, work.splits = len(parts), len(parts) - 1
    match: dict[int, tuple[int, float]] = {}  # head index -> (kept head index, cosine)
    for part in parts:
        found, computed = greedy_duplicates(vectors[part], cfg.threshold)
        work.comparisons += computed
        match.update({part[i]: (part[j], c) for i, (j, c) in found.items()})
    drops: list[Drop] = []
    for index, group in enumerate(heads):
        kept_key, cosine = (keys[match[index][0]], match[index][1]) if index in match else (group[0][0], 1.0)
        members = group if index in match else group[1:]
        drops += [(path, (key, near_duplicate(kept_key, cosine))) for key, path, _ in members]
    return sorted(drops, key=lambda d: d[1][0]), work


# Beam (thin over the functions above).


class _CheckEmbedding(beam.DoFn):
    """``((path, key), embedding)`` -> ``(key, path, unit)``, or ``bad_embedding`` drops on output ``bad``."""

    def process(self, element):
        (path, key), embedding = element
        unit = unit_vector(embedding)
        if unit is None:
            yield beam.pvalue.TaggedOutput("bad", (path, (key, bad_embedding(embedding))))
        else:
            yield key, path, unit


@beam.typehints.with_output_types(tuple[int, Any])  # its main output is keyed (Beam infers a union with TaggedOutput)
class _AssignCluster(beam.DoFn):
    """``(key, path, unit)`` -> ``(cluster, record)``; a vector not of the centroids' dimension -> ``bad``."""

    def process(self, record, centroids):
        key, path, unit = record
        if unit.any() and (len(centroids) == 0 or unit.size != centroids.shape[1]):
            dimension = centroids.shape[1] if len(centroids) else None
            yield beam.pvalue.TaggedOutput("bad", (path, (key, bad_embedding(unit, dimension))))
        else:
            yield nearest_centroid(unit, centroids), record


class _DedupCluster(beam.DoFn):
    """``(cluster, [record])`` -> the cluster's drops; counts the cluster, its splits and its cosine pairs."""

    def __init__(self, cfg: SemDedupConfig, stage: str):
        self.cfg, self.stage = cfg, stage

    def setup(self):
        counter = beam.metrics.Metrics.counter
        self.clusters = counter(self.stage, "semdedup_clusters")
        self.splits = counter(self.stage, "semdedup_splits")
        self.comparisons = counter(self.stage, "semdedup_comparisons")

    def process(self, element):
        cluster, records = element
        drops, work = cluster_duplicates(records, self.cfg, salt=cluster)
        self.clusters.inc()
        self.splits.inc(work.splits)
        self.comparisons.inc(work.comparisons)
        yield from drops


class SemDeDup(beam.PTransform):
    """``((path, key), embedding)`` -> ``(path, (key, Decision))`` for the dropped samples only (reasons
    ``near_duplicate`` and ``bad_embedding``); kept samples produce nothing. Counters under ``stage``:
    ``semdedup_clusters``, ``semdedup_splits``, ``semdedup_comparisons`` (cosine pairs computed)."""

    def __init__(self, cfg: SemDedupConfig, stage: str = "curate"):
        super().__init__()
        self.cfg, self.stage = cfg, stage

    def expand(self, embeddings):
        cfg = self.cfg
        checked = embeddings | "CheckEmbeddings" >> beam.ParDo(_CheckEmbedding()).with_outputs("bad", main="ok")
        # ok: (key, path, unit float32); bad: (path, (key, Decision))
        centroids = (
            checked.ok
            | "NonZero" >> beam.Filter(lambda r: r[2].any())
            | "SampleByKeyHash" >> beam.combiners.Top.Of(cfg.sample, key=lambda r: sample_rank(r[0]), reverse=True)
            # [record]: the cfg.sample records whose keys have the smallest sha1
            | "FitCentroids" >> beam.Map(sample_centroids, cfg)  # one (k, d) array
        )
        assigned = checked.ok | "AssignCluster" >> beam.ParDo(
            _AssignCluster(), beam.pvalue.AsSingleton(centroids)
        ).with_outputs("bad", main="ok")
        drops = (
            assigned.ok  # (cluster, record)
            | "GroupByCluster" >> beam.GroupByKey()  # (cluster, [record])
            | "DedupCluster" >> beam.ParDo(_DedupCluster(cfg, self.stage))  # (path, (key, Decision))
        )
        return (drops, checked.bad, assigned.bad) | "MergeDrops" >> beam.Flatten()
