"""Conversation generation: reply checking, deterministic plans, backends, and the stage end to end."""

import json
import re
from dataclasses import replace

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from apache_beam.testing import test_pipeline

from visinstruct.configs import GenerateConfig, IngestConfig, from_dict
from visinstruct.pipelines import generate
from visinstruct.pipelines.ingest import run as ingest
from visinstruct.pipelines.report import counter_value
from visinstruct.schemas import Box, Decision, GenerationInfo, SampleMeta, Turn
from visinstruct.testing.openai_server import OpenAIServer
from visinstruct.testing.sample_data import shapes_dataset
from visinstruct.testing.tars import write_tar
from visinstruct.transforms import generate_stages
from visinstruct.transforms.conversations import Bounds, parse_qa, read_reply, repetition
from visinstruct.transforms.prompts import caption_only, choose_kind, derive_seed, load_templates, uses_llm
from visinstruct.transforms.rewrite_stage import RewriteShard

pytestmark = pytest.mark.timeout(600)
RUNNER = ["--runner=FnApiRunner"]
META = SampleMeta(
    key="000000001",
    caption="a red circle and a blue square",
    boxes=[Box("red circle", [0.1, 0.4, 0.3, 0.6]), Box("blue square", [0.6, 0.35, 0.85, 0.6])],
)
VOCAB = load_templates().object_vocabulary


def decision(reply, fmt="qa", question=None):
    return read_reply(fmt, reply, META, question, VOCAB, Bounds())


def test_qa_replies_become_llava_turns():
    reply = (
        "**Question 1:** What shapes are there?\nAnswer: A red circle and a blue square.\n\n"
        "Q: Where is the circle?\nA: On the left,\nnext to the square."
    )
    assert parse_qa(reply) == [
        ("What shapes are there?", "A red circle and a blue square."),
        ("Where is the circle?", "On the left, next to the square."),
    ]
    assert decision(reply).value == [
        Turn("human", "<image>\nWhat shapes are there?"),
        Turn("gpt", "A red circle and a blue square."),
        Turn("human", "Where is the circle?"),
        Turn("gpt", "On the left, next to the square."),
    ]
    description = decision("Description: A red circle sits left of a blue square.", "description", "Describe it.")
    assert description.value == [
        Turn("human", "<image>\nDescribe it."),
        Turn("gpt", "A red circle sits left of a blue square."),
    ]


@pytest.mark.parametrize(
    "reply, reason",
    [
        ("The picture is nice.", "unparseable"),
        ("Question: What is it?\nAnswer: I'm sorry, I cannot see images.", "refusal"),
        ("Question: What is it?\nAnswer: As the caption says, a red circle.", "mentions_context"),
        ("Question: Where is it?\nAnswer: At [0.10, 0.40] on the left.", "mentions_context"),
        ("Question: Where is it?\nAnswer: The bounding box is on the left.", "mentions_context"),
        ("Question: Where is the square?\nAnswer: Its left edge is at 0.60.", "mentions_context"),
        ("Question: Where is it?\nAnswer: It spans (0.10, 0.40) to the middle.", "mentions_context"),
        ("Question: What is it?\nAnswer: According to the caption, a red circle.", "mentions_context"),
        ("Question: Where is it?\nAnswer: At [0.12, 0.30, 0.55, 0.91] in the picture.", "mentions_context"),
        ("Question: Where is it?\nAnswer: Its corner is at x1 = 0.1.", "mentions_context"),
        ("Question: What is it?\nAnswer: A red\x00 circle.", "bad_characters"),
        ("Question: What is it?\nAnswer: A red \ud800 circle.", "bad_characters"),
        ("Question: What colour?\nAnswer: Red.\nQuestion: What colour?\nAnswer: Blue.", "duplicate_question"),
        ("Question: What is there?\nAnswer: A red circle next to a sleeping cat.", "unknown_object"),
        ("Question: What is there?\nAnswer: A triangle.", "unknown_object"),
        ("Question: Colour?\nAnswer: R", "bad_length"),
    ],
)
def test_bad_replies_are_rejected_with_their_reason(reply, reason):
    assert decision(reply).reason == reason


def test_objects_in_the_context_are_allowed_in_plural_too():
    assert decision("Question: How many shapes?\nAnswer: Two: a circle and a square, no other squares.").value


@pytest.mark.parametrize(
    "answer",
    [
        "It is about 0.75 miles from the shore, so a 15 minute walk.",
        "There are 3 circles, and the price tag says $12.99.",
        "The circle is 0.5 metres wide and the square about .33 of that.",
        "It is 2.5 metres tall, and the three boxes on the shelf are brown.",
    ],
)
def test_ordinary_numbers_and_words_are_not_mentions_of_the_context(answer):
    assert decision(f"Question: What can you tell me?\nAnswer: {answer}").value


LOOPING = " ".join(["The teal circle is a small circle that is a little larger than the other circle."] * 8)[:-30]
GOOD_ANSWERS = [
    "Yes, it is. It is red.",
    "A red circle, a blue square, a green triangle and a yellow star.",
    "The dog is brown. The dog is running. The dog looks happy.",
    "There are two circles: a red circle on the left and a blue circle on the right. The red circle is a little "
    "smaller than the blue circle, and both circles sit on a white background.",
    "The image shows a busy city street with several cars parked along the side of the road. A man in a blue "
    "jacket is walking on the sidewalk, carrying a black bag. To the left of him, a woman is standing next to a "
    "bicycle, looking at her phone. In the background, there are tall buildings with many windows, and a traffic "
    "light can be seen at the corner of the street. The sky is overcast, suggesting that it might rain soon.",
    "First, the circle is on the left and the square is on the right. Second, the square is larger than the "
    "circle. So if the square slid to the left, it would push the circle off the edge of the picture, because "
    "the circle is smaller and there is nothing else on the left side to stop it.",
]
LOOPS = [
    LOOPING,
    "It is red.\nIt is red.\nIt is red.",
    "A red circle, a red circle, a red circle, a red circle, a red circle, a red circle.",
    "The picture shows a circle and a circle and a circle and a circle and a circle and a circle and a circle.",
    "It is very very very very very very very very very very very big.",
    "The square is blue and the square is big, and the square is next to the square, and the square is on the "
    "left of the square while the square is larger than the square, so the square is square and the square is "
    "near the square at the top of the square.",
]


def test_template_examples_and_normal_answers_are_not_repetitive():
    replies = [e["reply"] for k in load_templates().kinds.values() for e in k.examples]
    for text in replies + GOOD_ANSWERS:
        assert repetition(text) is None, text


@pytest.mark.parametrize("text", LOOPS)
def test_looping_answers_are_rejected_as_repetitive(text):
    assert repetition(text) is not None
    assert decision(f"Question: What is in the picture?\nAnswer: {text}").reason == "repetitive"
    assert decision(text, "description", "Describe it.").reason == "repetitive"


def test_good_answers_pass_the_whole_reply_reader():
    for text in GOOD_ANSWERS:  # the caption names every object, as a real context does
        meta = SampleMeta(key="000000001", caption=text)
        assert read_reply("description", text, meta, "Describe it.", VOCAB, Bounds()).value, text
    assert repetition(LOOPING).startswith("repeated sentences hold")


def test_plans_are_deterministic_per_key():
    templates = load_templates()
    weights = {"conversation": 1.0, "detailed": 2.0, "complex_reasoning": 1.0}
    kinds = [choose_kind(f"{i:09d}", weights, 0) for i in range(2000)]
    assert kinds == [choose_kind(f"{i:09d}", weights, 0) for i in range(2000)]
    assert 0.45 < kinds.count("detailed") / 2000 < 0.55
    assert derive_seed(0, "000000001") == derive_seed(0, "000000001") != derive_seed(1, "000000001")
    assert sum(uses_llm(f"{i:09d}", 0.25, 0) for i in range(2000)) in range(440, 560)
    turns = caption_only(META, templates, 0)
    assert turns == caption_only(META, templates, 0) and turns[1] == Turn("gpt", META.caption)
    assert turns[0].value.startswith("<image>\n") and turns[0].value[8:] in templates.brief_questions


def test_a_caption_no_backend_can_send_is_that_samples_rejection_not_the_batchs():
    cfg = from_dict(GenerateConfig, {"backend": "openai", "openai": {"endpoint": "http://127.0.0.1:9/v1"}})
    meta = SampleMeta(key="000000007", caption="a red circle \udce9 on white", url="http://x/\udce9.jpg")
    plan = generate_stages.plan_sample("p", meta, cfg, load_templates())
    assert plan.reason == "bad_characters" and "cannot be encoded" in plan.message


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    coco = shapes_dataset(root / "shapes", n=9, seed=5)
    cfg = from_dict(
        IngestConfig,
        {
            "read": {
                "path": str(coco / "annotations" / "*.json"),
                "format": "coco",
                "image_root": str(coco / "images"),
            },
            "write": {"path": str(root / "in"), "shard_size": 4},
            "resize": {"image_size": 64},
        },
    )
    assert ingest(cfg, RUNNER)["written"] == 9
    return sorted(str(p) for p in (root / "in").glob("*.tar"))


def samples(out) -> dict[str, SampleMeta]:
    tars = [str(p) for p in sorted(out.glob("*.tar"))]
    return {s["__key__"]: SampleMeta.from_json(s["json"]) for s in wds.WebDataset(tars, shardshuffle=False)}


def tree(out) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and not p.name.endswith(("_stats.json", "run_report.json"))
    }


def test_caption_only_data_is_deterministic(shards, tmp_path):
    for out in ("a", "b"):
        cfg = from_dict(GenerateConfig, {"backend": "caption_only", "write": {"path": str(tmp_path / out)}})
        report = generate.run(cfg, shards, RUNNER)
        assert report["written"] == 9 and report["backend_calls"] == 0 and report["accounted"]
    assert tree(tmp_path / "a") == tree(tmp_path / "b")
    for meta in samples(tmp_path / "a").values():
        assert meta.conversations[1].value == meta.caption and meta.generation.kind == "caption_only"


def test_a_jpeg_member_is_an_image_to_generate_for(tmp_path):
    """Other tools name JPEGs ``KEY.jpeg``: such a sample gets its conversation, its member kept under its name."""
    members = {
        "000000000": {"jpeg": b"\xff\xd8 jpeg bytes", "txt": b"a red circle"},
        "000000001": {"jpeg": b"\xff\xd8 more jpeg bytes", "txt": b"two blue squares"},
        "000000002": {"txt": b"a caption without its picture"},
    }
    tar = write_tar(tmp_path / "in" / "00000.tar", members)
    cfg = from_dict(GenerateConfig, {"backend": "caption_only", "write": {"path": str(tmp_path / "out")}})
    report = generate.run(cfg, [tar], RUNNER)
    assert report["written"] == 2 and report["rejected_by_reason"] == {"no_image": 1} and report["accounted"]
    out = {s["__key__"]: s for s in wds.WebDataset(str(tmp_path / "out" / "00000.tar"), shardshuffle=False)}
    assert sorted(out) == ["000000000", "000000001"]
    for key, sample in out.items():
        assert sample["jpeg"] == members[key]["jpeg"]
        turns = SampleMeta.from_json(sample["json"]).conversations
        assert turns[1] == Turn("gpt", members[key]["txt"].decode())


def test_the_generate_judge_through_rewrite_shard_writes_counts_tokens_and_dead_letters(tmp_path):
    """Generation's judge of one shard, fed decisions as the pipeline groups them: a kept conversation is written
    and its tokens counted, a dropped reply keeps its detail, a sample no decision reached is ``not_generated``."""
    keys = ["000000000", "000000001", "000000002"]
    tar = write_tar(tmp_path / "in" / "00000.tar", {k: {"jpg": b"\xff\xd8", "txt": b"a red circle"} for k in keys})
    turns = [Turn("human", "<image>\nWhat is it?"), Turn("gpt", "A red circle.")]
    info = GenerationInfo("conversation", "m", "0" * 64, 5, prompt_tokens=11, completion_tokens=7)
    kept = SampleMeta(key=keys[0], caption="a red circle", conversations=turns, generation=info)
    groups = {
        "decisions": [
            (keys[0], Decision.keep(kept)),
            (keys[1], Decision.drop("refusal", "an answer refuses", {"raw": "I'm sorry"})),
        ],
        "paths": [tar],
    }
    p = test_pipeline.TestPipeline(runner="FnApiRunner")
    _ = (
        p
        | beam.Create([(tar, groups)])
        | beam.ParDo(RewriteShard(generate_stages.STAGE, str(tmp_path / "out"), {}, generate_stages.shard_judge))
    )
    result = p.run()
    result.wait_until_finish()
    names = ("prompt_tokens", "completion_tokens", "dropped_refusal", "dropped_not_generated")
    assert [counter_value(result, generate_stages.STAGE, n) for n in names] == [11, 7, 1, 1]
    assert samples(tmp_path / "out") == {keys[0]: kept}
    dead = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "rejected").to_pylist()}
    assert json.loads(dead[keys[1]]["detail"]) == {"raw": "I'm sorry"} and dead[keys[1]]["reason"] == "refusal"
    assert dead[keys[2]]["reason"] == "not_generated"


def scripted(request: dict) -> str:
    """A well-behaved model, except for samples whose captions carry a fault marker or a bad answer."""
    context = request["messages"][-1]["content"]
    if "Objects:" in context and request["messages"][0]["content"].find("one rich paragraph") >= 0:
        return "Several coloured shapes are spread over a white background."
    if "triangle" in context:
        return "Question: What is in the picture?\nAnswer: I'm sorry, I cannot see pictures."
    return (
        "Question: What colours are the shapes?\nAnswer: They are bright.\n"
        "Question: Is the background plain?\nAnswer: Yes, it is plain white."
    )


def test_openai_backend_end_to_end_with_faults_retries_cache_and_no_key_leak(shards, tmp_path, monkeypatch, caplog):
    secret = "sk-test-SECRET-4242"
    monkeypatch.setenv("VI_TEST_KEY", secret)
    settings = {
        "backend": "openai",
        "model": "scripted",
        "temperature": 0.0,
        "cache_dir": str(tmp_path / "cache"),
        "write": {"path": str(tmp_path / "out")},
    }

    def server(endpoint: str) -> dict:
        return {"endpoint": endpoint, "api_key_env": "VI_TEST_KEY", "retries": 2, "timeout": 5.0}

    with OpenAIServer(responder=scripted, require_key=secret) as srv:
        cfg = from_dict(GenerateConfig, settings | {"openai": server(srv.base_url)})
        report = generate.run(cfg, shards, RUNNER)
        calls = srv.calls
    kept = samples(tmp_path / "out")
    rejected = pq.read_table(tmp_path / "out" / "rejected").to_pylist()
    assert report["inputs"] == report["rows_read"] == 9 and report["written"] + report["rejected"] == 9
    assert report["written"] == len(kept) and len(rejected) == report["rejected"]
    for meta in kept.values():
        assert meta.conversations[0].value.startswith("<image>\n") and meta.generation.model == "scripted"
        assert meta.generation.completion_tokens > 0 and len(meta.generation.template_sha256) == 64
    for row in rejected:  # every drop keeps the raw reply for a person to read
        assert row["stage"] == "generate" and json.loads(row["detail"])["raw"]
    assert {r["reason"] for r in rejected} <= {"refusal"}
    assert report["backend_calls"] == calls
    # tokens spent count every call; the written samples hold those of their own answers
    assert report["completion_tokens"] == sum(m.generation.completion_tokens for m in kept.values())
    assert report["completion_tokens_spent"] >= report["completion_tokens"] > 0
    # A rerun with the cache makes no backend call and writes the same shards.
    with OpenAIServer(responder=scripted, require_key=secret) as srv:
        again_settings = settings | {"openai": server(srv.base_url), "write": {"path": str(tmp_path / "again")}}
        cfg = from_dict(GenerateConfig, again_settings)
        again = generate.run(cfg, shards, RUNNER)
        assert srv.calls == 0
    assert again["backend_calls"] == 0 and tree(tmp_path / "again") == tree(tmp_path / "out")
    everything = b"".join(tree(tmp_path / "out").values()) + caplog.text.encode() + json.dumps(report).encode()
    assert secret.encode() not in everything


def test_openai_faults_end_written_after_retry_or_dead_lettered(tmp_path, monkeypatch):
    from visinstruct.transforms.llm import GenerationHandler
    from visinstruct.transforms.llm_openai import ChatRequest
    from visinstruct.transforms.plans import Plan

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    good = "Question: What is there?\nAnswer: A red circle and a blue square."
    with OpenAIServer(responder=lambda r: good) as srv:
        cfg = from_dict(
            GenerateConfig,
            {
                "backend": "openai",
                "openai": {"endpoint": srv.base_url, "retries": 1, "timeout": 1.0},
                "model": "m",
                "retry_new_seed": False,
            },
        )
        handler = GenerationHandler(cfg, load_templates())
        backend = handler.load_model()
        markers = [
            "",
            "[[fault:429:1:0.1]]",
            "[[fault:500:1]]",
            "[[fault:500]]",
            "[[fault:hang]]",
            "[[fault:malformed]]",
            "[[fault:empty]]",
            "[[fault:401]]",
        ]
        plans = [
            Plan.single(
                "p",
                replace(META, key=f"{i:09d}"),
                ChatRequest(f"{i:09d}", [{"role": "user", "content": f"sample {i} {m}"}], seed=i),
            )
            for i, m in enumerate(markers)
        ]
        outcomes = [r.inference.parts[0] for r in handler.run_inference(plans, backend)]
    assert [o.decision.reason for o in outcomes] == [
        None,
        None,
        None,
        "http_500",
        "timeout",
        "malformed_response",
        "empty_completion",
        "http_401",
    ]


def test_replies_cut_at_the_token_limit_are_rejected_as_truncated():
    from visinstruct.transforms.llm import GenerationHandler
    from visinstruct.transforms.llm_openai import ChatRequest
    from visinstruct.transforms.plans import Plan

    good = "Question: What is there?\nAnswer: A red circle and a blue square."  # 12 words: the server's tokens
    with OpenAIServer(responder=lambda r: good) as srv:
        cfg = from_dict(
            GenerateConfig,
            {
                "backend": "openai",
                "openai": {"endpoint": srv.base_url, "retries": 0, "api_key_env": None},
                "model": "m",
                "retry_new_seed": False,
            },
        )
        handler = GenerationHandler(cfg, load_templates())
        plans = [
            Plan.single(
                "p",
                replace(META, key=f"{i:09d}"),
                ChatRequest(f"{i:09d}", [{"role": "user", "content": f"sample {i}"}], max_tokens=limit),
            )
            for i, limit in enumerate([64, 8])
        ]
        whole, cut = [r.inference.parts[0] for r in handler.run_inference(plans, handler.load_model())]
    assert whole.result.finish_reason == "stop" and whole.decision.value
    # "Question: What is there? Answer: A red circle" reads as a valid pair: only finish_reason tells
    assert cut.result.finish_reason == "length" and cut.result.text.endswith("A red circle")
    assert cut.decision.reason == "truncated_reply" and "max_new_tokens" in cut.decision.message


def test_local_backend_finish_reason_is_length_only_when_no_stop_token_came_within_the_limit():
    from visinstruct.transforms.backends import _cut

    stops = frozenset({2, 7})
    assert _cut([5, 6, 2, 0, 0], stops, 5) == ([5, 6], "stop")
    assert _cut([5, 6, 9, 9, 9], stops, 5) == ([5, 6, 9, 9, 9], "length")
    assert _cut([5, 6, 9, 9, 7], stops, 3) == ([5, 6, 9], "length")  # a row whose own limit is below the batch's
    assert _cut([5, 7], stops, 5) == ([5], "stop")


def test_transformers_sampling_is_seeded_per_sample_not_per_batch(tmp_path):
    from visinstruct.testing.tiny_models import tiny_causal_lm
    from visinstruct.transforms.backends import TransformersBackend
    from visinstruct.transforms.llm_openai import ChatRequest

    tiny_causal_lm(save_dir=tmp_path / "lm", seed=1)
    backend = TransformersBackend(
        from_dict(GenerateConfig, {"model": str(tmp_path / "lm"), "transformers": {"device": "cpu"}})
    )

    def ask(key, text, seed):
        return ChatRequest(key, [{"role": "user", "content": text}], max_tokens=12, temperature=1.0, seed=seed)

    alone = backend.generate([ask("a", "hello there", 5)])[0]
    batched = backend.generate(
        [ask("b", "a much longer prompt that pads the other row", 9), ask("a", "hello there", 5)]
    )
    assert alone.text == batched[1].text and alone.completion_tokens > 0
    # random weights never say <|im_end|> within 12 tokens: the answer ran to the limit
    assert (alone.finish_reason, alone.completion_tokens) == ("length", 12)
    assert backend.generate([ask("a", "hello there", 6)])[0].text != alone.text


@pytest.mark.slow
def test_real_smollm2_writes_conversations_for_shapes_with_boxes(shards, tmp_path):
    from visinstruct.testing.smollm2 import smollm2_gguf_path

    cfg = from_dict(
        GenerateConfig,
        {
            "backend": "transformers",
            "model": str(smollm2_gguf_path()),
            "transformers": {"batch_size": 9},
            "max_new_tokens": 64,
            "temperature": 0.0,
            "retry_new_seed": False,
            "write": {"path": str(tmp_path / "out")},
        },
    )
    report = generate.run(cfg, shards[:1], RUNNER)
    assert report["inputs"] == 4 and report["accounted"] and report["backend_calls"] == 4
    assert report["completion_tokens_spent"] > 0 and report["completion_tokens_spent"] >= report["completion_tokens"]
    rejected = pq.read_table(tmp_path / "out" / "rejected").to_pylist()
    for row in rejected:
        assert re.fullmatch(r"[a-z_0-9]+", row["reason"]) and json.loads(row["detail"])["raw"] is not None


def test_cli_generates_caption_only_data_and_reports_one_line_errors(shards, tmp_path, capsys):
    from visinstruct.cli.main import main

    config = tmp_path / "gen.yaml"
    config.write_text("backend: caption_only\n")
    folder = str(shards[0]).rsplit("/", 1)[0]
    assert (
        main(
            [
                "generate",
                "--config",
                str(config),
                "--input",
                folder,
                "--out",
                str(tmp_path / "out"),
                "--runner=FnApiRunner",
            ]
        )
        == 0
    )
    assert "generate: 9 rows in 3 shards -> 9 written, 0 rejected" in capsys.readouterr().out
    assert main(["generate", "--config", str(config), "--input", str(tmp_path / "none"), "--out", "x"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


GOOD_QA = (
    "Question: What colours are the shapes?\nAnswer: They are bright.\n"
    "Question: Is the background plain?\nAnswer: Yes, it is plain white."
)


def test_a_bug_on_one_sample_dead_letters_that_sample_only(shards, tmp_path, monkeypatch):
    from visinstruct.transforms import llm, plans

    captions = {key: meta.caption for key, meta in samples_of(shards).items()}
    unique = [k for k, c in sorted(captions.items()) if list(captions.values()).count(c) == 1]
    bad_prompt, bad_reply = sorted(captions)[1], sorted(captions)[5]
    cut = next(k for k in unique if k not in (bad_prompt, bad_reply))  # its caption tells the server who it is
    real_build, real_read = plans.build_messages, llm.read_reply

    def build_messages(template, meta):  # a planted bug in prompt building, for one sample
        if meta.key == bad_prompt:
            raise KeyError("planted in build_messages")
        return real_build(template, meta)

    def read_reply(kind_format, reply, meta, *args):  # and one in reading the reply, for another
        if meta.key == bad_reply:
            raise ZeroDivisionError("planted in read_reply")
        return real_read(kind_format, reply, meta, *args)

    monkeypatch.setattr(plans, "build_messages", build_messages)
    monkeypatch.setattr(llm, "read_reply", read_reply)
    with OpenAIServer(
        responder=lambda r: " ".join([GOOD_QA] * 20) if captions[cut] in r["messages"][-1]["content"] else GOOD_QA
    ) as srv:
        cfg = from_dict(
            GenerateConfig,
            {
                "backend": "openai",
                "openai": {"endpoint": srv.base_url, "api_key_env": None},
                "model": "m",
                "kinds": {"conversation": 1.0},
                "max_new_tokens": 64,
                "temperature": 0.0,
                "write": {"path": str(tmp_path / "out")},
            },
        )
        report = generate.run(cfg, shards, RUNNER)
    assert (
        report["accounted"]
        and report["written"] == 6
        and sorted(samples(tmp_path / "out")) == sorted(set(captions) - {bad_prompt, bad_reply, cut})
    )
    rejected = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "rejected").to_pylist()}
    assert {k: r["reason"] for k, r in rejected.items()} == {
        bad_prompt: "internal_error",
        bad_reply: "internal_error",
        cut: "truncated_reply",
    }
    assert rejected[bad_prompt]["message"] == "KeyError: 'planted in build_messages'"
    assert rejected[bad_reply]["message"] == "ZeroDivisionError: planted in read_reply"
    detail = json.loads(rejected[cut]["detail"])
    assert detail["finish_reason"] == "length" and detail["raw"].startswith(GOOD_QA.split("\n")[0])


@pytest.mark.parametrize("down", ["stopped", "unresolvable"])
def test_with_the_llm_server_unreachable_every_row_is_a_retryable_connection_error_naming_the_endpoint(
    shards, tmp_path, down
):
    """A server that is down and an endpoint host that does not resolve (a typo) both mean nothing answered."""
    from visinstruct.pipelines.report import reason_hint
    from visinstruct.transforms.llm import CONFIG_REASONS, RETRYABLE_REASONS

    if down == "stopped":
        with OpenAIServer() as srv:
            endpoint = srv.base_url  # stopped on leaving: nothing listens there any more
    else:
        endpoint = "http://nonexistent-host.invalid:1/v1"  # .invalid never resolves (RFC 6761)
    cfg = from_dict(
        GenerateConfig,
        {
            "backend": "openai",
            "openai": {"endpoint": endpoint, "retries": 0, "api_key_env": None},
            "model": "m",
            "write": {"path": str(tmp_path / "out")},
        },
    )
    report = generate.run(cfg, shards, RUNNER)
    assert report["written"] == 0 and report["rejected_by_reason"] == {"connection_error": 9}
    rejected = pq.read_table(tmp_path / "out" / "rejected").to_pylist()
    assert len(rejected) == 9 and all(f"cannot connect to {endpoint}" in r["message"] for r in rejected)
    assert "connection_error" in RETRYABLE_REASONS and not RETRYABLE_REASONS & CONFIG_REASONS
    assert "generate.openai.endpoint" in reason_hint("connection_error", "generate", {"generate": "generate."})


def test_every_reason_the_llm_client_gives_counts_as_unanswered_and_has_a_hint():
    """A run whose every LLM row failed for one of these is a failed run, and its line says what to change."""
    from visinstruct.pipelines.report import reason_hint
    from visinstruct.transforms.llm import CONFIG_REASONS, RETRYABLE_REASONS

    transport = ["connection_error", "timeout", "ssl_error", "truncated", "invalid_url", "http_404", "http_401"]
    assert set(transport) <= RETRYABLE_REASONS | CONFIG_REASONS
    for reason in transport:
        assert "LLM" in reason_hint(reason, "generate") or "openai." in reason_hint(reason, "generate"), reason


def samples_of(shards) -> dict[str, SampleMeta]:
    return {s["__key__"]: SampleMeta.from_json(s["json"]) for s in wds.WebDataset(shards, shardshuffle=False)}
