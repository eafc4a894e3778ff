"""Zero-shot classification of easy-VQA's shapes and colours with a CLIP we trained (``visinstruct train-clip``).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/clip_zero_shot.py RUN [--split test]

RUN is a train-clip run of ``configs/train-clip/clip_easyvqa.yaml`` (``easy_vqa_llava.py --train-clip-steps N``
leaves one in ``OUT/clip``). Every captioned image of the split ("a blue circle") is classified twice, by its
shape (3 classes) and by its colour (8), against class embeddings averaged over prompt templates, as in CLIP's
paper (``trainer/clip_eval.py``: ``class_embeddings``, ``zero_shot``). The prompts are not the training captions,
so this measures how far what the model learned carries to other wordings. Chance: 1/3 for shape, 1/8 for colour.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from visinstruct.testing.sample_data import easy_vqa_samples  # noqa: E402
from visinstruct.trainer.clip_eval import PROMPT_TEMPLATES, class_embeddings, zero_shot  # noqa: E402

COLOUR_TEMPLATES = ("a {} shape.", "a {} object.", "something {}.", "a photo of a {} thing.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a train-clip run folder (model.pt and <name>.json)")
    parser.add_argument("--split", default="test", choices=("train", "test"))
    args = parser.parse_args()
    import open_clip

    saved = torch.load(os.path.join(args.run, "model.pt"), map_location="cpu", weights_only=True)
    name = saved["model_name"]
    open_clip.add_model_config(os.path.join(args.run, f"{name}.json"))
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=os.path.join(args.run, "model.pt"))
    tokenizer = open_clip.get_tokenizer(name)
    model.eval()
    samples = [s for s in easy_vqa_samples(args.split) if s["caption"]]
    words = [s["caption"].split() for s in samples]  # ["a", colour, shape]
    with torch.no_grad():
        images = torch.stack([preprocess(Image.open(s["image_path"]).convert("RGB")) for s in samples])
        embedded = model.encode_image(images, normalize=True).numpy()

        def encode(texts):
            return model.encode_text(tokenizer(texts), normalize=True).numpy()

        results = {}
        for what, position, templates in (("shape", 2, PROMPT_TEMPLATES), ("colour", 1, COLOUR_TEMPLATES)):
            names = sorted({w[position] for w in words})
            labels = [names.index(w[position]) for w in words]
            results[what] = zero_shot(embedded, class_embeddings(encode, names, templates), labels, names)
            results[what]["templates"] = list(templates)
    print(json.dumps({"run": args.run, "split": args.split, **results}, indent=1))


if __name__ == "__main__":
    main()
