"""The generation stage's config: the LLM backends' sections, the image the model sees, the grounding check."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

from visinstruct.configs.loader import opt
from visinstruct.configs.stages import ClipModelConfig, ComputeConfig, OutputConfig, _positive


@dataclass
class LocalLLMConfig:
    """A generation backend that runs the model inside the pipeline's workers (transformers, vllm)."""

    batch_size: int = opt(8, "prompts per batch")
    large_model: bool = opt(False, "share one model across the processes of a machine")
    accelerator: str | None = opt(
        None, "Beam resource hint for the generation step only, e.g. 'type:nvidia-l4;count:1;install-nvidia-driver'"
    )

    def __post_init__(self):
        _positive("batch_size", self.batch_size)


@dataclass
class TransformersLLMConfig(ComputeConfig, LocalLLMConfig):
    """The transformers backend: a local causal LM, where it runs (device, precision, threads) and its batches."""

    def __post_init__(self):
        ComputeConfig.__post_init__(self)
        LocalLLMConfig.__post_init__(self)


@dataclass
class OpenAIConfig:
    """The openai backend: an OpenAI-compatible server (vLLM, TGI, Ollama, hosted APIs) and how it is asked."""

    endpoint: str | None = opt(None, "base URL of the server, e.g. http://host:8000/v1; the openai backend needs it")
    api_key_env: str | None = opt("OPENAI_API_KEY", "environment variable holding the API key (never written)")
    concurrency: int = opt(8, "requests in flight per worker; a batch holds four rounds of them")
    timeout: float = opt(120.0, "seconds one request may take in all (connect, wait, read the answer)")
    retries: int = opt(3, "extra attempts on 429, 5xx, timeouts and connection errors")

    def __post_init__(self):
        for name in ("concurrency", "timeout"):
            _positive(name, getattr(self, name))
        _positive("retries", self.retries, allow_zero=True)


@dataclass
class VllmConfig(LocalLLMConfig):
    """The vllm backend: vLLM's offline engine in the workers (GPU), text or multimodal."""

    tensor_parallel_size: int = opt(1, "GPUs one engine spans")
    max_model_len: int | None = opt(None, "context length the engine reserves; null for the model's own")
    gpu_memory_utilization: float = opt(0.9, "share of each GPU's memory the engine may take")

    def __post_init__(self):
        super().__post_init__()
        _positive("tensor_parallel_size", self.tensor_parallel_size)
        _positive("max_model_len", self.max_model_len)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"'gpu_memory_utilization' must be within (0, 1], got {self.gpu_memory_utilization}")


@dataclass
class ImageConfig:
    """The image a vision model is shown (kinds with ``image: true`` in the templates, and re-captions)."""

    max_side: int = opt(672, "longest side in pixels; a larger image is resized (keeping its ratio) before sending")
    format: Literal["keep", "jpeg", "png", "webp"] = opt(
        "keep", "encoding sent; keep sends the shard's own bytes when they need no resize (no re-encode)"
    )
    quality: int = opt(90, "JPEG/WebP quality when the image is re-encoded")
    detail: Literal["auto", "low", "high"] = opt("auto", "OpenAI's image_url detail (openai backend)")
    max_pixels: int = opt(89_478_485, "the decompression-bomb guard: larger images are rejected unread")

    def __post_init__(self):
        _positive("max_side", self.max_side)
        _positive("max_pixels", self.max_pixels)
        if not 1 <= self.quality <= 100:
            raise ValueError(f"'quality' must be within 1-100, got {self.quality}")


@dataclass
class GroundingConfig:
    """The CLIP agreement check of replies from kinds that see the image: below ``threshold`` is ``low_grounding``."""

    threshold: float = opt(doc="the least mean CLIP score of a reply's sentences against its image")
    model: ClipModelConfig | None = opt(
        None, "the scoring model; null in a build takes the filter's (a standalone generate must name one)"
    )

    def __post_init__(self):
        if not -1 <= self.threshold <= 1:
            raise ValueError(f"'threshold' is a cosine similarity, within -1-1; got {self.threshold}")


# Each backend with keys of its own, and the class of its section (``generate.<backend>``).
_BACKEND_SECTIONS: dict[str, type] = {
    "transformers": TransformersLLMConfig,
    "vllm": VllmConfig,
    "openai": OpenAIConfig,
}
_DEFAULT_BACKEND = "transformers"
_ONE_BACKEND = {
    **dict.fromkeys(("endpoint", "api_key_env", "concurrency", "timeout", "retries"), "openai"),
    **dict.fromkeys(("device", "precision", "threads"), "transformers"),
    **dict.fromkeys(("tensor_parallel_size", "max_model_len", "gpu_memory_utilization"), "vllm"),
}
_OPENAI_INSTEAD = {  # a local model's key, with the openai backend (no model in the workers)
    "batch_size": "openai batches are 4 x '{section}openai.concurrency' requests: set that instead",
    "large_model": "the openai backend loads no model in the workers: remove it",
    "accelerator": "the openai backend loads no model in the workers (the server has the GPU): remove it",
}


def _local_model_key(key: str) -> Callable[[dict], str]:
    """The advice for a flat ``batch_size``/``large_model``/``accelerator``: where it goes with the chosen backend.

    Only the chosen backend's section is accepted, so the advice names that one; advice that then fails (moving
    it to a section the backend refuses) would be worse than none.
    """

    def advice(data: dict) -> str:
        backend = data.get("backend", _DEFAULT_BACKEND)
        if backend in ("transformers", "vllm"):
            return f"the {backend} backend's own keys sit in its section: move it to '{{section}}{backend}.{key}'"
        if backend == "openai":
            return _OPENAI_INSTEAD[key]
        if backend == "caption_only":
            return "the caption_only backend runs no model: remove it"
        places = " or ".join(f"'{{section}}{b}.{key}'" for b in ("transformers", "vllm"))
        return f"only the transformers and vllm backends use it: move it to {places}"

    return advice


@dataclass
class GenerateConfig:
    """``visinstruct generate``: LLaVA-style conversations with an LLM, from captions and boxes or from the image.

    Keys every LLM backend honours sit at the top; a backend's own keys sit in its section (``openai:``,
    ``transformers:``, ``vllm:``), and only the chosen backend's section is accepted.
    """

    REFUSED: ClassVar[dict[str, str | Callable[[dict], str]]] = {
        **{k: f"only the {b} backend uses it: move it to '{{section}}{b}.{k}'" for k, b in _ONE_BACKEND.items()},
        **{k: _local_model_key(k) for k in ("batch_size", "large_model", "accelerator")},
    }

    backend: Literal["transformers", "vllm", "openai", "caption_only"] = opt(
        _DEFAULT_BACKEND, "LLM backend; caption_only writes stage-1 data with no LLM"
    )
    model: str = opt("HuggingFaceTB/SmolLM2-135M-Instruct", "hub id, local folder, .gguf file, or the server's model")
    templates: str | None = opt(None, "prompt template YAML; null for the bundled configs/prompts/llava.yaml")
    kinds: dict[str, float] = opt(
        factory=lambda: {"conversation": 1.0, "detailed": 1.0, "complex_reasoning": 1.0},
        doc="conversation kinds and their sampling weights",
    )
    llm_fraction: float = opt(
        1.0, "share of samples sent to the LLM (a stable subset); the rest get caption-only data"
    )
    max_new_tokens: int = opt(384, "completion length bound")
    temperature: float = opt(0.7, "sampling temperature; 0 for greedy")
    top_p: float = opt(0.9, "nucleus sampling")
    seed: int = opt(0, "base seed; each sample's seed derives from it and the sample key")
    retry_new_seed: bool = opt(True, "ask once more, with another seed, when a reply is rejected (sampling only)")
    min_chars: int = opt(2, "shortest accepted turn")
    max_chars: int = opt(2000, "longest accepted turn")
    per_image: int = opt(
        1, "kinds asked per image (distinct, drawn by weight); their turns join into one multi-turn row"
    )
    recaption_first: bool = opt(
        False, "two passes: the model re-captions each image, and text-only kinds read that re-caption"
    )
    recaption_caption: Literal["keep", "replace", "extend"] = opt(
        "keep",
        "what a kept re-caption does to the sample's caption: keep the web caption, replace it (the web caption "
        "moves to captions), or extend it (the web caption, then the re-caption)",
    )
    image: ImageConfig = opt(factory=ImageConfig, doc="the image a vision model is shown")
    grounding: GroundingConfig | None = opt(None, "CLIP agreement check of replies that saw the image; null: off")
    cache_dir: str | None = opt(None, "persistent response cache; reruns reuse answers")
    transformers: TransformersLLMConfig | None = opt(
        None, "the transformers backend's keys (backend: transformers only)"
    )
    vllm: VllmConfig | None = opt(None, "the vllm backend's keys (backend: vllm only)")
    openai: OpenAIConfig | None = opt(None, "the openai backend's keys (backend: openai only)")
    input: str | None = opt(None, "input shards (standalone runs): a folder, glob or brace pattern of tars")
    write: OutputConfig | None = opt(None, "output shards (standalone runs)")

    def __post_init__(self):
        if not self.kinds or any(w < 0 for w in self.kinds.values()) or sum(self.kinds.values()) <= 0:
            raise ValueError("'kinds' needs at least one kind with a positive weight")
        for name in ("max_new_tokens", "max_chars", "per_image"):
            _positive(name, getattr(self, name))
        if not 0 <= self.llm_fraction <= 1:
            raise ValueError(f"'llm_fraction' must be within 0-1, got {self.llm_fraction}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("'temperature' must be >= 0 and 'top_p' within (0, 1]")
        for name, cls in _BACKEND_SECTIONS.items():
            if name != self.backend and getattr(self, name) is not None:
                raise ValueError(
                    f"'{name}' holds the {name} backend's keys and the backend is {self.backend}: remove it"
                )
            if name == self.backend and getattr(self, name) is None:
                setattr(self, name, cls())  # the chosen backend's section, its defaults when not given

    @property
    def local(self) -> LocalLLMConfig | None:
        """The chosen backend's section when it runs the model in the workers (transformers, vllm), else None."""
        return self.transformers or self.vllm
