"""Typed configs of the reference trainers: ``visinstruct train-clip`` (CLIP, LiT and its reverse).

``visinstruct config show train-clip`` prints every key. The data section is shared with the LLaVA trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from visinstruct.configs.loader import opt
from visinstruct.configs.stages import ComputeConfig, _positive

CaptionSource = Literal["auto", "txt", "conversation"]


def refuse_fp16(precision: str) -> None:
    """The trainers autocast to bf16 or run fp32; fp16 training needs loss scaling, which they do not do."""
    if precision == "fp16":
        raise ValueError("'precision' fp16 is for inference; the trainers take auto, fp32 or bf16")


@dataclass
class BlendSource:
    """One shard set of a read-time blend (``data.blend``) and its weight."""

    shards: str = opt(
        doc="this source's shards: a folder of .tar files, a glob, a brace pattern, or several joined by ::"
    )
    weight: float = opt(
        doc="relative weight (> 0; weights need not sum to 1): each sample is from here with "
        "probability weight / sum of weights"
    )

    def __post_init__(self):
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"'weight' must be a number > 0, got {self.weight}")


@dataclass
class StreamConfig:
    """Training batches streamed from our shards with webdataset (see ``visinstruct.trainer.data``)."""

    shards: str | None = opt(
        None,
        "training shards: a folder of .tar files, a glob, or a brace pattern (00{000..099}.tar); "
        "give this or blend, not both",
    )
    blend: list[BlendSource] | None = opt(
        None,
        "blend several shard sets at read time instead of shards: a list of {shards, weight}; each sample is drawn "
        "from a source with probability proportional to its weight, sources resampled endlessly",
    )
    blend_epoch_samples: int | None = opt(
        None,
        "samples in one blended epoch, all processes and workers together; null: the written samples of every "
        "source's shards (their stats files), which needs local shards with stats",
    )
    caption: CaptionSource = opt(
        "auto",
        "caption source: the .txt member, the first gpt turn of the .json "
        "conversations, or auto (txt, else conversations)",
    )
    batch_size: int = opt(256, "samples per step and process; each sample meets batch_size * processes - 1 negatives")
    shard_shuffle: int = opt(
        100, "shards in the shard shuffle buffer; 0 reads them in sorted order (a blend draws shards at random)"
    )
    shuffle_buffer: int = opt(2000, "samples in the sample shuffle buffer; 0 keeps stream order")
    resampled: bool = opt(
        False,
        "draw shards with replacement instead of splitting them across processes (few or unevenly sized shards); "
        "a blend always does",
    )
    num_workers: int = opt(2, "DataLoader processes decoding images; 0 decodes in the training process")
    augment: bool = opt(False, "open_clip's training augmentation (random resized crop); off: its eval transform")

    def __post_init__(self):
        _positive("batch_size", self.batch_size)
        for name in ("shard_shuffle", "shuffle_buffer", "num_workers"):
            _positive(name, getattr(self, name), allow_zero=True)
        if (self.shards is None) == (self.blend is None):
            raise ValueError(
                "give either 'shards' (one shard set) or 'blend' (a list of {shards, weight}), "
                + ("not both" if self.shards is not None else "got neither")
            )
        if self.blend is not None and not self.blend:
            raise ValueError("'blend' needs at least one source ({shards, weight})")
        if self.blend_epoch_samples is not None and self.blend is None:
            raise ValueError("'blend_epoch_samples' has no effect without 'blend'")
        _positive("blend_epoch_samples", self.blend_epoch_samples)


@dataclass
class ClipArchConfig:
    """The open_clip model to train."""

    name: str = opt(
        "ViT-B-32",
        "open_clip architecture; with `config`, the name the new architecture gets "
        "(the checkpoint's <name>.json, which the filter's model.config_file registers)",
    )
    pretrained: str | None = opt(None, "open_clip pretrained tag or checkpoint path; null starts from random weights")
    config: dict[str, Any] | None = opt(
        None,
        "an open_clip model config (embed_dim, vision_cfg, text_cfg) for a new, "
        "usually small, architecture; null uses open_clip's config of `name`",
    )

    def __post_init__(self):
        if self.config is not None and not {"embed_dim", "vision_cfg", "text_cfg"} <= set(self.config):
            raise ValueError("'config' needs embed_dim, vision_cfg and text_cfg (an open_clip model config)")


@dataclass
class LockConfig:
    """Which tower stays frozen: LiT locks the image tower, its reverse the text tower."""

    tower: Literal["none", "image", "text"] = opt(
        "none", "'none' trains both towers (CLIP); 'image' is LiT; 'text' locks the text tower"
    )
    unlocked_groups: int = opt(
        0,
        "trailing layer groups of the locked tower left trainable; 1 is its output "
        "projection alone (LiT's optional projection head)",
    )

    def __post_init__(self):
        _positive("unlocked_groups", self.unlocked_groups, allow_zero=True)


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay, and gradient clipping."""

    lr: float = opt(5e-4, "peak learning rate")
    min_lr: float = opt(0.0, "learning rate at the last step")
    warmup_steps: int = opt(100, "steps of linear warm-up from 0 to lr")
    weight_decay: float = opt(0.1, "AdamW decoupled weight decay, applied to matrices only (not gains, biases, scale)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.98, "AdamW beta2 (CLIP's 0.98)")
    eps: float = opt(1e-6, "AdamW epsilon (CLIP's 1e-6)")
    grad_clip: float | None = opt(1.0, "clip the global gradient norm to this; null for no clipping")

    def __post_init__(self):
        _positive("lr", self.lr)
        for name in ("min_lr", "warmup_steps", "weight_decay"):
            _positive(name, getattr(self, name), allow_zero=True)
        _positive("grad_clip", self.grad_clip)
        if self.min_lr > self.lr:
            raise ValueError(f"'min_lr' must be <= 'lr', got {self.min_lr} > {self.lr}")


@dataclass
class ClipEvalConfig:
    """Held-out evaluation: recall@1/5 both ways and the AUC of matching against shuffled captions."""

    shards: str | None = opt(None, "held-out shards (folder, glob or brace pattern); null for no evaluation")
    every: int | None = opt(None, "steps between evaluations; null evaluates only after the last step")
    max_samples: int = opt(5000, "first samples of the held-out shards used (similarities are max_samples^2)")
    batch_size: int = opt(256, "samples per forward pass")

    def __post_init__(self):
        for name in ("every", "max_samples", "batch_size"):
            _positive(name, getattr(self, name))


@dataclass
class ClipTrainConfig(ComputeConfig):
    """``visinstruct train-clip``: contrastive training (CLIP, LiT, or LiT's reverse) on our shards."""

    out: str = opt(
        doc="output folder: model.pt (open_clip loads it), <name>.json, resume.pt, train_config.yaml, "
        "metrics.jsonl, eval.json"
    )
    data: StreamConfig = opt(doc="training data")
    model: ClipArchConfig = opt(factory=ClipArchConfig, doc="model")
    lock: LockConfig = opt(factory=LockConfig, doc="tower locking (LiT)")
    optim: OptimConfig = opt(factory=OptimConfig, doc="optimizer and schedule")
    eval: ClipEvalConfig = opt(factory=ClipEvalConfig, doc="held-out evaluation")
    steps: int = opt(1000, "optimizer steps in all (the schedule's length)")
    seed: int = opt(0, "seeds the weights, the data order and every random draw")
    log_every: int = opt(10, "steps between log lines (step, loss, lr, samples/s, temperature)")
    save_every: int | None = opt(None, "steps between checkpoints; the last step always saves")
    resume: bool = opt(True, "continue from out/resume.pt when it exists")

    def __post_init__(self):
        super().__post_init__()
        refuse_fp16(self.precision)
        for name in ("steps", "log_every", "save_every"):
            _positive(name, getattr(self, name))
        if self.lock.unlocked_groups and self.lock.tower == "none":
            raise ValueError("'lock.unlocked_groups' needs lock.tower 'image' or 'text'")
