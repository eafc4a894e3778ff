"""Stream training batches from our shards with webdataset: endless, deterministic from a seed, resumable.

Shared by the contrastive and the LLaVA trainers. A batch is a dict::

    {"key": [str], "caption": [str], "image": tensor [N, 3, H, W] or None, "image_counts": [int],
     "text": text_transform(captions) or captions}

``image`` holds every image of the batch in order (a sample's images in member order, ``KEY.jpg`` or ``KEY.0.jpg``,
``KEY.1.png``...: :func:`~visinstruct.transforms.layout.image_members`), ``image_counts`` how many each sample gave;
None when no sample has one. Caption pairs (``caption`` a source name: the contrastive trainer) take single-image
samples only; a function of the sample (the LLaVA trainer's conversations) decides which shapes it takes.

How the stream is cut (each DataLoader worker runs :meth:`ShardStream._worker_batches` on its own):

- per epoch ``e``, the shard list is split across processes (as ``wds.split_by_node``: process ``r`` of ``W``
  takes shards ``r, r + W, ...``), then across workers the same way, then shuffled in a buffer of ``shard_shuffle``
  shards; samples are shuffled in a buffer of ``shuffle_buffer``; seeds derive from ``(seed, e, rank, worker)``.
  ``resampled`` draws ``len(shards) // (W * workers)`` shards with replacement per epoch instead, as open_clip does
  for few or uneven shards.
- batches never cross an epoch; a worker's last incomplete batch of an epoch is dropped (so every process's batch
  has ``batch_size`` samples, which gathering negatives across processes needs). Workers then start their next
  epoch on their own: the stream never ends, and the trainer counts steps, not epochs.
- images are decoded only for batches that are delivered. A sample that is no training data (no caption; for
  caption pairs a text-only or multi-image sample; what the text function refuses with a :class:`Skip`) is skipped
  and counted by reason: each batch carries the counts since the previous one, which the stream adds up in
  :attr:`ShardStream.skipped` (and :func:`iterate_once` in the ``Counter`` it is given).

What resume restores (:meth:`ShardStream.state_dict`): for each worker, its epoch and the batches it delivered
within it. A restored stream rebuilds that epoch and discards those batches before decoding (they are still read
from the tars: the cost of a resume is up to one epoch of reading, per worker). DataLoader takes batches from its
workers in strict rotation, and these streams never end, so the stream also restores which worker is next: with
the same shards, seed, batch size, world size and worker count, the batches after a resume are the very batches
an uninterrupted run gets. With another world size or worker count the stream restarts its epochs from zero (a
warning says so). Random augmentation (``augment``) draws from each worker's torch RNG, which is not replayed.

A blend (``data.blend``; :func:`stream_sources` gives a :class:`Blend`) mixes several shard sets at read time.
Each source is its own endless sample stream: shards drawn with replacement, samples shuffled in its share of
``shuffle_buffer`` (``shuffle_buffer // sources`` each, so a blend holds as many samples as one stream), seeded from
``(seed, epoch, rank, worker, source)``. Each sample a worker yields comes from source ``i`` with probability
``weight_i / sum(weights)``, drawn by an RNG seeded from ``(seed, epoch, rank, worker)``. A blended epoch is a fixed
number of samples: ``Blend.epoch_samples`` (``data.blend_epoch_samples``, or the written samples of every source's
shards by their stats) divided across processes and workers, so that epochs, batches and resume mean what they mean
without a blend. Its batches carry ``"source"``: the source (its shard spec) of each sample.

webdataset's own ``WebDataset(resampled=True)`` seeds its resampler from the clock and the process id, so the
pipeline is spelled out here with ``wds.DataPipeline`` and the same stages, seeded.
"""

from __future__ import annotations

import bisect
import collections
import functools
import io
import itertools
import json
import logging
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import webdataset as wds
from PIL import Image

from visinstruct.configs.loader import ConfigError
from visinstruct.transforms.layout import (
    SPEC_SEPARATOR,
    ShardError,
    expand_braces,
    image_members,
    read_stats,
    resolve_shards,
    shard_files,
)
from visinstruct.transforms.shards import exists, is_remote

log = logging.getLogger(__name__)


def shard_list(spec: str) -> list[str]:
    """The tars a spec names: a folder, a ``.tar``, a glob or a brace pattern (each part's tars sorted, as
    :func:`~visinstruct.transforms.layout.resolve_shards` finds them), or several joined by ``::``.

    A URL (``https://...``, ``gs://...``) or a ``pipe:`` command is only brace-expanded: webdataset opens it
    itself, and nothing can list it. A local folder gives only the tars that exist (a shard whose tar is gone but
    whose index remains is no training data).

    Raises:
        FileNotFoundError: when a local part names no shards (a typo should not train on zero shards).
    """
    urls = []
    for part in spec.split(SPEC_SEPARATOR):
        try:
            if part.startswith("pipe:") or is_remote(part):
                urls += expand_braces(part)
            else:
                urls += [tar for tar in resolve_shards(part) if exists(tar)]
        except ShardError as e:
            raise FileNotFoundError(str(e)) from None
    if not urls:
        raise FileNotFoundError(f"{spec}: no shards (.tar files) match")
    return urls


@dataclass(frozen=True)
class Source:
    """One shard set of a blend: its name (the spec), its tars and its relative weight."""

    name: str
    urls: tuple[str, ...]
    weight: float


@dataclass(frozen=True)
class Blend:
    """Shard sets mixed at read time by weight, and the samples of one blended epoch (all processes and workers)."""

    sources: tuple[Source, ...]
    epoch_samples: int


def written_samples(urls: list[str] | tuple[str, ...]) -> int | None:
    """The samples the shards hold by their stats files (``written``), or None when any has no stats beside it
    (remote shards, a ``pipe:``, img2dataset output without stats, a bare tar)."""
    total = 0
    for url in urls:
        if url.startswith("pipe:") or is_remote(url) or not exists(stats := shard_files(url).stats):
            return None
        total += read_stats(stats).written
    return total


def blend_of(sources: list[tuple[str, float]], epoch_samples: int | None = None) -> Blend:
    """A :class:`Blend` of ``(spec, weight)`` pairs; the epoch defaults to the sources' written samples.

    Raises:
        FileNotFoundError: a source names no shards.
        ValueError: a weight is not > 0, or the epoch is not given and some shard has no stats to count it from.
    """
    built = []
    for i, (spec, weight) in enumerate(sources):
        if not weight > 0:
            raise ValueError(f"blend source {i} ({spec}): weight must be > 0, got {weight}")
        try:
            urls = shard_list(spec)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"blend source {i}: {e}") from None
        built.append(Source(spec, tuple(urls), float(weight)))
    if not built:
        raise ValueError("a blend needs at least one source")
    if epoch_samples is None:
        counts = [written_samples(s.urls) for s in built]
        if None in counts:
            spec = built[counts.index(None)].name
            raise ConfigError(
                f"blend source {spec}: cannot count its samples (a shard without its stats file, or remote shards): "
                "set data.blend_epoch_samples"
            )
        epoch_samples = sum(counts)
    return Blend(tuple(built), epoch_samples)


def stream_sources(data) -> list[str] | Blend:
    """What :class:`ShardStream` reads for a ``StreamConfig``: the tars of ``data.shards``, or ``data.blend``."""
    if data.blend is None:
        return shard_list(data.shards)
    return blend_of([(b.shards, b.weight) for b in data.blend], data.blend_epoch_samples)


def caption_of(sample: dict[str, Any], source: str = "auto") -> str | None:
    """A sample's caption: its ``.txt`` member, or the first gpt turn of its ``.json`` conversations.

    Args:
        sample: a raw webdataset sample (member extension -> bytes).
        source: ``txt``, ``conversation`` or ``auto`` (txt when present and not blank, else conversations).

    Returns:
        The stripped caption, or None when the sample has none from that source.
    """
    if source in ("auto", "txt") and sample.get("txt") is not None:
        text = sample["txt"].decode("utf-8").strip()
        if text or source == "txt":
            return text or None
    if source in ("auto", "conversation") and sample.get("json") is not None:
        turns = json.loads(sample["json"]).get("conversations") or []
        reply = next((t.get("value", "") for t in turns if t.get("from") == "gpt"), "").strip()
        return reply or None
    return None


def decode_batch(
    raw: list[dict[str, Any]], image_transform: Callable, text_transform: Callable | None, caption: str
) -> dict[str, Any]:
    """Decode and collate raw samples (see the module docstring for the batch). A corrupt image raises, naming the
    sample (training data is validated)."""
    images, counts, captions = [], [], []
    for sample in raw:
        members = image_members(sample)
        for member in members:
            try:
                image = Image.open(io.BytesIO(sample[member])).convert("RGB")
            except Exception as e:
                where = f"{sample.get('__url__')}: sample {sample['__key__']}"
                raise ValueError(f"{where}: cannot decode its image {member}: {e}") from e
            images.append(image_transform(image))
        counts.append(len(members))
        captions.append(sample["__text__"] if "__text__" in sample else text_of(sample, caption))
    return {
        "key": [s["__key__"] for s in raw],
        "caption": captions,
        "image": torch.stack(images) if images else None,
        "image_counts": counts,
        "text": text_transform(captions) if text_transform is not None else captions,
    }


@dataclass(frozen=True)
class Skip:
    """What a text function (:class:`ShardStream`'s ``caption``) returns for a sample that is no training data:
    the reason it is skipped, counted under that name."""

    reason: str


def text_of(sample: dict[str, Any], caption: str | Callable[[dict[str, Any]], Any]) -> Any:
    """A raw sample's text: :func:`caption_of` by source name, or ``caption(sample)`` (the LLaVA trainer's
    conversations); None (or a :class:`Skip`) when it has none."""
    return caption(sample) if callable(caption) else caption_of(sample, caption)


def skip_reason(sample: dict[str, Any], caption: str | Callable) -> str | None:
    """Why a raw sample is no training data, or None when it is; its text is kept in ``sample["__text__"]``.

    Caption pairs (``caption`` a source name) need exactly one image: ``no_image`` (a text-only sample),
    ``multi_image``, ``no_caption``. A text function decides shapes itself: its :class:`Skip` reason, or
    ``no_text`` for None.
    """
    if not callable(caption):
        count = len(image_members(sample))
        if count != 1:
            return "no_image" if count == 0 else "multi_image"
    text = text_of(sample, caption)
    if isinstance(text, Skip):
        return text.reason
    if text is None:
        return "no_text" if callable(caption) else "no_caption"
    sample["__text__"] = text
    return None


def usable_samples(
    samples: Iterator[dict[str, Any]], caption: str | Callable, skipped: collections.Counter
) -> Iterator[dict[str, Any]]:
    """The samples that are training data (:func:`skip_reason`); the others counted in ``skipped`` by reason."""
    for sample in samples:
        reason = skip_reason(sample, caption)
        if reason is None:
            yield sample
        else:
            skipped[reason] += 1


def _every(src: Iterator, start: int, step: int) -> Iterator:
    """Items ``start, start + step, ...``: a process's or a worker's share of the shards."""
    return itertools.islice(src, start, None, step)


def _seed(*parts: int) -> int:
    return wds.utils.make_seed(*parts)  # ints only: Python's hash of an int does not vary between runs


class _Drought:
    """Shards drawn since a source last gave a usable sample: an endless stream of a source with none would
    otherwise spin forever."""

    def __init__(self, name: str, limit: int):
        self.name, self.limit, self.draws = name, limit, 0

    def draw(self) -> None:
        self.draws += 1
        if self.draws > self.limit:
            raise ValueError(
                f"blend source {self.name}: no usable sample (training data of the trainer's shape) in "
                f"{self.limit} shard draws"
            )


def _draw_shards(urls: tuple[str, ...], seed: int, drought: _Drought) -> Iterator[dict[str, str]]:
    """Shards drawn with replacement, for ever, in an order fixed by ``seed``."""
    rng = random.Random(seed)
    while True:
        drought.draw()
        yield {"url": rng.choice(urls)}


def _rained(samples: Iterator[dict[str, Any]], drought: _Drought) -> Iterator[dict[str, Any]]:
    for sample in samples:
        drought.draws = 0
        yield sample


def source_samples(
    source: Source, seed: int, shuffle_buffer: int, caption: str | Callable, skipped: collections.Counter
) -> Iterator[dict[str, Any]]:
    """One blend source's endless usable raw samples: resampled shards, shuffled in a buffer, seeded; each sample
    tagged ``__source__`` with the source's name; unusable ones counted in ``skipped``.

    Raises:
        ValueError: (when iterated) when ``10 * shards + 100`` shard draws in a row give no usable sample.
    """
    drought = _Drought(source.name, 10 * len(source.urls) + 100)
    samples = wds.tarfile_to_samples()(_draw_shards(source.urls, seed, drought))
    samples = _rained(usable_samples(samples, caption, skipped), drought)
    if shuffle_buffer:
        samples = wds.shuffle(shuffle_buffer, initial=shuffle_buffer, seed=seed + 1)(samples)
    for sample in samples:
        yield {**sample, "__source__": source.name}


def blend_samples(sources: tuple[Source, ...], count: int, seed: int, **source_args: Any) -> Iterator[dict[str, Any]]:
    """``count`` raw samples, each from source ``i`` with probability ``weight_i / sum(weights)``.

    The draw is seeded by ``seed``; source ``i`` streams with seed ``_seed(seed, i)`` (:func:`source_samples`, which
    opens a source only when first drawn).
    """
    rng = random.Random(seed)
    bounds = list(itertools.accumulate(s.weight for s in sources))
    streams: dict[int, Iterator[dict[str, Any]]] = {}
    for _ in range(count):
        i = min(bisect.bisect_right(bounds, rng.random() * bounds[-1]), len(sources) - 1)
        if i not in streams:
            streams[i] = source_samples(sources[i], _seed(seed, i), **source_args)
        yield next(streams[i])


class ShardStream(torch.utils.data.IterableDataset):
    """Endless, seeded batches from shards for a step-counting trainer; see the module docstring.

    Args:
        urls: the shards (:func:`shard_list`), or a :class:`Blend` of shard sets (:func:`stream_sources`); a blend
            always resamples (``shard_shuffle`` and ``resampled`` do not apply) and its batches carry ``"source"``.
        batch_size: samples per batch (per process).
        image_transform: ``PIL.Image -> tensor [3, H, W]`` (applied in the workers).
        text_transform: ``list[str] -> anything`` (a tokenizer), or None to deliver the captions as they are.
        caption: ``auto``, ``txt`` or ``conversation`` (:func:`caption_of`; single-image samples only), or a
            function of the raw sample giving its text, any image count (None or a :class:`Skip` skips the sample):
            :func:`text_of`. Skipped samples are counted in :attr:`skipped`.
        seed: the whole order is a function of it.
        shard_shuffle: shards in the shard shuffle buffer (0: sorted order).
        shuffle_buffer: samples in the sample shuffle buffer (0: stream order).
        resampled: draw shards with replacement (no split across processes).
        num_workers: DataLoader worker processes (0: decode in this process).
        rank, world_size: this process among all; None reads torchrun's ``RANK`` and ``WORLD_SIZE``.
    """

    def __init__(
        self,
        urls: list[str] | Blend,
        batch_size: int,
        image_transform: Callable,
        text_transform: Callable | None = None,
        caption: str = "auto",
        seed: int = 0,
        shard_shuffle: int = 100,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        num_workers: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        self.blend = urls if isinstance(urls, Blend) else None
        if self.blend is not None:
            urls, resampled = [], True
        self.urls, self.batch_size, self.caption, self.seed = list(urls), batch_size, caption, seed
        self.image_transform, self.text_transform = image_transform, text_transform
        self.shard_shuffle, self.shuffle_buffer, self.resampled = shard_shuffle, shuffle_buffer, resampled
        self.rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        self.world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        per_process = len(self.urls) // self.world_size
        if not resampled and per_process == 0:
            raise ValueError(
                f"{len(self.urls)} shards cannot be split across {self.world_size} processes "
                "(use more shards, or data.resampled)"
            )
        # A worker without a shard would idle; cap the workers so that each has at least one.
        self.num_workers = num_workers if resampled else min(num_workers, per_process)
        self.workers = max(1, self.num_workers)
        self.start = {w: (0, 0) for w in range(self.workers)}  # logical worker -> (epoch, batches to skip)
        self.first = 0  # the logical worker that physical worker 0 plays (the one whose batch comes next)
        self.position = dict(self.start)  # logical worker -> (epoch, batches delivered in it)
        self.delivered = 0
        self.skipped: collections.Counter = collections.Counter()  # samples skipped by reason, this process
        self._batches: Iterator | None = None
        if self.blend is not None and self.blend.epoch_samples // (self.world_size * self.workers) < batch_size:
            raise ConfigError(  # said here, not as a worker's exception the DataLoader wraps
                f"a blended epoch of {self.blend.epoch_samples} samples gives each of "
                f"{self.world_size * self.workers} workers less than one batch of {batch_size}: raise "
                "data.blend_epoch_samples or lower the batch"
            )

    def _epoch_samples(self, epoch: int, worker: int, skipped: collections.Counter) -> Iterator[dict[str, Any]]:
        """Usable raw samples of one worker's share of one epoch, shuffled; the others counted in ``skipped``."""
        seed = _seed(self.seed, epoch, self.rank, worker)
        if self.blend is not None:
            count = self.blend.epoch_samples // (self.world_size * self.workers)
            # the sources share the buffer, so a blend holds as many samples as one stream does
            buffer = self.shuffle_buffer and max(1, self.shuffle_buffer // len(self.blend.sources))
            return blend_samples(
                self.blend.sources, count, seed, shuffle_buffer=buffer, caption=self.caption, skipped=skipped
            )
        if self.resampled:
            count = max(1, len(self.urls) // (self.world_size * self.workers))
            stages = [
                wds.ResampledShards(self.urls, nshards=count, seed=seed, deterministic=True, worker_seed=lambda: 0)
            ]
        else:
            # wds.split_by_node's split, by the rank given (a spawned process need not have torchrun's variables)
            stages = [
                wds.SimpleShardList(self.urls),
                functools.partial(_every, start=self.rank, step=self.world_size),
                functools.partial(_every, start=worker, step=self.workers),
            ]
            if self.shard_shuffle:
                stages.append(wds.shuffle(self.shard_shuffle, initial=self.shard_shuffle, seed=seed))
        stages.append(wds.tarfile_to_samples())
        if self.shuffle_buffer:
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=seed + 1))
        stages.append(functools.partial(usable_samples, caption=self.caption, skipped=skipped))
        return iter(wds.DataPipeline(*stages))

    def _worker_batches(self) -> Iterator[dict[str, Any]]:
        """One worker's endless batches, each tagged with ``(logical worker, epoch, batches so far in it)``."""
        info = torch.utils.data.get_worker_info()
        worker = ((info.id if info else 0) + self.first) % self.workers
        epoch, skip = self.start[worker]
        skipped = collections.Counter()  # since this worker's last batch
        while True:
            raw_batches = _batches_of(self._epoch_samples(epoch, worker, skipped), self.batch_size)
            done = skip
            for _ in itertools.islice(raw_batches, skip):  # delivered before a resume: read again, not decoded
                skipped.clear()  # and their skipped samples were counted then
            for raw in raw_batches:
                done += 1
                batch = decode_batch(raw, self.image_transform, self.text_transform, self.caption)
                if self.blend is not None:
                    batch["source"] = [s["__source__"] for s in raw]
                batch["skipped"] = dict(skipped)
                skipped.clear()
                yield {**batch, "position": (worker, epoch, done)}
            if done == 0:
                raise ValueError(
                    f"process {self.rank}, worker {worker}: epoch {epoch} has no complete batch of "
                    f"{self.batch_size} samples (use fewer workers or processes, or a smaller batch)"
                )
            epoch, skip = epoch + 1, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._worker_batches()

    def __next__(self) -> dict[str, Any]:
        """The next batch for the trainer (starting the DataLoader workers on first use)."""
        if self._batches is None:
            self._batches = (
                iter(self)
                if self.num_workers == 0
                else iter(
                    torch.utils.data.DataLoader(self, batch_size=None, num_workers=self.num_workers, prefetch_factor=4)
                )
            )
        batch = next(self._batches)
        self.skipped.update(batch.pop("skipped"))
        worker, epoch, done = batch.pop("position")
        self.position[worker] = (epoch, done)
        self.delivered += 1
        return batch

    def close(self) -> None:
        """Stop the DataLoader workers now (left to the garbage collector, they linger for seconds)."""
        self._batches = None

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands: enough to continue with exactly the batches an uninterrupted run gets."""
        return {
            "workers": self.workers,
            "world_size": self.world_size,
            "rank": self.rank,
            "position": {w: list(p) for w, p in self.position.items()},
            "next_worker": (self.first + self.delivered) % self.workers,
            "skipped": dict(self.skipped),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`; call before the first batch."""
        if self._batches is not None:
            raise RuntimeError("load_state_dict must come before the first batch")
        if (state["workers"], state["world_size"]) != (self.workers, self.world_size):
            log.warning(
                "data position saved with %d processes x %d workers, resuming with %d x %d: the data stream "
                "restarts at epoch 0",
                state["world_size"],
                state["workers"],
                self.world_size,
                self.workers,
            )
            return
        self.skipped = collections.Counter(state.get("skipped", {}))
        self.start = {int(w): tuple(p) for w, p in state["position"].items()}
        self.position = dict(self.start)
        self.first = state["next_worker"]


def skipped_over_processes(skipped: collections.Counter, world_size: int = 1) -> dict[str, int]:
    """Samples skipped so far by reason (:attr:`ShardStream.skipped`), every process's added up; under torchrun
    every process calls it."""
    if world_size > 1:
        counts: list = [None] * world_size
        torch.distributed.all_gather_object(counts, dict(skipped))
        skipped = sum(map(collections.Counter, counts), collections.Counter())
    return dict(sorted(skipped.items()))


def _batches_of(samples: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    """Complete batches of raw samples; the incomplete rest is dropped."""
    while len(batch := list(itertools.islice(samples, size))) == size:
        yield batch


def iterate_once(
    urls: list[str],
    batch_size: int,
    image_transform: Callable,
    text_transform: Callable | None = None,
    caption: str = "auto",
    limit: int | None = None,
    skipped: collections.Counter | None = None,
) -> Iterator[dict[str, Any]]:
    """One pass over shards in their order, in this process (evaluation): the last batch may be smaller.

    Args:
        limit: stop after this many usable samples.
        skipped: counts the samples skipped, by reason (:func:`skip_reason`), when given.
    """
    skipped = collections.Counter() if skipped is None else skipped
    stages = [
        wds.SimpleShardList(urls),
        wds.tarfile_to_samples(),
        functools.partial(usable_samples, caption=caption, skipped=skipped),
    ]
    samples = itertools.islice(iter(wds.DataPipeline(*stages)), limit)
    while raw := list(itertools.islice(samples, batch_size)):
        yield decode_batch(raw, image_transform, text_transform, caption)
