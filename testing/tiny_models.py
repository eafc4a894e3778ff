"""Tiny random-weight models built offline in well under a second each, for tests of the model stages.

- :func:`tiny_open_clip`: an open_clip CLIP registered under :data:`TINY_OPEN_CLIP_NAME`, with open_clip's own
  (bundled) tokenizer.
- :func:`tiny_hf_clip`: a ``transformers.CLIPModel`` with a real CLIP BPE tokenizer built from the vocabulary
  that open_clip bundles, so no hub download is needed.
- :func:`tiny_causal_lm`: a Llama-style ``LlamaForCausalLM`` with a byte-level tokenizer and a ChatML template.

Weights are deterministic for a given ``seed``; building a model leaves the caller's torch RNG state untouched.
The HF models can be saved to a folder that ``from_pretrained`` loads offline.
"""

from __future__ import annotations

import contextlib
import functools
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

TINY_OPEN_CLIP_NAME = "visinstruct-tiny-clip"
# open_clip's vision tower takes its head count from width // head_width, hence head_width; the text tower keeps
# CLIP's vocabulary (49,408 BPE tokens) so the bundled SimpleTokenizer works unchanged.
TINY_OPEN_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_IMAGE_SIZE = 64

# SmolLM2's ChatML format, without its default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch's global RNG (module ``__init__`` draws from it) and restore the caller's state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ---------------------------------------------------------------------------------------------------------------------
# open_clip


@functools.cache
def register_tiny_open_clip(name: str = TINY_OPEN_CLIP_NAME) -> str:
    """Register the tiny config with open_clip under ``name`` (once per process) and return ``name``.

    open_clip only takes configs as JSON files (``add_model_config``) and names them after the file stem; it reads
    them into its registry at once, so the temporary file is deleted right away.
    """
    import open_clip

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.json"
        path.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
        open_clip.add_model_config(path)
    if name not in open_clip.list_models():
        raise RuntimeError(f"open_clip did not register {name!r}")
    return name


def tiny_open_clip(name: str = TINY_OPEN_CLIP_NAME, seed: int = 0):
    """A tiny random open_clip CLIP model (64x64 images, 32-d embeddings), in eval mode on the CPU.

    Args:
        name: the model name to register the tiny config under (see :func:`register_tiny_open_clip`); after this
            call, ``open_clip.create_model_and_transforms(name)`` and ``open_clip.get_tokenizer(name)`` work too.
        seed: weights are a function of the seed.

    Returns:
        ``(model, preprocess, tokenizer)``: ``preprocess`` is open_clip's evaluation transform (PIL image -> tensor
        ``[3, 64, 64]``), ``tokenizer`` its ``SimpleTokenizer`` (list of strings -> ``[n, 77]`` token ids).
    """
    import open_clip

    register_tiny_open_clip(name)
    with _seeded(seed):
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face CLIP


def clip_bpe_tokenizer(model_max_length: int = 77):
    """OpenAI CLIP's BPE tokenizer as a ``transformers.CLIPTokenizer``, built from the vocabulary open_clip bundles.

    It tokenizes exactly as open_clip's ``SimpleTokenizer`` (and as ``openai/clip-vit-base-patch32``): same merges,
    same ids, ``<|startoftext|>`` = 49406 and ``<|endoftext|>`` = 49407 (also the padding token).
    """
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    simple = SimpleTokenizer()
    vocab = dict(simple.encoder)
    # open_clip names the two special tokens differently from OpenAI's (and HF's) vocab.json; same ids.
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    merges = [pair for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda item: item[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def tiny_hf_clip(save_dir: str | Path | None = None, seed: int = 0):
    """A tiny random ``transformers.CLIPModel`` (64x64 images, 32-d projections) and its ``CLIPProcessor``.

    Args:
        save_dir: when given, model and processor are saved there, so that ``CLIPModel.from_pretrained(save_dir)``
            and ``CLIPProcessor.from_pretrained(save_dir)`` (or the ``Auto*`` classes) load them offline.
        seed: weights are a function of the seed.

    Returns:
        ``(model, processor)``, the model in eval mode on the CPU.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = clip_bpe_tokenizer()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    # eos_token_id must be the real one: CLIP pools the text at the first eos (the legacy id 2 means argmax).
    text = {
        **small,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 77,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }
    vision = {**small, "image_size": TINY_IMAGE_SIZE, "patch_size": 16}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    return _hf_model(CLIPModel, config, processor, save_dir, seed)


# ---------------------------------------------------------------------------------------------------------------------
# Causal LM


def byte_tokenizer(chat_template: str = CHATML_TEMPLATE, model_max_length: int = 1024):
    """A byte-level tokenizer (every UTF-8 byte is a token, no merges) with ChatML special tokens.

    Ids: 0 ``<|endoftext|>`` (padding and unknown), 1 ``<|im_start|>`` (bos), 2 ``<|im_end|>`` (eos), then the 256
    bytes. Any text round-trips through ``encode``/``decode``, and the vocabulary (259) keeps the model tiny.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pad, bos, eos = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
    vocab = {token: i for i, token in enumerate([pad, bos, eos] + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=pad))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=pad,
        chat_template=chat_template,
        model_max_length=model_max_length,
    )


def tiny_causal_lm(save_dir: str | Path | None = None, seed: int = 0):
    """A tiny random Llama-style causal LM (hidden 64, 2 layers, 259-token byte vocabulary) and its tokenizer.

    The tokenizer is :func:`byte_tokenizer`, whose ChatML chat template makes ``apply_chat_template`` work; the
    model's generation config stops at ``<|im_end|>`` and pads with ``<|endoftext|>``.

    Args:
        save_dir: when given, both are saved there so that ``AutoModelForCausalLM.from_pretrained(save_dir)`` and
            ``AutoTokenizer.from_pretrained(save_dir)`` load them offline.
        seed: weights are a function of the seed.

    Returns:
        ``(model, tokenizer)``, the model in eval mode on the CPU.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return _hf_model(LlamaForCausalLM, config, tokenizer, save_dir, seed)


def _hf_model(model_class, config, preprocessor, save_dir: str | Path | None, seed: int):
    """``(model_class(config), preprocessor)``, the model's weights drawn from ``seed``, in eval mode; both saved to
    ``save_dir`` when given, so that transformers' ``from_pretrained(save_dir)`` loads them offline."""
    with _seeded(seed):
        model = model_class(config).eval()
    if save_dir is not None:
        model.save_pretrained(save_dir)
        preprocessor.save_pretrained(save_dir)
    return model, preprocessor
