"""The per-sample steps of ``visinstruct curate``: the judge that decides every sample of a shard, and the plain
checks it runs.

What a model computed upstream reaches the judge through the shard's ``CoGroupByKey`` groups: ``nsfw``
``(key, score)`` from the NSFW model, ``decisions`` ``(key, Decision)`` drops from semantic dedup and the benchmark
embedding check, ``rejections`` for samples whose image could not be read or scored. The rest runs here, in the
writer, on the sample's own members: the caption check (:func:`~visinstruct.transforms.text_quality.check_caption`),
the conversation and pHash benchmark checks (:mod:`~visinstruct.transforms.decontam`), and faces
(:mod:`~visinstruct.transforms.faces`), blurred in the written image when asked.

A sample's checks run cheapest first and the first drop is its reason; a kept sample records what curation found
in its JSON (``curation``: NSFW score, face boxes, ``faces_blurred``) and its index row (``nsfw_score``,
``faces``); a dropped one keeps its NSFW score in the index too.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import apache_beam as beam

from visinstruct.configs import CurateConfig, TextQualityConfig
from visinstruct.configs.curate import DecontaminateConfig
from visinstruct.schemas import Curation, Decision, Dropped, Rejection, SampleMeta
from visinstruct.transforms.layout import image_member
from visinstruct.transforms.rewrite import Judge

STAGE = "curate"
DECONTAM_STAGE = "decontam"  # a build's question check after generate (its own dead-letter tables)
FIXED_MOJIBAKE = "fixed_mojibake"  # counter: captions written repaired (ftfy)
FACES_BLURRED = "faces_blurred"  # counter: images written with their faces blurred
NSFW_SCORE_DIGITS = 4  # an NSFW score finer than 1e-4 means nothing, and batch noise stays below it


def is_nsfw(score: float, threshold: float) -> bool:
    """Whether a score is dropped: it reaches the threshold; a threshold of 1 drops nothing (scores are recorded)."""
    return threshold < 1 and score >= threshold


def caption_decision(meta: SampleMeta, checked: Decision[str]) -> tuple[Decision[SampleMeta], bool]:
    """The sample's decision from its caption's check, and whether its caption was repaired.

    A caption kept as it is keeps the sample's members untouched (``Decision.keep()``), so its bytes stay the same.
    """
    if not checked.kept:
        return Decision.drop(checked.reason, checked.message or checked.reason, checked.detail), False
    if checked.value == meta.caption:
        return Decision.keep(), False
    return Decision.keep(replace(meta, caption=checked.value)), True


def caption_passes(caption: str | None, cfg: TextQualityConfig | None) -> bool:
    """Whether a caption survives the text checks (semantic dedup only compares samples that do); a caption the
    check fails on does not (the writer's judge gives it its ``internal_error`` row)."""
    if cfg is None:
        return True
    from visinstruct.transforms.text_quality import check_caption

    try:
        return check_caption(caption, cfg).kept
    except Exception:  # the judge meets the same caption again, under the guard that dead-letters it
        return False


def nsfw_dropped(score: float, threshold: float | None) -> bool:
    """Whether an NSFW score, rounded as the judge records it, is dropped (never with no threshold)."""
    return threshold is not None and is_nsfw(round(score, NSFW_SCORE_DIGITS), threshold)


_LOADED: dict[tuple[str, str], Any] = {}  # (what, repr of its config) -> built once per process
_LOADING = threading.Lock()  # Beam runs several threads per worker: one of them builds, the others wait


def _once(what: str, cfg: DecontaminateConfig, build):
    key = (what, repr(cfg))  # configs are mutable dataclasses (unhashable); their repr names every value
    with _LOADING:
        if key not in _LOADED:
            _LOADED[key] = build()
        return _LOADED[key]


def question_index(cfg: DecontaminateConfig):
    """The benchmarks' questions as an n-gram index, built once per process (``None`` when none has questions)."""
    from visinstruct.transforms.decontam import question_index as index

    return _once("questions", cfg, lambda: index(cfg))


def phash_index(cfg: DecontaminateConfig):
    """The benchmarks' images as a pHash index, computed once per process (``None`` when none has images)."""
    from visinstruct.transforms.decontam import PhashIndex, reference_phashes

    benchmarks = [b for b in cfg.benchmarks if b.images]
    if not benchmarks:
        return None
    return _once("phashes", cfg, lambda: PhashIndex(reference_phashes(benchmarks), cfg.phash_distance))


def benchmark_image_check(vector, refs, threshold: float) -> Decision:
    """The benchmark embedding check of one image; an embedding it cannot compare (zero: a blank image's features
    can be; not finite) is kept by it, and the pHash check still sees the image."""
    from visinstruct.transforms.decontam import embedding_overlap

    if refs is None:
        return Decision.keep()
    try:
        return embedding_overlap(vector, refs, threshold)
    except ValueError:
        return Decision.keep()


def reference_matrix(rows: list):
    """``(benchmark, reference, vector)`` rows as ``decontam.ReferenceEmbeddings``; rows whose vector is zero or not
    finite are left out (they can match nothing); ``None`` when none is left."""
    import numpy as np

    from visinstruct.transforms.decontam import ReferenceEmbeddings

    usable = [r for r in rows if np.all(np.isfinite(r[2])) and np.any(r[2])]
    return ReferenceEmbeddings.from_rows(usable) if usable else None


def sample_phash(meta: SampleMeta, members: dict[str, bytes]) -> str:
    """The sample's pHash: the one ingest recorded, else computed from its image (another tool's shards); raises
    :class:`Dropped` for a sample without an image or with one that does not decode."""
    if meta.phash:
        return meta.phash
    from visinstruct.transforms.images import decode_rgb, phash

    ext = image_member(members)
    if ext is None:
        raise Dropped("no_image", f"sample has no image member ({', '.join(members)})")
    return phash(decode_rgb(members[ext]))


def curate_judge(
    cfg: CurateConfig,
    nsfw: Mapping[str, float],
    drops: Mapping[str, Decision],
    rejections: Mapping[str, Rejection],
    scored: bool,
) -> Judge:
    """Curation as the judge of one shard.

    Args:
        cfg: the stage's config.
        nsfw: NSFW score by key (when the model ran).
        drops: semantic dedup's and the benchmark embedding check's drops by key.
        rejections: samples the image branch could not read, decode or score, by key.
        scored: whether every sample should have an NSFW score (a sample without one and without a rejection is
            dropped ``not_scored``, as in the filter: a row never lost silently).
    """
    from visinstruct.transforms.faces import curate_faces
    from visinstruct.transforms.text_quality import check_caption

    fixed = beam.metrics.Metrics.counter(STAGE, FIXED_MOJIBAKE)
    blurred = beam.metrics.Metrics.counter(STAGE, FACES_BLURRED)
    safety, contamination = cfg.safety, cfg.decontaminate
    questions = question_index(contamination) if contamination else None
    phashes = phash_index(contamination) if contamination else None

    def judge(key: str, meta: SampleMeta, members: dict[str, bytes]) -> Decision[SampleMeta]:
        score = nsfw.get(key)
        index = {} if score is None else {"nsfw_score": score}
        if key in rejections:
            return Decision.from_rejection(rejections[key], **index)
        if scored and score is None:
            return Decision.drop("not_scored", "no NSFW score reached the writer")
        kept, repaired = Decision.keep(), False
        if cfg.text is not None:
            kept, repaired = caption_decision(meta, check_caption(meta.caption, cfg.text))
            if not kept.kept:
                return replace(kept, index=index)
        if questions is not None and meta.conversations:
            from visinstruct.transforms.decontam import conversation_overlap

            overlap = conversation_overlap(meta.conversations, questions, contamination.ngram)
            if not overlap.kept:
                return replace(overlap, index=index)
        if safety is not None and safety.nsfw_threshold is not None and is_nsfw(score, safety.nsfw_threshold):
            message = f"NSFW score {score:.4f} reaches the threshold {safety.nsfw_threshold}"
            return Decision.drop("nsfw", message, {"score": score, "model": "open_nsfw"}, **index)
        if phashes is not None:
            from visinstruct.transforms.decontam import phash_overlap

            try:
                overlap = phash_overlap(sample_phash(meta, members), phashes, contamination.phash_distance)
            except Dropped as e:
                return replace(e.decision, index=index)
            if not overlap.kept:
                return replace(overlap, index=index)
        if key in drops:
            return replace(drops[key], index=index)
        meta = kept.value or meta
        if repaired:
            fixed.inc()
        curation = Curation(nsfw=score)
        if safety is not None and safety.faces:
            earlier = meta.curation
            if earlier is not None and earlier.faces_blurred:  # a rerun over its own output: already blurred
                curation = replace(curation, faces=earlier.faces, faces_blurred=True)
            else:
                ext = image_member(members)
                if ext is None:
                    return Decision.drop("no_image", f"sample has no image member ({', '.join(members)})", **index)
                try:
                    faces, new = curate_faces(members[ext], ext, safety.face_min_size, safety.blur_faces)
                except Dropped as e:  # the image does not decode: its reason, with its NSFW score kept
                    return replace(e.decision, index=index)
                if new is not None:
                    members[ext] = new  # the rewrite writes the members the judge leaves (FORMAT.md)
                    blurred.inc()
                curation = replace(curation, faces=faces, faces_blurred=new is not None)
        if curation == Curation():
            return kept
        return Decision.keep(replace(meta, curation=curation), **index)

    return judge


def shard_judge(cfg: CurateConfig, scored: bool, path: str, groups: Mapping[str, Iterable[Any]]) -> Judge:
    """:class:`~visinstruct.transforms.rewrite_stage.RewriteShard`'s ``make_judge`` (bind ``cfg`` and ``scored``
    with ``functools.partial``): the judge of one shard from its ``CoGroupByKey`` groups (any may be absent)."""
    rejections: dict[str, Rejection] = {}
    for rejection in sorted(groups.get("rejections", ()), key=lambda r: (r.key, r.reason, r.message)):
        if rejection.key:  # a shard-wide one (unreadable tar) is the writer's to find again
            rejections.setdefault(rejection.key, rejection)  # one per key, the same on any runner
    drops: dict[str, Decision] = {}
    for key, decision in sorted(groups.get("decisions", ()), key=lambda kd: (kd[0], kd[1].reason)):
        drops.setdefault(key, decision)  # one reason per key, the same on any runner: benchmark before duplicate
    nsfw = {key: round(score, NSFW_SCORE_DIGITS) for key, score in groups.get("nsfw", ())}
    return curate_judge(cfg, nsfw, drops, rejections, scored)


def conversation_judge(cfg: DecontaminateConfig) -> Judge:
    """The benchmark question check alone, for conversations written after curation (a build's ``decontam`` stage,
    after generate): a conversation that copies a benchmark question is dropped ``benchmark_overlap``."""
    from visinstruct.transforms.decontam import conversation_overlap

    questions = question_index(cfg)

    def judge(key: str, meta: SampleMeta, members: dict[str, bytes]) -> Decision[SampleMeta]:
        if questions is None or not meta.conversations:
            return Decision.keep()
        return conversation_overlap(meta.conversations, questions, cfg.ngram)

    return judge


def decontam_shard_judge(cfg: DecontaminateConfig, path: str, groups: Mapping[str, Iterable[Any]]) -> Judge:
    """``make_judge`` of the ``decontam`` stage (bind ``cfg``): every shard gets the same conversation judge."""
    return conversation_judge(cfg)
