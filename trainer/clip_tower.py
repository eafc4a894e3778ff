"""Our CLIP as LLaVA's vision tower: a ``train-clip`` checkpoint's open_clip image tower as transformers'
``CLIPVisionModel``, weight for weight.

``LlavaForConditionalGeneration`` builds its tower with ``AutoModel.from_config``, so the tower must be a
transformers class for the LLaVA checkpoint to save, load and serve (vLLM included) as any other. open_clip's
``VisionTransformer`` and transformers' ``CLIPVisionModel`` are the same network under other names: a patch
convolution without bias, a class token, learned positions, a pre-norm, pre-norm residual blocks (one fused QKV
projection in open_clip, three in transformers), a post-norm on the class token. :func:`convert` maps the tensors
one to one; the features are equal up to float rounding (``tests/test_clip_tower.py`` checks 1e-4).

What the mapping cannot express is refused with the option's name: layer scale, attentional pooling, pooling
other than the class token, no pre-norm, the norm after pooling; only plain ViT towers (``vision_cfg`` without
``timm_model_name``) convert.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# open_clip vision_cfg options whose non-default values change the network in ways CLIPVisionModel has no place for
UNSUPPORTED = {
    "ls_init_value": None,
    "attentional_pool": False,
    "no_ln_pre": False,
    "final_ln_after_pool": False,
    "timm_model_name": None,
    "output_tokens": False,
}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's default normalisation (OpenAI's CLIP)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def load_clip_checkpoint(path: str | Path) -> dict[str, Any]:
    """A ``train-clip`` ``model.pt`` (a run folder names its ``model.pt``): its state dict and open_clip config."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no train-clip checkpoint (model.pt) there")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or "state_dict" not in saved or "model_config" not in saved:
        raise ValueError(f"{path}: not a train-clip checkpoint (it needs state_dict and model_config)")
    return saved


def vision_config(model_config: dict[str, Any]):
    """transformers' ``CLIPVisionConfig`` of an open_clip model config's image tower."""
    from transformers import CLIPVisionConfig

    vision = dict(model_config.get("vision_cfg") or {})
    refused = {k: vision[k] for k, default in UNSUPPORTED.items() if vision.get(k, default) != default}
    if vision.get("pool_type", "tok") != "tok":
        refused["pool_type"] = vision["pool_type"]
    if refused:
        raise ValueError(f"this open_clip image tower cannot become a CLIP vision model: {refused}")
    width, layers = vision.get("width", 768), vision.get("layers", 12)
    image_size, patch_size = vision.get("image_size", 224), vision.get("patch_size", 16)
    if isinstance(image_size, (list, tuple)) or isinstance(patch_size, (list, tuple)):
        raise ValueError("only square images and patches convert (image_size and patch_size as single numbers)")
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=int(width * vision.get("mlp_ratio", 4.0)),
        num_hidden_layers=layers,
        num_attention_heads=width // vision.get("head_width", 64),
        image_size=image_size,
        patch_size=patch_size,
        hidden_act="quick_gelu" if model_config.get("quick_gelu") else "gelu",
        layer_norm_eps=1e-5,  # open_clip's LayerNorm default
        projection_dim=model_config.get("embed_dim", 512),
    )


def image_processor(model_config: dict[str, Any]):
    """The tower's image processor: open_clip's eval transform (shortest side resized bicubic, centre crop, the
    model's mean and std, OpenAI's by default) as transformers' ``CLIPImageProcessor``."""
    from transformers import CLIPImageProcessor

    vision = model_config.get("vision_cfg") or {}
    size = vision.get("image_size", 224)
    return CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(vision.get("image_mean") or OPENAI_MEAN),
        image_std=list(vision.get("image_std") or OPENAI_STD),
    )


def vision_state_dict(state: dict[str, torch.Tensor], layers: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """open_clip's ``visual.*`` tensors under ``CLIPVisionModel``'s names (the fused QKV split in three);
    ``prefix`` is what the model puts before them (``vision_model.`` in transformers 4, nothing in 5)."""
    out = {
        "embeddings.class_embedding": state["visual.class_embedding"],
        "embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "pre_layrnorm.weight": state["visual.ln_pre.weight"],  # transformers' own spelling
        "pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "post_layernorm.weight": state["visual.ln_post.weight"],
        "post_layernorm.bias": state["visual.ln_post.bias"],
    }
    for i in range(layers):
        ours, theirs = f"visual.transformer.resblocks.{i}.", f"encoder.layers.{i}."
        q, k, v = state[ours + "attn.in_proj_weight"].chunk(3)
        qb, kb, vb = state[ours + "attn.in_proj_bias"].chunk(3)
        pairs = {
            "self_attn.q_proj.weight": q,
            "self_attn.k_proj.weight": k,
            "self_attn.v_proj.weight": v,
            "self_attn.q_proj.bias": qb,
            "self_attn.k_proj.bias": kb,
            "self_attn.v_proj.bias": vb,
            "self_attn.out_proj.weight": state[ours + "attn.out_proj.weight"],
            "self_attn.out_proj.bias": state[ours + "attn.out_proj.bias"],
            "layer_norm1.weight": state[ours + "ln_1.weight"],
            "layer_norm1.bias": state[ours + "ln_1.bias"],
            "layer_norm2.weight": state[ours + "ln_2.weight"],
            "layer_norm2.bias": state[ours + "ln_2.bias"],
            "mlp.fc1.weight": state[ours + "mlp.c_fc.weight"],
            "mlp.fc1.bias": state[ours + "mlp.c_fc.bias"],
            "mlp.fc2.weight": state[ours + "mlp.c_proj.weight"],
            "mlp.fc2.bias": state[ours + "mlp.c_proj.bias"],
        }
        out.update({theirs + name: tensor for name, tensor in pairs.items()})
    return {prefix + name: tensor.detach().clone().contiguous() for name, tensor in out.items()}


def convert(path: str | Path):
    """A ``train-clip`` checkpoint's image tower as ``(CLIPVisionModel, its projection (width x embed_dim), its
    image processor)``.

    Every weight of the new model is set from the checkpoint (a missing or extra name raises); the projection is
    returned apart (LLaVA's projector reads the hidden states, not the projected embedding).
    """
    from transformers import CLIPVisionModel

    saved = load_clip_checkpoint(path)
    config = vision_config(saved["model_config"])
    model = CLIPVisionModel(config)
    prefix = "vision_model." if any(name.startswith("vision_model.") for name in model.state_dict()) else ""
    weights = vision_state_dict(saved["state_dict"], config.num_hidden_layers, prefix)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [name for name in missing if not name.endswith("position_ids")]  # a buffer, not a weight
    if missing or unexpected:
        raise ValueError(f"{path}: the converted tower does not fit: missing {missing}, unexpected {unexpected}")
    model.eval()
    return model, saved["state_dict"]["visual.proj"].detach().clone(), image_processor(saved["model_config"])
