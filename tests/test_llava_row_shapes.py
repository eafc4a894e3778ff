"""Every LLaVA row shape trains: one image, several (``KEY.0.png``, ``KEY.1.png``... for the conversation's
``<image>`` placeholders in order), none (a text-only conversation), and several conversations of one image. A
two-image prompt gets the very ids and pixels ``LlavaProcessor`` builds; a text-only sample has no image tokens and
no pixels; the tiny LLaVA trains on a mix of all of them with falling loss; a sample whose placeholders do not match
its images is skipped and counted, and the caption-pair stream (the contrastive trainer's) skips, counted, the
shapes it cannot use."""

import collections
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from visinstruct.configs import CONFIG_DIR, LlavaTrainConfig, load
from visinstruct.testing import sample_data
from visinstruct.trainer import llava_train
from visinstruct.trainer.data import iterate_once, shard_list
from visinstruct.trainer.llava_data import (
    IGNORE_INDEX,
    encoder_for,
    held_out_batches,
    make_stream,
    model_inputs,
    pixel_values,
)
from visinstruct.trainer.llava_model import build_llava
from visinstruct.transforms.layout import numbered_member
from visinstruct.transforms.shards import TarShardWriter

pytestmark = pytest.mark.timeout(600)
TINY_YAML = CONFIG_DIR / "train" / "llava_tiny.yaml"


# ---------------------------------------------------------------------------------------------------------------------
# Shards of every row shape, as /FORMAT.md lays them out (a helper the lead may move to testing/)


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, "PNG")
    return out.getvalue()


def sample_members(key: str, images: list[Image.Image], conversations: list[dict], caption: str = "") -> list:
    """A sample's tar members: ``png`` for one image, ``0.png``, ``1.png``... for several, none for a text-only
    sample; ``txt``; ``json`` with ``image_count`` (and ``images``) for the shapes other than one image."""
    meta: dict = {"key": key, "conversations": conversations}
    if len(images) == 1:
        members = [("png", png(images[0]))]
    else:
        members = [(numbered_member(i, "png"), png(image)) for i, image in enumerate(images)]
        meta["image_count"] = len(images)
        meta["images"] = [
            {"member": name, "width": image.width, "height": image.height} for (name, _), image in zip(members, images)
        ]
    return [*members, ("txt", caption.encode()), ("json", json.dumps(meta).encode())]


def write_shards(folder: Path, samples: list[tuple[list[Image.Image], list[dict]]], shard_size: int) -> Path:
    """``samples`` (images, conversations) as tars of ``shard_size`` in ``folder``, keys ``SSSSSIIII``."""
    folder.mkdir(parents=True, exist_ok=True)
    for shard, first in enumerate(range(0, len(samples), shard_size)):
        writer = TarShardWriter()
        for i, (images, conversations) in enumerate(samples[first : first + shard_size]):
            key = f"{shard:05d}{i:04d}"
            writer.add(key, sample_members(key, images, conversations))
        writer.finish(str(folder / f"{shard:05d}.tar"))
    return folder


ORDINALS = ["first", "second", "third"]


def turns(*pairs: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(pairs)]


def mixed_samples(count: int, mismatched_every: int | None = None) -> list[tuple[list[Image.Image], list[dict]]]:
    """``count`` samples in turn of four shapes: one easy-VQA image with two of its questions, two and three images
    asked about in turn (an ``<image>`` placeholder in each human turn, in image order), and text-only arithmetic.
    Each image is in several samples, each with its own conversation and its own copy of the image (as several
    LLaVA rows naming one image file become). With ``mismatched_every``, samples 0, n, 2n... get one image more than
    their placeholders."""
    found = sample_data.easy_vqa_samples("train", count)
    images = [Image.open(s["image_path"]).convert("RGB") for s in found]
    samples = []
    for i, s in enumerate(found):
        shape = i % 4
        if shape == 0:  # one image, two questions about it
            (q1, a1, _), (q2, a2, _) = s["questions"][:2]
            samples.append(([images[i]], turns(f"<image>\n{q1}", a1, q2, a2)))
        elif shape == 3:  # no image
            samples.append(([], turns(f"What is {i} plus {i % 7}?", str(i + i % 7))))
        else:  # two or three images, the first answer of each
            n = shape + 1
            picked = [(i + j) % count for j in range(n)]
            pairs = []
            for j, k in enumerate(picked):
                question, answer, _ = found[k]["questions"][0]
                pairs += [f"<image>\nIn the {ORDINALS[j]} image: {question}", answer]
            samples.append(([images[k] for k in picked], turns(*pairs)))
        if mismatched_every and i % mismatched_every == 0:
            samples[-1][0].append(images[(i + 5) % count])
    return samples


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = load(LlavaTrainConfig, TINY_YAML, ["data.shards=x", f"out={tmp_path_factory.mktemp('unused')}"])
    model, processor = build_llava(cfg.model, cfg.seed)
    return cfg, model, processor, encoder_for(model, processor, cfg.text)


def held_out(processor, encoder, folder: Path, skipped=None) -> list[dict]:
    """Batches of 4 of the LLaVA trainer's held-out pass over ``folder``."""
    cfg = load(LlavaTrainConfig, TINY_YAML, ["data.shards=x", "out=x", f"eval.shards={folder}", "eval.batch_size=4"])
    return list(held_out_batches(cfg, processor, encoder, skipped))


# ---------------------------------------------------------------------------------------------------------------------
# Ids and pixels as LlavaProcessor builds them


TWO_IMAGES = turns("<image>\nWhat color is this shape?", "red", "And here? <image>", "blue")


def test_a_two_image_conversation_gets_the_ids_and_pixels_llava_processor_builds(tiny, tmp_path):
    cfg, model, processor, enc = tiny
    a, b = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (96, 80), "blue")
    ids, labels = enc.encode(TWO_IMAGES)
    text = enc.render(enc.messages(TWO_IMAGES))
    inputs = processor(images=[a, b], text=text, return_tensors="pt")
    assert ids == inputs["input_ids"][0].tolist()
    assert ids.count(model.config.image_token_id) == 2 * model.config.image_seq_length == 32
    assert all(label == IGNORE_INDEX for i, label in zip(ids, labels) if i == model.config.image_token_id)

    # the stream reads KEY.0.png and KEY.1.png in placeholder order and stacks the processor's pixels
    (batch,) = held_out(processor, enc, write_shards(tmp_path / "two", [([a, b], TWO_IMAGES)], 10))
    assert batch["image_counts"] == [2]
    assert torch.equal(batch["image"], inputs["pixel_values"])
    assert batch["text"]["input_ids"][0].tolist() == ids
    fed = model_inputs(batch)
    assert torch.equal(fed["pixel_values"], inputs["pixel_values"])
    with torch.no_grad():
        ours = model(**{k: v for k, v in fed.items() if k != "labels"}).logits
        theirs = model(**inputs).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_a_text_only_sample_has_no_image_tokens_and_no_pixels(tiny, tmp_path):
    cfg, model, processor, enc = tiny
    conversation = turns("What is 2 plus 3?", "5")
    ids, labels = enc.encode(conversation)
    assert model.config.image_token_id not in ids
    assert processor.tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX]) == "5<|im_end|>\n"
    (batch,) = held_out(processor, enc, write_shards(tmp_path / "text", [([], conversation)] * 2, 10))
    assert batch["image"] is None and batch["image_counts"] == [0, 0]
    fed = model_inputs(batch)
    assert fed["pixel_values"] is None
    loss, count = llava_train.batch_loss(model, batch, "cpu")
    assert count == 2 * 3 and torch.isfinite(loss)  # "5", <|im_end|> and "\n", predicted from what precedes them


def test_a_batch_of_every_shape_gives_pixels_for_exactly_the_images_its_tokens_hold(tiny, tmp_path):
    cfg, model, processor, enc = tiny
    samples = mixed_samples(8)
    batch = held_out(processor, enc, write_shards(tmp_path / "mix", samples, 8))[0]
    assert batch["image_counts"] == [1, 2, 3, 0]
    fed = model_inputs(batch)
    tokens = int((fed["input_ids"] == model.config.image_token_id).sum())
    assert fed["pixel_values"].shape[0] == 6 and tokens == 6 * model.config.image_seq_length
    expected = torch.stack([pixel_values(processor.image_processor, image) for image in samples[1][0]])
    assert torch.equal(fed["pixel_values"][1:3], expected)  # sample 1's images, in order, after sample 0's one
    loss, count = llava_train.batch_loss(model, batch, "cpu")
    assert count > 0 and torch.isfinite(loss)


def test_max_length_cuts_before_an_image_that_does_not_fit_and_drops_its_pixels(tiny):
    cfg, model, processor, enc = tiny
    a, b = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")
    whole, _ = enc.encode(TWO_IMAGES)
    second = len(whole) - whole[::-1].index(model.config.image_token_id) - model.config.image_seq_length
    enc.max_length, saved = second + 5, enc.max_length  # room for 5 of the second image's 16 tokens
    try:
        text = enc([TWO_IMAGES])
    finally:
        enc.max_length = saved
    assert text["input_ids"].shape[1] == second and text["images"].tolist() == [1]
    pixels = torch.stack([pixel_values(processor.image_processor, i) for i in (a, b)])
    batch = {"text": text, "image": pixels, "image_counts": [2]}
    assert torch.equal(model_inputs(batch)["pixel_values"], pixels[:1])
    assert torch.isfinite(llava_train.batch_loss(model, batch, "cpu")[0])  # the model takes them: the counts match


# ---------------------------------------------------------------------------------------------------------------------
# Training on a mix; what is skipped, counted


def test_the_tiny_llava_trains_on_a_mix_of_every_shape_and_its_loss_falls(tmp_path):
    folder = write_shards(tmp_path / "shards", mixed_samples(96), 32)
    steps = 24
    cfg = load(
        LlavaTrainConfig,
        TINY_YAML,
        [f"data.shards={folder}", f"out={tmp_path / 'out'}", f"steps={steps}", "log_every=1", "data.num_workers=1"],
    )
    model, processor = build_llava(cfg.model, cfg.seed)
    shapes = collections.Counter()  # the stream's batches mix the shapes
    stream = make_stream(cfg, processor, encoder_for(model, processor, cfg.text), 0, 1)
    for _ in range(4):
        shapes.update(next(stream)["image_counts"])
    stream.close()
    assert set(shapes) == {0, 1, 2, 3}

    summary = llava_train.train(cfg)
    assert summary["step"] == steps and summary["skipped"] == {}
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == steps and all(r["skipped"] == {} for r in records if "loss" in r)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.7 * first, losses


def test_a_sample_whose_placeholders_do_not_match_its_images_is_skipped_and_counted(tiny, tmp_path):
    cfg, model, processor, enc = tiny
    # samples 0, 4, 8...: a one-image conversation (one placeholder) given a second image
    folder = write_shards(tmp_path / "shards", mixed_samples(24, mismatched_every=4), 12)
    skipped = collections.Counter()
    batches = held_out(processor, enc, folder, skipped)
    assert skipped == {"image_mismatch": 6}
    read = [key for b in batches for key in b["key"]]
    mismatched = {f"{i // 12:05d}{i % 12:04d}" for i in range(0, 24, 4)}
    assert len(read) == 18 and not mismatched & set(read)

    out = tmp_path / "out"
    train_cfg = load(
        LlavaTrainConfig,
        TINY_YAML,
        [f"data.shards={folder}", f"out={out}", "steps=4", "log_every=2", "data.batch_size=4", "data.num_workers=0"],
    )
    summary = llava_train.train(train_cfg)  # no crash: the model never sees a sample whose images do not fit
    assert summary["step"] == 4 and summary["skipped"]["image_mismatch"] > 0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["skipped"] == summary["skipped"]


def test_the_caption_pair_stream_skips_text_only_and_multi_image_samples_counted(tmp_path):
    folder = write_shards(tmp_path / "shards", mixed_samples(16), 8)  # 4 samples of each shape, every one answered
    skipped = collections.Counter()
    stream = iterate_once(shard_list(str(folder)), 16, lambda image: torch.zeros(1), None, "auto", skipped=skipped)
    batches = list(stream)
    assert skipped == {"multi_image": 8, "no_image": 4}
    (batch,) = batches
    assert batch["image_counts"] == [1] * 4 and batch["image"].shape == (4, 1)


# ---------------------------------------------------------------------------------------------------------------------
# Asking about several images


def test_chat_asks_about_several_images_as_llava_processor_builds_the_prompt(tiny):
    from visinstruct.trainer.chat import generate, prompt_text

    cfg, model, processor, enc = tiny
    a, b = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")
    question = "Which is red, <image> or <image>?"
    prompt = prompt_text(processor, question, image=2)
    assert prompt == "<|im_start|>user\nWhich is red, <image> or <image>?<|im_end|>\n<|im_start|>assistant\n"
    assert prompt_text(processor, "Compare them.", image=2).count("<image>") == 2  # put first when not placed

    def alone(text, images):
        inputs = processor(images=images if images != [] else None, text=text, return_tensors="pt")
        output = model.generate(
            **inputs, max_new_tokens=6, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id
        )
        return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()

    asked = [(question, [a, b]), ("What is 2 plus 3?", []), ("<image>\nWhat color?", a)]
    for text, images in asked:  # one at a time: greedy argmax may round differently with batching
        expected = alone(prompt_text(processor, text, image=len(images) if isinstance(images, list) else 1), images)
        assert generate(model, processor, [text], [images], 6) == [expected]
    assert len(generate(model, processor, [t for t, _ in asked], [i for _, i in asked], 6)) == 3  # one mixed batch


def test_under_torchrun_a_process_whose_batch_has_no_image_trains_beside_one_whose_has(tmp_path):
    from visinstruct.testing.trainers import torchrun

    samples = mixed_samples(16)
    one_image, text_only = [s for s in samples if len(s[0]) == 1], [s for s in samples if not s[0]]
    folder = write_shards(tmp_path / "shards", one_image + text_only, 4)  # rank 0 reads shard 0, rank 1 shard 1
    sets = [f"data.shards={folder}", f"out={tmp_path / 'out'}", "steps=3", "data.batch_size=2", "data.num_workers=0"]
    proc = torchrun("train", TINY_YAML, sets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 3/3" in proc.stderr


def test_a_batch_without_images_backpropagates_in_stage_1_where_only_the_projector_trains(tiny, tmp_path):
    from visinstruct.trainer.llava_model import set_trainable

    cfg, _, processor, enc = tiny
    model = build_llava(cfg.model, cfg.seed)[0]
    set_trainable(model, stage=1, freeze_vision=True)
    (batch,) = held_out(processor, enc, write_shards(tmp_path / "text", [([], turns("2 plus 3?", "5"))] * 2, 10))
    total, count = llava_train.batch_loss(model, batch, "cpu")
    (total / count).backward()  # the loss reaches no trained weight but through a zero term: zero gradients
    projector = list(model.model.multi_modal_projector.parameters())
    assert all(p.grad is not None and not p.grad.any() for p in projector)
