"""The local backends see the image: transformers runs the LLaVA checkpoints ``visinstruct train`` writes (a tiny
one built from the demo's config, saved as training saves it), batched with text-only rows, and a row's answer does
not depend on its batch; vLLM gets the image, the seeds and the sampling settings through ``LLM.chat``."""

import base64
import io
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visinstruct.configs import GenerateConfig, ImageConfig, from_dict
from visinstruct.testing.fake_vllm import IMAGE_SEQ_LENGTH, fake_vllm
from visinstruct.transforms.backends import TransformersBackend, VllmBackend
from visinstruct.transforms.llm_openai import ChatRequest
from visinstruct.transforms.vision import PreparedImage, prepare_image, user_parts

IMAGE_TOKENS = 16  # the tiny tower: 64x64 images in 16x16 patches, CLS dropped
# ChatML that reads content parts: renders exactly what ChatML renders for vision.text_messages
PARTS_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}{{ '<image>\n' }}{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# one that reads parts but drops the image ones: its rendering holds no image token, so it must not be used for them
TEXT_PARTS_CHATML = PARTS_CHATML.replace("{{ '<image>\n' }}", "")


def tiny_llava(save_dir: str | Path | None = None, seed: int = 0, sharpen: float = 1.0):
    """The LLaVA that ``configs/train/llava_tiny.yaml`` builds (the demo's), untrained: ``build_llava`` from that
    config's ``model`` section (a 2-layer CLIP tower on 64x64 images, 16 image tokens, a 2-layer Llama with the
    byte-level tokenizer and its ChatML template).

    Args:
        save_dir: when given, model and processor are saved there with ``save_pretrained``, as ``visinstruct train``
            saves a checkpoint, so that ``AutoModelForImageTextToText``/``AutoProcessor`` load them offline.
        seed: weights are a function of the seed.
        sharpen: every weight matrix is multiplied by it. Random weights at their initial scale give nearly flat
            logits that always pick the same token; sharpened (10 does it), the greedy answer depends on the prompt
            and the image, and its top two logits sit far apart, so float noise across batch shapes never flips it.

    Returns:
        ``(model, processor)``: a ``LlavaForConditionalGeneration`` in eval mode on the CPU and its
        ``LlavaProcessor``.
    """
    from visinstruct.configs import CONFIG_DIR, LlavaTrainConfig, load
    from visinstruct.trainer.llava_model import build_llava

    cfg = load(LlavaTrainConfig, CONFIG_DIR / "train" / "llava_tiny.yaml", ["data.shards=unused", "out=unused"])
    model, processor = build_llava(cfg.model, seed)
    if sharpen != 1.0:
        with torch.no_grad():
            for weight in model.parameters():
                if weight.dim() == 2:
                    weight.mul_(sharpen)
    model.eval()
    if save_dir is not None:
        model.save_pretrained(save_dir)
        processor.save_pretrained(save_dir)
    return model, processor


def png(img: Image.Image) -> PreparedImage:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return prepare_image(buf.getvalue(), ImageConfig(format="png"))


def noise(seed: int, size=(80, 48)) -> PreparedImage:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return png(Image.fromarray(pixels))


def see(key, question, image, seed=0, temperature=0.0, max_tokens=10) -> ChatRequest:
    messages = [{"role": "user", "content": user_parts(question)}]
    return ChatRequest(key, messages, max_tokens, temperature, 0.9, seed, image)


def read(key, text, seed=0, temperature=0.0, max_tokens=10) -> ChatRequest:
    return ChatRequest(key, [{"role": "user", "content": text}], max_tokens, temperature, 0.9, seed)


def backend_for(folder) -> TransformersBackend:
    cfg = from_dict(GenerateConfig, {"model": str(folder), "transformers": {"device": "cpu", "threads": 1}})
    return TransformersBackend(cfg, vision=True)


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    """The tiny LLaVA with its weights sharpened, so that its greedy answers depend on prompt and image."""
    folder = tmp_path_factory.mktemp("llava-sharp")
    tiny_llava(folder, seed=0, sharpen=10.0)
    return folder


@pytest.fixture(scope="module")
def backend(sharp):
    return backend_for(sharp)


def test_the_checkpoint_the_demo_trains_answers_about_its_image(tmp_path):
    from visinstruct.trainer.chat import answer, load_checkpoint

    tiny_llava(tmp_path / "model")  # configs/train/llava_tiny.yaml's model, saved as `visinstruct train` saves it
    image, question = noise(1), "What is in the picture?"
    [result] = backend_for(tmp_path / "model").generate([see("a", question, image)])
    # untrained, it repeats one token and never ends its turn; `visinstruct chat` says the same
    assert (result.completion_tokens, result.finish_reason) == (10, "length")
    assert result.text == answer(*load_checkpoint(tmp_path / "model"), image.pil(), question, max_new_tokens=10)
    assert result.image_tokens == IMAGE_TOKENS and result.prompt_tokens > IMAGE_TOKENS


def test_answers_are_those_of_the_checkpoint_asked_as_training_asked_it(backend, sharp):
    from visinstruct.trainer.chat import answers, load_checkpoint

    model, processor = load_checkpoint(sharp)
    images, question = [noise(1), noise(2, (40, 90))], "What is in the picture?"
    expected = answers(model, processor, [i.pil() for i in images], [question] * 2, max_new_tokens=10)
    got = backend.generate([see(str(n), question, image) for n, image in enumerate(images)])
    assert [r.text for r in got] == expected
    assert expected[0] != expected[1]  # the same question about another image gets another answer
    assert [r.image_tokens for r in got] == [IMAGE_TOKENS] * 2
    assert backend.vision.parts is False  # ChatML reads strings: the image token went into the text


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_rows_answer_does_not_depend_on_its_batch(backend, temperature):
    alone = see("a", "Describe it.", noise(3), seed=5, temperature=temperature)
    batch = [
        read("t", "A much longer text-only prompt that pads every other row of the batch.", 9, temperature),
        see("b", "Which colours and shapes do you see, and where?", noise(4), seed=7, temperature=temperature),
        alone,
        read("u", "Hi", 11, temperature),
    ]
    [single] = backend.generate([alone])
    results = backend.generate(batch)
    assert [r.key for r in results] == ["t", "b", "a", "u"]
    assert results[2] == single and single.ok and single.completion_tokens == 10
    assert len({r.text for r in results}) == 4  # every row's answer is its own: a mix-up would show
    assert [r.image_tokens for r in results] == [None, IMAGE_TOKENS, IMAGE_TOKENS, None]
    assert all(r.prompt_tokens > 0 for r in results) and results[1].prompt_tokens > results[2].prompt_tokens
    if temperature:
        reseeded = backend.generate([see("a", "Describe it.", noise(3), seed=6, temperature=temperature)])[0]
        assert reseeded.text != single.text


@pytest.mark.parametrize("template, reads_parts", [(PARTS_CHATML, True), (TEXT_PARTS_CHATML, False)])
def test_a_processor_template_renders_image_parts_only_when_it_places_the_image_token(
    sharp, backend, tmp_path, template, reads_parts
):
    from transformers import AutoProcessor

    shutil.copytree(sharp, tmp_path / "model")
    processor = AutoProcessor.from_pretrained(tmp_path / "model")
    processor.chat_template = template
    processor.save_pretrained(tmp_path / "model")
    other = backend_for(tmp_path / "model")
    requests = [see("a", "Describe it.", noise(5)), read("t", "Say something.")]
    assert other.generate(requests) == backend.generate(requests)  # the same prompt either way
    assert other.vision.parts is reads_parts and backend.vision.parts is False


def test_an_image_that_does_not_decode_fails_its_row_only(backend):
    broken = PreparedImage(b"\x89PNG\r\n\x1a\nnot really", "png", 64, 64, "0" * 64, "0" * 64, False)
    results = backend.generate([see("bad", "Describe it.", broken), see("good", "Describe it.", noise(6))])
    assert results[0].reason in ("truncated", "decode_error") and results[0].text is None  # the image's own reason
    assert results[1].ok and results[1].image_tokens == IMAGE_TOKENS


# ---------------------------------------------------------------------------------------------------------------------
# vLLM, through a recording stand-in for its engine


def vllm_config(**top) -> GenerateConfig:
    engine = {"tensor_parallel_size": 2, "max_model_len": 4096, "gpu_memory_utilization": 0.5}
    return from_dict(GenerateConfig, {"backend": "vllm", "model": "some/llava", "seed": 3, "vllm": engine, **top})


def echo(messages, params):
    """The fake engine's answer: what it read of the last message's text, long or short as the test needs."""
    content = messages[-1]["content"]
    return content if isinstance(content, str) else next(p["text"] for p in content if p["type"] == "text")


def test_vllm_gets_the_image_the_seeds_and_the_sampling_settings(monkeypatch):
    fake = fake_vllm(echo)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    backend = VllmBackend(vllm_config(), vision=True)
    image = noise(7)
    requests = [
        see("a", "Describe the picture in detail.", image, seed=41, temperature=0.7, max_tokens=8),
        read("t", "ok", seed=42, temperature=0.7, max_tokens=8),
    ]
    results = backend.generate(requests)

    [engine] = fake.engines
    assert engine.kwargs == {
        "model": "some/llava",
        "seed": 3,
        "tensor_parallel_size": 2,
        "max_model_len": 4096,
        "gpu_memory_utilization": 0.5,
        "limit_mm_per_prompt": {"image": 1},
    }
    [call] = engine.calls
    assert call.kwargs == {"use_tqdm": False}
    image_part, text_part = call.messages[0][0]["content"]
    assert text_part == {"type": "text", "text": "Describe the picture in detail."}
    header, data = image_part["image_url"]["url"].split(",", 1)
    assert header == "data:image/png;base64"
    sent = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
    assert sent.size == (80, 48) and sent.tobytes() == image.pil().tobytes()
    assert call.messages[1] == requests[1].messages
    assert [(p.seed, p.temperature, p.top_p, p.max_tokens) for p in call.params] == [
        (41, 0.7, 0.9, 8),
        (42, 0.7, 0.9, 8),
    ]

    cut, short = results
    assert (cut.text, cut.finish_reason, cut.completion_tokens) == ("Describe", "length", 8)
    assert cut.image_tokens == IMAGE_SEQ_LENGTH and cut.prompt_tokens == IMAGE_SEQ_LENGTH + 31
    assert (short.text, short.finish_reason, short.image_tokens, short.prompt_tokens) == ("ok", "stop", None, 2)


def test_vllm_without_vision_takes_no_images_and_counts_none(monkeypatch):
    fake = fake_vllm(echo)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    [result] = VllmBackend(vllm_config(), vision=False).generate([read("t", "hello")])
    assert "limit_mm_per_prompt" not in fake.engines[0].kwargs
    assert result.text == "hello" and result.image_tokens is None


def test_vllm_losing_an_output_fails_the_batch_loudly(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm(lambda messages, params: None if params.seed == 2 else "x"))
    backend = VllmBackend(vllm_config(), vision=True)
    with pytest.raises(RuntimeError, match="1 outputs for 2 requests"):
        backend.generate([read("a", "one", seed=1), read("b", "two", seed=2)])
