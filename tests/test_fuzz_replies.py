"""Reply-parser fuzz: whatever an LLM (or a broken server) sends ends as turns or as a rejection with a reason.

Seeded random and adversarial replies go through everything generation does with one: the client's reading of a
2xx body, the reply reader, the handler's decision (finish reason included), the dead-letter row and the sample
JSON a kept reply becomes, written with pyarrow. A few go through the real loopback server as well.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import replace

import pytest

from visinstruct.configs import GenerateConfig, from_dict
from visinstruct.schemas import SCHEMA_VERSION, Box, Decision, Rejection, SampleMeta, conversation_problems
from visinstruct.testing.openai_server import OpenAIServer
from visinstruct.transforms.conversations import Bounds, read_reply
from visinstruct.transforms.generate_stages import STAGE, judge_reply
from visinstruct.transforms.http import HttpError
from visinstruct.transforms.llm import GenerationHandler, PartReply, Reply, judge_result
from visinstruct.transforms.llm_openai import ChatRequest, ChatResult, _parse_completion
from visinstruct.transforms.plans import Plan
from visinstruct.transforms.prompts import load_templates
from visinstruct.transforms.shards import write_table

pytestmark = pytest.mark.timeout(300)

VOCAB = load_templates().object_vocabulary
METAS = [
    SampleMeta(
        key="000000001",
        caption="a red circle and a blue square",
        boxes=[Box("red circle", [0.1, 0.4, 0.3, 0.6]), Box("blue square", [0.6, 0.35, 0.85, 0.6])],
    ),
    SampleMeta(key="000000002", caption=None),
]
REASON = re.compile(r"[a-z][a-z0-9_]*")
PIECES = [
    "Question:",
    "Answer:",
    "Q:",
    "A:",
    "User:",
    "Assistant:",
    "Human:",
    "GPT:",
    "Question 1:",
    "**Answer:**",
    "```json",
    "```",
    "{",
    "}",
    "[",
    "]",
    '{"question": "x", "answer": [',
    "<image>",
    "<|im_end|>",
    "<|im_start|>assistant",
    "\n",
    "\r\n",
    "\n\n",
    "\u2028",
    "\x85",
    "\x1c",
    "\t",
    "\x00",
    "\x07",
    "\x1b[31m",
    "\ud800",
    "\udfff",
    "\ufffe",
    "\u200b",
    "\u202e",
    "e\u0301",
    "🐈",
    "漢字",
    "- ",
    "* ",
    "1. ",
    "**",
    "0.12",
    "[0.12, 0.30",
    "caption",
    "bounding box",
    "I'm sorry",
    "red circle",
    "cat",
    "a",
    "the",
    "is",
    "What?",
    ".",
    "The teal circle is a small circle.",
    "Yes.",
    " " * 50,
]
PRINTABLE = [p for p in PIECES if p.isprintable() or not p.strip(" \n\r\t")]


def random_text(rng: random.Random) -> str:
    """Random code points (surrogates included), random bytes decoded leniently, or a mix of (printable) pieces."""
    kind = rng.randrange(4)
    if kind == 0:
        return "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(200)))
    if kind == 1:
        data = rng.randbytes(2 * rng.randrange(200))  # even: utf-16 decodes whole code units only
        codec, errors = rng.choice(
            [("utf-8", "replace"), ("utf-8", "surrogateescape"), ("latin-1", "strict"), ("utf-16-le", "surrogatepass")]
        )  # the 2nd and 4th keep lone surrogates
        return data.decode(codec, errors)
    pieces = PIECES if kind == 2 else PRINTABLE  # printable ones get past the character check to the parser
    return " ".join(rng.choice(pieces) for _ in range(rng.randrange(1, 120)))


ADVERSARIAL = {
    "empty": "",
    "whitespace": " \n\t\r\n  \u3000 ",
    "huge": "Question: What is in the picture?\nAnswer: " + "A red circle on white. " * 46_000,  # about 1 MB
    "huge_random": "".join(random.Random(7).choice("abc xyz.\n") for _ in range(1_000_000)),
    "huge_line": "Question: " + "x" * 1_000_000 + "\nAnswer: yes",
    "long_loop": "Question: What is it?\nAnswer: " + "The teal circle is a small circle. " * 2500,  # 87 KB
    "json": json.dumps({"conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "A."}]}),
    "nested": "[" * 5000 + "Question: a?\nAnswer: b." + "]" * 10,
    "unbalanced": '{"Question": "What is it?", "Answer": "A red circle.", {{{',
    "fences": "```\nQuestion: What is it?\nAnswer: A red circle.\n```",
    "answers_first": "Answer: A red circle.\nAnswer: Again.\nQuestion: What is it?",
    "markers_only": "Question:\nAnswer:\nQuestion:\nAnswer:",
    "markers_inline": "Question: Answer: Question: Answer: What is it? Answer: Question:",
    "role_tokens": "<|im_start|>user\nQuestion: What is it?<|im_end|>\n<|im_start|>assistant\nAnswer: A circle.",
    "image_token_in_answer": "Question: What is it?\nAnswer: <image> a red circle.",
    "nul": "Question: What is it?\x00\nAnswer: A red circle.",
    "lone_surrogate": "Question: What is it?\nAnswer: A red \udcff circle.",
    "controls": "Question: What\x1b[2J is it?\nAnswer: A red\x08 circle.\x7f",
    "line_separators": "Question: What is it?\u2028Answer: A red circle.\x85Question: And?\x1eAnswer: Blue.",
    "rtl_override": "Question: What is it?\nAnswer: \u202eelcric der A.",
    "only_decorations": "**\n- \n* \n1.\n**",
}


def check_decision(decision: Decision) -> None:
    """A decision keeps turns that make valid, writable data, or drops with a reason code: never both."""
    assert isinstance(decision, Decision)
    if not decision.kept:
        assert isinstance(decision.reason, str) and REASON.fullmatch(decision.reason), decision
        assert decision.value is None
        return
    assert decision.value and not conversation_problems(decision.value)
    SampleMeta(key="000000001", conversations=decision.value).to_json().encode("utf-8")  # writable as a member


def read_every_way(text: str) -> list[Decision]:
    decisions = []
    for meta in METAS:
        decisions.append(read_reply("qa", text, meta, None, VOCAB, Bounds()))
        decisions.append(read_reply("description", text, meta, "Describe it.", VOCAB, Bounds()))
        decisions.append(read_reply("description", text, meta, None, VOCAB, Bounds(min_chars=0)))
    return decisions


def dead_letter_is_writable(text: str, decision: Decision, tmp_path, finish: str | None = "stop") -> None:
    """The decision generation makes of this reply writes (kept sample JSON, or a dead-letter parquet row)."""
    plan = Plan.single("p", METAS[0], ChatRequest("000000001", []))
    result = ChatResult("000000001", text, finish_reason=finish)
    reply = Reply((PartReply("conversation", result, decision, 1, False, 3),))
    written_as(judge_reply(plan, reply, "m", "0" * 64), tmp_path / "rejected.parquet")


def written_as(decision: Decision[SampleMeta], path) -> None:
    """A kept sample's JSON member, or a dropped one's dead-letter row written to a parquet table at ``path``."""
    if decision.kept:
        decision.value.to_json().encode("utf-8")
        return
    rejection = decision.rejection(STAGE, "000000001")
    assert REASON.fullmatch(rejection.reason)
    write_table(str(path), [rejection], Rejection, SCHEMA_VERSION)


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_replies_end_as_turns_or_a_reason(name, tmp_path):
    text = ADVERSARIAL[name]
    for decision in read_every_way(text):
        check_decision(decision)
    dead_letter_is_writable(text, read_every_way(text)[0], tmp_path)


def test_what_no_training_text_should_hold_is_rejected_with_a_reason():
    for name in ("nul", "lone_surrogate", "controls"):
        assert {v.reason for v in read_every_way(ADVERSARIAL[name])} == {"bad_characters"}, name
    assert {v.reason for v in read_every_way(ADVERSARIAL["empty"])} == {"unparseable"}
    assert {v.reason for v in read_every_way(ADVERSARIAL["huge"])} == {"bad_length"}  # over 50 turns: unread
    assert read_every_way(ADVERSARIAL["long_loop"])[0].reason == "repetitive"


@pytest.mark.parametrize("seed", range(8))
def test_seeded_random_replies_end_as_turns_or_a_reason(seed, tmp_path):
    rng = random.Random(seed)
    plan = Plan.single("p", METAS[0], ChatRequest("000000001", [], max_tokens=9))
    for _ in range(60):
        text = random_text(rng)
        decisions = read_every_way(text)
        for decision in decisions:
            check_decision(decision)
        finish = rng.choice(["stop", "length", None, "content_filter"])
        result = ChatResult("000000001", text, finish_reason=finish)
        check_decision(judge_result(plan.parts[0], plan.meta, result, VOCAB, Bounds()))
        dead_letter_is_writable(text, decisions[0], tmp_path, finish)


def test_the_random_replies_reach_every_part_of_the_reader():
    reasons = set()
    for seed in range(8):
        rng = random.Random(seed)
        reasons |= {v.reason for _ in range(60) for v in read_every_way(random_text(rng))}
    assert {None, "unparseable", "bad_characters", "mentions_context", "bad_format"} <= reasons


def completion_bodies(rng: random.Random) -> list[bytes]:
    """2xx bodies a broken server or proxy might send: valid and invalid JSON of every shape."""
    shapes = [
        None,
        1,
        "x",
        [],
        {},
        {"choices": None},
        {"choices": []},
        {"choices": {}},
        {"choices": [None]},
        {"choices": [{}]},
        {"choices": [{"message": None}]},
        {"choices": [{"message": "hi"}]},
        {"choices": [{"message": {"content": 5}}]},
        {"choices": [{"message": {"content": [1, {"text": 5}]}}]},
        {"choices": [{"message": {"content": [{"text": "Question: a?"}, {"text": "\nAnswer: b."}]}}]},
        {"choices": [{"message": {"content": "ok"}, "finish_reason": 7}], "usage": "many"},
        {"choices": [{"message": {"content": "ok"}}], "usage": {"prompt_tokens": -3, "completion_tokens": True}},
    ]
    bodies = [json.dumps(s).encode() for s in shapes]
    bodies += [b"", b"{", b"\xff\xfe", b'{"choices": [{"message": {"content": "\\ud800"}}]}', b"null" * 1000]
    bodies += [rng.randbytes(rng.randrange(300)) for _ in range(100)]
    return bodies


def test_the_clients_reading_of_any_2xx_body_is_an_answer_or_a_reasoned_failure():
    for body in completion_bodies(random.Random(11)):
        try:
            result = _parse_completion("k", body, 1)
        except HttpError as e:
            assert REASON.fullmatch(e.reason)
        else:
            assert isinstance(result.text, str) and result.text.strip() and result.completion_tokens >= 0
            for decision in read_every_way(result.text):
                check_decision(decision)


def test_adversarial_replies_through_the_real_server_and_handler(tmp_path):
    texts = [ADVERSARIAL[n] for n in ("lone_surrogate", "nul", "huge", "fences", "line_separators", "whitespace")]
    with OpenAIServer(responder=lambda r: texts[int(r["messages"][-1]["content"])]) as srv:
        cfg = from_dict(GenerateConfig, srv.generate_settings() | {"max_new_tokens": 10**6})
        handler = GenerationHandler(cfg, load_templates())
        plans = [
            Plan.single(
                "p",
                replace(METAS[0], key=f"{i:09d}"),
                ChatRequest(f"{i:09d}", [{"role": "user", "content": str(i)}], max_tokens=10**6),
            )
            for i in range(len(texts))
        ]
        replies = [r.inference for r in handler.run_inference(plans, handler.load_model())]
    reasons = [r.parts[0].decision.reason for r in replies]
    assert reasons[:2] == ["bad_characters", "bad_characters"] and reasons[2] in {"repetitive", "bad_length"}
    assert reasons[5] == "empty_completion"
    for plan, reply in zip(plans, replies):
        check_decision(reply.parts[0].decision)
        written_as(judge_reply(plan, reply, "m", "0" * 64), tmp_path / f"{plan.key}.parquet")
