"""Benchmark: samples/s the LLaVA trainer's loader delivers against samples/s the model consumes, 0, 1, 2 workers.

    python benchmarks/trainer_loader.py [--config configs/train/llava_easyvqa.yaml] [--images 2000] [--batches 100]

The shards are easy-VQA's training images and questions, ingested from LLaVA JSON by our ingest pipeline (as in
``easy_vqa_llava.py``). The loader is the trainer's own (``llava_data.make_stream``: ``ShardStream`` reading the tars,
shuffling, decoding and preprocessing images, rendering and tokenizing conversations, padding): timed over
``--batches`` batches after the first (which waits for the workers to start). The model's rate is the training
step alone (forward, masked loss, backward, AdamW) with the config's threads, on batches the loader made
beforehand. Each is measured alone, so the ratio says how much headroom the loader has. Goal (issue): loader
>= 2x the model with the workers a config uses.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from easy_vqa_llava import build_shards  # noqa: E402

from visinstruct.configs import CONFIG_DIR, LlavaTrainConfig, load  # noqa: E402
from visinstruct.testing.sample_data import easy_vqa_samples  # noqa: E402
from visinstruct.trainer.common import make_optimizer  # noqa: E402
from visinstruct.trainer.llava_data import encoder_for, make_stream  # noqa: E402
from visinstruct.trainer.llava_model import build_llava, set_trainable  # noqa: E402
from visinstruct.trainer.llava_train import batch_loss  # noqa: E402


def trainer_stream(cfg: LlavaTrainConfig, model, processor, workers: int):
    """The trainer's stream (``llava_train.setup`` makes the same) with ``workers`` loader processes."""
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=workers))
    return make_stream(cfg, processor, encoder_for(model, processor, cfg.text), rank=0, world_size=1)


def loader_rate(cfg: LlavaTrainConfig, model, processor, workers: int, batches: int) -> float:
    """Samples/s of the trainer's stream with ``workers`` loader processes, after its first batch."""
    stream = trainer_stream(cfg, model, processor, workers)
    next(stream)
    started = time.perf_counter()
    samples = sum(len(next(stream)["key"]) for _ in range(batches))
    return samples / (time.perf_counter() - started)


def model_rate(cfg: LlavaTrainConfig, model, batches: list[dict], steps: int) -> float:
    """Samples/s of training steps alone, cycling through batches made beforehand."""
    set_trainable(model, cfg.stage, cfg.model.vision.freeze)
    optimizer = make_optimizer(model, cfg.optim)
    model.train()
    cycle = itertools.cycle(batches)
    for _ in range(2):  # warm-up: first-call allocations
        _step(model, optimizer, next(cycle))
    started = time.perf_counter()
    samples = sum(_step(model, optimizer, next(cycle)) for _ in range(steps))
    return samples / (time.perf_counter() - started)


def _step(model, optimizer, batch) -> int:
    optimizer.zero_grad(set_to_none=True)
    total, count = batch_loss(model, batch, "cpu")
    (total / count.clamp(min=1)).backward()
    optimizer.step()
    return len(batch["key"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(CONFIG_DIR / "train" / "llava_easyvqa.yaml"))
    parser.add_argument("--images", type=int, default=2000, help="easy-VQA training images in the shards")
    parser.add_argument("--batches", type=int, default=100, help="batches timed per loader measurement")
    parser.add_argument("--steps", type=int, default=30, help="training steps timed for the model's rate")
    parser.add_argument("--shards", help="existing shards (default: ingest easy-VQA into a temporary folder)")
    args = parser.parse_args(argv)
    shards = args.shards or str(
        build_shards(easy_vqa_samples("train", args.images), "train", Path(tempfile.mkdtemp(prefix="trainer_loader_")))
    )
    cfg = load(LlavaTrainConfig, args.config, [f"data.shards={shards}"])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, processor = build_llava(cfg.model, cfg.seed)
    stream = trainer_stream(cfg, model, processor, workers=0)
    consumed = model_rate(cfg, model, [next(stream) for _ in range(8)], args.steps)
    print(
        f"{Path(args.config).name}: batch {cfg.data.batch_size}, {torch.get_num_threads()} torch thread(s); "
        f"model {consumed:.1f} samples/s"
    )
    print(f"{'workers':>8} {'loader samples/s':>17} {'loader / model':>15}")
    for workers in (0, 1, 2):
        delivered = loader_rate(cfg, model, processor, workers, args.batches)
        print(f"{workers:>8} {delivered:>17.1f} {delivered / consumed:>14.1f}x")


if __name__ == "__main__":
    main()
