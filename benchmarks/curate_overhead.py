"""The ``curate`` stage's overhead on top of ingest + filter in one ``visinstruct build``; its steps per 1,000 images.

    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python benchmarks/curate_overhead.py [--n 500] [--repeats 2]

Issue 16's goal: a build with ``curate`` takes at most 25% more wall time on CPU than the same build without it.
Three builds run on the same URL list, each whole command timed (start-up included), the order rotating by round:

- ``peer``: ingest (224 px border resize) + filter (open_clip ViT-B-32 with random weights, ``pretrained: null``:
  the real model's compute, no download; threshold -1.0, which keeps every pair);
- ``curate``: the same build with ``curate:`` at its defaults (caption checks, open_nsfw score on onnxruntime, face
  detection);
- ``curate_blur_semdedup``: the same with ``safety.blur_faces: true`` and ``semdedup: {embedding: open_nsfw}``.

Mixes: ``photos``, photo-sized JPEGs from ``ingest_vs_img2dataset.py``'s generator, and ``easyvqa``, easy-VQA's
64 px PNGs (captioned ones, by image id), both served by the same threaded server in its own process (20 ms
latency). 2 local processes (``FnApiRunner``, ``multi_processing``). Each build's report gives busy seconds per
stage; both curate builds are checked to write the peer's keys minus the keys curate dead-lettered.

Then, in this process (no Beam), per-step costs per 1,000 images on the images ingest wrote (224 px JPEGs):
decoding, open_nsfw preprocessing, open_nsfw inference at batch 32 (with and without the pooled features),
face detection (blur off and on), the caption check (default ``TextQualityConfig``), and SemDeDup's cluster work
(``cluster_duplicates``) on 5,000 and 10,000 identical blank-image embeddings and on 5,000 random vectors.
The machine's load (``/proc/loadavg``) is recorded before and after every timed part.
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
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ingest_vs_img2dataset import _photos, generate_images, serve  # noqa: E402

from visinstruct.transforms.layout import rejected_pattern, report_path, resolve_shards, shard_files  # noqa: E402

BIN = os.path.dirname(sys.executable)
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
BEAM = ["--runner=FnApiRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"]
SIDES = ("peer", "curate", "curate_blur_semdedup")
MIXES = ("photos", "easyvqa")


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# -- data -------------------------------------------------------------------------------------------------------------


def photo_mix(folder: str, n: int) -> tuple[list[str], list[str]]:
    """``n`` generated photo-sized JPEGs (names relative to ``folder``) and captions, the 12 photos' in turn."""
    paths, _ = generate_images(os.path.join(folder, "photos"), n, seed=0, image_size=224)
    photos = _photos()
    return [f"photos/{os.path.basename(p)}" for p in paths], [photos[i % len(photos)]["caption"] for i in range(n)]


def easyvqa_mix(folder: str, n: int) -> tuple[list[str], list[str]]:
    """The first ``n`` captioned easy-VQA training images (by id), copied under ``folder/easyvqa``, and captions."""
    from visinstruct.testing.sample_data import easy_vqa_samples

    samples = [s for s in easy_vqa_samples("train") if s["caption"]][:n]
    os.makedirs(os.path.join(folder, "easyvqa"), exist_ok=True)
    names = []
    for s in samples:
        name = f"easyvqa/{s['image_id']:06d}.png"
        target = os.path.join(folder, name)
        if not os.path.exists(target):
            shutil.copyfile(s["image_path"], target)
        names.append(name)
    return names, [s["caption"] for s in samples]


# -- the builds -------------------------------------------------------------------------------------------------------


def build_configs(work: str, mix: str, url_list: str, shard_size: int) -> dict[str, str]:
    """One JSON build config per side (JSON is YAML to the config loader)."""
    ingest = {
        "read": {"path": url_list},
        "download": {
            "threads": 32,
            "timeout": 10,
            "retries": 0,
            "per_host_rps": None,
            "allow_loopback": True,
            "check_robots_txt": False,
        },
        "resize": {"image_size": 224, "resize_mode": "border", "encode_format": "jpg", "encode_quality": 90},
        "write": {"shard_size": shard_size},
    }
    filter_ = {"model": {"name": "ViT-B-32", "pretrained": None}, "threshold": -1.0}
    curates = {
        "peer": None,
        "curate": {},
        "curate_blur_semdedup": {"safety": {"blur_faces": True}, "semdedup": {"embedding": "open_nsfw"}},
    }
    paths = {}
    for side, curate in curates.items():
        spec = {"out": "unused", "ingest": ingest, "filter": filter_}
        if curate is not None:
            spec["curate"] = curate
        paths[side] = os.path.join(work, f"{mix}-{side}.json")
        with open(paths[side], "w") as f:
            json.dump(spec, f, indent=1)
    return paths


def written_keys(folder: str) -> list[str]:
    index = pq.read_table([shard_files(tar).index for tar in resolve_shards(folder)], columns=["key", "status"])
    return sorted(r["key"] for r in index.to_pylist() if r["status"] == "success")


def dead_letters(folder: str, stage: str) -> dict[str, str]:
    """``{key: reason}`` of the rows ``stage`` dead-lettered in a dataset folder."""
    from apache_beam.io.filesystems import FileSystems

    found = {}
    for meta in FileSystems.match([rejected_pattern(folder)])[0].metadata_list:
        for row in pq.read_table(meta.path, columns=["stage", "reason", "key"]).to_pylist():
            if row["stage"] == stage:
                found[row["key"]] = row["reason"]
    return found


def run_build(config: str, out: str, log: str) -> dict:
    """One whole ``visinstruct build``, timed, with the machine's load before and after and its report's figures."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [os.path.join(BIN, "visinstruct"), "build", "--config", config, "--out", out, *BEAM]
    before = loadavg()
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, env=ENV)
    seconds = time.perf_counter() - start
    with open(report_path(out)) as f:
        report = json.load(f)
    return {
        "seconds": round(seconds, 2),
        "load_before": before,
        "load_after": loadavg(),
        "keys": written_keys(out),
        "curate_drops": dead_letters(out, "curate"),
        "stages": {
            s["stage"]: {k: s[k] for k in ("in", "out", "busy_seconds", "dropped_by_reason")} for s in report["stages"]
        },
    }


def check_keys(peer: dict, ours: dict) -> dict:
    """Whether ``ours`` wrote exactly the peer's keys minus the keys its curate stage dead-lettered."""
    expected = sorted(set(peer["keys"]) - set(ours["curate_drops"]))
    return {
        "same": ours["keys"] == expected,
        "drops_were_peer_keys": set(ours["curate_drops"]) <= set(peer["keys"]),
        "missing": len(set(expected) - set(ours["keys"])),
        "extra": len(set(ours["keys"]) - set(expected)),
    }


def run_mix(mix: str, configs: dict[str, str], work: str, repeats: int) -> dict:
    rounds = []
    for r in range(repeats):
        order = list(SIDES[r % len(SIDES) :] + SIDES[: r % len(SIDES)])
        result = {
            side: run_build(configs[side], os.path.join(work, "out", mix, side), os.path.join(work, "log.txt"))
            for side in order
        }
        checks = {side: check_keys(result["peer"], result[side]) for side in SIDES[1:]}
        print(
            f"{mix} round {r + 1} ({' -> '.join(order)}): "
            + ", ".join(f"{s} {result[s]['seconds']} s ({len(result[s]['keys'])} written)" for s in SIDES)
            + f"; keys check {checks}",
            flush=True,
        )
        rounds.append({"order": order, "result": result, "checks": checks})
    return summarize_mix(rounds)


def per_1000(seconds: float, images: int) -> float | None:
    return round(seconds * 1000 / images, 2) if images else None


def summarize_mix(rounds: list[dict]) -> dict:
    peer_s = statistics.median(r["result"]["peer"]["seconds"] for r in rounds)
    last = rounds[-1]["result"]
    summary = {"peer_s": peer_s, "sides": {}}
    for side in SIDES:
        median = statistics.median(r["result"][side]["seconds"] for r in rounds)
        stages = last[side]["stages"]
        summary["sides"][side] = {
            "wall_s": median,
            "overhead": round(median / peer_s - 1, 3),
            "rounds_s": [r["result"][side]["seconds"] for r in rounds],
            "load": [(r["result"][side]["load_before"], r["result"][side]["load_after"]) for r in rounds],
            "written": len(last[side]["keys"]),
            "busy_s": {stage: s["busy_seconds"] for stage, s in stages.items()},
            "busy_s_per_1000_in": {stage: per_1000(s["busy_seconds"], s["in"]) for stage, s in stages.items()},
            "in": {stage: s["in"] for stage, s in stages.items()},
            "curate_dropped_by_reason": stages.get("curate", {}).get("dropped_by_reason"),
            "keys_check": [r["checks"][side] for r in rounds] if side != "peer" else None,
        }
    return summary


# -- the steps, in-process --------------------------------------------------------------------------------------------


def ingested_images(folder: str, limit: int) -> tuple[list[bytes], list[str]]:
    """The first ``limit`` written images (JPEG bytes) and captions of a dataset folder, in shard order."""
    from visinstruct.transforms.shards import read_tar_samples

    images, captions = [], []
    for tar in resolve_shards(folder):
        for _, members in read_tar_samples(tar):
            if "jpg" in members:
                images.append(members["jpg"])
                captions.append(json.loads(members["json"]).get("caption") if "json" in members else None)
            if len(images) >= limit:
                return images, captions
    return images, captions


def timed(fn, items) -> tuple[float, list]:
    start = time.perf_counter()
    out = [fn(x) for x in items]
    return time.perf_counter() - start, out


def step_costs(images: list[bytes], captions: list[str]) -> dict:
    """Seconds per 1,000 images of each curate step on these images, in this process (one Python thread)."""
    from visinstruct.configs.curate import SafetyConfig, TextQualityConfig
    from visinstruct.transforms.faces import curate_faces
    from visinstruct.transforms.images import decode_rgb
    from visinstruct.transforms.nsfw import NsfwHandler, nsfw_preprocess
    from visinstruct.transforms.text_quality import check_caption

    n, costs, load = len(images), {}, {"before": loadavg()}
    seconds, decoded = timed(decode_rgb, images)
    costs["decode (decode_rgb)"] = per_1000(seconds, n)
    seconds, arrays = timed(nsfw_preprocess, decoded)
    costs["NSFW preprocessing"] = per_1000(seconds, n)
    for label, with_embeddings in (("NSFW inference, batch 32", False), ("NSFW inference + features", True)):
        handler = NsfwHandler(SafetyConfig(), with_embeddings=with_embeddings)
        model = handler.load_model()
        handler._score(arrays[:32], model)  # warm-up: onnxruntime's first run allocates
        start = time.perf_counter()
        for i in range(0, n, 32):
            handler._score(arrays[i : i + 32], model)
        costs[label] = per_1000(time.perf_counter() - start, n)
    for blur in (False, True):
        seconds, found = timed(lambda data, blur=blur: curate_faces(data, "jpg", 0.05, blur), images)
        costs[f"faces (curate_faces, blur {'on' if blur else 'off'})"] = per_1000(seconds, n)
    costs["images with a face found"] = sum(1 for faces, _ in found if faces)
    cfg = TextQualityConfig()
    check_caption(captions[0], cfg)  # warm-up: ftfy's first call
    seconds, decisions = timed(lambda c: check_caption(c, cfg), captions)
    costs["caption check (check_caption)"] = per_1000(seconds, n)
    costs["captions dropped"] = sum(1 for d in decisions if not d.kept)
    load["after"] = loadavg()
    return {"images": n, "seconds_per_1000": costs, "load": load}


def semdedup_costs() -> dict:
    """``cluster_duplicates`` on one cluster: N copies of a blank image's open_nsfw embedding, and random vectors."""
    from PIL import Image

    from visinstruct.configs.curate import SafetyConfig, SemDedupConfig
    from visinstruct.transforms.nsfw import NsfwHandler, nsfw_preprocess
    from visinstruct.transforms.semdedup import cluster_duplicates, unit_vector

    handler = NsfwHandler(SafetyConfig(), with_embeddings=True)
    blank = handler._score([nsfw_preprocess(Image.new("RGB", (224, 224), "white"))], handler.load_model())[0]
    unit = unit_vector(blank.embedding)
    cfg = SemDedupConfig(embedding="open_nsfw")
    rng = np.random.default_rng(0)
    cases = {
        "blank x 5,000": [unit] * 5000,
        "blank x 10,000": [unit] * 10000,
        "random x 5,000": list(unit_vector(v) for v in rng.standard_normal((5000, unit.size)).astype(np.float32)),
    }
    out, load = {"dimension": int(unit.size)}, {"before": loadavg()}
    for label, vectors in cases.items():
        records = [(f"{i:08d}", "shard.tar", v) for i, v in enumerate(vectors)]
        start = time.perf_counter()
        drops, work = cluster_duplicates(records, cfg)
        seconds = time.perf_counter() - start
        out[label] = {
            "seconds": round(seconds, 3),
            "dropped": len(drops),
            "distinct": work.distinct,
            "parts": work.parts,
            "comparisons": work.comparisons,
        }
    out["blank 10k / 5k time ratio"] = round(out["blank x 10,000"]["seconds"] / out["blank x 5,000"]["seconds"], 2)
    load["after"] = loadavg()
    out["load"] = load
    return out


# -- main -------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="images per mix")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mixes", nargs="+", choices=MIXES, default=list(MIXES))
    parser.add_argument("--step-images", type=int, default=256, help="images per mix for the in-process steps")
    parser.add_argument("--shard-size", type=int, default=125)
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--workdir", default="/tmp/visinstruct-curate-bench")
    args = parser.parse_args()
    work = os.path.abspath(args.workdir)
    image_dir = os.path.join(work, "images")
    os.makedirs(image_dir, exist_ok=True)
    makers = {"photos": photo_mix, "easyvqa": easyvqa_mix}
    lists = {mix: makers[mix](image_dir, args.n) for mix in args.mixes}
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    stop = ctx.Event()
    names = [name for mix in args.mixes for name in lists[mix][0]]
    server = ctx.Process(target=serve, args=(image_dir, names, args.latency, send, stop), daemon=True)
    server.start()
    summary = {"n": args.n, "repeats": args.repeats, "cpus": os.cpu_count(), "load_start": loadavg(), "mixes": {}}
    try:
        if not receive.poll(120):
            raise SystemExit("the image server did not start within 120 s")
        port = receive.recv()
        for mix in args.mixes:
            mix_names, captions = lists[mix]
            url_list = os.path.join(work, f"{mix}-urls.parquet")
            urls = [f"http://127.0.0.1:{port}/{name}" for name in mix_names]
            pq.write_table(pa.table({"url": urls, "caption": captions}), url_list)
            configs = build_configs(work, mix, url_list, args.shard_size)
            summary["mixes"][mix] = run_mix(mix, configs, work, args.repeats)
    finally:
        stop.set()
        server.join(timeout=10)
    summary["steps"] = {}
    for mix in args.mixes:
        images, captions = ingested_images(os.path.join(work, "out", mix, "peer"), args.step_images)
        summary["steps"][mix] = step_costs(images, captions)
        print(f"steps on {mix}: {json.dumps(summary['steps'][mix])}", flush=True)
    summary["semdedup"] = semdedup_costs()
    summary["load_end"] = loadavg()
    for mix in summary["mixes"].values():  # reasons dead-lettered by curate: the counts are in the table already
        for side in mix["sides"].values():
            side["curate_dropped_by_reason"] = dict(Counter(side["curate_dropped_by_reason"] or {}))
    with open(os.path.join(work, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
