"""Benchmark: the whole CLIP filter stage against a bare loop calling the same open_clip model.

    python benchmarks/clip_filter.py [--images 512] [--model ViT-B-32] [--batch 32] [--threads 2]

The stage reads shards, decodes and preprocesses images (on its decode threads), scores them through Beam's
RunInference and writes filtered shards. The bare loop runs the same model, same batch size and torch threads,
on batches decoded and preprocessed beforehand (not timed): the most the model alone can do. Both use random
weights (``pretrained=None``; offline), which cost the same compute as real ones. The stage's one-off model load
is timed separately and reported both ways. Goal (issue): stage >= 0.9x the bare loop on CPU.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from PIL import Image  # noqa: E402

from visinstruct.configs import FilterConfig, IngestConfig, from_dict  # noqa: E402
from visinstruct.pipelines import filter as clip_filter  # noqa: E402
from visinstruct.pipelines.ingest import run as ingest  # noqa: E402
from visinstruct.testing.sample_data import photo_samples  # noqa: E402
from visinstruct.transforms.layout import image_member, resolve_shards  # noqa: E402

RUNNER = ["--runner=FnApiRunner"]


def make_shards(root: Path, n: int) -> list[str]:
    """``n`` distinct 256px photos (crops of the bundled ones) with captions, ingested into shards."""
    images = root / "images"
    images.mkdir(parents=True)
    photos = photo_samples()
    rng = np.random.default_rng(0)
    for i in range(n):
        photo = photos[i % len(photos)]
        img = photo["image"]
        w, h = img.size
        side = int(min(w, h) * rng.uniform(0.5, 1.0))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        img.crop((x, y, x + side, y + side)).resize((256, 256)).save(images / f"{i:05d}.jpg", quality=90)
        (images / f"{i:05d}.txt").write_text(photo["caption"])
    cfg = from_dict(
        IngestConfig,
        {
            "read": {"path": str(images)},
            "write": {"path": str(root / "shards"), "shard_size": 128},
            "resize": {"image_size": 256, "resize_mode": "no"},
            "dedup": {"sha256": False},
        },
    )
    ingest(cfg, RUNNER)
    return resolve_shards(str(root / "shards"))


def bare_loop(shards: list[str], model_name: str, batch: int, threads: int) -> tuple[float, int]:
    """Seconds the model alone takes over pre-decoded batches, and the number of images."""
    torch.set_num_threads(threads)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
    tokenizer = open_clip.get_tokenizer(model_name)
    model.eval()
    samples = list(wds.WebDataset(shards, shardshuffle=False))
    images = [preprocess(Image.open(io.BytesIO(s[image_member(s)])).convert("RGB")) for s in samples]
    texts = [s["txt"].decode() for s in samples]
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            a = torch.nn.functional.normalize(model.encode_image(torch.stack(images[i : i + batch])), dim=-1)
            b = torch.nn.functional.normalize(model.encode_text(tokenizer(texts[i : i + batch])), dim=-1)
            (a * b).sum(-1).numpy()
    return time.perf_counter() - start, len(images)


def model_load_seconds(model_name: str) -> float:
    start = time.perf_counter()
    open_clip.create_model(model_name, pretrained=None)
    open_clip.get_tokenizer(model_name)
    return time.perf_counter() - start


def stage(shards: list[str], out: Path, model_name: str, batch: int, threads: int) -> tuple[float, dict]:
    cfg = from_dict(
        FilterConfig,
        {
            "model": {
                "name": model_name,
                "min_batch_size": batch,
                "max_batch_size": batch,
                "threads": threads,
                "decode_threads": threads,
            },
            "threshold": -1.0,
            "write": {"path": str(out)},
        },
    )
    start = time.perf_counter()
    report = clip_filter.run(cfg, shards, RUNNER)
    return time.perf_counter() - start, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="clip-bench-"))
    try:
        shards = make_shards(root, args.images)
        bare_s, n = bare_loop(shards, args.model, args.batch, args.threads)
        load_s = model_load_seconds(args.model)
        stage_s, report = stage(shards, root / "out", args.model, args.batch, args.threads)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert report["inputs"] == n == report["written"], report
    result = {
        "model": args.model,
        "images": n,
        "batch": args.batch,
        "threads": args.threads,
        "bare_images_per_s": round(n / bare_s, 2),
        "stage_images_per_s": round(n / stage_s, 2),
        "stage_images_per_s_without_model_load": round(n / (stage_s - load_s), 2),
        "model_load_s": round(load_s, 2),
    }
    result["ratio"] = round(result["stage_images_per_s"] / result["bare_images_per_s"], 3)
    result["ratio_without_model_load"] = round(
        result["stage_images_per_s_without_model_load"] / result["bare_images_per_s"], 3
    )
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
