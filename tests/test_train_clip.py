"""The contrastive trainer: a small CLIP learns easy-VQA well enough for the filter; locked towers stay bit-identical;
a resumed run continues exactly; negatives are gathered across DDP processes."""

import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from torchvision.transforms.functional import pil_to_tensor

from visinstruct.configs import CONFIG_DIR, ClipTrainConfig, FilterConfig, IngestConfig, from_dict, load
from visinstruct.testing import sample_data
from visinstruct.testing.tiny_models import tiny_open_clip
from visinstruct.testing.trainers import torchrun, train_argv
from visinstruct.trainer import clip_train
from visinstruct.trainer.clip_eval import auc, retrieval_recall, separating_threshold, shuffled_pairs
from visinstruct.trainer.data import ShardStream, caption_of, shard_list
from visinstruct.trainer.losses import clip_loss

pytestmark = pytest.mark.timeout(600)
RUNNER = ["--runner=FnApiRunner"]
EASYVQA_YAML = CONFIG_DIR / "train-clip" / "clip_easyvqa.yaml"
NAME = "visinstruct-easyvqa-clip"


def ingest_folder(samples, folder, out, shard_size=250):
    """Our ingest pipeline over a folder of PNGs with .txt captions (as a user would run it)."""
    from visinstruct.pipelines.ingest import run as ingest

    sample_data.write_caption_folder(samples, folder)
    cfg = from_dict(
        IngestConfig,
        {
            "read": {"path": str(folder)},
            "resize": {"image_size": 64},
            "write": {"path": str(out), "shard_size": shard_size},
        },
    )
    return ingest(cfg, RUNNER)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """easy-VQA shards: train images 0-1699 and held-out test images 0-239, those whose answers give a caption."""
    root = tmp_path_factory.mktemp("easyvqa")
    for split, limit in (("train", 1700), ("test", 240)):
        samples = [s for s in sample_data.easy_vqa_samples(split, limit) if s["caption"]]
        assert ingest_folder(samples, root / f"{split}-images", root / split)["written"] == len(samples)
    return root


def train_config(shards, out, *overrides) -> ClipTrainConfig:
    """The bundled easy-VQA config on the test's shards."""
    return load(
        ClipTrainConfig,
        EASYVQA_YAML,
        [f"data.shards={shards / 'train'}", f"eval.shards={shards / 'test'}", f"out={out}", *overrides],
    )


SHORT = ["steps=6", "data.batch_size=32", "data.shuffle_buffer=100", "eval.shards=null", "log_every=1"]


# ---------------------------------------------------------------------------------------------------------------------
# The headline: train from scratch, evaluate on held-out images, filter with the checkpoint


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    """``visinstruct train-clip`` with the bundled config: 200 steps of 128 on one CPU thread (about a minute)."""
    from visinstruct.cli.main import main

    out = tmp_path_factory.mktemp("clip-run")
    assert main(train_argv("train-clip", EASYVQA_YAML, out, shards)) == 0
    return out


@pytest.mark.slow
def test_a_small_clip_from_scratch_tells_held_out_captions_from_shuffled_ones(trained):
    metrics = json.loads((trained / "eval.json").read_text())
    assert metrics["samples"] > 200
    assert metrics["matching_auc"] >= 0.9
    assert 0 < metrics["threshold"] < 1 and metrics["threshold_balanced_accuracy"] >= 0.85
    # 25 distinct captions: chance is 0.04 at R@1 and 0.2 at R@5
    assert metrics["image_to_text_r1"] >= 0.5 and metrics["text_to_image_r1"] >= 0.5
    assert metrics["image_to_text_r5"] >= 0.9 and metrics["text_to_image_r5"] >= 0.9
    log = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0] and all(0 < r["temperature"] <= 0.07 for r in log if "loss" in r)
    saved = torch.load(trained / "model.pt", weights_only=True)
    assert saved["step"] == 200 and saved["train_config"]["model"]["name"] == NAME


@pytest.mark.slow
def test_filter_keeps_matching_pairs_over_mismatched_ones_with_the_trained_model(trained, tmp_path):
    from visinstruct.pipelines import filter as clip_filter

    # held-out images; every second one gets a caption of another kind (a different colour or shape)
    samples = [s for s in sample_data.easy_vqa_samples("test", 240) if s["caption"]]
    distinct = sorted({s["caption"] for s in samples})
    for s in samples[1::2]:
        s["caption"] = distinct[(distinct.index(s["caption"]) + 7) % len(distinct)]
    matching = {f"{s['image_id']:05d}" for s in samples[::2]}
    ingest_folder(samples, tmp_path / "images", tmp_path / "mixed")
    cfg = from_dict(
        FilterConfig,
        {
            "model": {
                "name": NAME,
                "pretrained": str(trained / "model.pt"),
                "config_file": str(trained / f"{NAME}.json"),
                "max_batch_size": 64,
            },
            "top_fraction": 0.5,
            "write": {"path": str(tmp_path / "kept")},
        },
    )
    report = clip_filter.run(cfg, shard_list(str(tmp_path / "mixed")), RUNNER)
    assert report["accounted"]
    kept = [
        Path(json.loads(s["json"])["path"]).stem
        for s in wds.WebDataset(shard_list(str(tmp_path / "kept")), shardshuffle=False)
    ]
    assert len(kept) == (len(samples) + 1) // 2
    assert sum(k in matching for k in kept) / len(kept) >= 0.9


def test_the_checkpoint_is_what_open_clip_loads_by_name(shards, tmp_path):
    import open_clip

    summary = clip_train.train(train_config(shards, tmp_path, *SHORT, "steps=2"))
    open_clip.add_model_config(summary["config_file"])
    model = open_clip.create_model(NAME, pretrained=summary["checkpoint"])
    saved = torch.load(summary["checkpoint"], weights_only=True)["state_dict"]
    assert saved.keys() == model.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------------------------------
# LiT: a locked tower does not move


def locked_keys(state_dict, tower, unlocked_groups):
    image = {k for k in state_dict if k.startswith("visual.")}
    if tower == "image":
        return image - ({"visual.proj"} if unlocked_groups else set())
    text = set(state_dict) - image - {"logit_scale"}
    return text - ({"text_projection"} if unlocked_groups else set())


@pytest.mark.parametrize("tower, unlocked_groups", [("image", 0), ("image", 1), ("text", 0)])
def test_a_locked_tower_is_bit_identical_after_training_and_the_rest_moves(shards, tmp_path, tower, unlocked_groups):
    cfg = train_config(shards, tmp_path, *SHORT, f"lock.tower={tower}", f"lock.unlocked_groups={unlocked_groups}")
    before = clip_train.build_model(cfg)[0].state_dict()  # the same seed gives the run's initial weights
    clip_train.train(cfg)
    after = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]
    locked = locked_keys(before, tower, unlocked_groups)
    assert locked and all(torch.equal(before[k], after[k]) for k in locked)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == set(before) - locked


# ---------------------------------------------------------------------------------------------------------------------
# Resume


@pytest.mark.parametrize("num_workers, resampled", [(0, False), (2, False), (2, True)])
def test_a_resumed_stream_delivers_the_batches_an_uninterrupted_one_does(shards, num_workers, resampled):
    streams = []

    def stream():
        streams.append(
            ShardStream(
                shard_list(str(shards / "train")),
                40,
                pil_to_tensor,
                caption="txt",
                seed=3,
                shard_shuffle=10,
                shuffle_buffer=200,
                num_workers=num_workers,
                resampled=resampled,
            )
        )
        return streams[-1]

    try:
        whole = stream()
        keys = [next(whole)["key"] for _ in range(60)]  # past one epoch (about 37 batches of 40)
        first = stream()
        for _ in range(23):  # odd: with two workers the next batch comes from the second one
            next(first)
        resumed = stream()
        resumed.load_state_dict(first.state_dict())
        assert [next(resumed)["key"] for _ in range(37)] == keys[23:]
        if not resampled:  # an epoch holds no sample twice
            assert len({k for batch in keys[:30] for k in batch}) == 30 * 40
    finally:
        for s in streams:
            s.close()


def test_training_resumed_from_a_checkpoint_matches_an_uninterrupted_run(shards, tmp_path):
    overrides = [*SHORT, "data.num_workers=2"]
    whole = clip_train.train(train_config(shards, tmp_path / "whole", *overrides))
    assert clip_train.train(train_config(shards, tmp_path / "parts", *overrides), stop_at=3)["step"] == 3
    resumed = clip_train.train(train_config(shards, tmp_path / "parts", *overrides))
    assert whole["step"] == resumed["step"] == 6

    def losses(run):
        records = map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
        return {r["step"]: r["loss"] for r in records if "loss" in r}

    assert losses("parts") == losses("whole")  # bit for bit on the CPU: same batches, same RNG, same optimizer state
    a, b = (torch.load(tmp_path / run / "model.pt", weights_only=True)["state_dict"] for run in ("whole", "parts"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------------------------
# DDP: negatives gathered across processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_half_batch(rank: int, world_size: int, port: int, out: str) -> None:
    """One of two gloo processes: the DDP gradient of clip_loss on its half of a fixed batch."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    model, images, tokens = _fixed_model_and_batch()
    half = images.shape[0] // world_size
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    image, text, scale = ddp(images[rank * half : (rank + 1) * half], tokens[rank * half : (rank + 1) * half])
    loss = clip_loss(image, text, scale)
    loss.backward()
    torch.save(
        {"loss": loss.detach(), "grads": {n: p.grad for n, p in model.named_parameters()}},
        os.path.join(out, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


def _fixed_model_and_batch():
    model, _, tokenizer = tiny_open_clip(seed=5)
    generator = torch.Generator().manual_seed(0)
    captions = [f"a {c} {s}" for c in ("red", "blue", "green", "teal") for s in ("circle", "triangle")]
    return model.train(), torch.randn(8, 3, 64, 64, generator=generator), tokenizer(captions)


def test_two_gloo_processes_gather_negatives_and_get_the_one_process_gradients(tmp_path):
    torch.multiprocessing.spawn(_ddp_half_batch, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    model, images, tokens = _fixed_model_and_batch()
    loss = clip_loss(*model(images, tokens))
    loss.backward()
    # each process's loss covers its own rows against all 8 pairs; their mean is the whole batch's loss
    assert abs(float(sum(r["loss"] for r in ranks) / 2) - float(loss.detach())) < 1e-5
    for name, p in model.named_parameters():
        for r in ranks:
            assert torch.allclose(r["grads"][name], p.grad, atol=1e-6, rtol=1e-4), name


@pytest.mark.slow
def test_train_clip_runs_under_torchrun_with_two_processes(shards, tmp_path):
    config = tmp_path / "ddp.yaml"
    config.write_text(EASYVQA_YAML.read_text())
    sets = [f"data.shards={shards / 'train'}", f"out={tmp_path / 'out'}", *SHORT, "steps=4", "data.num_workers=1"]
    proc = torchrun("train-clip", config, sets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("train-clip: step 4,") == 1  # rank 0 reports; torchrun fails if any process does
    # near initialisation every caption is about as likely: the loss is about log(negatives + 1), and with gathered
    # negatives that is log(2 processes x 32), not log(32)
    first = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["loss"] - math.log(64)) < 0.15
    resume = torch.load(tmp_path / "out" / "resume.pt", weights_only=True)
    assert [p["data"]["rank"] for p in resume["processes"]] == [0, 1]
    assert resume["processes"][0]["data"]["world_size"] == 2


# ---------------------------------------------------------------------------------------------------------------------
# Pieces: captions and metrics (configs/train-clip/*.yaml load in test_configs.py)


def test_captions_come_from_txt_or_from_the_first_gpt_turn():
    conversation = json.dumps(
        {
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe it."},
                {"from": "gpt", "value": " a red circle "},
            ]
        }
    ).encode()
    assert caption_of({"txt": b"a blue square\n", "json": conversation}) == "a blue square"
    assert caption_of({"txt": b"  ", "json": conversation}) == "a red circle"
    assert caption_of({"txt": b"a blue square", "json": conversation}, "conversation") == "a red circle"
    assert caption_of({"json": conversation}, "txt") is None
    assert caption_of({"json": b"{}"}) is None


def test_auc_counts_ties_as_half_and_recall_treats_equal_captions_as_one():
    assert auc([3, 4], [1, 2]) == 1.0 and auc([1], [2]) == 0.0 and auc([1, 2], [2, 0]) == 0.625
    image = np.eye(3, dtype=np.float32)
    text = np.eye(3, dtype=np.float32)[[0, 1, 1]]  # samples 1 and 2 share a caption, and so its embedding
    recall = retrieval_recall(image, text, ["a", "b", "b"], ks=(1,))
    assert recall == {"image_to_text_r1": 2 / 3, "text_to_image_r1": 1.0}
    images, texts = shuffled_pairs(["a", "b", "b", "c"], seed=1)
    assert len(images) == 4 and all(["a", "b", "b", "c"][i] != ["a", "b", "b", "c"][j] for i, j in zip(images, texts))


def test_the_suggested_threshold_separates_matching_from_shuffled_scores_best():
    assert separating_threshold([0.5, 0.6, 0.7], [0.1, 0.2]) == (0.35, 1.0)  # halfway across the gap
    threshold, accuracy = separating_threshold([0.3, 0.6, 0.7, 0.8], [0.1, 0.2, 0.4])
    assert threshold == 0.5 and accuracy == (3 / 4 + 1.0) / 2  # keeping the 0.3 would keep the 0.4: 0.83 < 0.875
    # the balance does not depend on how many of each there are: 100 negatives at 0.45 do not move it up
    assert separating_threshold([0.5, 0.9], [0.1] * 100 + [0.45])[0] == 0.475
    with pytest.raises(ValueError):
        separating_threshold([0.5], [])


def test_zero_shot_averages_each_class_prompts_and_counts_each_image_against_its_nearest_class():
    from visinstruct.trainer.clip_eval import class_embeddings, zero_shot

    names = ["circle", "triangle"]
    axes = {"circle": np.array([1.0, 0.0, 0.0]), "triangle": np.array([0.0, 1.0, 0.0])}

    def encode(texts):  # a prompt's embedding: its class's axis, tilted by its template (the third axis)
        return np.stack(
            [
                axes[next(n for n in names if n in t)] * 2 + [0, 0, 1.0 if t.startswith("a photo") else -1.0]
                for t in texts
            ]
        )

    classes = class_embeddings(encode, names, ("a photo of a {}.", "a {}."))
    assert np.allclose(classes, [[1, 0, 0], [0, 1, 0]], atol=1e-6)  # the template's tilt averages out
    images = np.array([[0.9, 0.1, 0.4], [0.2, 0.8, 0.0], [0.6, 0.5, 0.0]], np.float32)
    result = zero_shot(images, classes, [0, 1, 1], names)
    assert result == {"accuracy": 2 / 3, "per_class": {"circle": 1.0, "triangle": 0.5}, "samples": 3}
    with pytest.raises(ValueError):
        zero_shot(images, classes, [0, 1], names)
