"""SemDeDup (``transforms/semdedup.py``): near-copies dropped naming the smallest kept key, on any worker count and
input order; identical vectors cost linear work; big clusters are split so pairs stay bounded; bad vectors are
dropped one by one."""

from __future__ import annotations

import hashlib

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from visinstruct.configs.curate import SemDedupConfig
from visinstruct.transforms.semdedup import (
    ZERO_CLUSTER,
    SemDeDup,
    cluster_duplicates,
    fit_centroids,
    greedy_duplicates,
    nearest_centroid,
    sample_centroids,
    sample_rank,
    split_parts,
    unit_vector,
)

ONE_WORKER = ["--runner=DirectRunner"]
TWO_WORKERS = ["--runner=DirectRunner", "--direct_num_workers=2", "--direct_running_mode=multi_threading"]
DIM = 64


def unit(v) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return (v / np.linalg.norm(v)).astype(np.float32)


def synthetic() -> tuple[list, list]:
    """30 random directions in 64-d around 4 subjects; groups 0-4 add one noisy copy keyed after the original,
    groups 5-9 one before and one after. Returns the ``((path, key), embedding)`` rows and the expected drops as
    ``(path, key, reason, kept)``: every member of a group but its smallest key, naming that key."""
    rng = np.random.default_rng(3)
    themes = np.eye(DIM)[:4]  # four subjects (the clusters), 30 distinct images spread around them
    originals = [unit(themes[i % 4] + 0.15 * rng.standard_normal(DIM)) for i in range(30)]
    rows, expected = [], []
    for i, original in enumerate(originals):
        path = f"shards/{i % 3:05d}.tar"
        suffixes = ["7"] if i < 5 else ["2", "8"] if i < 10 else []
        group = {f"g{i:02d}5": original} | {
            f"g{i:02d}{s}": unit(original + 0.012 * rng.standard_normal(DIM)) for s in suffixes
        }
        vectors = np.stack(list(group.values()))
        assert (vectors @ original > 0.97).all() and (vectors @ vectors.T > 0.96).all()  # the premise: near-copies
        dtype = np.float16 if i % 2 else np.float32  # embedders give either
        rows += [((path, key), (v * 3).astype(dtype)) for key, v in group.items()]  # not unit: normalised inside
        smallest = min(group)
        expected += [(path, key, "near_duplicate", smallest) for key in group if key != smallest]
    vectors, groups = np.stack([unit(v) for _, v in rows]), np.array([key[:3] for (_, key), _ in rows])
    assert (vectors @ vectors.T)[groups[:, None] != groups[None, :]].max() < 0.8  # the premise: groups far apart
    return rows, expected


def summary(drop):
    """A drop as ``(path, key, reason, kept)``, after checking its cosine and message."""
    path, (key, decision) = drop
    assert decision.reason == "bad_embedding" or 0.95 <= decision.detail["cosine"] <= 1
    assert decision.message
    return path, key, decision.reason, decision.detail.get("kept")


def run_semdedup(rows, cfg: SemDedupConfig, expected, args=ONE_WORKER) -> dict[str, int]:
    """Run :class:`SemDeDup` on ``rows``, assert its drops are ``expected``; return its counters."""
    p = beam.Pipeline(options=PipelineOptions(args))
    drops = p | "Rows" >> beam.Create(rows, reshuffle=False) | "SemDeDup" >> SemDeDup(cfg)
    assert_that(drops | "Summary" >> beam.Map(summary), equal_to(expected))
    result = p.run()
    result.wait_until_finish()
    counters = result.metrics().query(beam.metrics.MetricsFilter().with_namespace("curate"))["counters"]
    return {c.key.metric.name: c.committed for c in counters}


CFG = SemDedupConfig(threshold=0.95, clusters=4, min_cluster=5, sample=20, max_cluster=2000, seed=0)


# Plain functions


def test_unit_vector_normalises_float16_and_float32_and_refuses_what_is_not_a_finite_vector():
    for dtype in (np.float16, np.float32):
        v = unit_vector(np.array([3, 4], dtype))
        assert v.dtype == np.float32 and np.allclose(v, [0.6, 0.8])
    assert not unit_vector(np.zeros(8, np.float32)).any()  # zero stays zero: a valid, direction-less vector
    for bad in ([1.0, np.nan], [np.inf, 1.0], "abc", np.ones((2, 2)), [], None, [[1.0], [2.0, 3.0]]):
        assert unit_vector(bad) is None, bad


def test_sample_rank_is_the_keys_sha1_the_same_in_every_process():
    assert sample_rank("k1") == (int.from_bytes(hashlib.sha1(b"k1").digest()[:8], "big"), "k1")


def test_kmeans_finds_separated_groups_and_never_more_centroids_than_distinct_vectors():
    rng = np.random.default_rng(1)
    centres = np.eye(DIM, dtype=np.float32)[:3]
    points = np.stack([unit(c + 0.05 * rng.standard_normal(DIM)) for c in centres for _ in range(20)])
    centroids = fit_centroids(points, clusters=3, seed=0)
    assert sorted(int(np.argmax(centres @ c)) for c in centroids) == [0, 1, 2]
    assert (np.max(centroids @ centres.T, axis=1) > 0.99).all()
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1, atol=1e-5)  # spherical: unit centroids
    assert fit_centroids(points[:2], clusters=8, seed=0).shape == (2, DIM)


def test_centroids_do_not_depend_on_the_samples_order_and_duplicates_do_not_count_as_centroids():
    rows, _ = synthetic()
    records = [(key, path, unit_vector(v)) for (path, key), v in rows]
    many = records * 3 + [(f"{k}-{i}", p, unit_vector(v + 0.3 * i)) for i in (1, 2) for k, p, v in records]
    cfg = SemDedupConfig(clusters=2, sample=40)
    first = sample_centroids(many, cfg)
    assert first.tobytes() == sample_centroids(many[::-1], cfg).tobytes() and first.shape == (2, DIM)
    # one centroid per POINTS_PER_CENTROID distinct sampled vectors at most: 45 distinct rows make clusters of 45
    assert sample_centroids(records, SemDedupConfig(clusters=40, sample=40)).shape == (1, DIM)
    twice = records + [(key + "x", path, v) for key, path, v in records]
    assert sample_centroids(twice, cfg).shape == (1, DIM)  # 90 rows but 45 distinct vectors
    same = [(f"k{i}", "p", records[0][2]) for i in range(50)]
    assert sample_centroids(same, cfg).shape == (1, DIM)  # one distinct vector: one centroid
    assert nearest_centroid(np.zeros(DIM, np.float32), first) == ZERO_CLUSTER


def test_greedy_compares_with_kept_vectors_only_and_names_the_smallest_kept_match():
    a = np.array([1, 0, 0], np.float32)
    b = unit([1, 0.35, 0])  # cos(a, b) ~ 0.94
    c = unit([1, 0.7, 0])  # cos(b, c) ~ 0.98, cos(a, c) ~ 0.82
    d = unit([1, 0.05, 0])  # near a and b
    found, pairs = greedy_duplicates(np.stack([a, b, c, d]), threshold=0.93, block=2)
    # b is a's copy, so c (near b only) is kept: it is compared with kept a, not with dropped b
    assert sorted(found) == [1, 3] and found[1][0] == 0 and found[3][0] == 0
    assert found[1][1] == pytest.approx(float(a @ b), abs=1e-6)
    assert pairs == 4 + 4 + 2 * 1  # two 2x2 blocks, and the second block against the one vector kept before it


def test_identical_vectors_collapse_in_linear_work():
    blank = unit_vector(np.ones(DIM, np.float32))
    for n in (5000, 10000):
        drops, work = cluster_duplicates([(f"k{i:05d}", "s.tar", blank) for i in range(n)], CFG)
        assert len(drops) == n - 1 and {d[1][1].detail["kept"] for d in drops} == {"k00000"}
        assert {d[1][1].detail["cosine"] for d in drops} == {1.0}
        assert (work.records, work.distinct, work.comparisons, work.splits) == (n, 1, 1, 0)
    rng = np.random.default_rng(2)
    distinct = [(f"d{i:02d}", "s.tar", unit(rng.standard_normal(DIM))) for i in range(40)]
    _, work = cluster_duplicates(distinct + [(f"k{i:05d}", "s.tar", blank) for i in range(5000)], CFG)
    assert work.distinct == 41 and work.comparisons <= 41 * 41  # quadratic in distinct vectors only


def test_a_dropped_representatives_copies_name_what_it_matched():
    a, near_a = unit(np.arange(1, DIM + 1)), unit(np.arange(1, DIM + 1) + 4 * np.sin(np.arange(DIM)))
    assert 0.95 < a @ near_a < 0.999
    records = [("a", "p", a), ("b", "p", near_a), ("c", "p", near_a)]
    drops, _ = cluster_duplicates(records, CFG)
    assert [(key, d.detail["kept"]) for _, (key, d) in drops] == [("b", "a"), ("c", "a")]
    assert drops[0][1][1].detail["cosine"] == drops[1][1][1].detail["cosine"] < 1


def test_split_parts_are_bounded_and_cover_every_vector_once():
    rng = np.random.default_rng(4)
    vectors = np.stack([unit(v) for v in rng.standard_normal((1000, DIM))])
    parts = split_parts(vectors, [f"k{i:04d}" for i in range(1000)], 100, np.random.default_rng(0))
    assert all(len(p) <= 100 for p in parts) and len(parts) >= 10
    assert sorted(i for p in parts for i in p) == list(range(1000))


# The Beam transform


def test_near_copies_are_dropped_naming_the_smallest_key_of_their_group():
    rows, expected = synthetic()
    assert len(expected) == 15
    counters = run_semdedup(rows, CFG, expected)
    assert counters["semdedup_clusters"] == 4 and counters["semdedup_splits"] == 0
    assert 0 < counters["semdedup_comparisons"] <= len(rows) ** 2


@pytest.mark.parametrize("args", [ONE_WORKER, TWO_WORKERS], ids=["1-worker", "2-workers"])
@pytest.mark.parametrize("order", ["reversed", "shuffled"])
def test_the_drops_do_not_depend_on_worker_count_or_input_order(args, order):
    rows, expected = synthetic()
    rows = rows[::-1] if order == "reversed" else [rows[i] for i in np.random.default_rng(5).permutation(len(rows))]
    run_semdedup(rows, CFG, expected, args)


def test_5000_blank_images_keep_one_at_linear_cost():
    blank = np.full(DIM, 0.25, np.float16)
    rows = [((f"shards/{i // 1000:05d}.tar", f"{i:06d}"), blank) for i in range(5000)]
    expected = [(f"shards/{i // 1000:05d}.tar", f"{i:06d}", "near_duplicate", "000000") for i in range(1, 5000)]
    counters = run_semdedup(rows, SemDedupConfig(clusters=4, min_cluster=5, sample=100), expected, TWO_WORKERS)
    assert counters["semdedup_comparisons"] == 1 and counters["semdedup_clusters"] == 1


def test_a_cluster_bigger_than_max_cluster_is_split_and_pairs_stay_bounded():
    rng = np.random.default_rng(6)
    rows = [(("s.tar", f"k{i:04d}"), rng.standard_normal(DIM).astype(np.float32)) for i in range(600)]
    cfg = SemDedupConfig(clusters=1, sample=50, max_cluster=100)
    counters = run_semdedup(rows, cfg, [])
    assert counters["semdedup_splits"] >= 5  # 600 distinct vectors in parts of at most 100
    assert counters["semdedup_comparisons"] <= 600 * 100 < 600 * 599 // 2


def test_zero_nan_and_wrong_dimension_embeddings_do_not_stop_the_run():
    rows, expected = synthetic()
    rows += [
        (("z.tar", "zero-b"), np.zeros(DIM, np.float32)),
        (("z.tar", "zero-a"), np.zeros(DIM, np.float16)),
        (("z.tar", "nan"), np.full(DIM, np.nan, np.float32)),
        (("z.tar", "inf"), np.full(DIM, np.inf, np.float16)),
        (("z.tar", "short"), np.ones(DIM // 2, np.float32)),
        (("z.tar", "text"), "not an embedding"),
    ]
    expected += [("z.tar", "zero-b", "near_duplicate", "zero-a")]  # zero vectors: a cluster of their own
    expected += [("z.tar", key, "bad_embedding", None) for key in ("nan", "inf", "short", "text")]
    counters = run_semdedup(rows, CFG, expected, TWO_WORKERS)
    assert counters["semdedup_clusters"] == 5  # the 4 centroids' clusters and the zero vectors'
