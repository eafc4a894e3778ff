"""Our CLIP as LLaVA's vision tower: a train-clip checkpoint's image tower becomes transformers' CLIPVisionModel with
the same features as open_clip's, and `train` builds a LLaVA around it."""

import copy

import pytest
import torch

from visinstruct.configs import LlavaModelConfig, from_dict
from visinstruct.testing.tiny_models import TINY_OPEN_CLIP_CONFIG, TINY_OPEN_CLIP_NAME, tiny_open_clip
from visinstruct.trainer.clip_tower import convert, vision_config

TOLERANCE = 1e-4


def save_checkpoint(folder, model, model_config) -> str:
    """A checkpoint as `visinstruct train-clip` writes it (model.pt with the state dict and the open_clip config)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.pt"
    torch.save(
        {"state_dict": model.state_dict(), "step": 1, "model_name": TINY_OPEN_CLIP_NAME, "model_config": model_config},
        path,
    )
    return str(path)


def open_clip_features(model, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """open_clip's hidden states after every block (by forward hooks) and its projected image embedding."""
    states = []
    hooks = [b.register_forward_hook(lambda m, i, o: states.append(o)) for b in model.visual.transformer.resblocks]
    with torch.no_grad():
        embedding = model.encode_image(images)
    for hook in hooks:
        hook.remove()
    return states, embedding


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_the_converted_tower_gives_open_clips_features_to_1e_4(tmp_path, quick_gelu):
    model_config = dict(copy.deepcopy(TINY_OPEN_CLIP_CONFIG), quick_gelu=quick_gelu)
    model, _, _ = tiny_open_clip(seed=3)
    if quick_gelu:  # the same weights in a network whose blocks use QuickGELU (OpenAI's CLIP)
        from open_clip.model import CLIP

        quick = CLIP(**model_config)
        quick.load_state_dict(model.state_dict())
        model = quick
    model.eval()
    tower, projection, _ = convert(save_checkpoint(tmp_path / "run", model, model_config))
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    theirs, embedding = open_clip_features(model, images)
    with torch.no_grad():
        ours = tower(pixel_values=images, output_hidden_states=True)
    assert len(ours.hidden_states) == len(theirs) + 1  # the embeddings' output, then one per block
    for block, (mine, reference) in enumerate(zip(ours.hidden_states[1:], theirs)):
        assert torch.allclose(mine, reference, atol=TOLERANCE), f"block {block}"
    assert torch.allclose(ours.pooler_output @ projection, embedding, atol=TOLERANCE)
    assert tower.config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")


def test_what_a_clip_vision_model_cannot_hold_is_refused_by_name():
    for option, value in (("ls_init_value", 0.1), ("attentional_pool", True), ("pool_type", "avg")):
        cfg = copy.deepcopy(TINY_OPEN_CLIP_CONFIG)
        cfg["vision_cfg"][option] = value
        with pytest.raises(ValueError, match=option):
            vision_config(cfg)


def test_a_llava_is_built_around_our_clip_and_sees_with_its_weights(tmp_path):
    from visinstruct.trainer.llava_model import build_llava

    model, _, _ = tiny_open_clip(seed=5)
    checkpoint = save_checkpoint(tmp_path / "clip-run", model, TINY_OPEN_CLIP_CONFIG)
    lm = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    lm |= {"num_attention_heads": 2, "num_key_value_heads": 2}
    cfg = from_dict(
        LlavaModelConfig,
        {"vision": {"clip_checkpoint": str(tmp_path / "clip-run")}, "lm": {"config": lm, "tokenizer": "bytes"}},
    )
    llava, processor = build_llava(cfg, seed=0)
    tower, _, _ = convert(checkpoint)
    for name, tensor in tower.state_dict().items():
        assert torch.equal(llava.model.vision_tower.state_dict()[name], tensor), name
    assert processor.image_processor.crop_size == {"height": 64, "width": 64}
    assert llava.config.image_seq_length == (64 // 16) ** 2  # the patch tokens, CLS dropped (LLaVA's default)


def test_a_clip_checkpoint_and_a_tower_name_are_one_too_many():
    with pytest.raises(ValueError, match="clip_checkpoint"):
        from_dict(LlavaModelConfig, {"vision": {"clip_checkpoint": "run/", "name": "x"}, "lm": {"name": "y"}})
