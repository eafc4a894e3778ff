"""The generation backends behind one interface: ``generate(requests) -> results``, one result per request, in order.

A backend never raises per sample: what one row's result handling raises becomes that row's ``internal_error``
result (:func:`per_sample`). Each result carries its ``finish_reason`` (``"length"`` when the answer was cut at the
token limit).

- ``transformers``: any causal LM by hub id, local folder or ``.gguf`` file, its chat template, batched
  generation; with ``vision`` (a kind sees the image), any image-text-to-text model (LLaVA-family, including the
  checkpoints ``visinstruct train`` writes) through its processor. Sampling is seeded per sample (each row draws
  from its own generator), so a sample's answer does not depend on which samples share its batch;
- ``vllm``: the vllm package on GPU workers, with per-request seeds, images through ``LLM.chat``;
- ``openai``: any OpenAI-compatible endpoint (:mod:`visinstruct.transforms.llm_openai`), images as data URIs.

A request's image is a placeholder in its messages and a :class:`~visinstruct.transforms.vision.PreparedImage`
beside them (``ChatRequest.image``); each backend renders it (:mod:`visinstruct.transforms.vision`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial

from visinstruct.configs import GenerateConfig, VllmConfig
from visinstruct.schemas import IMAGE_TOKEN, Dropped, Rejection
from visinstruct.transforms.devices import pick_device, pick_dtype
from visinstruct.transforms.guard import guarded
from visinstruct.transforms.llm_openai import ChatRequest, ChatResult, OpenAIChatClient
from visinstruct.transforms.vision import count_images, openai_messages, text_messages, user_parts

STAGE = "generate"


class TransformersBackend:
    """A local causal LM: batched generation with its chat template, CPU or GPU.

    With ``vision``, an image-text-to-text model and its processor instead (:class:`VisionModel`).
    """

    def __init__(self, cfg: GenerateConfig, vision: bool = False):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg, local = cfg, cfg.transformers
        if local.threads:
            import torch

            torch.set_num_threads(local.threads)
        device = pick_device(local.device)
        dtype = pick_dtype(local.precision, device)
        self.vision = VisionModel(cfg.model, device, dtype) if vision else None
        if self.vision is not None:
            return
        source, extra = cfg.model, {}
        if cfg.model.endswith(".gguf"):  # transformers reads GGUF (with the gguf package) from its folder
            source, extra = os.path.dirname(cfg.model) or ".", {"gguf_file": os.path.basename(cfg.model)}
        self.tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        self.tokenizer.padding_side = "left"  # generation continues from the right end of every row
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra).to(device).eval()
        self.device = device
        self.stops = _stop_ids(self.tokenizer.eos_token_id, self.model.generation_config.eos_token_id)

    def generate(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:

        if self.vision is not None:
            return self.vision.generate(requests)
        texts = [
            self.tokenizer.apply_chat_template(r.messages, tokenize=False, add_generation_prompt=True)
            for r in requests
        ]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        out = generate_tokens(self.model, batch, requests, self.tokenizer.pad_token_id)
        width = batch["input_ids"].shape[1]

        def result(i: int, request: ChatRequest) -> ChatResult:
            new, finish = _cut(out[i, width:].tolist(), self.stops, request.max_tokens)
            text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
            return ChatResult(
                request.key,
                text,
                int(batch["attention_mask"][i].sum()),
                len(new),
                None if text else "empty_completion",
                None if text else "empty reply",
                finish_reason=finish,
            )

        return per_sample(requests, result)


class VisionModel:
    """An image-text-to-text model (LLaVA-family) and its processor, from a hub id or a local folder.

    Rows with an image and text-only rows share a batch when the processor takes a batch with fewer images than
    rows (LLaVA's does); otherwise each group is generated on its own. Either way a row's answer depends on its own
    prompt, image and seed only (left padding, :class:`PerRowSampler`), so the grouping never shows in the results.
    """

    def __init__(self, source: str, device, dtype):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if source.endswith(".gguf"):
            raise ValueError(f"{source}: a kind that sees the image needs a vision model folder or hub id, not GGUF")
        self.processor = AutoProcessor.from_pretrained(source)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # generation continues from the right end of every row
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype).to(device).eval()
        self.device, self.dtype = device, dtype
        self.stops = _stop_ids(self.tokenizer.eos_token_id, self.model.generation_config.eos_token_id)
        self.image_token = getattr(self.processor, "image_token", None) or IMAGE_TOKEN
        config = self.model.config
        token_id = getattr(config, "image_token_id", None)
        self.image_token_id = token_id if token_id is not None else getattr(config, "image_token_index", None)
        if self.image_token_id is None:
            self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.parts: bool | None = None  # how prompts are rendered: decided on first use (:meth:`render`)
        self.mixes = True  # whether image rows and text rows share a batch; False once the processor refuses

    def render(self, messages: list[dict]) -> str:
        """The prompt text of ``messages``, image placeholders included.

        The processor's chat template takes the placeholders as content parts when it understands them: the first
        call checks that a rendered user turn holds the image token exactly once. Templates that read string
        contents only (ChatML, as the checkpoints ``visinstruct train`` writes) get :func:`text_messages`, the image
        token on its own line, through the tokenizer's template instead, as training rendered them.
        """
        if self.parts is None:
            self.parts = self._template_reads_parts()
        if self.parts:
            as_parts = [
                {**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m["content"], str) else m
                for m in messages
            ]
            return self.processor.apply_chat_template(as_parts, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.apply_chat_template(
            text_messages(messages, self.image_token), tokenize=False, add_generation_prompt=True
        )

    def _template_reads_parts(self) -> bool:
        probe = [{"role": "user", "content": user_parts("Describe the image.")}]
        try:
            text = self.processor.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        except Exception:  # no template, or one that concatenates the content as a string
            return False
        return isinstance(text, str) and text.count(self.image_token) == 1

    def generate(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        prepared = [guarded(STAGE, partial(_row_image, r), r.key) for r in requests]  # Rejection: failed alone
        rows = [i for i, p in enumerate(prepared) if not isinstance(p, Rejection)]
        with_image = [i for i in rows if prepared[i] is not None]
        text_only = [i for i in rows if prepared[i] is None]
        done: dict[int, tuple] = {}
        if with_image and text_only and self.mixes:
            try:
                done.update(self._generate_rows(requests, prepared, rows))
            except (ValueError, TypeError):  # the processor wants an image in every row: one group at a time
                self.mixes = False
        if not done:
            for group in (with_image, text_only):
                if group:
                    done.update(self._generate_rows(requests, prepared, group))

        def result(i: int, request: ChatRequest) -> ChatResult:
            if isinstance(prepared[i], Rejection):
                return ChatResult(request.key, reason=prepared[i].reason, message=prepared[i].message)
            new, prompt_tokens, image_tokens = done[i]
            new, finish = _cut(new, self.stops, request.max_tokens)
            text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
            return ChatResult(
                request.key,
                text,
                prompt_tokens,
                len(new),
                None if text else "empty_completion",
                None if text else "empty reply",
                finish_reason=finish,
                image_tokens=image_tokens,
            )

        return per_sample(requests, result)

    def _generate_rows(self, requests: Sequence[ChatRequest], images: list, rows: list[int]) -> dict[int, tuple]:
        """One batch of ``rows``: for each, ``(generated token ids, prompt tokens, image tokens or None)``."""

        chosen = [requests[i] for i in rows]
        pictures = [images[i] for i in rows if images[i] is not None]
        batch = self.processor(
            text=[self.render(r.messages) for r in chosen],
            images=pictures or None,
            padding=True,
            add_special_tokens=False,  # the chat template holds every special token the model expects
            return_tensors="pt",
        )
        batch = batch.to(self.device)
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        out = generate_tokens(self.model, batch, chosen, self.tokenizer.pad_token_id)
        ids, width = batch["input_ids"], batch["input_ids"].shape[1]
        return {
            i: (
                out[row, width:].tolist(),
                int(batch["attention_mask"][row].sum()),
                int((ids[row] == self.image_token_id).sum()) if images[i] is not None else None,
            )
            for row, i in enumerate(rows)
        }


def generate_tokens(model, batch, requests: Sequence[ChatRequest], pad_token_id: int):
    """``model.generate`` on one left-padded batch: greedy, or every row sampled from its own seed
    (:class:`PerRowSampler`), up to the longest ``max_tokens`` of the batch (each row is cut to its own later)."""
    import torch
    from transformers import LogitsProcessorList

    sampler = PerRowSampler([r.seed or 0 for r in requests], requests[0].temperature, requests[0].top_p)
    with torch.inference_mode():
        return model.generate(
            **batch,
            max_new_tokens=max(r.max_tokens for r in requests),
            do_sample=False,
            logits_processor=LogitsProcessorList([sampler]) if sampler.active else None,
            pad_token_id=pad_token_id,
        )


def _row_image(request: ChatRequest):
    """The request's image decoded (None for a text-only request), or, for bytes that do not decode, the sample's
    rejection with the image's own reason (``truncated``, ``decode_error``...); a placeholder without an image, or
    an image without its placeholder, is a malformed request (raises)."""
    placeholders = count_images(request.messages)
    if placeholders != (0 if request.image is None else 1):
        image = "an image" if request.image is not None else "no image"
        raise ValueError(f"a request with {image} holds {placeholders} image placeholders")
    if request.image is None:
        return None
    try:
        return request.image.pil()
    except Dropped as e:
        return e.decision.rejection(STAGE, request.key)


def _stop_ids(*ids) -> frozenset[int]:
    """Token ids that end a generation: the tokenizer's EOS and the model's (an int or a list, or None)."""
    flat = [i for v in ids for i in (v if isinstance(v, (list, tuple)) else [v])]
    return frozenset(i for i in flat if isinstance(i, int))


def _cut(tokens: list[int], stops: frozenset[int], limit: int) -> tuple[list[int], str]:
    """A row's answer tokens and finish reason: ``stop`` at a stop token, ``length`` when it ran to ``limit``."""
    end = next((i for i, t in enumerate(tokens[:limit]) if t in stops), None)
    if end is not None:
        return tokens[:end], "stop"
    return tokens[:limit], "length" if len(tokens) >= limit else "stop"


def per_sample(requests: Sequence[ChatRequest], make: Callable[[int, ChatRequest], ChatResult]) -> list[ChatResult]:
    """``make(i, request)`` for every request; what one row raises becomes that row's ``internal_error`` result."""
    results = []
    for i, request in enumerate(requests):
        out = guarded(STAGE, partial(make, i, request), request.key)
        results.append(
            out if isinstance(out, ChatResult) else ChatResult(request.key, reason=out.reason, message=out.message)
        )
    return results


class PerRowSampler:
    """Temperature/top-p sampling with one generator per row, as a logits processor under greedy search.

    Each step it draws a token per row from that row's own ``torch.Generator`` and leaves only that token
    possible, so greedy search picks it. A row's tokens depend on its seed alone, not on its batch.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.active = temperature > 0
        self.temperature, self.top_p = temperature, top_p
        if self.active:
            import torch

            self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids, scores):
        import torch

        probs = torch.softmax(scores.float() / self.temperature, dim=-1).cpu()
        out = torch.full_like(scores, float("-inf"))
        for row, generator in enumerate(self.generators):
            p, order = probs[row].sort(descending=True)
            keep = p.cumsum(0) - p < self.top_p  # the smallest prefix whose mass reaches top_p
            token = order[keep][torch.multinomial(p[keep], 1, generator=generator)]
            out[row, token] = 0.0
        return out


class VllmBackend:
    """vLLM on a GPU worker (``pip install visinstruct[gpu]``); seeds are per request.

    All requests go through ``LLM.chat``, image placeholders as OpenAI ``image_url`` data URIs (which vLLM's chat
    reads); with ``vision`` the engine takes one image per prompt.
    """

    def __init__(self, cfg: GenerateConfig, vision: bool = False):
        try:
            from vllm import LLM
        except ImportError:
            raise ImportError("backend 'vllm' needs the gpu extra: pip install 'visinstruct[gpu]'") from None
        engine = cfg.vllm or VllmConfig()
        self.cfg, self.vision = cfg, vision
        self.llm = LLM(
            model=cfg.model,
            seed=cfg.seed,
            tensor_parallel_size=engine.tensor_parallel_size,
            max_model_len=engine.max_model_len,
            gpu_memory_utilization=engine.gpu_memory_utilization,
            **({"limit_mm_per_prompt": {"image": 1}} if vision else {}),
        )
        self.image_token_id = _image_token_id(self.llm) if vision else None

    def generate(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        from vllm import SamplingParams

        params = [
            SamplingParams(temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens, seed=r.seed)
            for r in requests
        ]
        detail = self.cfg.image.detail
        messages = [openai_messages(r.messages, r.image, detail) for r in requests]
        outputs = self.llm.chat(messages, params, use_tqdm=False)
        if len(outputs) != len(requests):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(requests)} requests")

        def result(i: int, request: ChatRequest) -> ChatResult:
            completion = outputs[i].outputs[0]
            text = completion.text.strip()
            prompt = list(outputs[i].prompt_token_ids or [])
            counted = request.image is not None and self.image_token_id is not None
            # vLLM's finish_reason is "stop" or "length", as OpenAI's (CompletionOutput.finish_reason)
            return ChatResult(
                request.key,
                text,
                len(prompt),
                len(completion.token_ids),
                None if text else "empty_completion",
                None if text else "empty reply",
                finish_reason=completion.finish_reason,
                image_tokens=prompt.count(self.image_token_id) if counted else None,
            )

        return per_sample(requests, result)


def _image_token_id(llm) -> int | None:
    """The id of the image token the engine expands in a prompt (one per image feature), from the model's
    Hugging Face config as the engine holds it; None when this vLLM does not expose it (image_tokens unknown)."""
    hf_config = getattr(getattr(getattr(llm, "llm_engine", None), "model_config", None), "hf_config", None)
    for name in ("image_token_id", "image_token_index"):
        value = getattr(hf_config, name, None)
        if isinstance(value, int):
            return value
    return None


class OpenAIBackend:
    """Any OpenAI-compatible endpoint, with bounded concurrency and retries (see ``llm_openai``)."""

    def __init__(self, cfg: GenerateConfig, vision: bool = False):
        self.cfg, server = cfg, cfg.openai
        if not server.endpoint:
            raise ValueError("backend 'openai' needs openai.endpoint (e.g. http://127.0.0.1:8000/v1)")
        self.client = OpenAIChatClient(
            server.endpoint,
            cfg.model,
            api_key_env=server.api_key_env,
            timeout=server.timeout,
            retries=server.retries,
            concurrency=server.concurrency,
        )

    def generate(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        detail = self.cfg.image.detail
        rendered = [replace(r, messages=openai_messages(r.messages, r.image, detail), image=None) for r in requests]
        return self.client.complete_all(rendered)


BACKENDS = {"transformers": TransformersBackend, "vllm": VllmBackend, "openai": OpenAIBackend}
