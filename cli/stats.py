"""``stats``: a dataset summary from the parquet indexes and dead-letter tables alone, never the tars.

The indexes hold every input row with its status, sizes, caption, CLIP score and conversation kind (FORMAT.md),
so a summary of a million-sample dataset reads a few megabytes instead of every image.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from visinstruct.cli.shards import Progress, read_index
from visinstruct.transforms.layout import (
    ShardError,
    ShardFiles,
    match_paths,
    rejected_pattern,
    rejected_shard,
    shard_files,
)
from visinstruct.transforms.shards import read_bytes

CLIP_BUCKET = 0.05
BAR_WIDTH = 40
Bucket = tuple[Callable[[float], int], Callable[[int], str]]
_COLUMNS = [
    "status",
    "caption",
    "width",
    "height",
    "original_width",
    "original_height",
    "clip_score",
    "conversation_kind",
    "image_count",
    "turns",
]


def dataset_stats(paths: list[str], progress: Progress | None = None) -> dict:
    """Counts and distributions of a dataset, JSON-ready.

    Args:
        paths: tar paths from :func:`~visinstruct.transforms.layout.resolve_shards`; only the index and the
            ``rejected/*.parquet`` tables beside each are read.
        progress: called with ``(shards done, shards)`` after each index.

    Returns:
        shards, indexes_missing, inputs, written, rejected, rejected_by_reason (index statuses),
        rejected_by_stage (``{stage: {reason: n}}`` from the dead-letter tables), width, height,
        original_width, original_height, caption_chars, caption_words (each a distribution: count, min,
        median, max, mean, histogram), clip_score (over every scored row, ``None`` when nothing is scored),
        conversation_kinds, images_per_sample (written samples by image count, ``{"0": text-only, "1": ...}``, an
        index that records no count counting as one image) and turns (a distribution over the written samples that
        carry a conversation).
    """
    tables, missing = [], []
    for done, tar in enumerate(paths, 1):
        files = shard_files(tar)
        table = read_index(files.index, _COLUMNS)
        if table is None:
            missing.append(files.name)
        else:
            tables.append(table)
        if progress:
            progress(done, len(paths))
    if not tables:
        raise ShardError(f"none of the {len(paths)} shards has a parquet index: stats needs them")
    rows = pa.concat_tables(tables).to_pydict()
    ok = [i for i, status in enumerate(rows["status"]) if status == "success"]
    captions = [rows["caption"][i] or "" for i in ok]
    scored = [score for score in rows["clip_score"] if score is not None]
    kinds = Counter(rows["conversation_kind"][i] for i in ok if rows["conversation_kind"][i] is not None)
    images = Counter(1 if rows["image_count"][i] is None else rows["image_count"][i] for i in ok)
    return {
        "shards": len(paths),
        "indexes_missing": missing,
        "inputs": len(rows["status"]),
        "written": len(ok),
        "rejected": len(rows["status"]) - len(ok),
        "rejected_by_reason": dict(Counter(s for s in rows["status"] if s != "success").most_common()),
        "rejected_by_stage": _rejections_by_stage([shard_files(tar) for tar in paths]),
        **{
            name: distribution([rows[name][i] for i in ok if rows[name][i] is not None], POW2)
            for name in ("width", "height", "original_width", "original_height")
        },
        "caption_chars": distribution([len(c) for c in captions], POW2),
        "caption_words": distribution([len(c.split()) for c in captions], POW2),
        "clip_score": distribution(scored, CLIP) if scored else None,
        "conversation_kinds": dict(kinds.most_common()),
        "images_per_sample": {str(n): images[n] for n in sorted(images)},
        "turns": distribution([rows["turns"][i] for i in ok if rows["turns"][i]], POW2),
    }


def _rejections_by_stage(shards: list[ShardFiles]) -> dict[str, dict[str, int]]:
    """``{stage: {reason: n}}`` over the dead-letter tables of the chosen shards (``rejected/STAGE-NNNNN.parquet``)."""
    wanted: dict[str, set[str]] = {}
    for files in shards:
        wanted.setdefault(files.folder, set()).add(files.name)
    counts: Counter = Counter()
    for folder, names in sorted(wanted.items()):
        for meta in match_paths(rejected_pattern(folder)):
            stage_shard = rejected_shard(meta.path)
            if stage_shard and stage_shard[1] in names:  # a glob over some shards counts only their rejections
                table = pq.read_table(pa.BufferReader(read_bytes(meta.path)), columns=["stage", "reason"]).to_pydict()
                counts.update(zip(table["stage"], table["reason"]))
    out: dict[str, dict[str, int]] = {}
    for (stage, reason), n in sorted(counts.items(), key=lambda item: (item[0][0], -item[1], item[0][1])):
        out.setdefault(stage, {})[reason] = n
    return out


def distribution(values: list[float], bucket: Bucket) -> dict:
    """count, min, median, max, mean and a histogram ``[[label, n], ...]``, empty buckets in between kept.

    Args:
        values: the numbers.
        bucket: ``(number, label)``: ``number`` maps a value to its bucket (consecutive numbers are adjacent
            buckets) and ``label`` names a bucket number.
    """
    if not values:
        return {"count": 0, "min": None, "median": None, "max": None, "mean": None, "histogram": []}
    number, label = bucket
    counts = Counter(number(v) for v in values)
    histogram = [[label(n), counts.get(n, 0)] for n in range(min(counts), max(counts) + 1)]
    return {
        "count": len(values),
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
        "mean": round(statistics.fmean(values), 4),
        "histogram": histogram,
    }


def _pow2_label(number: int) -> str:
    lo, hi = (1 << (number - 1), (1 << number) - 1) if number else (0, 0)
    return str(lo) if lo == hi else f"{lo}-{hi}"


# Sizes and lengths span orders of magnitude: buckets 0, 1, 2-3, 4-7, 8-15...
POW2: Bucket = (lambda value: int(value).bit_length(), _pow2_label)
# CLIP cosine scores sit in a narrow band (about 0.1 to 0.4): linear buckets of 0.05 (rounding first, so that
# 0.30 / 0.05 = 5.999... still falls in the 0.30..0.35 bucket).
CLIP: Bucket = (
    lambda value: math.floor(round(value / CLIP_BUCKET, 9)),
    lambda n: f"{n * CLIP_BUCKET:.2f}..{(n + 1) * CLIP_BUCKET:.2f}",
)  # ".." reads well with negatives


def format_stats(stats: dict) -> str:
    """The ``stats`` report for the terminal: counts, rejections, then each distribution with a histogram."""
    share = f" ({stats['written'] / stats['inputs']:.1%} kept)" if stats["inputs"] else ""
    missing = stats["indexes_missing"]
    lines = [
        f"shards      {stats['shards']}"
        + (f" ({len(missing)} without an index: {', '.join(missing)})" if missing else ""),
        f"inputs      {stats['inputs']}",
        f"written     {stats['written']}{share}",
        f"rejected    {stats['rejected']}",
    ]
    lines += [f"  {reason:<28}{n}" for reason, n in stats["rejected_by_reason"].items()]
    if stats["rejected_by_stage"]:
        lines.append("rejections by stage (dead-letter tables)")
        for stage, reasons in stats["rejected_by_stage"].items():
            lines.append(f"  {stage:<12}{sum(reasons.values())}: " + ", ".join(f"{r} {n}" for r, n in reasons.items()))
    for name, title in [
        ("width", "image width (px)"),
        ("height", "image height (px)"),
        ("original_width", "original width (px)"),
        ("original_height", "original height (px)"),
        ("caption_chars", "caption length (characters)"),
        ("caption_words", "caption length (words)"),
        ("clip_score", "CLIP score (every scored row)"),
    ]:
        if stats.get(name) and stats[name]["count"]:
            lines += ["", *_format_distribution(title, stats[name])]
    if set(stats.get("images_per_sample") or {"1": 0}) != {"1"}:  # said only when some sample is not single-image
        lines += ["", "images per sample", *(f"  {n:<28}{count}" for n, count in stats["images_per_sample"].items())]
    if stats.get("turns") and stats["turns"]["count"]:
        lines += ["", *_format_distribution("conversation turns", stats["turns"])]
    if stats["conversation_kinds"]:
        lines += ["", "conversation kinds", *(f"  {kind:<28}{n}" for kind, n in stats["conversation_kinds"].items())]
    return "\n".join(lines)


def _format_distribution(title: str, dist: dict) -> list[str]:
    def number(value):
        return f"{value:.3f}" if isinstance(value, float) and not value.is_integer() else f"{value:g}"

    lines = [
        f"{title}: min {number(dist['min'])}  median {number(dist['median'])}  max {number(dist['max'])}  "
        f"mean {number(dist['mean'])}  (n={dist['count']})"
    ]
    peak = max(n for _, n in dist["histogram"])
    width = max(len(label) for label, _ in dist["histogram"])
    for label, n in dist["histogram"]:
        lines.append(f"  {label:>{width}}  {'#' * math.ceil(BAR_WIDTH * n / peak):<{BAR_WIDTH}}  {n}")
    return lines
