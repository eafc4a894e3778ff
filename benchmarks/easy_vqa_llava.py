"""Benchmark: does data built by our stages teach a LLaVA-style model to look? easy-VQA, end to end, on a CPU.

    python benchmarks/easy_vqa_llava.py [--steps N] [--train-images 4000] [--test-images 200] [--out DIR]
                                        [--clip RUN | --train-clip-steps N]

easy-VQA (the ``easy-vqa`` package; nobody here wrote it) has 64x64 images of one coloured shape and questions
about its colour, its shape, and yes/no questions ("is there a red shape?"). The script:

1. writes LLaVA's training JSON from the training images: one entry per question (``{"id", "image",
   "conversations": [{"from": "human", "value": "<image>\\n<question>"}, {"from": "gpt", "value": <answer>}]}``);
2. ingests it with our ingest pipeline (what ``visinstruct ingest`` runs: ``read.format: llava``,
   ``read.image_root``), into shards; the test images the same way, as held-out shards;
3. trains ``configs/train/llava_easyvqa.yaml`` on the shards (``visinstruct train``: a new, frozen vision tower;
   the projector and a small Llama with a byte-level tokenizer trained from scratch), on one CPU thread;
   With ``--clip RUN`` (a ``visinstruct train-clip`` run folder) or ``--train-clip-steps N`` (first train one:
   ``visinstruct train-clip --config configs/train-clip/clip_easyvqa.yaml`` for N steps on the training images with
   their captions, ingested as a folder of PNGs and .txt files, into ``OUT/clip``), the tower is our own CLIP:
   ``configs/train/llava_easyvqa_ourclip.yaml`` with ``model.vision.clip_checkpoint`` set to the run;
4. ``visinstruct eval`` of the checkpoint on a question file of the first ``--test-images`` test images (one line
   per question: image, text, answer, category colour/shape/yes-no): every question asked with its image, a blank
   (white) image of the same size, another test image and no image; exact match after VQA's normalisation, by
   category, with bootstrap intervals (``OUT/eval/eval.json``, ``answers.jsonl``, ``errors.html``).

The image helps when the with-image accuracy clearly beats the blank-image one, which can only use the question
(the majority answer per question type, from the training set, is printed as that floor's reference).
Results go to ``OUT/easy_vqa_llava.json`` and the table to stdout.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


from visinstruct.configs import CONFIG_DIR, IngestConfig, LlavaTrainConfig, from_dict, load  # noqa: E402
from visinstruct.pipelines.ingest import run as ingest  # noqa: E402
from visinstruct.testing.sample_data import easy_vqa_samples, write_caption_folder  # noqa: E402

CONFIG = CONFIG_DIR / "train" / "llava_easyvqa.yaml"
OUR_CLIP_CONFIG = CONFIG_DIR / "train" / "llava_easyvqa_ourclip.yaml"
CLIP_CONFIG = CONFIG_DIR / "train-clip" / "clip_easyvqa.yaml"
TYPES = ("color", "shape", "yes/no")
CONDITIONS = {"with_image": "image", "blank_image": "blank", "shuffled_image": "shuffled", "no_image": "none"}


def write_llava_json(samples: list[dict], path: Path) -> str:
    """LLaVA's training JSON of easy-VQA samples, one entry per question; returns the image folder (``image_root``).

    One question per conversation, as the test asks them: in a conversation of all an image's questions, one
    question often names what another asks ("what is the color of the triangle?" before "what is the red
    shape?"), and the model learns to copy it from the context instead of looking at the image.
    """
    entries = [
        {
            "id": f"{s['image_id']}-{i}",
            "image": Path(s["image_path"]).name,
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}],
        }
        for s in samples
        for i, (question, answer, _) in enumerate(s["questions"])
    ]
    path.write_text(json.dumps(entries))
    return str(Path(samples[0]["image_path"]).parent)


def build_shards(samples: list[dict], name: str, root: Path) -> Path:
    image_root = write_llava_json(samples, root / f"{name}.json")
    # every image comes once per question: duplicates here are intended, so deduplication is off
    cfg = from_dict(
        IngestConfig,
        {
            "read": {"path": str(root / f"{name}.json"), "format": "llava", "image_root": image_root},
            "dedup": {"urls": False, "sha256": False},
            "resize": {"image_size": 64},
            "write": {"path": str(root / name), "shard_size": 2000},
        },
    )
    report = ingest(cfg, ["--runner=FnApiRunner"])
    questions = sum(len(s["questions"]) for s in samples)
    print(f"ingest {name}: {report['written']} of {questions} questions ({len(samples)} images) written")
    return root / name


def build_caption_shards(samples: list[dict], name: str, root: Path) -> Path:
    """Shards of easy-VQA images with their captions ("a blue circle"), for ``train-clip``: our ingest over a folder
    of PNGs with .txt captions, as a user would run it; images without a caption are left out."""
    captioned = [s for s in samples if s["caption"]]
    folder = write_caption_folder(captioned, root / f"{name}-images")
    cfg = from_dict(
        IngestConfig,
        {
            "read": {"path": str(folder)},
            "resize": {"image_size": 64},
            "write": {"path": str(root / name), "shard_size": 500},
        },
    )
    report = ingest(cfg, ["--runner=FnApiRunner"])
    print(f"ingest {name}: {report['written']} of {len(captioned)} captioned images written")
    return root / name


def train_clip(train: list[dict], test: list[dict], steps: int, root: Path) -> tuple[Path, float]:
    """``visinstruct train-clip --config configs/train-clip/clip_easyvqa.yaml`` for ``steps`` steps on the captioned
    training images (held-out: the test images), into ``root/clip``; returns the run folder and its wall seconds."""
    from visinstruct.cli.main import main as cli

    train_shards = build_caption_shards(train, "clip-train", root)
    test_shards = build_caption_shards(test, "clip-test", root)
    out = root / "clip"
    argv = ["train-clip", "--config", str(CLIP_CONFIG), "--out", str(out)]
    for setting in (f"data.shards={train_shards}", f"eval.shards={test_shards}", f"steps={steps}"):
        argv += ["--set", setting]
    print("visinstruct " + " ".join(argv))
    started = time.time()
    if cli(argv) != 0:
        raise SystemExit("train-clip failed")
    return out, time.time() - started


def write_questions(samples: list[dict], path: Path) -> None:
    """``visinstruct eval``'s question file: one JSON line per question, its category easy-VQA's question type."""
    lines = [
        json.dumps(
            {"question_id": f"{s['image_id']}-{i}", "image": s["image_path"], "text": q, "answer": a, "category": kind}
        )
        for s in samples
        for i, (q, a, kind) in enumerate(s["questions"])
    ]
    path.write_text("\n".join(lines) + "\n")


def accuracy(questions: list[tuple[str, str, str]], said: list[str]) -> dict[str, float]:
    right, total = collections.Counter(), collections.Counter()
    for (_, truth, kind), answer in zip(questions, said):
        for key in (kind, "all"):
            total[key] += 1
            right[key] += answer.strip().lower() == truth
    return {key: right[key] / total[key] for key in (*TYPES, "all")} | {"questions": total["all"]}


def evaluate(checkpoint: str, test_samples: list[dict], root: Path) -> dict:
    """``visinstruct eval`` on the test questions; returns its eval.json."""
    from visinstruct.cli.main import main as cli

    write_questions(test_samples, root / "test_questions.jsonl")
    argv = ["eval", "--checkpoint", checkpoint, "--questions", str(root / "test_questions.jsonl")]
    argv += ["--out", str(root / "eval"), "--set", "max_new_tokens=12", "--set", "batch_size=64"]
    print("visinstruct " + " ".join(argv))
    if cli(argv) != 0:
        raise SystemExit("eval failed")
    return json.loads((root / "eval" / "eval.json").read_text())


def by_type(report: dict, condition: str) -> dict[str, float]:
    """One condition's exact-match accuracy per question type (and all), from eval.json."""
    per = report["conditions"][condition]
    return {key: per[key]["exact"]["mean"] for key in (*TYPES, "all")} | {"questions": report["questions"]}


def majority_baseline(train: list[dict], questions: list[tuple[str, str, str]]) -> dict[str, float]:
    """Accuracy of always giving the training set's most common answer of each question type."""
    counts = collections.defaultdict(collections.Counter)
    for s in train:
        for _, answer, kind in s["questions"]:
            counts[kind][answer] += 1
    best = {kind: c.most_common(1)[0][0] for kind, c in counts.items()}
    return accuracy(questions, [best[kind] for _, _, kind in questions])


def tower_record(clip_run: Path | None, clip_seconds: float | None, clip_steps: int | None, cfg) -> dict:
    """Which vision tower the LLaVA had: the config's random one, or our CLIP with its held-out metrics."""
    vision = cfg.model.vision
    if clip_run is None:
        return {
            "kind": "random",
            "config": vision.config,
            "freeze": vision.freeze,
            "feature_layer": vision.feature_layer,
            "select_strategy": vision.select_strategy,
        }
    metrics = clip_run / "eval.json"
    return {
        "kind": "our_clip",
        "clip_checkpoint": str(clip_run),
        "clip_trained_here": clip_steps is not None,
        "clip_steps": clip_steps,
        "clip_train_seconds": None if clip_seconds is None else round(clip_seconds, 1),
        "clip_eval": json.loads(metrics.read_text()) if metrics.is_file() else None,
        "freeze": vision.freeze,
        "feature_layer": vision.feature_layer,
        "select_strategy": vision.select_strategy,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, help="training steps (default: the config's, 1000 batches of 32)")
    parser.add_argument("--train-images", type=int, default=4000, help="training images (easy-VQA has 4,000)")
    parser.add_argument("--test-images", type=int, default=200, help="test images whose questions are asked")
    parser.add_argument("--out", help="folder for shards, run and results (default: a temporary folder)")
    tower = parser.add_mutually_exclusive_group()
    tower.add_argument(
        "--clip", help="a `visinstruct train-clip` run folder whose image tower becomes the LLaVA tower"
    )
    tower.add_argument(
        "--train-clip-steps", type=int, help="first train our CLIP (clip_easyvqa.yaml) for N steps, into OUT/clip"
    )
    parser.add_argument(
        "--set", action="append", default=[], help="extra KEY=VALUE override of the LLaVA config (repeatable)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("visinstruct.trainer").setLevel(logging.INFO)
    root = Path(args.out or tempfile.mkdtemp(prefix="easy_vqa_llava_"))
    root.mkdir(parents=True, exist_ok=True)

    train_samples = easy_vqa_samples("train", args.train_images)
    test_samples = easy_vqa_samples("test", args.test_images)
    train_shards = build_shards(train_samples, "train", root)
    test_shards = build_shards(test_samples, "test", root)
    clip_run, clip_seconds = (Path(args.clip), None) if args.clip else (None, None)
    if args.train_clip_steps:
        clip_run, clip_seconds = train_clip(train_samples, test_samples, args.train_clip_steps, root)

    from visinstruct.trainer.llava_train import train

    steps = [f"steps={args.steps}"] if args.steps else []
    tower = [f"model.vision.clip_checkpoint={clip_run}"] if clip_run else []
    config = OUR_CLIP_CONFIG if clip_run else CONFIG
    overrides = [
        f"data.shards={train_shards}",
        f"eval.shards={test_shards}",
        f"out={root / 'run'}",
        "eval.max_samples=200",
        *steps,
        *tower,
        *args.set,
    ]
    cfg = load(LlavaTrainConfig, config, overrides)
    summary = train(cfg)
    report = evaluate(summary["checkpoint"], test_samples, root)
    questions = [q for s in test_samples for q in s["questions"]]
    results = {
        "config": str(config.relative_to(CONFIG_DIR.parent))
        if config.is_relative_to(CONFIG_DIR.parent)
        else str(config),
        "overrides": overrides,
        "tower": tower_record(clip_run, clip_seconds, args.train_clip_steps, cfg),
        "steps": summary["step"],
        "train_seconds": round(summary["seconds"], 1),
        "train_samples_per_s": round(summary["samples_per_second"], 2),
        "held_out_loss": summary["eval"],
        **{name: by_type(report, condition) for name, condition in CONDITIONS.items()},
        "image_minus_blank": {k: report["image_minus"]["blank"][k] for k in (*TYPES, "all")},
        "majority_answer": majority_baseline(train_samples, questions),
        "ask_seconds": round(report["seconds"]["total"], 1),
        "eval": str(root / "eval" / "eval.json"),
    }
    (root / "easy_vqa_llava.json").write_text(json.dumps(results, indent=1) + "\n")
    print(
        f"\n{results['with_image']['questions']} test questions ({args.test_images} images); trained "
        f"{results['steps']} steps in {results['train_seconds']} s"
    )
    print(f"{'accuracy':<16}" + "".join(f"{k:>9}" for k in (*TYPES, "all")))
    for name in (*CONDITIONS, "majority_answer"):
        print(f"{name:<16}" + "".join(f"{results[name][k]:>9.3f}" for k in (*TYPES, "all")))
    print(f"tower: {results['tower']['kind']}" + (f" ({clip_run})" if clip_run else ""))
    print(f"results: {root / 'easy_vqa_llava.json'}")
    return results


if __name__ == "__main__":
    main()
