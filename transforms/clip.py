"""CLIP scoring through Beam's RunInference: model handlers for open_clip and transformers CLIP/SigLIP.

A handler scores ``(image_tensor, caption)`` examples: the cosine similarity of the normalised image and text
embeddings, optionally with the embeddings themselves. Images arrive already decoded and preprocessed (see
:class:`~visinstruct.transforms.filter_stages.DecodeForClip`, which does it on a thread pool ahead of the
model); :meth:`ClipHandler.preprocessor` gives that stage the model's own transform without loading weights.

Beam does the batching (``min_batch_size``/``max_batch_size``), shares one model per process across threads,
and with ``model_copies`` (or ``large_model``) across processes, as Dataflow runs several per VM.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from visinstruct.configs import ClipModelConfig
from visinstruct.transforms.devices import device_type, pick_device, pick_dtype
from visinstruct.transforms.timing import busy

log = logging.getLogger(__name__)
Example = tuple[np.ndarray, str]  # (preprocessed image, CHW float32; caption)


@dataclass(frozen=True)
class ClipOutput:
    """What a handler returns per example."""

    score: float
    image_embedding: np.ndarray | None = None
    text_embedding: np.ndarray | None = None
    error: str | None = None  # why this example alone could not be scored (then ``score`` is NaN)


def cosine_scores(image_features, text_features) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row-wise cosine similarity of two feature batches; returns numpy arrays (scores float64).

    Each row is normalised and reduced on its own in float64 on the CPU (MPS has no float64), so this step adds no
    rounding that depends on the batch: only the model's batched matrix products do (about 1e-7 in float32; tests
    bound it at 1e-6).
    """
    import torch

    image = torch.nn.functional.normalize(image_features.detach().cpu().to(torch.float64), dim=-1)
    text = torch.nn.functional.normalize(text_features.detach().cpu().to(torch.float64), dim=-1)
    scores = (image * text).sum(dim=-1)
    return scores.numpy(), image.float().numpy(), text.float().numpy()


class ClipHandler(ModelHandler[Example, ClipOutput, Any]):
    """Shared machinery: device, precision, threads, batching, embeddings on request."""

    def __init__(self, cfg: ClipModelConfig, with_embeddings: bool = False, stage: str = "filter"):
        super().__init__(
            min_batch_size=cfg.min_batch_size,
            max_batch_size=cfg.max_batch_size,
            large_model=cfg.large_model,
            model_copies=cfg.model_copies,
        )
        self.cfg, self.with_embeddings, self.stage = cfg, with_embeddings, stage  # stage: whose busy time it is

    # Subclasses: build the model (on self.device, eval mode), encode images and texts.
    def _build(self, device: str) -> Any:
        raise NotImplementedError

    def _encode(self, model: Any, images, texts: list[str]):
        raise NotImplementedError

    def preprocessor(self) -> Callable:
        """A picklable ``PIL.Image -> CHW float32 numpy`` transform matching the model, without its weights."""
        raise NotImplementedError

    def load_model(self) -> Any:
        import torch

        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        device = pick_device(self.cfg.device)
        model = self._build(device)
        model.eval()
        model.visinstruct_device = device
        log.info("loaded CLIP %s (%s) on %s", self.cfg.name, self.cfg.pretrained, device)
        return model

    def run_inference(self, batch: Sequence[Example], model: Any, inference_args=None) -> Iterable[PredictionResult]:
        with busy(self.stage):
            try:
                outputs = self._score(batch, model)
            except Exception:  # one example (a caption the tokenizer chokes on...) fails its batch
                if len(batch) == 1:
                    raise
                log.warning("a batch of %d failed; scoring its examples one by one", len(batch), exc_info=True)
                outputs = [self._score_alone(example, model) for example in batch]
        for example, output in zip(batch, outputs):
            yield PredictionResult(example, output, self.model_id())

    def _score(self, batch: Sequence[Example], model: Any) -> list[ClipOutput]:
        import torch

        device = model.visinstruct_device
        dtype = pick_dtype(self.cfg.precision, device)
        images = torch.from_numpy(np.stack([image for image, _ in batch])).to(device)
        texts = [caption for _, caption in batch]
        autocast = torch.autocast(device_type=device_type(device), dtype=dtype, enabled=dtype != torch.float32)
        with torch.inference_mode(), autocast:
            image_features, text_features = self._encode(model, images, texts)
        scores, image_emb, text_emb = cosine_scores(image_features, text_features)
        embed = self.with_embeddings
        return [
            ClipOutput(
                float(scores[i]),
                image_emb[i].astype(np.float16) if embed else None,
                text_emb[i].astype(np.float16) if embed else None,
            )
            for i in range(len(batch))
        ]

    def _score_alone(self, example: Example, model: Any) -> ClipOutput:
        """One example of a failed batch, so that only the examples that fail alone are lost."""
        try:
            return self._score([example], model)[0]
        except Exception as e:  # this example's failure becomes its dead-letter row
            return ClipOutput(math.nan, error=f"{type(e).__name__}: {e}"[:500])

    def model_id(self) -> str:
        return f"{self.cfg.name}:{self.cfg.pretrained}" if self.cfg.pretrained else self.cfg.name

    def get_metrics_namespace(self) -> str:
        return "clip"


class _OpenClipPreprocess:
    """Picklable wrapper around open_clip's eval transform (built lazily in each worker)."""

    def __init__(self, size, mean, std, resize_mode):
        self.args, self._transform = (size, mean, std, resize_mode), None

    def __call__(self, image) -> np.ndarray:
        if self._transform is None:
            import open_clip

            size, mean, std, resize_mode = self.args
            self._transform = open_clip.image_transform(
                size, is_train=False, mean=mean, std=std, resize_mode=resize_mode
            )
        return self._transform(image).numpy()

    def __getstate__(self):
        return {"args": self.args, "_transform": None}


class OpenClipHandler(ClipHandler):
    """Any open_clip architecture, with a pretrained tag, a local checkpoint path, or random weights (None).

    ``cfg.config_file`` registers a model config JSON first (custom architectures such as those
    ``visinstruct train-clip`` writes); open_clip names it after the file stem, which must equal ``cfg.name``.
    """

    def _register(self) -> None:
        if self.cfg.config_file:
            import open_clip

            stem = os.path.splitext(os.path.basename(self.cfg.config_file))[0]
            if stem != self.cfg.name:
                raise ValueError(
                    f"model.config_file must be named {self.cfg.name}.json (open_clip names models "
                    f"after the file), got {self.cfg.config_file}"
                )
            open_clip.add_model_config(self.cfg.config_file)

    def preprocessor(self) -> Callable:
        import open_clip

        self._register()
        config = open_clip.get_model_config(self.cfg.name)
        if config is None:
            raise ValueError(f"open_clip knows no model {self.cfg.name!r} (set model.config_file for a custom one)")
        pretrained_cfg = {}
        if self.cfg.pretrained and not os.path.exists(self.cfg.pretrained):
            pretrained_cfg = open_clip.get_pretrained_cfg(self.cfg.name, self.cfg.pretrained) or {}
        vision = config.get("vision_cfg", {})
        mean = pretrained_cfg.get("mean") or vision.get("image_mean") or open_clip.OPENAI_DATASET_MEAN
        std = pretrained_cfg.get("std") or vision.get("image_std") or open_clip.OPENAI_DATASET_STD
        resize_mode = pretrained_cfg.get("resize_mode") or vision.get("image_resize_mode") or "shortest"
        return _OpenClipPreprocess(vision.get("image_size", 224), tuple(mean), tuple(std), resize_mode)

    def _build(self, device: str):
        import open_clip

        self._register()
        model = open_clip.create_model(self.cfg.name, pretrained=self.cfg.pretrained, device=device)
        model.visinstruct_tokenizer = open_clip.get_tokenizer(self.cfg.name)
        return model

    def _encode(self, model, images, texts):
        tokens = model.visinstruct_tokenizer(texts).to(images.device)
        return model.encode_image(images), model.encode_text(tokens)


class _HfPreprocess:
    def __init__(self, name: str):
        self.name, self._processor = name, None

    def __call__(self, image) -> np.ndarray:
        if self._processor is None:
            from transformers import AutoImageProcessor

            self._processor = AutoImageProcessor.from_pretrained(self.name)
        return self._processor(images=image, return_tensors="np")["pixel_values"][0].astype(np.float32)

    def __getstate__(self):
        return {"name": self.name, "_processor": None}


class HfClipHandler(ClipHandler):
    """transformers CLIP or SigLIP (``AutoModel``) by hub id or local path."""

    def preprocessor(self) -> Callable:
        return _HfPreprocess(self.cfg.name)

    def _build(self, device: str):
        from transformers import AutoModel, AutoTokenizer

        model = AutoModel.from_pretrained(self.cfg.name).to(device)
        model.visinstruct_tokenizer = AutoTokenizer.from_pretrained(self.cfg.name)
        return model

    def _encode(self, model, images, texts):
        tokenizer = model.visinstruct_tokenizer
        # SigLIP was trained on max_length padding and pools differently without it; CLIP does not mind.
        tokens = tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt").to(images.device)
        image = model.get_image_features(pixel_values=images.to(model.dtype))
        text = model.get_text_features(**tokens)
        return _features(image), _features(text)


def _features(output):
    """transformers 5 may return a ModelOutput where 4.x returned a tensor."""
    return output if hasattr(output, "float") else output.pooler_output


def make_handler(cfg: ClipModelConfig, with_embeddings: bool = False, stage: str = "filter") -> ClipHandler:
    return {"open_clip": OpenClipHandler, "transformers": HfClipHandler}[cfg.backend](cfg, with_embeddings, stage)
