"""Caption quality (``transforms/text_quality.py``): each rule names its reason, and ordinary captions all pass."""

from __future__ import annotations

import pytest

from visinstruct.configs.curate import TextQualityConfig
from visinstruct.transforms.text_quality import check_caption, identify_language, is_repeated, words

SENTENCES = {
    "en": "A brown dog runs along the sandy beach at sunset while the waves roll in.",
    "fr": "Un chien brun court le long de la plage de sable au coucher du soleil pendant que les vagues arrivent.",
    "de": "Ein brauner Hund läuft bei Sonnenuntergang am Sandstrand entlang, während die Wellen heranrollen.",
    "es": "Un perro marrón corre por la playa de arena al atardecer mientras llegan las olas.",
    "zh": "一只棕色的狗在日落时沿着沙滩奔跑，海浪不断地涌上岸边。",
    "ru": "Коричневая собака бежит по песчаному пляжу на закате, а волны накатывают на берег одна за другой.",
}

GOOD_CAPTIONS = [
    "A man in a red jacket rides a bicycle across a snowy bridge.",
    "Two children share an ice cream cone on a park bench.",
    "Stock photo of a golden retriever catching a frisbee on the beach.",
    "A photo of my grandmother's kitchen taken in the summer of 1987.",
    "A woman waits for a download to finish on her laptop in a busy cafe.",
    "Crowds gather in Times Square on 31 December 2019 to watch the ball drop.",
    "The score board shows 3-2 after 90 minutes of play.",
    "A delivery van with the Amazon.com logo parked outside a brick house.",
    "Untitled (Blue Figure), oil on canvas, painted by an unknown artist in 1912.",
    "A thumbnail-sized ladybug crawls across a green leaf.",
    "Close-up of a placeholder sign in a shop window reading 'coming soon'.",
    "New York, New York",
    "Fresh tomatoes, basil and mozzarella on a white plate.",
    "Aerial view of a winding river through an autumn forest.",
    "An old steam locomotive puffs smoke as it leaves the station.",
    "Screenshot of a spreadsheet with quarterly sales figures.",
    "A cat sleeping on a keyboard next to a coffee mug.",
    "The photographer saved the picture as a .jpg file before editing it.",
    "Snow-capped mountains reflected in a still alpine lake at dawn.",
    "A chef slices salmon for sushi behind a wooden counter.",
    "Hikers cross a suspension bridge over a deep gorge.",
    "Vintage postcard of the Eiffel Tower, Paris, around 1900.",
    "Royal guards in red tunics march past Buckingham Palace.",
    "A default-looking grey sedan parked among colourful food trucks.",
    "Two dogs and a cat and a bird sit on a porch in the sun.",
    "Download speed test results displayed on a phone held over a wooden desk.",
]


def cfg(**changes) -> TextQualityConfig:
    return TextQualityConfig(**changes)


def reason(caption, **changes) -> str | None:
    return check_caption(caption, cfg(**changes)).reason


@pytest.mark.parametrize("caption", GOOD_CAPTIONS)
def test_ordinary_captions_are_kept_unchanged(caption):
    decision = check_caption(caption, cfg(languages=["en"]))
    assert decision.kept, decision.message
    assert decision.value == caption


@pytest.mark.parametrize("language", sorted(SENTENCES))
def test_captions_in_any_language_are_kept_when_no_languages_are_set(language):
    decision = check_caption(SENTENCES[language], cfg())
    assert decision.kept, decision.message
    assert decision.value == SENTENCES[language]


@pytest.mark.parametrize("language", sorted(SENTENCES))
def test_captions_are_kept_when_their_language_is_allowed(language):
    assert identify_language(SENTENCES[language])[0] == language  # the sentences are plain enough to identify
    assert check_caption(SENTENCES[language], cfg(languages=[language, "en"])).kept


@pytest.mark.parametrize("language", sorted(set(SENTENCES) - {"en"}))
def test_other_languages_are_dropped_with_the_language_found(language):
    decision = check_caption(SENTENCES[language], cfg(languages=["en"]))
    assert decision.reason == "wrong_language"
    assert decision.detail["language"] == language
    assert 0.5 <= decision.detail["probability"] <= 1
    assert decision.detail["allowed"] == ["en"]
    assert language in decision.message and "\n" not in decision.message


def test_an_unsure_identification_keeps_the_caption():
    # two words are barely evidence: "bonne nuit" comes out French, but far from surely
    language, probability = identify_language("bonne nuit")
    assert language == "fr" and probability < 0.9
    assert check_caption("bonne nuit", cfg(languages=["de"], language_min_words=2, language_min_probability=0.9)).kept
    unsure = check_caption("bonne nuit", cfg(languages=["de"], language_min_words=2, language_min_probability=0.1))
    assert unsure.reason == "wrong_language"


def test_short_captions_are_not_language_checked():
    assert check_caption("Bonjour Paris", cfg(languages=["en"], language_min_words=3)).kept
    assert reason("Bonjour mes amis de Paris et de Lyon", languages=["en"], language_min_words=3) == "wrong_language"


def test_no_caption():
    assert reason(None) == "no_caption"
    assert reason("") == "no_caption"
    assert reason("  \n\t ") == "no_caption"


@pytest.mark.parametrize(
    ("broken", "fixed"),
    [
        ("cafÃ© au lait in a white cup on a saucer", "café au lait in a white cup on a saucer"),
        ("Itâ€™s a sunny day at the beach", "It’s a sunny day at the beach"),
        ("Ein GemÃ¼sestand auf dem Markt in MÃ¼nchen", "Ein Gemüsestand auf dem Markt in München"),
    ],
)
def test_mojibake_is_repaired_or_rejected(broken, fixed):
    repaired = check_caption(broken, cfg(fix_mojibake=True))
    assert repaired.kept and repaired.value == fixed
    rejected = check_caption(broken, cfg(fix_mojibake=False))
    assert rejected.reason == "mojibake"
    assert rejected.detail["repaired"] == fixed


def test_correct_typography_is_not_mojibake():
    caption = "It’s a “perfect” crème brûlée — naïve but delicious"
    assert check_caption(caption, cfg(fix_mojibake=False)).value == caption


def test_repaired_mojibake_still_meets_the_other_rules():
    assert reason("IMG_1234.jpg cafÃ©", fix_mojibake=True) == "filename_caption"


@pytest.mark.parametrize(
    "caption",
    [
        "IMG_1234.jpg",
        "DSC00012",
        "photo (3).png",
        "image.jpeg",
        "DSCF0042.JPG",
        "PXL_20230101_120000123",
        "beach_sunset_2019_final.jpg",
        "Screenshot 2021-03-04 at 10.22.33.png",
        "IMG_1234.jpg dog",
        "dog.jpg cat.png",
        "image (3)",
    ],
)
def test_file_names_are_dropped(caption):
    assert reason(caption) == "filename_caption"


@pytest.mark.parametrize(
    "caption",
    [
        "https://example.com/images/1234.jpg",
        "www.example.org",
        "shop.example.com/products/42",
        "Visit http://example.com",
        "example.com example.net",
    ],
)
def test_urls_are_dropped(caption):
    assert reason(caption) == "url_caption"


@pytest.mark.parametrize(
    "caption",
    [
        "stock photo",
        "Image may contain",
        "No description available",
        "Untitled",
        "An untitled image",
        "Click to enlarge",
        "Royalty free stock image",
        "Download",
        "Thumbnail",
        "placeholder image",
        "Default image",
        "Download free stock photo of dog",
        "A photo",
    ],
)
def test_boilerplate_is_dropped(caption):
    assert reason(caption) == "boilerplate_caption"


@pytest.mark.parametrize(
    "caption", ["dog dog dog dog", "sale sale cheap cheap sale", "cheap shoes cheap bags cheap shoes bags cheap"]
)
def test_repeated_tokens_are_dropped(caption):
    assert reason(caption) == "repeated_tokens"


def test_a_long_real_description_is_not_a_tag_dump():
    long_caption = SENTENCES["en"] + " " + " ".join(GOOD_CAPTIONS)  # about 300 words, many "a" and "the"
    assert not is_repeated(long_caption)
    assert check_caption(long_caption, cfg(max_words=1000)).kept


def test_word_bounds():
    one_word = check_caption("Sunset", cfg())
    assert one_word.reason == "too_few_words" and one_word.detail == {"words": 1}
    long_caption = " ".join(f"word{i}" for i in range(301))
    too_long = check_caption(long_caption, cfg())
    assert too_long.reason == "too_many_words" and too_long.detail == {"words": 301}
    assert "\n" not in too_long.message and len(too_long.message) < 200  # the caption is quoted cut short
    assert check_caption("Sunset", cfg(min_words=1)).kept


def test_cjk_characters_count_as_words():
    assert words("一只狗") == ["一", "只", "狗"]
    assert words("A dog 在海滩上") == ["A", "dog", "在", "海", "滩", "上"]
    assert check_caption(SENTENCES["zh"], cfg(min_words=10)).kept
    assert reason(SENTENCES["zh"], max_words=10) == "too_many_words"


@pytest.mark.parametrize(
    ("caption", "rule", "next_reason"),
    [
        ("IMG_1234.jpg", "filename", "too_few_words"),  # IMG_1234, jpg: 2 words, kept
        ("https://example.com/a", "url", None),
        ("Royalty free stock image", "boilerplate", None),
        ("dog dog dog dog", "repeated_tokens", None),
    ],
)
def test_each_content_rule_can_be_switched_off(caption, rule, next_reason):
    others = [r for r in ("filename", "url", "boilerplate", "repeated_tokens") if r != rule]
    assert reason(caption, rules=others, min_words=3 if next_reason else 2) == next_reason


@pytest.mark.parametrize(
    "caption",
    [
        "Amazon.com logo",
        "Paris.fr city hall",
        "bike.co bicycle shop",
        "Mount Kilimanjaro Tanzania Africa",
        "Croissant and cafe au lait",
        "Machu Picchu Peru",
    ],
)
def test_names_that_look_like_domains_or_other_languages_are_kept(caption):
    assert reason(caption, languages=["en"]) is None


def test_generated_alt_text_is_boilerplate():
    assert reason("Image may contain: 2 people, people smiling, outdoor") == "boilerplate_caption"


def test_undecodable_bytes_are_mojibake_that_no_repair_undoes():
    assert reason("caf\ufffd au lait on a small table") == "mojibake"
    assert reason("caf\ufffd au lait on a small table", fix_mojibake=False) == "mojibake"


def test_a_caption_over_max_chars_is_dropped_before_any_rule_reads_it():
    assert reason("a." * 10_000) == "too_many_chars"
    assert reason("x.com " * 3000) == "too_many_chars"
    assert reason("A dog. " * 100, max_chars=10_000) == "repeated_tokens"  # under the bound, the rules read it


def test_language_codes_are_normalised_and_unknown_ones_refused_before_a_run(tmp_path):
    from visinstruct.configs import CurateConfig, from_dict
    from visinstruct.pipelines.curate import CurateShards

    assert cfg(languages=["EN", " de"]).languages == ["en", "de"]
    with pytest.raises(ValueError, match="ISO 639-1"):
        cfg(languages=["eng"])
    curate = from_dict(CurateConfig, {"text": {"languages": ["xx"]}, "write": {"path": str(tmp_path)}})
    with pytest.raises(ValueError, match=r"\['xx'\] are not languages py3langid knows"):
        CurateShards(curate)


def test_a_caption_only_in_the_txt_member_is_the_samples_caption():
    from visinstruct.transforms.rewrite import sample_meta

    members = {"json": b'{"key": "000000001", "url": "http://x/1.jpg"}', "txt": b"A dog on a beach"}
    assert sample_meta("000000001", members).caption == "A dog on a beach"
    with_json_caption = {"json": b'{"key": "000000001", "caption": "A cat"}', "txt": b"A dog on a beach"}
    assert sample_meta("000000001", with_json_caption).caption == "A cat"
