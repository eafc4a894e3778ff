"""The curation stage's config: rules every caption must pass (more curation checks join as sections)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from visinstruct.configs.loader import opt
from visinstruct.configs.stages import OutputConfig, _positive

CAPTION_RULES = ("filename", "url", "boilerplate", "repeated_tokens")


@dataclass
class TextQualityConfig:
    """Caption quality: mojibake repaired (ftfy), language, length in words, and captions that say nothing."""

    fix_mojibake: bool = opt(True, "repair mojibake with ftfy (the repaired caption is written); false: reject it")
    languages: list[str] | None = opt(
        None, "allowed languages, ISO 639-1 codes (py3langid), e.g. [en]; null: any language"
    )
    language_min_words: int = opt(5, "captions shorter than this are not language-checked (too short to tell)")
    language_min_probability: float = opt(
        0.8, "a caption is dropped for its language only when identified at least this surely (names mislead)"
    )
    max_chars: int = opt(5000, "most characters a caption may have (checked first: no rule reads more)")
    min_words: int = opt(2, "fewest words a caption may have")
    max_words: int = opt(300, "most words a caption may have")
    rules: list[str] = opt(
        factory=lambda: list(CAPTION_RULES),
        doc="content-free caption rules: filename (IMG_1234.jpg), url, boilerplate ('stock photo', "
        "'image may contain'), repeated_tokens",
    )

    def __post_init__(self):
        _positive("min_words", self.min_words, allow_zero=True)
        _positive("max_words", self.max_words)
        _positive("language_min_words", self.language_min_words, allow_zero=True)
        if self.max_words < self.min_words:
            raise ValueError("'max_words' must be >= 'min_words'")
        if not 0 <= self.language_min_probability <= 1:
            raise ValueError(f"'language_min_probability' must be within 0-1, got {self.language_min_probability}")
        unknown = sorted(set(self.rules) - set(CAPTION_RULES))
        if unknown:
            raise ValueError(f"unknown rules {unknown}: choose from {list(CAPTION_RULES)}")
        _positive("max_chars", self.max_chars)
        if self.languages is not None:
            self.languages = [str(code).strip().lower() for code in self.languages]
            if not self.languages or any(not re.fullmatch("[a-z]{2}", code) for code in self.languages):
                raise ValueError(f"'languages' takes ISO 639-1 codes such as [en, de], got {self.languages}")


@dataclass
class CurateConfig:
    """``visinstruct curate``: drop pairs whose caption is unusable, each with its reason (text checks first)."""

    text: TextQualityConfig | None = opt(
        factory=TextQualityConfig, doc="caption quality (required: the only check yet)"
    )
    input: str | None = opt(None, "input shards (standalone runs): a folder, glob or brace pattern of tars")
    write: OutputConfig | None = opt(None, "output shards (standalone runs)")

    def __post_init__(self):
        if self.text is None:
            raise ValueError("curate has nothing to check: give it a 'text' section")
