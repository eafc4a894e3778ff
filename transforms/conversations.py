"""Read an LLM reply into LLaVA turns and decide whether it is good training data: plain functions, no Beam.

A reply is rejected, with a stable reason, when it:

- cannot be read in the kind's format (``unparseable``);
- refuses or talks about itself as a model (``refusal``);
- gives the game away by mentioning captions, labels, boxes or coordinates (``mentions_context``);
- asks the same question twice (``duplicate_question``);
- names an object that the context does not contain, when the object vocabulary knows it (``unknown_object``);
- has a turn shorter or longer than the bounds (``bad_length``);
- breaks LLaVA's format rules (``bad_format``, from :func:`visinstruct.schemas.conversation_problems`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from visinstruct.schemas import IMAGE_TOKEN, SampleMeta, Turn, conversation_problems

_QUESTION = re.compile(r"^(?:question|q|user|human)\s*\d*\s*[:：]\s*(.*)$", re.IGNORECASE)
_ANSWER = re.compile(r"^(?:answer|a|assistant|gpt)\s*\d*\s*[:：]\s*(.*)$", re.IGNORECASE)
_DECORATION = re.compile(r"^\s*(?:[-*•]+|\d+[.)])?\s*(?:\*\*)?|(?:\*\*)")
_REFUSAL = re.compile(
    r"\b(?:i'?m sorry|i am sorry|as an ai|language model|i cannot|i can'?t|i can not|i am unable|i'?m unable|"
    r"unable to (?:see|view|access|determine)|i (?:don'?t|do not) have (?:access|the ability|any information))\b",
    re.IGNORECASE)
_CONTEXT = re.compile(
    r"\b(?:captions?|bounding[ -]box(?:es)?|boxes|coordinates?|labels? (?:say|says|given)|"
    r"(?:given|provided) (?:description|information|text|context|details)|"
    r"according to the (?:description|information|text|context)|as (?:described|mentioned) (?:above|earlier))\b"
    r"|\[\s*-?\d*\.\d+\s*,\s*-?\d*\.\d+"  # a coordinate list
    r"|(?<![\d.])0?\.\d{2,}\b", re.IGNORECASE)  # a bare coordinate such as 0.73: boxes are given to 2 decimals


@dataclass(frozen=True)
class Bounds:
    """Length bounds per turn, in characters."""

    min_chars: int = 2
    max_chars: int = 2000


@dataclass(frozen=True)
class Verdict:
    """Turns when the reply is good; else a reason code and message."""

    turns: list[Turn] | None
    reason: str | None = None
    message: str | None = None


def _clean(line: str) -> str:
    return _DECORATION.sub("", line).strip()


def parse_qa(text: str) -> list[tuple[str, str]]:
    """``Question: ... / Answer: ...`` pairs (also Q/A, User/Assistant); multi-line answers are joined."""
    pairs: list[list[str]] = []
    current = None  # "q" or "a"
    for raw in text.splitlines():
        line = _clean(raw)
        if not line:
            continue
        if m := _QUESTION.match(line):
            pairs.append([m.group(1).strip(), ""])
            current = "q"
        elif (m := _ANSWER.match(line)) and pairs:
            pairs[-1][1] = (pairs[-1][1] + " " + m.group(1)).strip()
            current = "a"
        elif pairs and current is not None:
            index = 0 if current == "q" else 1
            pairs[-1][index] = (pairs[-1][index] + " " + line).strip()
    return [(q, a) for q, a in pairs if q and a]


def _normal(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def _mentions(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}(?:s|es)?\b", text) is not None


def unknown_objects(answers: list[str], meta: SampleMeta, vocabulary: list[str]) -> list[str]:
    """Vocabulary objects the answers name that neither captions, box categories nor tags mention."""
    context = " ".join([meta.caption or "", *meta.captions, *(b.category for b in meta.boxes), *meta.tags]).lower()
    said = " ".join(answers).lower()
    return [w for w in vocabulary if _mentions(said, w) and not _mentions(context, w)]


def to_turns(pairs: list[tuple[str, str]]) -> list[Turn]:
    """LLaVA turns; the image token opens the first human turn."""
    turns = []
    for i, (question, answer) in enumerate(pairs):
        turns.append(Turn("human", f"{IMAGE_TOKEN}\n{question}" if i == 0 else question))
        turns.append(Turn("gpt", answer))
    return turns


def check(pairs: list[tuple[str, str]], meta: SampleMeta, vocabulary: list[str], bounds: Bounds) -> Verdict:
    """The verdict on parsed pairs (see the module docstring for the reasons, in the order they are checked)."""
    if not pairs:
        return Verdict(None, "unparseable", "no question and answer could be read from the reply")
    texts = [t for pair in pairs for t in pair]
    if any(_REFUSAL.search(a) for _, a in pairs):
        return Verdict(None, "refusal", "an answer refuses or talks about being a model")
    if hit := next((m for t in texts if (m := _CONTEXT.search(t))), None):
        return Verdict(None, "mentions_context", f"mentions what the model was shown: {hit.group(0)!r}")
    questions = [_normal(q) for q, _ in pairs]
    if len(set(questions)) != len(questions):
        return Verdict(None, "duplicate_question", "the same question is asked twice")
    if made_up := unknown_objects([a for _, a in pairs], meta, vocabulary):
        return Verdict(None, "unknown_object", f"names objects the image does not have: {', '.join(made_up)}")
    if bad := next((t for t in texts if not bounds.min_chars <= len(t) <= bounds.max_chars), None):
        return Verdict(None, "bad_length", f"a turn of {len(bad)} characters is outside "
                                           f"{bounds.min_chars}-{bounds.max_chars}")
    turns = to_turns(pairs)
    if problems := conversation_problems(turns):
        return Verdict(None, "bad_format", "; ".join(problems))
    return Verdict(turns)


def read_reply(kind_format: str, reply: str, meta: SampleMeta, question: str | None, vocabulary: list[str],
               bounds: Bounds) -> Verdict:
    """Parse and check one reply: ``qa`` replies hold pairs, ``description`` replies answer ``question``."""
    if kind_format == "description":
        text = " ".join(_clean(line) for line in reply.splitlines() if line.strip())
        text = re.sub(r"^(?:answer|description)\s*[:：]\s*", "", text, flags=re.IGNORECASE)
        pairs = [(question or "", text)] if text else []
        return check(pairs, meta, vocabulary, bounds)
    return check(parse_qa(reply), meta, vocabulary, bounds)
