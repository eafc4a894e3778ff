"""The CPU stages of the CLIP filter around RunInference: read samples, decode ahead of the model, rewrite shards.

Image bytes flow read -> decode -> score inside one fused stage; only small ``(shard, decision)`` records are
grouped, and each output shard is written by re-reading its input tar, so no image bytes are shuffled.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import apache_beam as beam
import numpy as np
from PIL import Image

from visinstruct.schemas import (
    SCHEMA_VERSION,
    ClipScore,
    IndexRow,
    JsonDict,
    Rejection,
    SampleMeta,
    ShardStats,
)
from visinstruct.transforms.shards import (
    TarShardWriter,
    UnsafeMember,
    join,
    read_tar_samples,
    write_stats,
    write_table,
)

log = logging.getLogger(__name__)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
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


def shard_id(path: str, position: int) -> int:
    """Output shard id: the input tar's numeric stem (``00042.tar`` -> 42), else its position in the input."""
    stem = os.path.basename(path).split(".", 1)[0]
    return int(stem) if stem.isdigit() else position


def iter_samples(path: str):
    """``(key, members)`` of a tar, then a final ``(None, Rejection)`` if the tar is truncated or unsafe."""
    try:
        for key, members in read_tar_samples(path):
            yield key, members
    except (UnsafeMember, OSError, EOFError, ValueError) as e:  # tarfile.ReadError is an OSError... mostly
        yield None, Rejection(STAGE, "corrupt_shard", f"{type(e).__name__}: {e}"[:500], "", path)
    except Exception as e:  # noqa: BLE001 - tarfile raises StreamError/ReadError (not OSError) too
        yield None, Rejection(STAGE, "corrupt_shard", f"{type(e).__name__}: {e}"[:500], "", path)


def sample_caption(members: dict[str, bytes]) -> str:
    if "txt" in members:
        return members["txt"].decode("utf-8", "replace")
    if "json" in members:
        return SampleMeta.from_json(members["json"]).caption or ""
    return ""


def image_member(members: dict[str, bytes]) -> str | None:
    return next((ext for ext in IMAGE_EXTS if ext in members), None)


class ReadShardSamples(beam.DoFn):
    """``tar path`` -> ``((path, key), (image bytes, caption))``; tagged ``rejected``: ``(path, Rejection)``."""

    def __init__(self):
        self.rows_read = beam.metrics.Metrics.counter(STAGE, "rows_read")

    def process(self, path):
        for key, members in iter_samples(path):
            if key is None:
                yield beam.pvalue.TaggedOutput("rejected", (path, members))
                continue
            self.rows_read.inc()
            ext = image_member(members)
            if ext is None:
                yield beam.pvalue.TaggedOutput("rejected", (path, Rejection(
                    STAGE, "no_image", f"sample has no image member ({', '.join(members)})", key, path)))
                continue
            yield (path, key), (members[ext], sample_caption(members))


class DecodeForClip(beam.DoFn):
    """Decode and preprocess images on a thread pool, keeping up to ``2 * threads`` in flight.

    Elements come out while later ones are still decoding, so the threads work while RunInference (downstream
    in the same fused stage) runs the model: decoding overlaps inference. Failures go to ``rejected``.
    """

    def __init__(self, preprocess, threads: int):
        self.preprocess, self.threads = preprocess, threads

    def setup(self):
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="decode")

    def teardown(self):
        self.pool.shutdown(wait=False, cancel_futures=True)

    def start_bundle(self):
        self.pending = deque()

    def _decode(self, data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as img:
            return self.preprocess(img.convert("RGB"))

    def _ready(self, drain: bool):
        while self.pending and (drain or len(self.pending) > 2 * self.threads or self.pending[0][1].done()):
            (path, key), future, caption = self.pending.popleft()
            try:
                yield (path, key), (future.result(), caption)
            except Exception as e:  # noqa: BLE001 - any decoder error is the sample's fault, not the stage's
                yield beam.pvalue.TaggedOutput("rejected", (path, Rejection(
                    STAGE, "decode_error", f"{type(e).__name__}: {e}"[:500], key, path)))

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


def rewrite_shard(path: str, position: int, decisions: dict[str, Decision], rejections: dict[str, Rejection],
                  out_dir: str, model: str, pretrained: str | None) -> ShardStats:
    """Write the filtered shard: kept samples with their CLIP score in the JSON; an index row for every input."""
    start = time.monotonic()
    shard = shard_id(path, position)
    stem = f"{shard:05d}"
    writer, rows, dead = TarShardWriter(), [], []
    try:
        for key, members in iter_samples(path):
            if key is None:
                dead.append(members)
                continue
            row, rejection = _filter_sample(key, members, decisions, rejections, writer, model, pretrained)
            rows.append(row)
            if rejection is not None:
                dead.append(rejection)
        tar_bytes = writer.finish(join(out_dir, f"{stem}.tar"))
    except BaseException:
        writer.abort()
        raise
    write_table(join(out_dir, f"{stem}.parquet"), rows, IndexRow, SCHEMA_VERSION)
    write_table(join(out_dir, "rejected", f"{STAGE}-{stem}.parquet"), dead, Rejection, SCHEMA_VERSION)
    reasons = Counter(r.status for r in rows if r.status != "success")
    written = sum(r.status == "success" for r in rows)
    stats = ShardStats(shard=shard, stage=STAGE, inputs=len(rows), written=written, rejected=len(rows) - written,
                       rejected_by_reason=dict(reasons), tar_bytes=tar_bytes,
                       duration_s=round(time.monotonic() - start, 3))
    write_stats(join(out_dir, f"{stem}_stats.json"), stats)
    return stats


def _filter_sample(key, members, decisions, rejections, writer, model, pretrained):
    meta = SampleMeta.from_json(members["json"]) if "json" in members else SampleMeta(
        key=key, caption=sample_caption(members))
    decision = decisions.get(key)
    if decision is not None:
        meta = replace(meta, clip=ClipScore(round(decision.score, 6), model, pretrained))
    base = IndexRow(key=key, status="success", url=meta.url, path=meta.path, caption=meta.caption,
                    width=meta.width, height=meta.height, original_width=meta.original_width,
                    original_height=meta.original_height, sha256=meta.sha256, phash=meta.phash,
                    clip_score=meta.clip.score if meta.clip else None,
                    clip_image_embedding=decision.image_embedding if decision else None,
                    clip_text_embedding=decision.text_embedding if decision else None)
    if decision is not None and decision.kept:
        members = dict(members, json=meta.to_json().encode("utf-8"))
        return replace(base, members=writer.add(key, list(members.items()))), None
    if decision is not None:
        rejection = Rejection(STAGE, decision.reason, f"CLIP score {decision.score:.4f} ({decision.reason})", key,
                              meta.url or meta.path, JsonDict({"score": decision.score, "model": model}))
    else:
        rejection = rejections.get(key) or Rejection(STAGE, "not_scored", "no score reached the writer", key,
                                                     meta.url or meta.path)
    return replace(base, status=rejection.reason, error_message=rejection.message), rejection
