"""The CPU stages of the CLIP filter around RunInference: read samples, decode ahead of the model, rewrite shards.

Image bytes flow read -> decode -> score inside one fused stage; only small ``(shard, decision)`` records are
grouped, and each output shard is written by re-reading its input tar, so no image bytes are shuffled.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial

import apache_beam as beam
import numpy as np

from visinstruct.schemas import ClipScore, Decision, Dropped, Rejection, SampleMeta
from visinstruct.transforms import worker
from visinstruct.transforms.guard import guarded
from visinstruct.transforms.images import decode_rgb
from visinstruct.transforms.layout import image_member
from visinstruct.transforms.rewrite import Judge, iter_samples, read_meta
from visinstruct.transforms.select import ranks_within
from visinstruct.transforms.timing import add_busy

STAGE = "filter"


def shard_sample(path: str, key: str, members: dict[str, bytes], stage: str = STAGE, carry: bool = False):
    """One sample of a tar -> ``((path, key), (image bytes, caption))``, or the :class:`Rejection` saying why not.

    With ``carry``, a text-only or multi-image sample (no single image to score) gives ``None``: the filter's judge
    keeps it unscored. Without, it is a ``no_image`` rejection like a sample missing its image.
    """
    meta = read_meta(stage, key, members, path)  # anything but ValueError is left to the caller's guard
    if isinstance(meta, Rejection):
        return meta
    if carry and meta.n_images != 1:
        return None
    ext = image_member(members)
    if ext is None:
        return Rejection(stage, "no_image", f"sample has no image member ({', '.join(members)})", key, path)
    return (path, key), (members[ext], meta.caption or "")


class ReadShardSamples(beam.DoFn):
    """``tar path`` -> ``((path, key), (image bytes, caption))``; tagged ``rejected``: ``(path, Rejection)``.

    ``stage`` names the rejections and the ``rows_read`` counter (the filter's, or curate's image checks);
    ``carry``: text-only and multi-image samples are left to the judge (see :func:`shard_sample`).
    """

    def __init__(self, stage: str = STAGE, carry: bool = False):
        self.stage, self.carry = stage, carry
        self.rows_read = beam.metrics.Metrics.counter(stage, "rows_read")

    def process(self, path):
        stage = self.stage
        for key, members in iter_samples(path, stage):
            if key is None:
                yield beam.pvalue.TaggedOutput("rejected", (path, members))
                continue
            self.rows_read.inc()
            outcome = guarded(stage, partial(shard_sample, path, key, members, stage, self.carry), key, path)
            if outcome is None:
                continue
            if isinstance(outcome, Rejection):
                yield beam.pvalue.TaggedOutput("rejected", (path, outcome))
            else:
                yield outcome


def decode_for_clip(data: bytes, preprocess: Callable) -> np.ndarray:
    """Shard image bytes -> the model's input (CHW float32); raises :class:`Dropped` for damaged bytes."""
    return preprocess(decode_rgb(data))


class DecodeForClip(beam.DoFn):
    """Decode and preprocess images on a thread pool, keeping up to ``2 * threads`` in flight.

    Elements come out while later ones are still decoding, so the threads work while RunInference (downstream
    in the same fused stage) runs the model: decoding overlaps inference. Damaged images go to ``rejected`` with
    their reason (``truncated``, ``decode_error``...); anything else one sample raises, as ``internal_error``.
    ``preprocess`` is any model's (CLIP's, or curate's NSFW model); ``stage`` names rejections and busy time.
    """

    def __init__(self, preprocess, threads: int, stage: str = STAGE):
        self.preprocess, self.threads, self.stage = preprocess, threads, stage

    def setup(self):
        worker.settle()
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="decode")

    def teardown(self):
        self.pool.shutdown(wait=False, cancel_futures=True)

    def start_bundle(self):
        self.pending = deque()

    def _decode(self, data: bytes) -> tuple[np.ndarray, float]:
        start = time.thread_time()  # CPU time: parallel decoding threads waiting for a core do no work
        return decode_for_clip(data, self.preprocess), time.thread_time() - start

    def _outcome(self, future, key: str, path: str) -> tuple[np.ndarray, float] | Rejection:
        try:
            return future.result()  # re-raises the decoding thread's exception here
        except Dropped as e:
            return e.decision.rejection(self.stage, key, path)

    def _ready(self, drain: bool):
        while self.pending and (drain or len(self.pending) > 2 * self.threads or self.pending[0][1].done()):
            (path, key), future, caption = self.pending.popleft()
            # The guard runs in this thread, not the decoding one, so its counter lands in the DoFn's metrics.
            outcome = guarded(self.stage, partial(self._outcome, future, key, path), key, path)
            if isinstance(outcome, Rejection):
                yield beam.pvalue.TaggedOutput("rejected", (path, outcome))
                continue
            image, seconds = outcome
            add_busy(self.stage, seconds)  # here, not in the decoding thread: metrics are per DoFn thread
            yield (path, key), (image, caption)

    def process(self, element):
        (path, key), (data, caption) = element
        self.pending.append(((path, key), self.pool.submit(self._decode, data), caption))
        yield from self._ready(drain=False)

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindow
        from apache_beam.utils.windowed_value import WindowedValue

        for out in self._ready(drain=True):
            if isinstance(out, beam.pvalue.TaggedOutput):
                yield beam.pvalue.TaggedOutput(out.tag, WindowedValue(out.value, 0, [GlobalWindow()]))
            else:
                yield WindowedValue(out, 0, [GlobalWindow()])


class SplitUnscored(beam.DoFn):
    """``((path, key), output)`` that the model could not score alone (``output.error``) or scored NaN or infinite
    -> ``rejected``: ``(path, Rejection)``, reason ``inference_error``. A NaN would otherwise reach a histogram or a
    threshold and fail the job there. Any model's outputs with ``score`` and ``error`` (CLIP's, the NSFW model's)."""

    def __init__(self, stage: str = STAGE):
        self.stage = stage

    def process(self, element):
        (path, key), output = element
        if output.error is None and math.isfinite(output.score):
            yield element
            return
        message = output.error or f"the model scored this example {output.score}"
        rejection = Rejection(self.stage, "inference_error", message, key, path)
        yield beam.pvalue.TaggedOutput("rejected", (path, rejection))


def failed_batch_rejections(failure, stage: str = STAGE) -> list[tuple[str, Rejection]]:
    """RunInference's ``(failed batch, exception)`` as one dead-letter row per sample."""
    batch, error = failure
    message = f"{type(error).__name__}: {error}"[:500] if isinstance(error, BaseException) else str(error)[:500]
    return [(path, Rejection(stage, "inference_error", message, key, path)) for (path, key), _ in batch]


def score_decision(
    key: str, output, threshold: float | None, top_fraction: float | None, cut, clip: ClipScore
) -> Decision[ClipScore]:
    """One scored pair's decision: threshold first, then the top fraction (``cut`` from :class:`TopFractionCut`).

    ``clip`` names the model; the value is it with this pair's score. The score and embeddings are index columns
    whether the pair is kept or not, so a dropped row still says how it scored.
    """
    score = round(output.score, 6)
    index = {
        "clip_score": score,
        "clip_image_embedding": _bytes(output.image_embedding),
        "clip_text_embedding": _bytes(output.text_embedding),
    }
    reason = None
    if threshold is not None and output.score < threshold:
        reason = "clip_below_threshold"
    elif top_fraction is not None and not ranks_within(output.score, key, cut):
        reason = "clip_not_top_fraction"
    if reason is None:
        return Decision.keep(replace(clip, score=score), **index)
    detail = {"score": output.score, "model": clip.model}
    return Decision.drop(reason, f"CLIP score {output.score:.4f} ({reason})", detail, **index)


def _bytes(vector: np.ndarray | None) -> bytes | None:
    return None if vector is None else vector.tobytes()


def filter_judge(decisions: dict[str, Decision[ClipScore]], rejections: dict[str, Rejection]) -> Judge:
    """The filter as a judge of one shard: a scored sample keeps its decision (kept, it carries the score in its
    JSON); one that never reached the model is dropped for the reason it did not, except text-only and multi-image
    samples, which have no single image to score: they are kept as they are."""

    def judge(key: str, meta: SampleMeta, members: dict[str, bytes]) -> Decision[SampleMeta]:
        decision = decisions.get(key)
        if decision is None:
            rejection = rejections.get(key)
            if rejection is not None:
                return Decision.from_rejection(rejection)
            if meta.n_images != 1:
                return Decision.keep(meta)
            return Decision.drop("not_scored", "no score reached the writer")
        if decision.kept:
            return Decision.keep(replace(meta, clip=decision.value), **decision.index)
        return decision

    return judge


def shard_judge(path: str, groups) -> Judge:
    """The judge of one shard from its ``CoGroupByKey`` groups: ``decisions`` ``(key, Decision)`` and
    ``rejections`` ``Rejection`` (a shard-wide one, keyed by no sample, is the writer's to find again)."""
    return filter_judge(dict(groups["decisions"]), {r.key: r for r in groups["rejections"] if r.key})
