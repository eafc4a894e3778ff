"""Caption quality: one small rule per reason, checked in a fixed order by :func:`check_caption`.

Order (the first rule that fails names the reason): ``no_caption``, ``too_many_chars`` (so that no rule reads an
unbounded text), ``mojibake`` (repaired, or rejected: always for U+FFFD, which no repair can undo),
``filename_caption``, ``url_caption``, ``boilerplate_caption``, ``repeated_tokens`` (the four content-free rules,
each skipped when not in ``cfg.rules``), ``too_few_words`` / ``too_many_words``, then ``wrong_language``.
The cheap, certain rules run first; language identification, the one that needs a model, runs last and only on
captions long enough to identify.

Words are ``\\w+`` runs, except that every CJK character (Han, kana) counts as one word: Chinese and Japanese are
written without spaces, so a whole sentence would otherwise be one "word" and fail ``min_words``/pass ``max_words``
by accident. Hangul is written with spaces and counts by runs like any other script.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import ftfy

from visinstruct.configs.curate import TextQualityConfig
from visinstruct.schemas import Decision

QUOTE_CHARS = 80  # how much of a caption a message quotes
MOSTLY = 0.5  # "mostly" a file name / URLs / boilerplate: at least this share of the caption's words

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # kana, CJK ideographs (+ extension A, compatibility)
_WORD = re.compile(rf"[{_CJK}]|(?:(?![{_CJK}])\w)+")

_IMAGE_EXT = r"(?:jpe?g|jpe|png|gif|webp|bmp|tiff?|heic|heif|avif|raw|cr2|nef|arw|dng|svg|ico|mp4|mov|avi)"
# a caption that IS a file name: a stem of name characters (no commas, colons, quotes: not a sentence) + extension
# (repeats are bounded so that a long caption costs linear time, never a quadratic backtrack)
_WHOLE_FILENAME = re.compile(rf"[\w\-.~+()\[\] ]{{0,200}}\w[\w\-.~+()\[\] ]{{0,200}}\.{_IMAGE_EXT}", re.IGNORECASE)
_FILENAME_TOKENS = re.compile(
    "|".join(
        (
            rf"\b[\w\-~+]{{1,200}}(?: ?\(\d{{1,6}}\))?\.{_IMAGE_EXT}\b",  # IMG_1234.jpg, photo (3).png
            # names cameras and phones give their files: IMG_1234, DSC00012, DSCF0042, PXL_20230101_120000123
            r"\b(?:IMG|DSC[NF]?|DCIM|DJI|GOPR|GP|PXL|MVIMG|VID|SAM|WP|PANO|P|CIMG|IMAG|HPIM|PICT|DSCN)[_\-]?\d{3,}"
            r"(?:[_\-]\w{1,40}){0,8}\b",
            # generic stems numbered by a file manager: image (3), photo_12, Screenshot 2021-03-04, untitled-2
            r"\b(?:image|img|photo|picture|pic|screenshot|scan|untitled|file)[ _\-]?\(?\d[\d\-_.]{0,40}\)?",
        )
    ),
    re.IGNORECASE,
)

_TLD = r"(?:com|net|org|edu|gov|io|co|uk|de|fr|es|it|nl|ru|cn|jp|br|in|au|ca|info|biz|me|tv|ly|us|eu|pl|ch|se)"
_URL_TOKENS = re.compile(
    rf"\b(?:https?|ftp)://\S{{1,2048}}|\bwww\.\S{{1,2048}}|\b[\w\-]{{1,63}}(?:\.[\w\-]{{1,63}}){{0,8}}\.{_TLD}\b(?:/\S{{0,2048}})?",
    re.IGNORECASE,
)

# content-free stock/alt-text phrases (matched on word boundaries, case-insensitive)
_BOILERPLATE_PHRASES = re.compile(
    r"\b(?:"
    + "|".join(
        (
            r"stock (?:photo(?:graph)?s?|photography|images?|pictures?|footage|vectors?)",
            r"(?:this )?image may contain",
            r"may contain",
            r"no (?:description|image|photo|picture|preview) available",
            r"(?:image|photo|picture|preview) (?:not|un)available",
            r"untitled",
            r"click (?:to enlarge|here|for (?:full size|larger image))",
            r"royalty[ \-]free",
            r"free download",
            r"downloads?",
            r"thumbnails?",
            r"placeholder",
            r"default (?:image|avatar|thumbnail|picture|photo)",
            r"(?:no )?alt text",
            r"high resolution",
            r"hd",
        )
    )
    + r")\b",
    re.IGNORECASE,
)
_URL_FILLER = frozenset("visit see source via from at on by credit credits link more info here to the a".split())
_AUTO_ALT_TEXT = re.compile(r"\s*(?:this )?(?:image|photo|picture) may contain\b", re.IGNORECASE)
# generic media words, and filler: no content on their own (a caption of only these and phrases describes nothing)
_MEDIA = frozenset(
    "image images photo photos picture pictures pic pics img graphic graphics vector vectors illustration".split()
)
_FILLER = _MEDIA | frozenset("a an the of for and or in on at to with by from this that is are free jpg png".split())


def words(text: str) -> list[str]:
    """The caption's words: ``\\w+`` runs, each CJK character one word (see the module docstring)."""
    return _WORD.findall(text)


def _word_spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in _WORD.finditer(text)]


def _inside(text: str, pattern: re.Pattern[str]) -> tuple[int, int, int]:
    """``(words inside matches of pattern, words outside them, matches)``, in one sweep (matches come in order)."""
    matches = [m.span() for m in pattern.finditer(text)]
    inside = outside = i = 0
    for start, end in _word_spans(text):
        while i < len(matches) and matches[i][1] <= start:
            i += 1
        if i < len(matches) and matches[i][0] <= start and end <= matches[i][1]:
            inside += 1
        else:
            outside += 1
    return inside, outside, len(matches)


def _covered_share(text: str, pattern: re.Pattern[str]) -> float:
    """The share of the caption's words that lie inside matches of ``pattern`` (0 for a caption without words)."""
    inside, outside, _ = _inside(text, pattern)
    return inside / (inside + outside) if inside + outside else 0.0


def quote(caption: str) -> str:
    """A one-line quotation of (the start of) a caption for a message."""
    flat = " ".join(caption.split())
    return repr(flat if len(flat) <= QUOTE_CHARS else flat[:QUOTE_CHARS] + "...")


def repaired_mojibake(caption: str) -> str:
    """The caption with its mojibake undone (``cafÃ©`` -> ``café``, ``â€™`` -> ``’``).

    ``ftfy.fix_encoding`` only, not ``ftfy.fix_text``: the latter also straightens curly quotes, unescapes HTML and
    normalises Unicode, so a correct caption with a ``’`` would count as "mojibake" and be rejected (or rewritten)
    for no reason.
    """
    return ftfy.fix_encoding(caption)


def is_filename(caption: str) -> bool:
    """The caption is a file name, or file names are at least half its words.

    A file name is a name with an image/video extension (``IMG_1234.jpg``, ``photo (3).png``, ``image.jpeg``), a
    camera's or phone's file name without one (``DSC00012``, ``PXL_20230101_120000``), or a numbered generic stem
    (``image (3)``, ``Screenshot 2021-03-04``). A bare extension in a sentence ("saved as a .jpg file") is no file
    name: it has no stem. A whole caption ending in an extension whose stem has no sentence punctuation
    (``Screenshot 2021-03-04 at 10.22.33.png``) is a file name too.
    """
    text = caption.strip()
    return bool(_WHOLE_FILENAME.fullmatch(text)) or _covered_share(text, _FILENAME_TOKENS) >= MOSTLY


def is_url(caption: str) -> bool:
    """URLs or bare domains (``https://...``, ``www.x``, ``shop.example.com/p/1``) are at least half the words.

    Each URL counts as one word, and URLs must outnumber the other words that say something ("visit", "source",
    "via"... say nothing): "Visit http://example.com" is dropped; a brand written as a domain ("Amazon.com logo",
    "a delivery van with the Amazon.com logo parked outside a house") stays.
    """
    found = list(_URL_TOKENS.finditer(caption))
    rest = words(_URL_TOKENS.sub(" ", caption))
    content = [w for w in rest if w.lower() not in _URL_FILLER]
    return len(found) > len(content)  # each URL one word: "Amazon.com logo" is half a URL, and stays


def is_boilerplate(caption: str) -> bool:
    """The caption is stock/alt-text boilerplate, alone or as most of it.

    Precisely: dropped when (1) it has at least one boilerplate phrase or generic media word (``stock photo``,
    ``image may contain``, ``no description available``, ``untitled``, ``click to enlarge``, ``royalty free``,
    ``download``, ``thumbnail``, ``placeholder``, ``default image``, ``HD``: all in ``_BOILERPLATE_PHRASES``;
    ``image``, ``photo``, ``picture``... in ``_MEDIA``) and every other word is filler (articles, prepositions,
    ``free``, numbers): "Stock photo", "An untitled image", "Placeholder"; or (2) boilerplate phrases make up at
    least half of its words: "Download free stock photo of dog". A real description that uses such a word keeps
    its content words in the majority and stays: "Stock photo of a dog running on the beach", "Untitled (Blue
    Figure), oil on canvas", "A man waits for a download to finish on
    his laptop".
    """
    all_words = [w.lower() for w in words(caption)]
    if not all_words:
        return False
    if _AUTO_ALT_TEXT.match(caption):  # "Image may contain: 2 people, smiling": a generator's tags, not a caption
        return True
    stripped = _BOILERPLATE_PHRASES.sub(" ", caption)
    phrase_words = len(all_words) - len(words(stripped))
    rest = [w.lower() for w in words(stripped)]
    content = [w for w in rest if w not in _FILLER and not w.isdigit()]
    if not content and (phrase_words or any(w in _MEDIA for w in rest)):
        return True
    return phrase_words / len(all_words) >= MOSTLY


def is_repeated(caption: str) -> bool:
    """The caption is mostly one token repeated, or a tag dump of a few tokens repeated.

    With at least 3 words (lower-cased): dropped when one word is more than half of them ("dog dog dog dog",
    "sale sale cheap cheap sale"), or, with at least 6 words, when at most 40% of them are distinct ("cheap shoes
    cheap bags cheap shoes bags cheap"). Real sentences repeat function words ("a dog and a cat and a bird" is 5
    distinct of 8) but not half their words; "New York, New York" (2 of 4, not more than half) stays.
    CJK characters are left out of the count: a Chinese sentence repeats common characters (的, 一) the way English
    repeats letters, not words.
    """
    tokens = [w.lower() for w in words(caption) if not re.fullmatch(f"[{_CJK}]", w)]
    if len(tokens) < 3:
        return False
    top = Counter(tokens).most_common(1)[0][1]
    if top > len(tokens) / 2:
        return True
    return len(tokens) >= 6 and len(set(tokens)) <= 0.4 * len(tokens)


@lru_cache(maxsize=1)
def language_identifier() -> Any:
    """py3langid's identifier with normalised probabilities, built once per process (loading takes ~1 s).

    py3langid 0.4 builds it with ``from_model_file`` (older releases called it ``from_pickled_model``).
    """
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def unknown_languages(codes: Iterable[str]) -> list[str]:
    """The codes py3langid cannot name (a config that allows them would drop every caption it identifies)."""
    known = set(language_identifier().nb_classes)
    return sorted(c for c in codes if c not in known)


def identify_language(text: str) -> tuple[str, float]:
    """The most likely ISO 639-1 language of ``text`` and its probability (0-1)."""
    language, probability = language_identifier().classify(text)
    return str(language), float(probability)


def _drop(reason: str, what: str, caption: str, detail: dict[str, Any] | None = None) -> Decision[str]:
    return Decision.drop(reason, f"{what}: {quote(caption)}", detail)


def check_caption(caption: str | None, cfg: TextQualityConfig) -> Decision[str]:
    """Keep the caption to write (mojibake repaired when ``cfg.fix_mojibake``, else unchanged) or drop it with its
    reason (order in the module docstring).

    Language is checked only when ``cfg.languages`` is set and the caption has at least ``language_min_words``
    words, and a caption is dropped only when its identified language is not allowed AND identified with at least
    ``language_min_probability``: short captions and names are often misidentified ("red car" comes out English at
    0.17), and an unsure identification is no evidence against a caption.
    """
    if caption is None or not caption.strip():
        return Decision.drop("no_caption", "the sample has no caption" if caption is None else "the caption is blank")
    if len(caption) > cfg.max_chars:  # before any rule: none then reads more than max_chars
        return _drop("too_many_chars", f"{len(caption)} characters, over max_chars {cfg.max_chars}", caption)
    if "\ufffd" in caption:  # bytes that were not text in their encoding: replaced, past any repair
        return _drop("mojibake", "the caption holds U+FFFD (undecodable bytes)", caption)
    repaired = repaired_mojibake(caption)
    if repaired != caption:
        if not cfg.fix_mojibake:
            return _drop("mojibake", "mis-decoded text (mojibake)", caption, {"repaired": repaired})
        caption = repaired
    rules: Iterable[tuple[str, str, str, Any]] = (
        ("filename", "filename_caption", "the caption is a file name", is_filename),
        ("url", "url_caption", "the caption is a URL", is_url),
        ("boilerplate", "boilerplate_caption", "the caption is stock/alt-text boilerplate", is_boilerplate),
        ("repeated_tokens", "repeated_tokens", "the caption is mostly repeated words", is_repeated),
    )
    for rule, reason, what, fails in rules:
        if rule in cfg.rules and fails(caption):
            return _drop(reason, what, caption)
    count = len(words(caption))
    if count < cfg.min_words:
        return _drop("too_few_words", f"{count} words, under min_words {cfg.min_words}", caption, {"words": count})
    if count > cfg.max_words:
        return _drop("too_many_words", f"{count} words, over max_words {cfg.max_words}", caption, {"words": count})
    if cfg.languages and count >= cfg.language_min_words:
        language, probability = identify_language(caption)
        if language not in cfg.languages and probability >= cfg.language_min_probability:
            return _drop(
                "wrong_language",
                f"language {language} ({probability:.2f}) is not in {list(cfg.languages)}",
                caption,
                {"language": language, "probability": round(probability, 4), "allowed": list(cfg.languages)},
            )
    return Decision.keep(caption)
