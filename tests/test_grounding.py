"""The grounding check: a reply's score is the mean CLIP score of its sentences against its image, computed as the
model computes it directly, whatever else shares the batch; blank replies are NaN and never pass."""

import functools
import io
import math
import pickle

import pytest
import torch

from visinstruct.configs import ClipModelConfig, GroundingConfig, ImageConfig
from visinstruct.testing import sample_data
from visinstruct.testing.tiny_models import TINY_OPEN_CLIP_NAME, tiny_open_clip
from visinstruct.transforms.grounding import MAX_WORDS, GroundingScorer, passes, sentences
from visinstruct.transforms.vision import PreparedImage, prepare_image

REPLIES = [
    "A red circle sits on the left. Next to it is a blue square!\nIs there a triangle? No.",
    "Two shapes.",
    "The picture shows a green triangle above a yellow square. The background is white. Nothing else is there.",
]


@pytest.fixture(scope="module")
def scorer(tiny_checkpoint) -> GroundingScorer:
    model = ClipModelConfig(
        name=TINY_OPEN_CLIP_NAME,
        pretrained=str(tiny_checkpoint / "tiny.pt"),
        config_file=str(tiny_checkpoint / f"{TINY_OPEN_CLIP_NAME}.json"),
        max_batch_size=4,  # smaller than the 9 sentences of REPLIES: chunks cut across items
    )
    return GroundingScorer(GroundingConfig(threshold=0.0, model=model))


@pytest.fixture(scope="module")
def images() -> list[PreparedImage]:
    prepared = []
    for sample in sample_data.shapes_samples(len(REPLIES), seed=3):
        buf = io.BytesIO()
        sample["image"].save(buf, "PNG")
        prepared.append(prepare_image(buf.getvalue(), ImageConfig()))
    return prepared


@functools.cache
def checkpoint_model():
    """The model the checkpoint was saved from (``tiny_checkpoint``), with its transform and tokenizer."""
    return tiny_open_clip(seed=7)


def direct_scores(image: PreparedImage, texts: list[str]) -> list[float]:
    """Cosine similarity of each text with the image, straight from the model, one image and no batching code."""
    model, preprocess, tokenizer = checkpoint_model()
    with torch.no_grad():
        a = torch.nn.functional.normalize(model.encode_image(preprocess(image.pil()).unsqueeze(0)), dim=-1)
        b = torch.nn.functional.normalize(model.encode_text(tokenizer(texts)), dim=-1)
    return (a * b).sum(dim=-1).tolist()


def test_sentences_split_on_terminators_and_line_breaks_and_drop_empty_pieces():
    text = "  A red   circle.  Is it big?Yes!\n\nIt is 3.5 cm wide...  \n - \n"
    assert sentences(text) == ["A red circle.", "Is it big?Yes!", "It is 3.5 cm wide..."]
    assert sentences("One. Two. Three. Four.", limit=2) == ["One.", "Two."]


def test_sentences_are_cut_to_what_clip_reads_and_a_reply_without_one_is_scored_whole():
    long = " ".join(f"w{i}" for i in range(200)) + ". Short one."
    first, second = sentences(long)
    assert first.split() == [f"w{i}" for i in range(MAX_WORDS)] and second == "Short one."
    assert sentences("...  !?") == ["... !?"]
    assert sentences("") == sentences(" \n ") == []


def test_a_reply_scores_the_mean_of_its_sentence_scores_as_the_model_computes_them(scorer, images):
    got = scorer.scores(list(zip(images, REPLIES)))
    for image, reply, score in zip(images, REPLIES, got):
        per_sentence = direct_scores(image, sentences(reply))
        assert abs(score - sum(per_sentence) / len(per_sentence)) < 1e-5
    first = direct_scores(images[0], sentences(REPLIES[0]))
    assert min(first) + 1e-3 < got[0] < max(first) - 1e-3  # a mean, not the worst or best sentence


def test_a_reply_scores_the_same_alone_or_among_others(scorer, images):
    together = scorer.scores(list(zip(images, REPLIES)))
    alone = [scorer.scores([(image, reply)])[0] for image, reply in zip(images, REPLIES)]
    reversed_ = scorer.scores(list(zip(images[::-1], REPLIES[::-1])))[::-1]
    for a, b, c in zip(together, alone, reversed_):
        assert abs(a - b) < 1e-5 and abs(a - c) < 1e-5


def test_a_blank_reply_is_nan_and_never_passes(scorer, images):
    got = scorer.scores([(images[0], ""), (images[1], REPLIES[1]), (images[2], "  \n")])
    assert math.isnan(got[0]) and math.isnan(got[2]) and not math.isnan(got[1])
    assert not passes(got[0], -1.0) and not GroundingScorer.passes(got[2], -math.inf)


def test_the_threshold_passes_exactly_the_replies_scoring_at_least_it(scorer, images):
    items = [(image, reply) for image in images for reply in REPLIES]  # every reply against every image
    got = scorer.scores(items)
    assert all(passes(s, -1.0) for s in got) and not any(passes(s, 1.0) for s in got)
    direct = [sum(d) / len(d) for d in (direct_scores(image, sentences(reply)) for image, reply in items)]
    ranked = sorted(direct)
    gaps = [(ranked[i + 1] - ranked[i], i) for i in range(len(ranked) - 1)]
    gap, i = max(gaps)  # a threshold far from every score, so rounding cannot decide a case
    assert gap > 1e-4, f"scores too close to split: {ranked}"
    threshold = (ranked[i] + ranked[i + 1]) / 2
    assert [passes(s, threshold) for s in got] == [d >= threshold for d in direct]
    assert 0 < sum(passes(s, threshold) for s in got) < len(got)
    # the image matters: the same reply scores differently against different images
    assert len({round(s, 6) for s in got[0 :: len(REPLIES)]}) == len(images)


def test_a_scorer_pickles_without_its_model_and_scores_the_same_after(scorer, images):
    before = scorer.scores([(images[0], REPLIES[0])])
    copy = pickle.loads(pickle.dumps(scorer))
    assert copy.cfg == scorer.cfg and copy._model is None
    assert abs(copy.scores([(images[0], REPLIES[0])])[0] - before[0]) < 1e-6
