"""The CPU stages of the CLIP filter around RunInference: read samples, decode ahead of the model, rewrite shards.

Image bytes flow read -> decode -> score inside one fused stage; only small ``(shard, decision)`` records are
grouped, and each output shard is written by re-reading its input tar, so no image bytes are shuffled.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import apache_beam as beam
import numpy as np

from visinstruct.schemas import ClipScore, Dropped, JsonDict, Rejection, SampleMeta
from visinstruct.transforms.guard import guarded
from visinstruct.transforms.images import decode_rgb
from visinstruct.transforms.rewrite import Judge, Judgement, image_member, iter_samples, read_meta
from visinstruct.transforms.timing import add_busy

log = logging.getLogger(__name__)
STAGE = "filter"


@dataclass(frozen=True)
class Decision:
    """The filter's verdict on one sample."""

    key: str
    score: float
    kept: bool
    reason: str | None = None
    image_embedding: bytes | None = None
    text_embedding: bytes | None = None


def shard_sample(path: str, key: str, members: dict[str, bytes]):
    """One sample of a tar -> ``((path, key), (image bytes, caption))``, or the :class:`Rejection` saying why not."""
    ext = image_member(members)
    if ext is None:
        return Rejection(STAGE, "no_image", f"sample has no image member ({', '.join(members)})", key, path)
    meta = read_meta(STAGE, key, members, path)  # anything but ValueError is left to the caller's guard
    if isinstance(meta, Rejection):
        return meta
    return (path, key), (members[ext], meta.caption or "")


class ReadShardSamples(beam.DoFn):
    """``tar path`` -> ``((path, key), (image bytes, caption))``; tagged ``rejected``: ``(path, Rejection)``."""

    def __init__(self):
        self.rows_read = beam.metrics.Metrics.counter(STAGE, "rows_read")

    def process(self, path):
        for key, members in iter_samples(path, STAGE):
            if key is None:
                yield beam.pvalue.TaggedOutput("rejected", (path, members))
                continue
            self.rows_read.inc()
            outcome = guarded(STAGE, lambda: shard_sample(path, key, members), key, path)  # noqa: B023 - called now
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
    """

    def __init__(self, preprocess, threads: int):
        self.preprocess, self.threads = preprocess, threads

    def setup(self):
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="decode")

    def teardown(self):
        self.pool.shutdown(wait=False, cancel_futures=True)

    def start_bundle(self):
        self.pending = deque()

    def _decode(self, data: bytes) -> tuple[np.ndarray, float]:
        start = time.thread_time()  # CPU time: parallel decoding threads waiting for a core do no work
        return decode_for_clip(data, self.preprocess), time.thread_time() - start

    @staticmethod
    def _outcome(future, key: str, path: str) -> tuple[np.ndarray, float] | Rejection:
        try:
            return future.result()  # re-raises the decoding thread's exception here
        except Dropped as e:
            return Rejection(STAGE, e.reason, str(e)[:500], key, path)

    def _ready(self, drain: bool):
        while self.pending and (drain or len(self.pending) > 2 * self.threads or self.pending[0][1].done()):
            (path, key), future, caption = self.pending.popleft()
            # The guard runs in this thread, not the decoding one, so its counter lands in the DoFn's metrics.
            outcome = guarded(STAGE, lambda: self._outcome(future, key, path), key, path)  # noqa: B023 - called now
            if isinstance(outcome, Rejection):
                yield beam.pvalue.TaggedOutput("rejected", (path, outcome))
                continue
            image, seconds = outcome
            add_busy(STAGE, seconds)  # here, not in the decoding thread: metrics are per DoFn thread
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


def failed_batch_rejections(failure) -> list[tuple[str, Rejection]]:
    """RunInference's ``(failed batch, exception)`` as one dead-letter row per sample."""
    batch, error = failure
    message = f"{type(error).__name__}: {error}"[:500] if isinstance(error, BaseException) else str(error)[:500]
    return [(path, Rejection(STAGE, "inference_error", message, key, path)) for (path, key), _ in batch]


def filter_judge(
    decisions: dict[str, Decision], rejections: dict[str, Rejection], model: str, pretrained: str | None
) -> Judge:
    """The filter's verdict per sample: its decision (score in the JSON either way), or why it was not scored."""

    def judge(key: str, meta: SampleMeta) -> Judgement:
        decision = decisions.get(key)
        if decision is None:
            return Judgement(
                rejection=rejections.get(key)
                or Rejection(STAGE, "not_scored", "no score reached the writer", key, meta.url or meta.path)
            )
        meta = replace(meta, clip=ClipScore(round(decision.score, 6), model, pretrained))
        index = {"clip_image_embedding": decision.image_embedding, "clip_text_embedding": decision.text_embedding}
        if decision.kept:
            return Judgement(meta=meta, index=index)
        rejection = Rejection(
            STAGE,
            decision.reason,
            f"CLIP score {decision.score:.4f} ({decision.reason})",
            key,
            meta.url or meta.path,
            JsonDict({"score": decision.score, "model": model}),
        )
        return Judgement(rejection=rejection, index=index | {"clip_score": meta.clip.score})

    return judge
