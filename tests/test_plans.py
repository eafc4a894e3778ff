"""What generation asks per sample: kinds per image, two passes, the image sent, and how parts join into one row."""

import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from visinstruct.configs import ConfigError, GenerateConfig, ImageConfig, from_dict
from visinstruct.schemas import IMAGE_TOKEN, Decision, SampleMeta, Turn, conversation_problems
from visinstruct.transforms.conversations import copies_caption
from visinstruct.transforms.generate_stages import join_turns, judge_reply
from visinstruct.transforms.llm import PartReply, Reply, judge_result
from visinstruct.transforms.llm_openai import ChatResult
from visinstruct.transforms.plans import (
    RECAPTION,
    Plan,
    after_recaption,
    check_kinds,
    plan_parts,
    sample_sees_image,
    with_caption,
)
from visinstruct.transforms.prompts import choose_kind, choose_kinds, load_templates, request_fingerprint
from visinstruct.transforms.vision import (
    count_images,
    image_fingerprint,
    openai_messages,
    prepare_image,
    text_messages,
)

TEMPLATES = load_templates()
META = SampleMeta(key="000000007", caption="A red circle above a blue square.", width=64, height=48)
KINDS = {"conversation": 1.0, "recaption": 2.0, "grounded_qa": 1.0}


def png(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def pixels_sha(data: bytes) -> str:
    return hashlib.sha256(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).tobytes()).hexdigest()


def cfg(**keys) -> GenerateConfig:
    return from_dict(GenerateConfig, {"backend": "openai", "openai": {"endpoint": "http://127.0.0.1:1/v1"}, **keys})


def test_kinds_per_image_are_distinct_drawn_by_weight_and_the_first_is_the_single_kind_draw():
    for i in range(200):
        key = f"{i:09d}"
        two = choose_kinds(key, KINDS, 3, 2)
        assert len(set(two)) == 2 and two[0] == choose_kind(key, KINDS, 3)
        assert sorted(choose_kinds(key, KINDS, 3, 9)) == sorted(KINDS)  # capped by the kinds with a weight
    firsts = [choose_kinds(f"{i:09d}", KINDS, 0, 2)[0] for i in range(2000)]
    assert 0.45 < firsts.count("recaption") / len(firsts) < 0.55  # weight 2 of 4


def test_a_plan_has_a_part_per_drawn_kind_and_only_image_kinds_carry_the_image():
    image = prepare_image(png(64, 48), ImageConfig())
    config = cfg(kinds=KINDS, per_image=3)
    plan = plan_parts("p.tar", META, config, TEMPLATES, image)
    assert sorted(p.kind for p in plan.parts) == sorted(KINDS) and plan.kind.count("+") == 2
    for part in plan.parts:
        assert part.sees_image == (part.kind != "conversation")
        assert (part.request.image is image) == part.sees_image
        assert count_images(part.request.messages) == int(part.sees_image)
    assert len({p.seed for p in plan.parts}) == 3
    assert plan_parts("p.tar", META, config, TEMPLATES, image) == plan  # deterministic per key


def test_two_passes_ask_the_recaption_first_and_text_kinds_after_it():
    image = prepare_image(png(64, 48), ImageConfig())
    plan = plan_parts("p.tar", META, cfg(kinds={"conversation": 1.0}, recaption_first=True), TEMPLATES, image)
    recaption, conversation = plan.parts
    assert recaption.kind == RECAPTION and recaption.request is not None and not recaption.written
    assert conversation.request is None and conversation.written  # built once the re-caption is in
    assert plan.kind == "conversation"
    drawn = plan_parts("p.tar", META, cfg(kinds={"recaption": 1.0}, recaption_first=True), TEMPLATES, image)
    assert [(p.kind, p.written) for p in drawn.parts] == [(RECAPTION, True)]  # asked once, written
    context = after_recaption(META, "Two shapes on white.")
    assert context.caption == "Two shapes on white." and context.captions == []


def test_two_passes_ask_no_recaption_when_no_drawn_kind_would_read_it():
    image = prepare_image(png(64, 48), ImageConfig())
    plan = plan_parts("p.tar", META, cfg(kinds={"grounded_qa": 1.0}, recaption_first=True), TEMPLATES, image)
    assert [(p.kind, p.written) for p in plan.parts] == [("grounded_qa", True)]


def test_only_samples_whose_kinds_see_the_image_prepare_it():
    mixed = cfg(kinds={"conversation": 1.0, "recaption": 1.0})
    seen = {sample_sees_image(f"{i:09d}", mixed, TEMPLATES) for i in range(50)}
    assert seen == {True, False}
    assert not any(sample_sees_image(f"{i:09d}", cfg(), TEMPLATES) for i in range(50))
    assert all(sample_sees_image(f"{i:09d}", cfg(recaption_first=True), TEMPLATES) for i in range(50))


def test_configs_that_cannot_work_are_refused_before_a_run():
    with pytest.raises(ValueError, match="no template"):
        check_kinds(cfg(kinds={"ocr": 1.0}), TEMPLATES)
    with pytest.raises(ValueError, match="vision model"):
        check_kinds(from_dict(GenerateConfig, {"backend": "caption_only", "kinds": {"recaption": 1.0}}), TEMPLATES)
    with pytest.raises(ConfigError, match="per_image"):
        cfg(per_image=0)
    with pytest.raises(ConfigError, match="max_side"):
        cfg(image={"max_side": 0})
    with pytest.raises(ValueError, match="more kinds per image"):
        check_kinds(cfg(kinds={"recaption": 1.0, "conversation": 0.0}, per_image=2), TEMPLATES)
    with pytest.raises(ValueError, match="recaption_caption"):
        check_kinds(cfg(recaption_caption="replace"), TEMPLATES)  # no re-caption is ever asked
    model = {"name": "ViT-B-32"}
    with pytest.raises(ValueError, match="none of these kinds"):
        check_kinds(cfg(grounding={"threshold": 0.2, "model": model}), TEMPLATES)
    with pytest.raises(ValueError, match="large_model has no effect"):
        check_kinds(cfg(kinds=KINDS, grounding={"threshold": 0.2, "model": model | {"large_model": True}}), TEMPLATES)
    with pytest.raises(ValueError, match="names the CLIP"):
        check_kinds(cfg(kinds=KINDS, grounding={"threshold": 0.2}), TEMPLATES)
    with pytest.raises(ConfigError, match="cosine"):
        cfg(kinds=KINDS, grounding={"threshold": 2, "model": model})
    check_kinds(cfg(kinds=KINDS, grounding={"threshold": 0.2, "model": model}, recaption_caption="extend"), TEMPLATES)


def test_an_image_that_fits_is_sent_as_the_shards_own_bytes():
    data = png(64, 48)
    image = prepare_image(data, ImageConfig(max_side=64))
    assert image.data is data and not image.reencoded and (image.width, image.height) == (64, 48)
    assert image.sha256 == image.source_sha256 == hashlib.sha256(data).hexdigest()


def test_a_larger_image_is_resized_to_max_side_in_the_asked_format_deterministically():
    data = png(200, 100)
    image = prepare_image(data, ImageConfig(max_side=50, format="jpeg", quality=80))
    assert image.reencoded and (image.width, image.height) == (50, 25) and image.format == "jpeg"
    assert Image.open(io.BytesIO(image.data)).format == "JPEG"
    assert prepare_image(data, ImageConfig(max_side=50, format="jpeg", quality=80)) == image
    assert image.source_sha256 == hashlib.sha256(data).hexdigest() != image.sha256
    same_size = prepare_image(data, ImageConfig(max_side=500, format="webp"))  # a format change re-encodes
    assert same_size.reencoded and same_size.format == "webp"


@pytest.mark.parametrize("mode", ["RGBA", "CMYK", "P", "I;16"])
def test_an_image_a_model_might_read_otherwise_than_clip_is_converted_the_way_clip_reads_it(mode):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    buf = io.BytesIO()
    Image.new(mode, (20, 10)).save(buf, fmt)
    image = prepare_image(buf.getvalue(), ImageConfig())
    assert (
        image.reencoded
        and Image.open(io.BytesIO(image.data)).mode == "RGB"
        and (image.width, image.height) == (20, 10)
    )


def test_an_image_over_max_pixels_is_rejected_unread():
    from visinstruct.schemas import Dropped

    with pytest.raises(Dropped) as e:
        prepare_image(png(200, 100), ImageConfig(max_side=50, max_pixels=10_000))
    assert e.value.reason == "decompression_bomb"


def test_backends_render_the_placeholder_their_way():
    image = prepare_image(png(8, 8), ImageConfig())
    plan = plan_parts("p.tar", META, cfg(kinds={"recaption": 1.0}), TEMPLATES, image)
    messages = plan.parts[0].request.messages
    sent = openai_messages(messages, image, "low")
    part = sent[-1]["content"][0]
    assert part["type"] == "image_url" and part["image_url"]["detail"] == "low"
    uri = part["image_url"]["url"]
    assert uri.startswith("data:image/png;base64,")
    import base64

    assert pixels_sha(base64.b64decode(uri.split(",", 1)[1])) == pixels_sha(image.data)
    text = text_messages(messages, IMAGE_TOKEN)[-1]["content"]
    assert text.startswith(f"{IMAGE_TOKEN}\n") and text.count(IMAGE_TOKEN) == 1
    assert json.dumps(messages)  # the placeholder form is what the cache key holds: no bytes in it


def test_the_cache_key_holds_the_image_sent_and_its_settings_and_text_keys_are_unchanged():
    messages, sampling = [{"role": "user", "content": "hi"}], {"seed": 1}
    assert request_fingerprint("m", messages, sampling) == request_fingerprint("m", messages, sampling, None)
    a = prepare_image(png(8, 8, seed=1), ImageConfig())
    b = prepare_image(png(8, 8, seed=2), ImageConfig())
    keys = {
        request_fingerprint("m", messages, sampling, image_fingerprint(image, settings))
        for image in (a, b)
        for settings in (ImageConfig(), ImageConfig(max_side=4), ImageConfig(detail="high"))
    }
    assert len(keys) == 6


def test_a_recaption_that_copies_the_web_caption_is_rejected():
    assert copies_caption("A red circle above a blue square. Nothing else.", META) == META.caption
    assert copies_caption("a red circle above a blue square", META) == META.caption
    long = "A red circle above a blue square sits on a white page; the circle is small, the square larger, centred."
    assert copies_caption(long, META) is None  # the caption's words inside a description that says much more
    assert copies_caption("A green triangle.", META) is None
    image = prepare_image(png(8, 8), ImageConfig())
    plan = plan_parts("p.tar", META, cfg(kinds={"recaption": 1.0}), TEMPLATES, image)
    copied = judge_result(plan.parts[0], META, ChatResult(META.key, META.caption, finish_reason="stop"), [], BOUNDS)
    assert copied.reason == "copies_caption"


BOUNDS = __import__("visinstruct.transforms.conversations", fromlist=["Bounds"]).Bounds()


def reply(kind: str, turns: list[Turn] | None, reason: str | None = None, tokens=(10, 5, None)) -> PartReply:
    result = ChatResult(META.key, "x", tokens[0], tokens[1], image_tokens=tokens[2])
    decision = Decision.keep(turns) if turns else Decision.drop(reason, f"{reason} here")
    return PartReply(kind, result, decision, 1, False, 11)


QA = [Turn("human", f"{IMAGE_TOKEN}\nWhat is red?"), Turn("gpt", "The circle.")]
DESC = [Turn("human", f"{IMAGE_TOKEN}\nDescribe it."), Turn("gpt", "A red circle above a blue square on white.")]


def test_kept_parts_join_into_one_conversation_with_the_image_token_once():
    turns = join_turns([DESC, QA])
    assert [t.role for t in turns] == ["human", "gpt", "human", "gpt"]
    assert sum(t.value.count(IMAGE_TOKEN) for t in turns) == 1 and turns[2].value == "What is red?"
    assert conversation_problems(turns) == []


def test_a_row_is_written_with_its_kept_parts_and_records_the_rejected_ones():
    image = prepare_image(png(8, 8), ImageConfig())
    plan = plan_parts("p.tar", META, cfg(kinds={"recaption": 1.0, "grounded_qa": 1.0}, per_image=2), TEMPLATES, image)
    first, second = (p.kind for p in plan.parts)
    replies = Reply(
        (reply(first, None, "refusal"), reply(second, QA if second == "grounded_qa" else DESC, tokens=(30, 6, 12)))
    )
    decision = judge_reply(plan, replies, "m", "0" * 64)
    info = decision.value.generation
    assert decision.kept and info.kind == second and info.image_tokens == 12
    assert (info.prompt_tokens, info.completion_tokens) == (30, 6)  # the kept part's
    assert [p.get("reason") for p in info.parts] == ["refusal", None]
    assert info.image == image.provenance() and "data" not in json.dumps(info.image)
    both = judge_reply(plan, Reply((reply(first, DESC), reply(second, QA))), "m", "0" * 64).value
    assert both.generation.kind == f"{first}+{second}" and len(both.conversations) == 4


def test_a_row_with_no_kept_part_is_dropped_with_the_first_rejection_and_every_parts_reason():
    image = prepare_image(png(8, 8), ImageConfig())
    plan = plan_parts("p.tar", META, cfg(kinds={"conversation": 1.0}, recaption_first=True), TEMPLATES, image)
    replies = Reply((reply(RECAPTION, None, "low_grounding"), reply("conversation", None, "recaption_rejected")))
    decision = judge_reply(plan, replies, "m", "0" * 64)
    assert decision.reason == "low_grounding"
    assert [p["reason"] for p in decision.detail["parts"]] == ["low_grounding", "recaption_rejected"]


def test_a_kept_recaption_keeps_replaces_or_extends_the_web_caption():
    assert with_caption(META, "New words.", "keep") == META
    replaced = with_caption(META, "New words.", "replace")
    assert replaced.caption == "New words." and replaced.captions == [META.caption]
    extended = with_caption(META, "New words.", "extend")
    assert extended.caption == META.caption and extended.captions == ["New words."]
    assert with_caption(META, None, "replace") == META


def test_a_single_part_plan_is_what_callers_with_their_own_requests_use():
    from visinstruct.transforms.llm_openai import ChatRequest

    plan = Plan.single("p.tar", META, ChatRequest(META.key, [{"role": "user", "content": "hi"}], seed=4))
    assert plan.kind == "conversation" and plan.parts[0].seed == 4 and not plan.parts[0].sees_image
