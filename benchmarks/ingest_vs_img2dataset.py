"""Throughput of ``visinstruct ingest`` against img2dataset on the same URL list, served from loopback.

    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python benchmarks/ingest_vs_img2dataset.py [--n 2000] [--repeats 3]

Steps: make N distinct photo-sized JPEGs from the 12 scikit-image photos (cached in ``--workdir``), serve them
from a threaded HTTP server in its own process (so serving never holds either client's GIL), write one parquet
URL list, then run both tools' command lines on it with the same resize settings, processes and threads,
alternating which goes first, and count the images each wrote. A ``--startup-n`` image list separates start-up cost
from throughput; CPU time (command plus workers) is recorded beside wall time, since it shrugs off other load.
Results go to stdout and ``--json``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import multiprocessing
import os
import platform
import resource
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

GENERATOR_VERSION = 2  # bump when the image recipe changes, so cached images are rebuilt
# Size mixes (image widths in pixels, drawn uniformly): what a crawl meets. "small": thumbnails and web images,
# where reduced-scale JPEG decoding gains little; "photo": camera photos as sites serve them; "large": full-size
# uploads, where decoding dominates.
MIXES = {"small": (200, 520), "photo": (640, 1600), "large": (1800, 3200)}
# No two images closer than this (our phash, as ingest computes it); tests use phash_max_distance 4 and 6.
MIN_PHASH_DISTANCE = 6
ASPECTS = [(4, 3), (3, 2), (16, 9), (1, 1), (3, 4), (2, 3)]
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
BIN = os.path.dirname(sys.executable)  # the venv's console scripts: visinstruct and img2dataset

# -- data -------------------------------------------------------------------------------------------------------------


def make_image(source: Image.Image, rng: np.random.Generator, widths: tuple[int, int] = MIXES["photo"]) -> Image.Image:
    """One variant of ``source``: a random crop ``widths`` px wide (inclusive range), flipped, colour-jittered,
    grained."""
    aw, ah = ASPECTS[rng.integers(len(ASPECTS))]
    width = int(rng.integers(widths[0], widths[1] + 1))
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


_PHOTO_CACHE: list = []


def _photos() -> list[dict]:
    if not _PHOTO_CACHE:
        from visinstruct.testing.sample_data import photo_samples

        _PHOTO_CACHE.extend(photo_samples())
    return _PHOTO_CACHE


def generate_one(job: tuple[str, int, int, int, int, str]) -> dict:
    """Writes image ``index`` (variant ``attempt``) and returns its attempt and the phash our ingest will compute."""
    from visinstruct.configs import ResizeConfig
    from visinstruct.transforms.images import process_image

    folder, seed, index, attempt, image_size, mix = job
    photos = _photos()
    rng = np.random.default_rng([seed, index, attempt])
    img = make_image(photos[index % len(photos)]["image"], rng, MIXES[mix])
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    path = os.path.join(folder, f"{index:06d}.jpg")
    with open(path + ".tmp", "wb") as f:
        f.write(buf.getvalue())
    os.replace(path + ".tmp", path)
    processed = process_image(buf.getvalue(), ResizeConfig(image_size=image_size, resize_mode="border"))
    return {"attempt": attempt, "phash": processed.phash}


def spread_apart(folder: str, seed: int, image_size: int, mix: str, entries: list[dict]) -> int:
    """Regenerates, in index order, every image whose phash is within ``MIN_PHASH_DISTANCE`` of an earlier one.

    Crops of one photo sometimes nearly coincide; our ingest can drop those as near-duplicates, img2dataset
    cannot, so they would make the two tools write different counts. Returns how many images were redone.
    """
    kept, redone = np.zeros(len(entries), dtype=np.uint64), 0
    for i, entry in enumerate(entries):
        while i and nearest_distance(int(entry["phash"], 16), kept[:i]) <= MIN_PHASH_DISTANCE:
            if entry["attempt"] >= 50:
                raise SystemExit(f"image {i}: no variant far enough from the others after 50 attempts")
            entry = entries[i] = generate_one((folder, seed, i, entry["attempt"] + 1, image_size, mix))
            redone += 1
        kept[i] = int(entry["phash"], 16)
    return redone


def generate_images(folder: str, n: int, seed: int, image_size: int, mix: str) -> tuple[list[str], list[str]]:
    """Paths and phashes of N distinct JPEGs, generated in parallel once and reused while the manifest matches."""
    manifest_path = os.path.join(folder, "manifest.json")
    recipe = {"version": GENERATOR_VERSION, "seed": seed, "image_size": image_size, "mix": mix}
    manifest = {}
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
    if manifest.get("recipe") != recipe:  # another recipe: nothing cached is valid
        shutil.rmtree(folder, ignore_errors=True)
        manifest = {"recipe": recipe, "images": []}
    os.makedirs(folder, exist_ok=True)
    entries = manifest["images"][:n]
    if len(entries) < n:
        print(f"generating {n - len(entries)} images in {folder} ...", flush=True)
        start = time.perf_counter()
        jobs = [(folder, seed, i, 0, image_size, mix) for i in range(len(entries), n)]
        with multiprocessing.get_context("spawn").Pool(os.cpu_count()) as pool:
            entries += pool.map(generate_one, jobs, chunksize=16)
        redone = spread_apart(folder, seed, image_size, mix, entries)
        print(f"  done in {time.perf_counter() - start:.1f}s ({redone} regenerated as near-duplicates)", flush=True)
        manifest["images"] = entries + manifest["images"][n:]
        with open(manifest_path, "w") as f:
            json.dump(manifest, f)
    return [os.path.join(folder, f"{i:06d}.jpg") for i in range(n)], [e["phash"] for e in entries]


def describe_images(paths: list[str], phashes: list[str]) -> dict:
    """Sizes of the generated files, and a check that every image is distinct in bytes and in content."""
    digests, sizes, dims = set(), [], []
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        digests.add(hashlib.sha256(data).hexdigest())
        sizes.append(len(data))
        with Image.open(io.BytesIO(data)) as img:
            dims.append(img.size)
    values = np.array([int(h, 16) for h in phashes], dtype=np.uint64)
    nearest = min((nearest_distance(int(v), np.delete(values, i)) for i, v in enumerate(values)), default=64)
    if len(digests) != len(paths) or nearest <= MIN_PHASH_DISTANCE:
        raise SystemExit(
            f"{len(digests)} distinct files of {len(paths)}, nearest phashes {nearest} apart: "
            f"delete {os.path.dirname(paths[0])} and rerun"
        )
    return {
        "count": len(paths),
        "distinct_sha256": len(digests),
        "min_phash_distance": nearest,
        "mean_kib": round(sum(sizes) / len(sizes) / 1024, 1),
        "widths": [min(w for w, _ in dims), max(w for w, _ in dims)],
        "mean_megapixels": round(sum(w * h for w, h in dims) / len(dims) / 1e6, 3),
    }


_POPCOUNT = np.array([bin(b).count("1") for b in range(256)], dtype=np.uint8)


def nearest_distance(value: int, others: np.ndarray) -> int:
    """The smallest Hamming distance between a 64-bit hash and an array of them (64 for an empty array)."""
    if not len(others):
        return 64
    xor = others ^ np.uint64(value)
    return int(_POPCOUNT[xor.view(np.uint8)].reshape(-1, 8).sum(axis=1).min())


# -- server -----------------------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for clients that want it (urllib3); urllib closes each time

    def do_GET(self) -> None:  # http.server's naming
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

    def log_message(self, format, *args) -> None:  # the base class names it so
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default listen backlog is 5: 64 threads each opening a connection per image (img2dataset's
    # urllib does) then see dropped SYNs and 1 s retransmits (measured: 64 of 2,000 requests over 1 s with 5, none
    # with 1024), which would time the server, not the client.
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

TOOLS = ("img2dataset", "visinstruct")


def ingest_config(args, url_list: str, out: str, shard_size: int) -> dict:
    """Our config: img2dataset's settings where both have one (no retries, 10 s timeout, no rate limit or robots)."""
    return {
        "read": {"path": url_list, "url_col": "url", "caption_col": "caption"},
        "download": {
            "threads": args.threads,
            "timeout": 10,
            "retries": 0,
            "per_host_rps": None,
            "allow_loopback": True,
            "check_robots_txt": False,
        },
        "resize": {
            "image_size": args.image_size,
            "resize_mode": "border",
            "encode_format": "jpg",
            "encode_quality": args.quality,
        },
        "write": {"path": out, "shard_size": shard_size},
    }


def commands(args, url_list: str, config_path: str, outs: dict[str, str], shard_size: int) -> dict[str, list[str]]:
    """The two command lines: same image size, mode, quality, shard size, processes and threads per process."""
    return {
        "img2dataset": [
            os.path.join(BIN, "img2dataset"),
            f"--url_list={url_list}",
            "--input_format=parquet",
            "--url_col=url",
            "--caption_col=caption",
            f"--output_folder={outs['img2dataset']}",
            "--output_format=webdataset",
            f"--processes_count={args.processes}",
            f"--thread_count={args.threads}",
            f"--number_sample_per_shard={shard_size}",
            f"--image_size={args.image_size}",
            "--resize_mode=border",
            "--encode_format=jpg",
            f"--encode_quality={args.quality}",
            "--distributor=multiprocessing",
            "--timeout=10",
            "--retries=0",
        ],
        "visinstruct": [
            os.path.join(BIN, "visinstruct"),
            "ingest",
            "--config",
            config_path,
            "--runner=FnApiRunner",
            "--direct_running_mode=multi_processing",
            f"--direct_num_workers={args.processes}",
        ],
    }


def prepare_workload(args, work: str, name: str, urls: list[str], captions: list[str], shard_size: int) -> dict:
    """Writes a URL list and our config for the first ``len(urls)`` images; returns both tools' commands."""
    url_list = os.path.join(work, f"urls-{name}.parquet")
    pq.write_table(pa.table({"url": urls, "caption": captions}), url_list)
    outs = {tool: os.path.join(work, f"out-{name}-{tool}") for tool in TOOLS}
    config_path = os.path.join(work, f"ingest-{name}.json")  # JSON is YAML: the config loader reads it
    with open(config_path, "w") as f:
        json.dump(ingest_config(args, url_list, outs["visinstruct"], shard_size), f, indent=1)
    return {
        "inputs": len(urls),
        "shard_size": shard_size,
        "outs": outs,
        "commands": commands(args, url_list, config_path, outs, shard_size),
    }


def count_written(folder: str) -> dict:
    """Image members in the tars of an output folder (either tool's), and the number of tars."""
    from visinstruct.transforms.layout import IMAGE_EXTENSIONS, ShardError, resolve_shards

    try:
        paths = [p for p in resolve_shards(folder) if os.path.exists(p)]
    except ShardError:  # the tool wrote no shard
        paths = []
    images = 0
    for path in paths:
        with tarfile.open(path) as tar:
            images += sum(1 for m in tar if m.isfile() and m.name.partition(".")[2] in IMAGE_EXTENSIONS)
    return {"images": images, "shards": len(paths)}


def run_tool(tool: str, workload: str, spec: dict, log_dir: str, round_no: int) -> dict:
    """Runs one command from a fresh output folder; wall time includes interpreter start-up and teardown."""
    out = spec["outs"][tool]
    shutil.rmtree(out, ignore_errors=True)
    log_path = os.path.join(log_dir, f"{workload}-{tool}-round{round_no}.log")
    with open(log_path, "w") as log:
        cpu_start, start = _children_cpu_s(), time.perf_counter()
        rc = subprocess.run(spec["commands"][tool], stdout=log, stderr=subprocess.STDOUT, env=ENV).returncode
        wall, cpu = time.perf_counter() - start, _children_cpu_s() - cpu_start
    result = {
        "tool": tool,
        "workload": workload,
        "round": round_no,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 2),
        "rc": rc,
        **count_written(out),
        "log": log_path,
    }
    print(
        f"  round {round_no} {workload:<7} {tool:<12} {wall:7.2f}s wall {cpu:7.2f}s CPU  rc={rc}  "
        f"images={result['images']}/{spec['inputs']}  shards={result['shards']}",
        flush=True,
    )
    return result


def _children_cpu_s() -> float:
    """User + system CPU seconds of every finished descendant (their workers too, once reaped)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_rounds(workloads: dict[str, dict], repeats: int, log_dir: str) -> list[dict]:
    """Every workload for both tools, each round; the tool that goes first alternates between rounds."""
    runs = []
    for round_no in range(1, repeats + 1):
        order = TOOLS if round_no % 2 else TOOLS[::-1]
        for workload, spec in workloads.items():
            runs += [run_tool(tool, workload, spec, log_dir, round_no) for tool in order]
    return runs


# -- report -----------------------------------------------------------------------------------------------------------


def machine() -> dict:
    model = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {}
    for package in ("img2dataset", "apache-beam", "pillow", "opencv-python-headless", "urllib3", "webdataset"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_gib, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def busy_cpus(seconds: float = 3.0) -> float | None:
    """CPUs kept busy by other processes while this benchmark waits (from /proc/stat); None off Linux."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    if not os.path.exists("/proc/stat"):
        return None
    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return round((1 - (idle1 - idle0) / max(1, total1 - total0)) * os.cpu_count(), 2)


def summarize(runs: list[dict], workloads: dict[str, dict]) -> dict:
    """Medians per tool and workload; images/s of the whole command, and beyond the start-up run if there is one."""
    summary = {}
    for tool in TOOLS:
        entry = {}
        for workload in workloads:
            mine = [r for r in runs if r["tool"] == tool and r["workload"] == workload]
            entry[workload] = {
                "median_wall_s": round(statistics.median(r["wall_s"] for r in mine), 3),
                "median_cpu_s": round(statistics.median(r["cpu_s"] for r in mine), 2),
                "walls_s": [r["wall_s"] for r in mine],
                "images": [r["images"] for r in mine],
                "all_rc_zero": all(r["rc"] == 0 for r in mine),
            }
        full = entry["full"]
        full["images_per_s"] = round(min(full["images"]) / full["median_wall_s"], 1)
        full["cpu_ms_per_image"] = round(1000 * full["median_cpu_s"] / max(1, min(full["images"])), 2)
        if "startup" in entry:  # throughput once both tools are up: extra images over extra seconds
            base = entry["startup"]
            extra_images = min(full["images"]) - min(base["images"])
            entry["marginal_images_per_s"] = round(extra_images / (full["median_wall_s"] - base["median_wall_s"]), 1)
            entry["marginal_cpu_ms_per_image"] = round(
                1000 * (full["median_cpu_s"] - base["median_cpu_s"]) / max(1, extra_images), 2
            )
        summary[tool] = entry
    ours, theirs = summary["visinstruct"], summary["img2dataset"]
    summary["ratio_ours_over_img2dataset"] = round(ours["full"]["images_per_s"] / theirs["full"]["images_per_s"], 3)
    if "startup" in workloads:
        summary["marginal_ratio"] = round(ours["marginal_images_per_s"] / theirs["marginal_images_per_s"], 3)
    return summary


def print_summary(summary: dict, n: int, json_path: str) -> None:
    for tool in TOOLS:
        s = summary[tool]
        line = (
            f"{tool:<12} median {s['full']['median_wall_s']:7.2f}s  {min(s['full']['images'])}/{n} images  "
            f"{s['full']['images_per_s']:7.1f} images/s  CPU {s['full']['median_cpu_s']:.1f}s "
            f"({s['full']['cpu_ms_per_image']:.1f} ms/image)"
        )
        if "startup" in s:
            line += (
                f"\n{'':<12} start-up run {s['startup']['median_wall_s']:.2f}s; after start-up "
                f"{s['marginal_images_per_s']:.1f} images/s, CPU {s['marginal_cpu_ms_per_image']:.1f} ms/image"
            )
        print(line)
    print(
        f"ratio visinstruct/img2dataset: {summary['ratio_ours_over_img2dataset']:.2f} whole command"
        + (f", {summary['marginal_ratio']:.2f} after start-up" if "marginal_ratio" in summary else "")
        + f"  (result: {json_path})"
    )


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
    parser.add_argument(
        "--startup-n",
        type=int,
        default=16,
        help="also time a run of this many images (one shard per process) to separate start-up "
        "cost from throughput; 0 to skip (default 16)",
    )
    parser.add_argument(
        "--mix",
        choices=sorted(MIXES),
        default="photo",
        help="image widths: " + ", ".join(f"{k} {a}-{b} px" for k, (a, b) in MIXES.items()) + " (default photo)",
    )
    parser.add_argument("--seed", type=int, default=0, help="image generator seed (default 0)")
    parser.add_argument("--workdir", default="/tmp/visinstruct-bench-ingest", help="cache, URL list, outputs, logs")
    parser.add_argument("--json", help="result file (default WORKDIR/result-<mix>-N<n>.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    work = os.path.abspath(args.workdir)
    image_dir, log_dir = os.path.join(work, f"images-{args.mix}"), os.path.join(work, "logs")
    os.makedirs(log_dir, exist_ok=True)
    paths, phashes = generate_images(image_dir, args.n, args.seed, args.image_size, args.mix)
    data = describe_images(paths, phashes)
    print(f"data: {json.dumps(data)}", flush=True)
    photos = _photos()
    captions = [photos[i % len(photos)]["caption"] for i in range(args.n)]
    names = [os.path.basename(p) for p in paths]

    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    stop = ctx.Event()
    server = ctx.Process(target=serve, args=(image_dir, names, args.latency, send, stop), daemon=True)
    server.start()
    try:
        if not receive.poll(120):
            raise SystemExit("the image server did not start within 120 s")
        port = receive.recv()
        urls = [f"http://127.0.0.1:{port}/{name}" for name in names]
        workloads = {"full": prepare_workload(args, work, "full", urls, captions, args.shard_size)}
        if args.startup_n:
            k = args.startup_n
            workloads["startup"] = prepare_workload(
                args, work, "startup", urls[:k], captions[:k], max(1, k // args.processes)
            )
        load = {"before": busy_cpus()}
        if load["before"] > 0.2:
            print(f"warning: {load['before']:.2f} CPUs busy with other work before timing", flush=True)
        runs = run_rounds(workloads, args.repeats, log_dir)
        load["after"] = busy_cpus()
    finally:
        stop.set()
        server.join(timeout=10)

    summary = summarize(runs, workloads)
    result = {
        "benchmark": "ingest_vs_img2dataset",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "args": vars(args),
        "machine": machine(),
        "busy_cpus_when_idle": load,
        "data": data,
        "commands": {name: spec["commands"] for name, spec in workloads.items()},
        "summary": summary,
        "runs": runs,
    }
    json_path = args.json or os.path.join(work, f"result-{args.mix}-N{args.n}.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    print_summary(summary, args.n, json_path)
    return result


if __name__ == "__main__":
    main()
