"""Benchmark: grounded generation (kinds that see the image) against the bare vision backend.

    python benchmarks/grounded_generation.py [--sizes 64 256] [--repeats 3] [--latency 0.03]

Peer: ``OpenAIBackend(cfg, vision=True).generate(requests)`` on the very requests the stage asks (built beforehand
from the shards with ``plans.plan_parts`` and ``vision.prepare_image``, the code the stage runs), against the
loopback ``OpenAIServer`` answering valid ``recaption`` / ``grounded_qa`` replies after a fixed latency, at the same
concurrency. Ours: the whole ``visinstruct generate`` stage (``pipelines.generate.run``, DirectRunner in this
process: read shards, prepare images, plan, RunInference, check, write shards) on the same shards and kinds.
Overhead = stage wall / bare wall - 1, the median of alternating rounds; at two sample counts, so that Beam's
fixed start-up and the marginal cost per sample come apart.

Two input mixes: shards whose images already fit ``image.max_side`` (their bytes must be sent as they are: no
decode) and shards of larger images (decoded, resized and encoded once per sample). Image decodes are counted in
this process (calls of the decoders ``vision`` uses, and every pixel decode Pillow does, wherever it happens);
the image bytes the backend got are counted at the server (the data URIs of the requests it received), and the
written samples' ``generation.image`` provenance is checked against the shard's bytes.

Issue 15's goals: overhead <= 10%; no re-decode when the shard already holds the resized image.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import webdataset as wds  # noqa: E402
from PIL import Image, ImageFile  # noqa: E402

from visinstruct.configs import GenerateConfig, IngestConfig, from_dict  # noqa: E402
from visinstruct.pipelines import generate  # noqa: E402
from visinstruct.pipelines.ingest import run as ingest  # noqa: E402
from visinstruct.testing.openai_server import OpenAIServer  # noqa: E402
from visinstruct.testing.sample_data import shapes_dataset  # noqa: E402
from visinstruct.transforms import vision  # noqa: E402
from visinstruct.transforms.backends import OpenAIBackend  # noqa: E402
from visinstruct.transforms.images import open_image  # noqa: E402
from visinstruct.transforms.layout import image_member, resolve_shards  # noqa: E402
from visinstruct.transforms.plans import Plan, plan_parts  # noqa: E402
from visinstruct.transforms.prompts import load_templates  # noqa: E402
from visinstruct.transforms.rewrite import iter_samples, sample_meta  # noqa: E402

RUNNER = ["--runner=DirectRunner"]
KINDS = {"recaption": 1.0, "grounded_qa": 1.0}  # per_image 2: every sample asks both, each with the image
DESCRIPTION = (
    "The picture shows a few flat coloured shapes on a plain white background. They are spread apart, do not "
    "overlap, and there is no text or other object anywhere in the scene."
)
QA = (
    "Question: What colour is the background?\nAnswer: White.\n"
    "Question: Do any of the shapes overlap?\nAnswer: No, they are apart.\n"
    "Question: Is there any text in the picture?\nAnswer: No."
)


def responder(body: dict) -> str:
    """A valid reply for the kind asked: question-answer lines when the system prompt wants them, else a paragraph."""
    system = next((m.get("content") for m in body["messages"] if m.get("role") == "system"), "") or ""
    return QA if "Question: <the question>" in system else DESCRIPTION


class DecodeCounter:
    """Counts image decodes in this process: calls of the decoders ``vision`` uses for images it sends
    (``decode_rgb``, ``load_rgb``), and every pixel decode Pillow does anywhere (``ImageFile.load`` with tiles left
    to read)."""

    NAMES = ("decode_rgb", "load_rgb")

    def __init__(self):
        self.vision = 0
        self.pillow = 0
        self._saved = {name: getattr(vision, name) for name in self.NAMES if hasattr(vision, name)}
        self._load = ImageFile.ImageFile.load

    def __enter__(self) -> DecodeCounter:
        def counting(fn):
            def counted(*args, **kwargs):
                self.vision += 1
                return fn(*args, **kwargs)

            return counted

        load = self._load

        def counted_load(img):
            if img.tile:
                self.pillow += 1
            return load(img)

        for name, fn in self._saved.items():
            setattr(vision, name, counting(fn))
        ImageFile.ImageFile.load = counted_load
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(vision, name, fn)
        ImageFile.ImageFile.load = self._load


def make_shards(root: Path, n: int, side: int, shard_size: int) -> list[str]:
    """``n`` shapes samples drawn at ``side`` px, ingested (JPEG) into shards of ``shard_size``."""
    coco = shapes_dataset(root / "shapes", n=n, seed=15, size=(side, side), fmt="jpg")
    ingest(
        from_dict(
            IngestConfig,
            {
                "read": {
                    "path": str(coco / "annotations" / "*.json"),
                    "format": "coco",
                    "image_root": str(coco / "images"),
                },
                "write": {"path": str(root / "in"), "shard_size": shard_size},
                "resize": {"image_size": side},
            },
        ),
        ["--runner=FnApiRunner"],
    )
    return resolve_shards(str(root / "in"))


def config(endpoint: str, out: Path, args) -> GenerateConfig:
    return from_dict(
        GenerateConfig,
        {
            "backend": "openai",
            "openai": {"endpoint": endpoint, "concurrency": args.concurrency, "api_key_env": None, "retries": 0},
            "model": "m",
            "kinds": KINDS,
            "per_image": 2,
            "temperature": 0.0,
            "image": {"max_side": args.max_side},
            "write": {"path": str(out)},
        },
    )


def bare_requests(shards: list[str], cfg: GenerateConfig) -> tuple[list, dict]:
    """Every request the stage asks for these shards, built with its code (prepared here, before any timing), and
    what preparing the images cost."""
    templates = load_templates(cfg.templates)
    requests, source_bytes, prep_s, samples = [], 0, 0.0, 0
    with DecodeCounter() as decodes:
        for path in shards:
            for key, members in iter_samples(path, "bench"):
                if key is None:
                    continue
                meta = sample_meta(key, members)
                data = members[image_member(members)]
                start = time.perf_counter()
                image = vision.prepare_image(data, cfg.image)
                prep_s += time.perf_counter() - start
                plan = plan_parts(path, meta, cfg, templates, image)
                assert isinstance(plan, Plan), plan
                requests += [p.request for p in plan.parts if p.request is not None]
                source_bytes += len(data)
                samples += 1
    prep = {
        "samples": samples,
        "shard_image_bytes_per_sample": round(source_bytes / samples),
        "prepare_ms_per_image": round(1000 * prep_s / samples, 3),
        "decodes_per_image": decodes.vision / samples,
    }
    if prep["decodes_per_image"]:
        prep["steps"] = prepare_breakdown(shards, cfg)
    return requests, prep


def prepare_breakdown(shards: list[str], cfg: GenerateConfig) -> dict:
    """Milliseconds per image of the steps ``prepare_image`` takes for an image that needs a resize: header,
    decode, resize and encode, each timed alone on the shards' images (one thread)."""
    datas = [m[image_member(m)] for path in shards for key, m in iter_samples(path, "bench") if key is not None]
    steps = {"header": 0.0, "decode": 0.0, "resize": 0.0, "encode": 0.0}
    for data in datas:
        t0 = time.perf_counter()
        header = open_image(data)
        t1 = time.perf_counter()
        target = vision.fitted_size(*header.size, cfg.image.max_side)
        if hasattr(vision, "load_rgb"):  # JPEGs decoded at a reduced DCT scale where the target allows it
            img = vision.load_rgb(header, cfg.image.max_pixels, target)
        else:
            img = vision.decode_rgb(data)
        t2 = time.perf_counter()
        img = img.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
        t3 = time.perf_counter()
        vision.encode(img, "jpeg", cfg.image.quality)
        t4 = time.perf_counter()
        for name, seconds in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            steps[name] += seconds
    return {f"{name}_ms": round(1000 * s / len(datas), 3) for name, s in steps.items()}


def sent_image_bytes(srv: OpenAIServer) -> tuple[int, int]:
    """``(requests, image bytes)`` the server received: the decoded data URIs of its ``image_url`` parts."""
    total = 0
    records = [r for r in srv.requests if r.path == "/v1/chat/completions"]
    for record in records:
        for message in record.json["messages"]:
            for part in message["content"] if isinstance(message["content"], list) else []:
                if part.get("type") == "image_url":
                    total += len(base64.b64decode(part["image_url"]["url"].split(",", 1)[1]))
    return len(records), total


def written(out: Path) -> dict:
    """What the written samples say of the image their model saw (``generation.image``)."""
    rows = [json.loads(s["json"]) for s in wds.WebDataset(resolve_shards(str(out)), shardshuffle=False)]
    images = [r["generation"]["image"] for r in rows]
    return {
        "rows": len(rows),
        "reencoded": sum(bool(i["reencoded"]) for i in images),
        "sent_bytes_per_sample": round(sum(i["bytes"] for i in images) / max(1, len(rows))),
    }


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def bench_size(shards: list[str], root: Path, args) -> dict:
    """Bare backend and whole stage on ``shards``, alternating, ``args.repeats`` rounds each."""
    with OpenAIServer(responder=responder, latency=args.latency) as srv:
        cfg = config(srv.base_url, root / "out", args)
        requests, prep = bare_requests(shards, cfg)
        backend = OpenAIBackend(cfg, vision=True)
        bare, stage, checks = [], [], {}
        for round_ in range(args.repeats):
            for side in ("bare", "stage") if round_ % 2 == 0 else ("stage", "bare"):
                srv.reset()
                shutil.rmtree(root / "out", ignore_errors=True)
                with DecodeCounter() as decodes:
                    if side == "bare":
                        seconds, results = timed(lambda: backend.generate(requests))
                        assert all(r.ok for r in results), [r.reason for r in results if not r.ok][:3]
                        bare.append(seconds)
                    else:
                        seconds, report = timed(lambda: generate.run(cfg, shards, RUNNER))
                        stage.append(seconds)
                calls, image_bytes = sent_image_bytes(srv)
                checks[side] = {
                    "requests": calls,
                    "sent_image_bytes_per_sample": round(image_bytes / prep["samples"]),
                    "vision_decodes": decodes.vision,
                    "pillow_decodes": decodes.pillow,
                }
                if side == "stage":
                    checks["stage"] |= {"report_written": report.get("written"), "written": written(root / "out")}
                    rows = checks["stage"]["written"]["rows"]
                    assert rows == prep["samples"], f"the stage wrote {rows} of {prep['samples']} samples"
    n = prep["samples"]
    bare_s, stage_s = statistics.median(bare), statistics.median(stage)
    return {
        "samples": n,
        "requests": len(requests),
        "sent_image_bytes_per_request": round(checks["stage"]["sent_image_bytes_per_sample"] * n / len(requests)),
        "bare_s": round(bare_s, 3),
        "stage_s": round(stage_s, 3),
        "bare_rounds_s": [round(s, 3) for s in bare],
        "stage_rounds_s": [round(s, 3) for s in stage],
        "bare_samples_per_s": round(n / bare_s, 2),
        "stage_samples_per_s": round(n / stage_s, 2),
        "overhead": round(stage_s / bare_s - 1, 3),
        "prepare": prep,
        "checks": checks,
    }


def marginal(small: dict, large: dict) -> dict:
    """Per-sample costs from the difference of two sizes, and the fixed part (Beam start-up, mostly) that is left."""
    dn = large["samples"] - small["samples"]
    bare_ms = 1000 * (large["bare_s"] - small["bare_s"]) / dn
    stage_ms = 1000 * (large["stage_s"] - small["stage_s"]) / dn
    return {
        "bare_ms_per_sample": round(bare_ms, 2),
        "stage_ms_per_sample": round(stage_ms, 2),
        "marginal_overhead": round(stage_ms / bare_ms - 1, 3),
        "stage_fixed_s": round(small["stage_s"] - stage_ms * small["samples"] / 1000, 2),
        "bare_fixed_s": round(small["bare_s"] - bare_ms * small["samples"] / 1000, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[64, 256], help="two sample counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency", type=float, default=0.03, help="server seconds before each answer")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-side", type=int, default=672, help="generate.image.max_side")
    parser.add_argument("--small-side", type=int, default=224, help="image side of the mix that fits max_side")
    parser.add_argument("--large-side", type=int, default=1024, help="image side of the mix that needs a resize")
    parser.add_argument(
        "--json", type=Path, default=Path(tempfile.gettempdir()) / "grounded_generation.json", help="result file"
    )
    args = parser.parse_args()
    load_before = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="grounded-bench-"))
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_before": load_before},
        "settings": {k: v for k, v in vars(args).items() if k != "json"} | {"kinds": KINDS, "per_image": 2},
        "mixes": {},
    }
    try:
        for mix, side in (("fits", args.small_side), ("resized", args.large_side)):
            shard_size = math.gcd(*args.sizes)
            shards = make_shards(root / mix, max(args.sizes), side, shard_size)
            per_size = {}
            for n in sorted(args.sizes):
                per_size[n] = bench_size(shards[: n // shard_size], root / mix / f"run{n}", args)
                assert per_size[n]["samples"] == n, f"ingest wrote {per_size[n]['samples']} of {n} samples"
            small, large = (per_size[n] for n in sorted(args.sizes))
            result["mixes"][mix] = {"image_side": side, "sizes": per_size, "marginal": marginal(small, large)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result["machine"]["load_after"] = os.getloadavg()
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    print(f"results: {args.json}")


def print_table(result: dict) -> None:
    print(f"load average before {result['machine']['load_before']}, after {result['machine']['load_after']}")
    head = (
        "| mix | samples | bare | stage | overhead | bytes sent / sample (shard) | decodes / sample | prepare ms/img |"
    )
    print(head + "\n" + "|" + " --- |" * 8)
    for mix, m in result["mixes"].items():
        for n, r in m["sizes"].items():
            stage, prep = r["checks"]["stage"], r["prepare"]
            print(
                f"| {mix} {m['image_side']} px | {n} | {r['bare_samples_per_s']}/s | {r['stage_samples_per_s']}/s "
                f"| {100 * r['overhead']:.1f}% | {stage['sent_image_bytes_per_sample']} "
                f"({prep['shard_image_bytes_per_sample']}) | {stage['vision_decodes'] / r['samples']:.2f} "
                f"| {prep['prepare_ms_per_image']} |"
            )
        mg = m["marginal"]
        print(
            f"| {mix}: marginal | | {mg['bare_ms_per_sample']} ms | {mg['stage_ms_per_sample']} ms "
            f"| {100 * mg['marginal_overhead']:.1f}% | stage fixed {mg['stage_fixed_s']} s | | |"
        )


if __name__ == "__main__":
    main()
