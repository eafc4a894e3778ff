"""Benchmark: does data built by our stages teach a LLaVA-style model to look? easy-VQA, end to end, on a CPU.

    python benchmarks/easy_vqa_llava.py [--steps N] [--train-images 4000] [--test-images 200] [--out DIR]

easy-VQA (the ``easy-vqa`` package; nobody here wrote it) has 64x64 images of one coloured shape and questions
about its colour, its shape, and yes/no questions ("is there a red shape?"). The script:

1. writes LLaVA's training JSON from the training images: one entry per question (``{"id", "image",
   "conversations": [{"from": "human", "value": "<image>\\n<question>"}, {"from": "gpt", "value": <answer>}]}``);
2. ingests it with our ingest pipeline (what ``visinstruct ingest`` runs: ``read.format: llava``,
   ``read.image_root``), into shards; the test images the same way, as held-out shards;
3. trains ``configs/train/llava_easyvqa.yaml`` on the shards (``visinstruct train``: a new, frozen vision tower;
   the projector and a small Llama with a byte-level tokenizer trained from scratch), on one CPU thread;
4. asks every question of the first ``--test-images`` test images twice, through ``visinstruct chat``'s code: with
   its image, and with a blank (white) image of the same size; a greedy answer is right when it equals the truth.

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

from PIL import Image  # noqa: E402

from visinstruct.configs import CONFIG_DIR, IngestConfig, LlavaTrainConfig, from_dict, load  # noqa: E402
from visinstruct.pipelines.ingest import run as ingest  # noqa: E402
from visinstruct.testing.sample_data import easy_vqa_samples  # noqa: E402

CONFIG = CONFIG_DIR / "train" / "llava_easyvqa.yaml"
TYPES = ("color", "shape", "yes/no")


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


def ask(model, processor, items: list[tuple[Image.Image, str]], batch_size: int = 64) -> list[str]:
    from visinstruct.trainer.chat import answers

    said = []
    for start in range(0, len(items), batch_size):
        images, questions = zip(*items[start : start + batch_size])
        said += answers(model, processor, images, questions, max_new_tokens=12)
    return said


def accuracy(questions: list[tuple[str, str, str]], said: list[str]) -> dict[str, float]:
    right, total = collections.Counter(), collections.Counter()
    for (_, truth, kind), answer in zip(questions, said):
        for key in (kind, "all"):
            total[key] += 1
            right[key] += answer.strip().lower() == truth
    return {key: right[key] / total[key] for key in (*TYPES, "all")} | {"questions": total["all"]}


def majority_baseline(train: list[dict], questions: list[tuple[str, str, str]]) -> dict[str, float]:
    """Accuracy of always giving the training set's most common answer of each question type."""
    counts = collections.defaultdict(collections.Counter)
    for s in train:
        for _, answer, kind in s["questions"]:
            counts[kind][answer] += 1
    best = {kind: c.most_common(1)[0][0] for kind, c in counts.items()}
    return accuracy(questions, [best[kind] for _, _, kind in questions])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, help="training steps (default: the config's, 1000 batches of 32)")
    parser.add_argument("--train-images", type=int, default=4000, help="training images (easy-VQA has 4,000)")
    parser.add_argument("--test-images", type=int, default=200, help="test images whose questions are asked")
    parser.add_argument("--out", help="folder for shards, run and results (default: a temporary folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("visinstruct.trainer").setLevel(logging.INFO)
    root = Path(args.out or tempfile.mkdtemp(prefix="easy_vqa_llava_"))
    root.mkdir(parents=True, exist_ok=True)

    train_samples = easy_vqa_samples("train", args.train_images)
    test_samples = easy_vqa_samples("test", args.test_images)
    train_shards = build_shards(train_samples, "train", root)
    test_shards = build_shards(test_samples, "test", root)

    from visinstruct.trainer.chat import load_checkpoint
    from visinstruct.trainer.llava_train import train

    steps = [f"steps={args.steps}"] if args.steps else []
    cfg = load(
        LlavaTrainConfig,
        CONFIG,
        [
            f"data.shards={train_shards}",
            f"eval.shards={test_shards}",
            f"out={root / 'run'}",
            "eval.max_samples=200",
            *steps,
        ],
    )
    summary = train(cfg)
    model, processor = load_checkpoint(summary["checkpoint"])

    questions = [q for s in test_samples for q in s["questions"]]
    images = [Image.open(s["image_path"]).convert("RGB") for s in test_samples for _ in s["questions"]]
    blank = Image.new("RGB", (64, 64), "white")
    started = time.time()
    with_image = ask(model, processor, [(image, q[0]) for image, q in zip(images, questions)])
    without = ask(model, processor, [(blank, q[0]) for q in questions])
    results = {
        "steps": summary["step"],
        "train_seconds": round(summary["seconds"], 1),
        "train_samples_per_s": round(summary["samples_per_second"], 2),
        "held_out_loss": summary["eval"],
        "with_image": accuracy(questions, with_image),
        "blank_image": accuracy(questions, without),
        "majority_answer": majority_baseline(train_samples, questions),
        "ask_seconds": round(time.time() - started, 1),
        "examples": [
            {"question": q[0], "truth": q[1], "with_image": a, "blank_image": b}
            for q, a, b in list(zip(questions, with_image, without))[:12]
        ],
    }
    (root / "easy_vqa_llava.json").write_text(json.dumps(results, indent=1) + "\n")
    print(
        f"\n{results['with_image']['questions']} test questions ({args.test_images} images); trained "
        f"{results['steps']} steps in {results['train_seconds']} s"
    )
    print(f"{'accuracy':<16}" + "".join(f"{k:>9}" for k in (*TYPES, "all")))
    for name in ("with_image", "blank_image", "majority_answer"):
        print(f"{name:<16}" + "".join(f"{results[name][k]:>9.3f}" for k in (*TYPES, "all")))
    print(f"results: {root / 'easy_vqa_llava.json'}")
    return results


if __name__ == "__main__":
    main()
