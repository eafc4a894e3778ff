"""``visinstruct stats`` over many shards, against a baseline that reads the tars, in the same run.

    .venv/bin/python benchmarks/shard_stats.py [--shards 1000] [--samples 10] [--repeats 3] [--json FILE]

Steps: write ``--shards`` small shards directly with our writers (``TarShardWriter``, ``write_table``,
``write_stats``: a tar of ``--samples`` JPEG/caption/JSON samples, its parquet index with two more rejected rows, a
dead-letter table and ``_stats.json``), then time, alternating which goes first, (a) ``dataset_stats`` on the
folder, which reads the parquet indexes and dead-letter tables only, and (b) a baseline that streams every tar,
counts the samples and parses each JSON member for the same sizes and captions. Both read files the page cache
already holds after the first repeat; the ratio of medians is printed. Results go to stdout and ``--json``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import random
import statistics
import sys
import tarfile
import tempfile
import time

from PIL import Image

from visinstruct.cli.stats import dataset_stats
from visinstruct.schemas import SCHEMA_VERSION, IndexRow, Rejection, SampleMeta, ShardStats, make_key
from visinstruct.transforms.layout import rejected_path, resolve_shards, shard_files, shard_in, write_stats
from visinstruct.transforms.rewrite import index_row
from visinstruct.transforms.shards import TarShardWriter, write_table

REJECTED_PER_SHARD = 2


def jpeg_pool(size: int, count: int = 16) -> list[bytes]:
    """``count`` different noisy JPEGs (noise keeps them photo-sized in bytes; flat colour would not)."""
    rng = random.Random(size)
    pool = []
    for _ in range(count):
        image = Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=80)
        pool.append(buffer.getvalue())
    return pool


def write_dataset(out: str, shards: int, samples: int, size: int) -> None:
    """``shards`` complete shards of ``samples`` written samples and ``REJECTED_PER_SHARD`` rejected rows each."""
    pool = jpeg_pool(size)
    for shard in range(shards):
        writer, rows, dead = TarShardWriter(), [], []
        for index in range(samples + REJECTED_PER_SHARD):
            key, url = make_key(shard, index), f"https://images.example/{shard}/{index}.jpg"
            caption = f"photo {index} of shard {shard}, a small square in one colour"
            if index >= samples:  # the last rows of a shard failed to download
                dead.append(Rejection("download", "http_404", "HTTP 404 Not Found", key, url))
                rows.append(IndexRow(key, "http_404", url=url, caption=caption, error_message="HTTP 404 Not Found"))
                continue
            data = pool[(shard * samples + index) % len(pool)]
            digest = hashlib.sha256(data).hexdigest()
            meta = SampleMeta(
                key=key,
                url=url,
                caption=caption,
                width=size,
                height=size,
                original_width=size * 4,
                original_height=size * 3,
                sha256=digest,
            )
            members = writer.add(key, [("jpg", data), ("txt", caption.encode()), ("json", meta.to_json().encode())])
            rows.append(index_row(meta, members=members))
        files = shard_in(out, shard)
        tar_bytes = writer.finish(files.tar)
        write_table(files.index, rows, IndexRow, SCHEMA_VERSION)
        write_table(rejected_path(out, "ingest", shard), dead, Rejection, SCHEMA_VERSION)
        write_stats(
            files.stats,
            ShardStats(
                shard,
                "ingest",
                samples + REJECTED_PER_SHARD,
                samples,
                REJECTED_PER_SHARD,
                {"http_404": REJECTED_PER_SHARD},
                tar_bytes,
            ),
        )


def baseline(paths: list[str]) -> dict:
    """What a tool without indexes does: stream every tar, count samples, parse each JSON member."""
    written, widths, captions = 0, [], []
    for path in paths:
        with tarfile.open(path, mode="r|") as tar:
            for info in tar:
                if info.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(info).read())
                    written += 1
                    widths.append(meta.get("width"))
                    captions.append(len(meta.get("caption") or ""))
    return {"written": written, "max_width": max(widths), "caption_chars": sum(captions)}


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=10, help="written samples per shard")
    parser.add_argument("--image-size", type=int, default=64, help="side of the square JPEGs, in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", help="where the shards go (default: a temporary folder, removed after)")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.workdir or os.path.join(tmp, "shards")
        seconds, _ = timed(lambda: write_dataset(out, args.shards, args.samples, args.image_size))
        print(f"wrote {args.shards} shards of {args.samples} samples in {seconds:.1f} s", file=sys.stderr)
        paths = resolve_shards(out)
        tar_bytes = sum(os.path.getsize(p) for p in paths)
        index_bytes = sum(os.path.getsize(shard_files(p).index) for p in paths)
        runs = {"stats": lambda: dataset_stats(paths), "baseline": lambda: baseline(paths)}
        times = {name: [] for name in runs}
        for repeat in range(args.repeats):
            for name in list(runs) if repeat % 2 == 0 else list(runs)[::-1]:
                seconds, result = timed(runs[name])
                times[name].append(seconds)
                assert result["written"] == args.shards * args.samples, result
    medians = {name: statistics.median(values) for name, values in times.items()}
    results = {
        "shards": args.shards,
        "samples_per_shard": args.samples,
        "tar_bytes": tar_bytes,
        "index_bytes": index_bytes,
        "seconds": times,
        "median_s": medians,
        "ratio": medians["baseline"] / medians["stats"],
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    print(
        f"stats (indexes only): {medians['stats']:.2f} s   baseline (read every tar): "
        f"{medians['baseline']:.2f} s   ratio {results['ratio']:.2f}x   "
        f"({args.shards} shards, {tar_bytes / 2**20:.1f} MiB of tars, {index_bytes / 2**20:.1f} MiB of indexes)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
