"""Read an LLM reply into LLaVA turns and decide whether it is good training data: plain functions, no Beam.

The answer is a :class:`~visinstruct.schemas.Decision`: keep, with the turns as its value, or drop with a stable
reason, when the reply:

- holds characters no training text should (NUL and other control characters, lone surrogates:
  ``bad_characters``);
- cannot be read in the kind's format (``unparseable``);
- refuses or talks about itself as a model (``refusal``);
- gives the game away by mentioning captions, labels, bounding boxes or coordinates, or by quoting one of the
  sample's box coordinates (``mentions_context``); ordinary numbers ("about 0.75 miles") are fine;
- asks the same question twice (``duplicate_question``);
- loops: a turn repeats a sentence or a run of words (``repetitive``, see :func:`repetition`);
- names an object that the context does not contain, when the object vocabulary knows it (``unknown_object``);
- has a turn shorter or longer than the bounds, or is too long to read at all (``bad_length``);
- holds a chat-template marker such as ``<|im_end|>``, or breaks LLaVA's format rules (``bad_format``, from
  :func:`visinstruct.schemas.conversation_problems`).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from visinstruct.schemas import IMAGE_TOKEN, Decision, SampleMeta, Turn, conversation_problems

_QUESTION = re.compile(r"^(?:question|q|user|human)\s*\d*\s*[:：]\s*(.*)$", re.IGNORECASE)
_ANSWER = re.compile(r"^(?:answer|a|assistant|gpt)\s*\d*\s*[:：]\s*(.*)$", re.IGNORECASE)
_DECORATION = re.compile(r"^\s*(?:[-*•]+|\d+[.)])?\s*(?:\*\*)?|(?:\*\*)")
_FENCE = re.compile(r"```[\w+-]*")  # a markdown code fence line around the reply
# Chat-template markers (ChatML, Llama, Mistral): a model that talks past its turn, never training text.
_CHAT_MARKER = re.compile(r"<\|[\w-]{1,40}\|>|</?s>|\[/?INST\]", re.IGNORECASE)
_REFUSAL = re.compile(
    r"\b(?:i'?m sorry|i am sorry|as an ai|language model|i cannot|i can'?t|i can not|i am unable|i'?m unable|"
    r"unable to (?:see|view|access|determine)|i (?:don'?t|do not) have (?:access|the ability|any information))\b",
    re.IGNORECASE,
)
_CONTEXT = re.compile(
    r"\b(?:captions?|captioned|bounding[ -]box(?:es)?|coordinates?|labels? (?:say|says|given)|"
    r"(?:given|provided) (?:description|information|text|context|details)|"
    r"according to the (?:description|information|text|context)|as (?:described|mentioned) (?:above|earlier))\b"
    r"|[\[(]\s*-?\d*\.\d+\s*,\s*-?\d*\.\d+"  # a coordinate list: [0.12, 0.30, ...] or (0.12, 0.30)
    r"|\b[xy][12]\s*[=:]\s*-?\d",
    re.IGNORECASE,
)  # a named corner: x1 = 0.12
# A number written as the prompt writes box coordinates (two decimals): a hit when it equals one of the sample's.
_TWO_DECIMALS = re.compile(r"(?<![\d.])[01]?\.\d{2}(?![\d])")
# What no training text holds: C0 controls but tab and newlines, DEL, lone surrogates (unencodable as UTF-8),
# and the non-characters U+FFFE/U+FFFF.
_BAD_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff\ufffe\uffff]")


@dataclass(frozen=True)
class Bounds:
    """Length bounds per turn, in characters."""

    min_chars: int = 2
    max_chars: int = 2000


def _clean(line: str) -> str:
    return _DECORATION.sub("", line).strip()


def parse_qa(text: str) -> list[tuple[str, str]]:
    """``Question: ... / Answer: ...`` pairs (also Q/A, User/Assistant); multi-line answers are joined."""
    pairs: list[list[str]] = []
    current = None  # "q" or "a"
    for raw in text.splitlines():
        line = _clean(raw)
        if not line or _FENCE.fullmatch(line):
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


REPLY_TURNS_LIMIT = 50  # a reply longer than this many of the longest turns is rejected unread (``bad_length``)
# Degenerate repetition, after Gopher's repetition filters (Rae et al. 2021, as datatrove's GopherRepetitionFilter
# applies them to web documents); ours are smaller and sized for one reply turn, so that normal short answers
# ("Yes, it is. It is red.") never trip them. Word characters are what the fractions measure.
REPEATED_SENTENCE_SHARE = 0.3  # sentences (3+ words) that repeat an earlier one hold over 30% of the characters
REPEATED_NGRAM = 5
REPEATED_NGRAM_SHARE = 0.3  # word 5-grams that repeat an earlier one cover over 30% of the characters
# The most frequent 2-, 3- or 4-gram's occurrences cover over 30% of the characters of a turn of 40+ words.
# Gopher's bars (20/18/16%) are for web pages: a short answer names its objects often ("the triangle" is 20% of
# the bundled complex_reasoning example), so the bar is higher here and short turns are left to the rules above.
TOP_NGRAM_SHARE, TOP_NGRAM_SIZES = 0.3, (2, 3, 4)
TOP_NGRAM_MIN_WORDS, TOP_NGRAM_MIN_COUNT = 40, 3
_SENTENCES = re.compile(r"(?<=[.!?。！？])\s+|\n+")
_WORDS = re.compile(r"\w+")


def _share(words: list[str], marked: list[bool]) -> float:
    total = sum(len(w) for w in words)
    return sum(len(w) for w, m in zip(words, marked) if m) / total if total else 0.0


def _repeated_ngram_share(words: list[str], n: int) -> float:
    """The share of word characters covered by n-grams that repeat an earlier n-gram (not counting overlaps)."""
    seen, marked, i = set(), [False] * len(words), 0
    while i + n <= len(words):
        gram = tuple(words[i : i + n])
        if gram in seen:
            marked[i : i + n] = [True] * n
            i += n
        else:
            seen.add(gram)
            i += 1
    return _share(words, marked)


def repetition(text: str) -> str | None:
    """How ``text`` loops, or None: repeated sentences or lines, repeated word 5-grams, or one dominant n-gram.

    Example: eight copies of one sentence, cut mid-way, give ``"repeated sentences hold 79% of the text"``.
    """
    sentences = [_WORDS.findall(s.lower()) for s in _SENTENCES.split(text)]
    seen, repeated, total = set(), 0, 0
    for words in sentences:
        size = sum(len(w) for w in words)
        total += size
        if len(words) >= 3 and tuple(words) in seen:
            repeated += size
        seen.add(tuple(words))
    if total and repeated / total > REPEATED_SENTENCE_SHARE:
        return f"repeated sentences hold {repeated / total:.0%} of the text"
    words = [w for s in sentences for w in s]
    if (share := _repeated_ngram_share(words, REPEATED_NGRAM)) > REPEATED_NGRAM_SHARE:
        return f"repeated {REPEATED_NGRAM}-word runs cover {share:.0%} of the text"
    if len(words) < TOP_NGRAM_MIN_WORDS:
        return None
    total = sum(len(w) for w in words)
    for n in TOP_NGRAM_SIZES:
        counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        gram, count = counts.most_common(1)[0]
        if count >= TOP_NGRAM_MIN_COUNT and (share := count * sum(map(len, gram)) / total) > TOP_NGRAM_SHARE:
            return f"{' '.join(gram)!r} ({count} times) covers {min(share, 1):.0%} of the text"
    return None


def context_mention(text: str, meta: SampleMeta) -> str | None:
    """What in ``text`` shows the model was given a context: a telling phrase, or one of the sample's coordinates.

    Ordinary numbers pass; a two-decimal number equal to one of the sample's box coordinates (the prompt gives
    them to two decimals) does not.
    """
    if m := _CONTEXT.search(text):
        return m.group(0)
    coordinates = {round(v, 2) for box in meta.boxes for v in box.bbox}
    return next((m.group(0) for m in _TWO_DECIMALS.finditer(text) if round(float(m.group(0)), 2) in coordinates), None)


def check(
    pairs: list[tuple[str, str]], meta: SampleMeta, vocabulary: list[str], bounds: Bounds
) -> Decision[list[Turn]]:
    """The decision on parsed pairs (see the module docstring for the reasons, in the order they are checked)."""
    if not pairs:
        return Decision.drop("unparseable", "no question and answer could be read from the reply")
    texts = [t for pair in pairs for t in pair]
    if any(_REFUSAL.search(a) for _, a in pairs):
        return Decision.drop("refusal", "an answer refuses or talks about being a model")
    if hit := next((m for t in texts if (m := context_mention(t, meta))), None):
        return Decision.drop("mentions_context", f"mentions what the model was shown: {hit!r}")
    questions = [_normal(q) for q, _ in pairs]
    if len(set(questions)) != len(questions):
        return Decision.drop("duplicate_question", "the same question is asked twice")
    if loop := next((r for t in texts if (r := repetition(t))), None):
        return Decision.drop("repetitive", f"a turn repeats itself: {loop}")
    if made_up := unknown_objects([a for _, a in pairs], meta, vocabulary):
        return Decision.drop("unknown_object", f"names objects the image does not have: {', '.join(made_up)}")
    if bad := next((t for t in texts if not bounds.min_chars <= len(t) <= bounds.max_chars), None):
        return Decision.drop(
            "bad_length", f"a turn of {len(bad)} characters is outside {bounds.min_chars}-{bounds.max_chars}"
        )
    if marker := next((m for t in texts if (m := _CHAT_MARKER.search(t))), None):
        return Decision.drop("bad_format", f"a turn holds the chat marker {marker.group(0)!r}")
    turns = to_turns(pairs)
    if problems := conversation_problems(turns):
        return Decision.drop("bad_format", "; ".join(problems))
    return Decision.keep(turns)


def read_reply(
    kind_format: str, reply: str, meta: SampleMeta, question: str | None, vocabulary: list[str], bounds: Bounds
) -> Decision[list[Turn]]:
    """Parse and check one reply: ``qa`` replies hold pairs, ``description`` replies answer ``question``."""
    if not isinstance(reply, str):
        return Decision.drop("unparseable", f"the reply is a {type(reply).__name__}, not text")
    if len(reply) > REPLY_TURNS_LIMIT * bounds.max_chars:  # not read at all: reading a megabyte takes seconds
        return Decision.drop(
            "bad_length",
            f"the reply has {len(reply)} characters, more than {REPLY_TURNS_LIMIT} turns of {bounds.max_chars}",
        )
    if bad := _BAD_CHARS.search(reply):
        return Decision.drop("bad_characters", f"the reply holds the character U+{ord(bad.group(0)):04X}")
    if kind_format == "description":
        text = " ".join(c for line in reply.splitlines() if (c := _clean(line)) and not _FENCE.fullmatch(c))
        text = re.sub(r"^(?:answer|description)\s*[:：]\s*", "", text, flags=re.IGNORECASE)
        pairs = [(question or "", text)] if text else []
        return check(pairs, meta, vocabulary, bounds)
    return check(parse_qa(reply), meta, vocabulary, bounds)


COPY_SHARE = 0.5  # a re-caption that is a web caption for half or more of its words copies it


def copies_caption(reply: str, meta: SampleMeta) -> str | None:
    """The web caption a re-caption copies verbatim, or None.

    A re-caption copies a caption (of two words or more) when it holds the caption word for word (case and
    punctuation aside) and the caption is at least half of it: "A dog on grass." copied into "A dog on grass. It is
    brown." is a copy, the same words inside a long description that goes on about what the image shows are not.
    """
    said = _normal(reply).split()
    for caption in [meta.caption, *meta.captions]:
        words = _normal(caption or "").split()
        if len(words) < 2 or len(words) < COPY_SHARE * len(said):
            continue
        n = len(words)
        if any(said[i : i + n] == words for i in range(len(said) - n + 1)):
            return caption
    return None
