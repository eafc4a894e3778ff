"""Build a transformers ``LlavaForConditionalGeneration`` from a vision tower and a causal LM, as the config says.

The model is transformers' own class, so a checkpoint (``save_pretrained``: safetensors, ``config.json``, the
processor) loads with ``LlavaForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained``, and in
vLLM. As LLaVA 1.5: the patch features of the vision tower's penultimate layer (``vision_feature_layer`` -2; the CLS
token dropped, strategy ``default``, for CLIP; every token kept, ``full``, for SigLIP, which has none) go through the
2-layer MLP projector and replace the ``<image>`` placeholder tokens, ``image_seq_length`` of them, in the LM's input.

Either part comes from pretrained weights (a hub name or a local folder; for the LM also a ``.gguf`` file, which
transformers dequantises; for the tower also a ``train-clip`` checkpoint, converted by
:mod:`~visinstruct.trainer.clip_tower`) or from a config with random weights; ``<image>`` is added to the tokenizer
as a special token and the LM's embeddings grow by one row.
"""

from __future__ import annotations

from pathlib import Path

import torch

from visinstruct.configs import LanguageModelConfig, LlavaModelConfig, VisionTowerConfig
from visinstruct.schemas import IMAGE_TOKEN

# transformers class of a vision tower, by the model_type of its config (a whole CLIP/SigLIP model's or its vision
# half's); LlavaModel builds its tower with AutoModel.from_config(vision_config), which gives these same classes.
VISION_CLASSES = {
    "clip": "CLIPVisionModel",
    "clip_vision_model": "CLIPVisionModel",
    "siglip": "SiglipVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
}
CHECKPOINT_DIR = "model"  # a run's checkpoint: OUT/model


def byte_level_tokenizer(model_max_length: int = 4096, chat_template: str | None = None):
    """A byte-level tokenizer for new LMs: every UTF-8 byte is a token, plus ChatML's special tokens.

    Ids: 0 ``<|endoftext|>`` (padding and unknown), 1 ``<|im_start|>`` (bos), 2 ``<|im_end|>`` (eos), then the 256
    bytes; no merges, so any text round-trips and the vocabulary stays tiny (a from-scratch LM on a CPU learns it
    fast). The chat template is ChatML's unless ``chat_template`` is given.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from visinstruct.trainer.llava_data import CHATML_TEMPLATE

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE if chat_template is None else chat_template,
        model_max_length=model_max_length,
    )


def _from_pretrained_args(source: str) -> tuple[str, dict]:
    """``(folder or hub name, extra kwargs)``: a ``.gguf`` file is named by its folder and ``gguf_file``."""
    if source.endswith(".gguf"):
        path = Path(source)
        return str(path.parent), {"gguf_file": path.name}
    return source, {}


def load_tokenizer(lm: LanguageModelConfig):
    """The LM's tokenizer with ``<image>`` added as one special token, and a padding token (eos when it has none)."""
    from transformers import AutoTokenizer

    source = lm.tokenizer or lm.name
    if source == "bytes":
        tokenizer = byte_level_tokenizer()
    else:
        folder, kwargs = _from_pretrained_args(source)
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)  # special: never split, never normalised
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of attention and loss anyway
    return tokenizer


def build_vision(vision: VisionTowerConfig):
    """The vision tower's config, its pretrained model (None for a new tower), and its image processor."""
    import transformers
    from transformers import AutoConfig, AutoImageProcessor

    if vision.config is not None:
        config = AutoConfig.for_model(**vision.config)
        return config, None, _image_processor(config)
    if vision.clip_checkpoint is not None:  # our own CLIP from train-clip
        from visinstruct.trainer.clip_tower import convert

        tower, _, processor = convert(vision.clip_checkpoint)
        return tower.config, tower, processor
    whole = AutoConfig.from_pretrained(vision.name)
    config = getattr(whole, "vision_config", whole)  # a whole CLIP model's config holds its tower's
    if config.model_type not in VISION_CLASSES:
        raise ValueError(f"{vision.name}: a {config.model_type!r} model is not a CLIP or SigLIP vision tower")
    tower = getattr(transformers, VISION_CLASSES[config.model_type]).from_pretrained(vision.name)
    return tower.config, tower, AutoImageProcessor.from_pretrained(vision.name)


def _image_processor(config):
    """The image processor of a new tower: resize and centre-crop to its image size, CLIP's or SigLIP's way."""
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    size = config.image_size
    if "siglip" in config.model_type:
        return SiglipImageProcessor(size={"height": size, "width": size})
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def build_lm(lm: LanguageModelConfig, tokenizer):
    """The LM's config and its pretrained model (None for a new LM), its vocabulary sized to the tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if lm.config is not None:
        ids = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")}
        return AutoConfig.for_model(**{**lm.config, "vocab_size": len(tokenizer), **ids}), None
    folder, kwargs = _from_pretrained_args(lm.name)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))  # the <image> row; its value never reaches the LM
    return model.config, model


def select_strategy(vision: VisionTowerConfig, model_type: str) -> str:
    if vision.select_strategy != "auto":
        return vision.select_strategy
    return "full" if "siglip" in model_type else "default"


def build_llava(cfg: LlavaModelConfig, seed: int = 0):
    """A new ``LlavaForConditionalGeneration`` and its ``LlavaProcessor``, or the checkpoint ``cfg.init_from``.

    New weights (the projector always; a tower or LM given by config) are a function of ``seed``; building leaves
    the caller's torch RNG state as it was.

    Returns:
        ``(model, processor)``: the model in fp32 on the CPU; ``processor.tokenizer`` knows ``<image>``.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    if cfg.init_from is not None:
        return load_checkpoint(cfg.init_from)
    tokenizer = load_tokenizer(cfg.lm)
    vision_config, tower, image_processor = build_vision(cfg.vision)
    text_config, lm = build_lm(cfg.lm, tokenizer)
    strategy = select_strategy(cfg.vision, vision_config.model_type)
    cls_tokens = 0 if "siglip" in vision_config.model_type else 1
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=patches + (cls_tokens if strategy == "full" else 0),
        vision_feature_layer=cfg.vision.feature_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act=cfg.projector_act,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    if tower is not None:
        model.model.vision_tower.load_state_dict(tower.state_dict())
    if lm is not None:
        model.model.language_model.load_state_dict(lm.base_model.state_dict())
        model.lm_head.load_state_dict(lm.get_output_embeddings().state_dict())
    # generate() (and vLLM, from generation_config.json) stops at the end of the assistant's turn
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=cls_tokens,
        chat_template=tokenizer.chat_template,
    )
    return model, processor


def checkpoint_dir(path: str | Path) -> Path:
    """The model folder of a run (``OUT/model``) or the folder itself when it is one."""
    path = Path(path)
    if not (path / "config.json").exists() and (path / CHECKPOINT_DIR / "config.json").exists():
        return path / CHECKPOINT_DIR
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: no checkpoint here (config.json, or {CHECKPOINT_DIR}/config.json)")
    return path


def load_checkpoint(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A saved model and its processor: ``(model, processor)``, the model in eval mode.

    Our checkpoints load as ``LlavaForConditionalGeneration``; any other transformers image-text-to-text checkpoint
    (a local folder, or a hub name that is not a local path) through ``AutoModelForImageTextToText``.

    Args:
        path: a run's output folder or its ``model/`` folder, or another image-text-to-text model.
        device: where to put the model.
        dtype: the weights' dtype.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    folder = str(path) if _hub_name(path) else str(checkpoint_dir(path))
    try:
        model_type = AutoConfig.from_pretrained(folder).model_type
    except OSError as e:  # a hub name that is not there, or cannot be fetched (offline)
        first = (str(e).strip().splitlines() or [""])[0]
        raise FileNotFoundError(
            f"{path}: no checkpoint here, nor a hub model this machine can load ({first})"
        ) from None
    cls = LlavaForConditionalGeneration if model_type == "llava" else AutoModelForImageTextToText
    try:
        model = cls.from_pretrained(folder, dtype=dtype)
    except ValueError as e:  # a text LM, a CLIP...: transformers has no image-text-to-text class for it
        first = (str(e).strip().splitlines() or [""])[0]
        raise FileNotFoundError(f"{path}: not an image-text-to-text model ({first})") from None
    return model.to(device).eval(), AutoProcessor.from_pretrained(folder)


def _hub_name(path: str | Path) -> bool:
    """Whether ``path`` names a hub model (``org/name``) rather than a local folder."""
    text = str(path)
    return not Path(text).exists() and text.count("/") == 1 and not text.startswith((".", "/", "~"))


def set_trainable(model, stage: int, freeze_vision: bool) -> list[torch.nn.Module]:
    """Freeze what the stage does not train; returns the modules to keep in eval mode (a frozen tower).

    Stage 1 trains the projector alone; stage 2 the projector and the LM (its output head included). The vision
    tower trains only when ``freeze_vision`` is false. A frozen LM stays in train mode: gradients still flow through
    it to the projector, and gradient checkpointing only acts in train mode (Llama-style LMs have no dropout).
    """
    parts = {
        "vision": [model.model.vision_tower],
        "projector": [model.model.multi_modal_projector],
        "lm": [model.model.language_model, model.lm_head],
    }
    trained = {"projector"} | ({"lm"} if stage == 2 else set()) | (set() if freeze_vision else {"vision"})
    for name, modules in parts.items():
        for module in modules:
            module.requires_grad_(name in trained)
    return [] if "vision" in trained else parts["vision"]
