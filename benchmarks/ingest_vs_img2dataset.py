"""Throughput of ``visinstruct ingest`` against img2dataset on the same URL list, served from loopback.

    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python benchmarks/ingest_vs_img2dataset.py [--n 2000] [--repeats 3]

Steps: make N distinct photo-sized JPEGs from the 12 scikit-image photos (cached in ``--workdir``), serve them
from a threaded HTTP server in its own process (so serving never holds either client's GIL), write one parquet
URL list, then run both tools' command lines on it with the same resize settings, processes and threads,
alternating which goes first, and count the images each wrote. Results go to stdout and ``--json``.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import hashlib
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageEnhance

GENERATOR_VERSION = 1  # bump when the image recipe changes, so cached images are rebuilt
ASPECTS = [(4, 3), (3, 2), (16, 9), (1, 1), (3, 4), (2, 3)]
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONWARNINGS": "ignore"}
BIN = os.path.dirname(sys.executable)  # the venv's console scripts: visinstruct and img2dataset

# -- data -------------------------------------------------------------------------------------------------------------


def make_image(source: Image.Image, seed: int) -> Image.Image:
    """One photo-sized variant of ``source``: a random crop, 640-1600 px wide, flipped, colour-jittered, grained."""
    rng = np.random.default_rng(seed)
    aw, ah = ASPECTS[rng.integers(len(ASPECTS))]
    width = int(rng.integers(640, 1601))
    height = width * ah // aw
    sw, sh = source.size
    scale = min(sw / aw, sh / ah)  # the largest crop of this aspect ratio that fits the source
    frac = rng.uniform(0.55, 1.0)
    cw, ch = max(8, int(aw * scale * frac)), max(8, int(ah * scale * frac))
    left, top = int(rng.integers(0, sw - cw + 1)), int(rng.integers(0, sh - ch + 1))
    img = source.resize((width, height), Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhancer(img).enhance(rng.uniform(0.88, 1.12))
    # Sensor-like grain: upscaled crops are smoother than real photos, so without it files are unrealistically small.
    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0.0, 3.0, (height, width, 1)).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _generate_one(job: tuple[str, int, int]) -> None:
    path, index, seed = job
    photos = _photos()
    img = make_image(photos[index % len(photos)]["image"], seed * 1_000_003 + index)
    img.save(path + ".tmp", "JPEG", quality=90)
    os.replace(path + ".tmp", path)


_PHOTO_CACHE: list = []


def _photos() -> list[dict]:
    if not _PHOTO_CACHE:
        from visinstruct.testing.sample_data import photo_samples

        _PHOTO_CACHE.extend(photo_samples())
    return _PHOTO_CACHE


def generate_images(folder: str, n: int, seed: int) -> tuple[list[str], list[str]]:
    """Paths and captions of N JPEGs, generated in parallel once and reused while ``manifest.json`` matches."""
    manifest_path = os.path.join(folder, "manifest.json")
    recipe = {"version": GENERATOR_VERSION, "seed": seed}
    manifest = {}
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
    paths = [os.path.join(folder, f"{i:06d}.jpg") for i in range(n)]
    os.makedirs(folder, exist_ok=True)
    if manifest.get("recipe") != recipe:  # a different recipe: nothing cached is valid
        for old in glob.glob(os.path.join(folder, "*.jpg")):
            os.unlink(old)
    todo = [(p, i, seed) for i, p in enumerate(paths) if not os.path.exists(p)]
    if todo:
        print(f"generating {len(todo)} images in {folder} ...", flush=True)
        start = time.perf_counter()
        with multiprocessing.get_context("spawn").Pool(os.cpu_count()) as pool:
            pool.map(_generate_one, todo, chunksize=16)
        print(f"  done in {time.perf_counter() - start:.1f}s", flush=True)
    with open(manifest_path, "w") as f:
        json.dump({"recipe": recipe}, f)
    photos = _photos()
    return paths, [photos[i % len(photos)]["caption"] for i in range(n)]


def describe_images(paths: list[str]) -> dict:
    """Sizes of the generated files, and a check that every image is distinct in bytes and in content."""
    from visinstruct.transforms.images import phash

    digests, hashes, sizes, dims = set(), [], [], []
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        digests.add(hashlib.sha256(data).hexdigest())
        sizes.append(len(data))
        with Image.open(path) as img:
            dims.append(img.size)
            img.draft("RGB", (img.width // 8, img.height // 8))  # the phash needs a 32x32 thumbnail only
            hashes.append(phash(img.convert("RGB")))
    if len(digests) != len(paths):
        raise SystemExit(f"only {len(digests)} distinct files among {len(paths)}: fix the generator")
    nearest = nearest_phash_distances(hashes)
    return {"count": len(paths), "distinct_sha256": len(digests), "distinct_phash": len(set(hashes)),
            "min_phash_distance": int(nearest.min()), "with_phash_neighbour_within_4": int((nearest <= 4).sum()),
            "mean_kib": round(sum(sizes) / len(sizes) / 1024, 1),
            "widths": [min(w for w, _ in dims), max(w for w, _ in dims)],
            "mean_megapixels": round(sum(w * h for w, h in dims) / len(dims) / 1e6, 3)}


def nearest_phash_distances(hashes: list[str]) -> np.ndarray:
    """For each hash, the Hamming distance to its nearest other hash (64 when there is no other)."""
    values = np.array([int(h, 16) for h in hashes], dtype=np.uint64)
    popcount = np.array([bin(b).count("1") for b in range(256)], dtype=np.uint8)
    nearest = np.full(len(values), 64)
    for lo in range(0, len(values), 128):
        xor = values[lo:lo + 128, None] ^ values[None, :]  # (rows, all)
        dist = popcount[xor.view(np.uint8)].reshape(*xor.shape, 8).sum(axis=-1)
        dist[np.arange(len(dist)), np.arange(lo, lo + len(dist))] = 64  # not against itself
        nearest[lo:lo + 128] = dist.min(axis=1)
    return nearest


# -- server -----------------------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for clients that want it (urllib3); urllib closes each time

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = self.server.files.get(self.path)
        time.sleep(self.server.latency)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class names it so
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default listen backlog is 5: a client opening 64 connections at once (img2dataset opens one
    # per image) would see dropped SYNs and 1 s retransmits, which measures the server, not the client.
    request_queue_size = 1024


def serve(folder: str, names: list[str], latency: float, port_pipe, stop) -> None:
    """Child process: serve ``/<name>`` for every file from memory, one thread per connection, until ``stop``."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.files, server.latency = {}, latency
    for name in names:
        with open(os.path.join(folder, name), "rb") as f:
            server.files["/" + name] = f.read()
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    port_pipe.send(server.server_address[1])
    stop.wait()
    server.shutdown()


# -- the two tools ----------------------------------------------------------------------------------------------------


def ingest_config(args, url_list: str, out: str) -> dict:
    return {
        "read": {"path": url_list, "url_col": "url", "caption_col": "caption"},
        "download": {"threads": args.threads, "timeout": 10, "retries": 0, "per_host_rps": None,
                     "allow_loopback": True},
        "resize": {"image_size": args.image_size, "resize_mode": "border", "encode_format": "jpg",
                   "encode_quality": args.quality},
        "write": {"path": out, "shard_size": args.shard_size},
    }


def commands(args, url_list: str, config_path: str, outs: dict[str, str]) -> dict[str, list[str]]:
    """The two command lines: same image size, mode, quality, shard size, processes and threads per process."""
    return {
        "img2dataset": [
            os.path.join(BIN, "img2dataset"), f"--url_list={url_list}", "--input_format=parquet", "--url_col=url",
            "--caption_col=caption", f"--output_folder={outs['img2dataset']}", "--output_format=webdataset",
            f"--processes_count={args.processes}", f"--thread_count={args.threads}",
            f"--number_sample_per_shard={args.shard_size}", f"--image_size={args.image_size}",
            "--resize_mode=border", "--encode_format=jpg", f"--encode_quality={args.quality}",
            "--distributor=multiprocessing", "--timeout=10", "--retries=0"],
        "visinstruct": [
            os.path.join(BIN, "visinstruct"), "ingest", "--config", config_path, "--runner=FnApiRunner",
            "--direct_running_mode=multi_processing", f"--direct_num_workers={args.processes}"],
    }


def count_written(folder: str) -> dict:
    """Images (``.jpg`` members) and samples in the top-level tars of an output folder."""
    images, shards = 0, 0
    for path in sorted(glob.glob(os.path.join(folder, "*.tar"))):
        shards += 1
        with tarfile.open(path) as tar:
            images += sum(1 for m in tar if m.isfile() and m.name.endswith(".jpg"))
    return {"images": images, "shards": shards}


def run_tool(name: str, cmd: list[str], out: str, log_dir: str, round_no: int) -> dict:
    """Run one command from a fresh output folder; wall time includes interpreter start-up and teardown."""
    shutil.rmtree(out, ignore_errors=True)
    log_path = os.path.join(log_dir, f"{name}-round{round_no}.log")
    with open(log_path, "w") as log:
        start = time.perf_counter()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV).returncode
        wall = time.perf_counter() - start
    result = {"tool": name, "round": round_no, "wall_s": round(wall, 3), "rc": rc, **count_written(out),
              "log": log_path}
    print(f"  round {round_no} {name:<12} {wall:7.2f}s  rc={rc}  images={result['images']} "
          f"shards={result['shards']}", flush=True)
    return result


# -- report -----------------------------------------------------------------------------------------------------------


def machine() -> dict:
    model = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {p: metadata.version(p) for p in ("img2dataset", "apache-beam", "pillow", "opencv-python-headless",
                                                 "urllib3") if _installed(p)}
    return {"cpus": os.cpu_count(), "cpu_model": model, "memory_gib": round(mem_gib, 1),
            "platform": platform.platform(), "python": platform.python_version(), "versions": versions}


def _installed(package: str) -> bool:
    try:
        metadata.version(package)
        return True
    except metadata.PackageNotFoundError:
        return False


def summarize(runs: list[dict], n: int) -> dict:
    summary = {}
    for tool in ("img2dataset", "visinstruct"):
        mine = [r for r in runs if r["tool"] == tool]
        wall = statistics.median(r["wall_s"] for r in mine)
        images = min(r["images"] for r in mine)
        summary[tool] = {"median_wall_s": round(wall, 3), "walls_s": [r["wall_s"] for r in mine],
                         "images_written_min": images, "images_written": [r["images"] for r in mine],
                         "images_per_s": round(images / wall, 1), "all_rc_zero": all(r["rc"] == 0 for r in mine)}
    summary["ratio_ours_over_img2dataset"] = round(
        summary["visinstruct"]["images_per_s"] / summary["img2dataset"]["images_per_s"], 3)
    summary["inputs"] = n
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="distinct images to serve (default 2000)")
    parser.add_argument("--latency", type=float, default=0.02, help="seconds before every response (default 0.02)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the first tool alternates (default 3)")
    parser.add_argument("--processes", type=int, default=2, help="worker processes per tool (default 2)")
    parser.add_argument("--threads", type=int, default=32, help="download threads per process (default 32)")
    parser.add_argument("--shard-size", type=int, default=250, help="samples per shard (default 250)")
    parser.add_argument("--image-size", type=int, default=256, help="output side in pixels (default 256)")
    parser.add_argument("--quality", type=int, default=95, help="output JPEG quality, both tools (default 95)")
    parser.add_argument("--seed", type=int, default=0, help="image generator seed (default 0)")
    parser.add_argument("--workdir", default="/tmp/visinstruct-bench-ingest", help="cache, URL list, outputs, logs")
    parser.add_argument("--json", help="result file (default WORKDIR/result-N<n>.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    work = os.path.abspath(args.workdir)
    image_dir, log_dir = os.path.join(work, "images"), os.path.join(work, "logs")
    os.makedirs(log_dir, exist_ok=True)
    paths, captions = generate_images(image_dir, args.n, args.seed)
    data = describe_images(paths)
    print(f"data: {json.dumps(data)}", flush=True)

    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    stop = ctx.Event()
    names = [os.path.basename(p) for p in paths]
    server = ctx.Process(target=serve, args=(image_dir, names, args.latency, send, stop), daemon=True)
    server.start()
    try:
        port = receive.recv()
        url_list = os.path.join(work, f"urls-{args.n}.parquet")
        urls = [f"http://127.0.0.1:{port}/{name}" for name in names]
        pq.write_table(pa.table({"url": urls, "caption": captions}), url_list)
        outs = {tool: os.path.join(work, f"out-{tool}") for tool in ("img2dataset", "visinstruct")}
        config_path = os.path.join(work, "ingest.json")  # JSON is YAML: the config loader reads it
        with open(config_path, "w") as f:
            json.dump(ingest_config(args, url_list, outs["visinstruct"]), f, indent=1)
        cmds = commands(args, url_list, config_path, outs)
        runs = []
        for round_no in range(1, args.repeats + 1):
            order = ["img2dataset", "visinstruct"] if round_no % 2 else ["visinstruct", "img2dataset"]
            for tool in order:
                runs.append(run_tool(tool, cmds[tool], outs[tool], log_dir, round_no))
    finally:
        stop.set()
        server.join(timeout=10)

    summary = summarize(runs, args.n)
    result = {"benchmark": "ingest_vs_img2dataset", "date": datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds"), "args": vars(args), "machine": machine(), "data": data, "commands": cmds,
        "summary": summary, "runs": runs}
    json_path = args.json or os.path.join(work, f"result-N{args.n}.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    for tool in ("img2dataset", "visinstruct"):
        s = summary[tool]
        print(f"{tool:<12} median {s['median_wall_s']:7.2f}s  {s['images_written_min']}/{args.n} images  "
              f"{s['images_per_s']:7.1f} images/s")
    print(f"ratio visinstruct/img2dataset: {summary['ratio_ours_over_img2dataset']:.2f}  (result: {json_path})")
    return result


if __name__ == "__main__":
    main()
