"""``visinstruct build`` (one Beam graph) against the same stages run as three commands, on the same URL list.

    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python benchmarks/build_vs_stages.py [--n 1000] [--repeats 2]

The peer is what a user does without ``build``: ``visinstruct ingest``, then ``visinstruct filter`` on its shards
into a second folder, then ``visinstruct generate`` into a third. Both sides get the same config: photo-sized
JPEGs from ``ingest_vs_img2dataset.py``'s generator, served from a threaded server in its own process with 20 ms
latency; resize to 224 px; a tiny random open_clip (the model is not what is measured: the orchestration is) with
a threshold; caption-only generation; 2 local processes. Each round runs both, alternating which goes first, and
checks they wrote the same samples. Reported: wall time (whole commands, start-up included), bytes written to disk
in all (the stage-by-stage peer keeps two intermediate copies), and the build report's busy seconds per stage.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ingest_vs_img2dataset import _photos, generate_images, serve  # noqa: E402

from visinstruct.testing.tiny_models import TINY_OPEN_CLIP_CONFIG, TINY_OPEN_CLIP_NAME, tiny_open_clip  # noqa: E402
from visinstruct.transforms.layout import report_path, resolve_shards, shard_files  # noqa: E402

BIN = os.path.dirname(sys.executable)
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}
BEAM = ["--runner=FnApiRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"]


def tiny_clip(folder: str) -> dict:
    os.makedirs(folder, exist_ok=True)
    model, _, _ = tiny_open_clip(seed=7)
    torch.save(model.state_dict(), os.path.join(folder, "tiny.pt"))
    with open(os.path.join(folder, f"{TINY_OPEN_CLIP_NAME}.json"), "w") as f:
        json.dump(TINY_OPEN_CLIP_CONFIG, f)
    return {
        "name": TINY_OPEN_CLIP_NAME,
        "pretrained": os.path.join(folder, "tiny.pt"),
        "config_file": os.path.join(folder, f"{TINY_OPEN_CLIP_NAME}.json"),
        "max_batch_size": 64,
    }


def configs(work: str, url_list: str, clip: dict, shard_size: int) -> dict[str, str]:
    """One JSON config per command (JSON is YAML to the config loader)."""
    read = {"path": url_list}
    download = {"threads": 32, "timeout": 10, "retries": 0, "per_host_rps": None, "allow_loopback": True}
    resize = {"image_size": 224, "resize_mode": "border", "encode_format": "jpg", "encode_quality": 90}
    filter_ = {"model": clip, "threshold": -0.05}
    generate = {"backend": "caption_only"}
    specs = {
        "build": {
            "out": "unused",
            "ingest": {"read": read, "download": download, "resize": resize, "write": {"shard_size": shard_size}},
            "filter": filter_,
            "generate": generate,
        },
        "ingest": {
            "read": read,
            "download": download,
            "resize": resize,
            "write": {"path": "unused", "shard_size": shard_size},
        },
        "filter": {**filter_, "write": {"path": "unused"}},
        "generate": {**generate, "write": {"path": "unused"}},
    }
    paths = {}
    for name, spec in specs.items():
        paths[name] = os.path.join(work, f"{name}.json")
        with open(paths[name], "w") as f:
            json.dump(spec, f, indent=1)
    return paths


def commands(cfg: dict[str, str], out: str) -> dict[str, list[list[str]]]:
    """Each side's command lines; side ``S`` writes under ``out/S``."""
    vi, b, s = os.path.join(BIN, "visinstruct"), f"{out}/build", f"{out}/stages"
    return {
        "build": [[vi, "build", "--config", cfg["build"], "--out", f"{b}/dataset", *BEAM]],
        "stages": [
            [vi, "ingest", "--config", cfg["ingest"], "--set", f"write.path={s}/ingested", *BEAM],
            [vi, "filter", "--config", cfg["filter"], "--input", f"{s}/ingested", "--out", f"{s}/filtered", *BEAM],
            [vi, "generate", "--config", cfg["generate"], "--input", f"{s}/filtered", "--out", f"{s}/dataset", *BEAM],
        ],
    }


def disk_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def samples(folder: str) -> list[str]:
    index = pq.read_table([shard_files(tar).index for tar in resolve_shards(folder)], columns=["key", "status"])
    return sorted(r["key"] for r in index.to_pylist() if r["status"] == "success")


def run_side(side: str, cmds: list[list[str]], out: str, log: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    start = time.perf_counter()
    for cmd in cmds:
        with open(log, "a") as f:
            subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, env=ENV)
    seconds = time.perf_counter() - start
    final = os.path.join(out, "dataset")
    result = {"seconds": round(seconds, 2), "disk_bytes": disk_bytes(out), "samples": samples(final)}
    if side == "build":
        with open(report_path(final)) as f:
            report = json.load(f)
        result["busy_seconds"] = {s["stage"]: s["busy_seconds"] for s in report["stages"]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=125)
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--workdir", default="/tmp/visinstruct-build-bench")
    args = parser.parse_args()
    work = os.path.abspath(args.workdir)
    image_dir = os.path.join(work, "images")
    paths, _ = generate_images(image_dir, args.n, seed=0, image_size=224)
    names = [os.path.basename(p) for p in paths]
    photos = _photos()
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    stop = ctx.Event()
    server = ctx.Process(target=serve, args=(image_dir, names, args.latency, send, stop), daemon=True)
    server.start()
    rounds = []
    try:
        if not receive.poll(120):
            raise SystemExit("the image server did not start within 120 s")
        port = receive.recv()
        url_list = os.path.join(work, "urls.parquet")
        pq.write_table(
            pa.table(
                {
                    "url": [f"http://127.0.0.1:{port}/{n}" for n in names],
                    "caption": [photos[i % len(photos)]["caption"] for i in range(args.n)],
                }
            ),
            url_list,
        )
        cmds = commands(
            configs(work, url_list, tiny_clip(os.path.join(work, "clip")), args.shard_size), os.path.join(work, "out")
        )
        for r in range(args.repeats):
            order = ["build", "stages"] if r % 2 == 0 else ["stages", "build"]
            result = {
                side: run_side(side, cmds[side], os.path.join(work, "out", side), os.path.join(work, "log.txt"))
                for side in order
            }
            if result["build"]["samples"] != result["stages"]["samples"]:
                raise SystemExit("build and the three commands wrote different samples")
            print(
                f"round {r + 1}: build {result['build']['seconds']} s, stages {result['stages']['seconds']} s, "
                f"{len(result['build']['samples'])} samples",
                flush=True,
            )
            rounds.append(result)
    finally:
        stop.set()
        server.join(timeout=10)
    build_s = statistics.median(r["build"]["seconds"] for r in rounds)
    stages_s = statistics.median(r["stages"]["seconds"] for r in rounds)
    last = rounds[-1]
    summary = {
        "n": args.n,
        "samples": len(last["build"]["samples"]),
        "build_s": build_s,
        "stages_s": stages_s,
        "speedup": round(stages_s / build_s, 2),
        "build_disk_mb": round(last["build"]["disk_bytes"] / 1e6, 1),
        "stages_disk_mb": round(last["stages"]["disk_bytes"] / 1e6, 1),
        "busy_seconds": last["build"]["busy_seconds"],
        "rounds": [{side: r[side]["seconds"] for side in ("build", "stages")} for r in rounds],
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
