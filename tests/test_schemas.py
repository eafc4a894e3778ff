"""Records, keys and tables: every schema round-trips through pyarrow and parquet."""

import copy
import dataclasses
import io
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from visinstruct.schemas import (
    INDEX_SCHEMA,
    REJECTED_SCHEMA,
    SCHEMA_VERSION,
    STATS_SCHEMA,
    Box,
    ClipScore,
    Decision,
    Dropped,
    FetchedImage,
    GenerationInfo,
    ImageTextPair,
    IndexRow,
    JsonDict,
    Member,
    Rejection,
    SampleMeta,
    ShardStats,
    Turn,
    arrow_schema,
    conversation_problems,
    from_table,
    index_digits,
    key_for_row,
    make_key,
    parse_key,
    to_table,
)
from visinstruct.schemas.decision import MESSAGE_CHARS

CONVERSATION = [
    Turn("human", "<image>\nWhat is the dog doing?"),
    Turn("gpt", "It is leaping for a frisbee."),
    Turn("human", "What colour is it?"),
    Turn("gpt", "Brown and white."),
]

EXAMPLES = [
    ImageTextPair(
        key="000000000",
        url="https://example.com/a.jpg",
        caption="a dog",
        captions=["a brown dog"],
        boxes=[Box("dog", [0.12, 0.3, 0.55, 0.91])],
        tags=["animal"],
        conversations=CONVERSATION,
        source=JsonDict({"license": "cc-by", "nested": {"n": [1, 2]}}),
    ),
    ImageTextPair(key="000000001", path="/data/b.png"),
    FetchedImage(
        key="000000002",
        image=b"\xff\xd8\xff\x00binary\x00",
        format="jpg",
        width=256,
        height=192,
        original_width=1024,
        original_height=768,
        sha256="ab" * 32,
        phash="f0e1d2c3b4a59687",
    ),
    ClipScore(score=0.3125, model="ViT-B-32", pretrained="laion2b_s34b_b79k"),
    ClipScore(score=-0.01, model="tiny"),
    GenerationInfo(
        kind="conversation",
        model="SmolLM2",
        template_sha256="00" * 32,
        seed=17,
        prompt_tokens=412,
        completion_tokens=96,
    ),
    Rejection(
        stage="download",
        reason="http_404",
        message="404 Not Found",
        key="000000003",
        url="http://x/y.jpg",
        detail=JsonDict({"attempts": 1}),
    ),
    Rejection(stage="read", reason="malformed_row", message="no url"),
    IndexRow(
        key="000000000",
        status="success",
        url="u",
        caption="c",
        width=1,
        height=2,
        original_width=3,
        original_height=4,
        sha256="s",
        phash="p",
        members=[Member("000000000.jpg", 512, 100)],
        clip_score=0.3,
        conversation_kind="detailed",
    ),
    IndexRow(key="000000001", status="http_404", error_message="404 Not Found"),
    ShardStats(
        shard=3,
        stage="ingest",
        inputs=5,
        written=3,
        rejected=2,
        rejected_by_reason={"http_404": 1, "too_small": 1},
        tar_bytes=1024,
        duration_s=1.5,
    ),
    SampleMeta(
        key="000000000",
        url="u",
        caption="c",
        width=10,
        height=20,
        clip=ClipScore(0.3, "m"),
        conversations=CONVERSATION,
        boxes=[Box("cat", [0, 0, 1, 1])],
        generation=GenerationInfo("detailed", "m", "h", 1),
    ),
]


@pytest.mark.parametrize("record", EXAMPLES, ids=lambda r: type(r).__name__)
def test_every_record_round_trips_through_arrow_and_parquet(record):
    cls = type(record)
    table = to_table([record], cls, SCHEMA_VERSION)
    assert table.schema.equals(arrow_schema(cls, SCHEMA_VERSION))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    read = pq.read_table(pa.BufferReader(buf.getvalue()))
    assert read.schema.metadata[b"visinstruct.schema_version"] == str(SCHEMA_VERSION).encode()
    assert from_table(cls, read) == [record]


def test_table_schemas_carry_record_name_and_version():
    for schema, name in [(INDEX_SCHEMA, b"IndexRow"), (REJECTED_SCHEMA, b"Rejection"), (STATS_SCHEMA, b"ShardStats")]:
        assert schema.metadata[b"visinstruct.record"] == name
        assert schema.metadata[b"visinstruct.schema_version"] == b"1"
    assert INDEX_SCHEMA.field("key").nullable is False
    assert INDEX_SCHEMA.field("members").type.value_type.names == ["name", "offset", "size"]


def test_turn_is_written_with_llava_field_names():
    table = to_table([SampleMeta(key="000000000", conversations=CONVERSATION[:2])], SampleMeta)
    turn = table.column("conversations").to_pylist()[0][0]
    assert turn == {"from": "human", "value": "<image>\nWhat is the dog doing?"}


def test_sample_json_drops_absent_fields_and_round_trips():
    meta = EXAMPLES[-1]
    data = json.loads(meta.to_json())
    assert data["conversations"][0] == {"from": "human", "value": "<image>\nWhat is the dog doing?"}
    assert data["clip"] == {"score": 0.3, "model": "m", "pretrained": None}
    assert "phash" not in data and "tags" not in data and data["schema_version"] == SCHEMA_VERSION
    assert SampleMeta.from_json(meta.to_json()) == meta


def test_sample_json_keeps_unknown_img2dataset_fields():
    raw = {"key": "000000007", "url": "u", "caption": "c", "status": "success", "exif": "{}", "width": 3}
    meta = SampleMeta.from_dict(raw)
    assert meta.extra == {"status": "success", "exif": "{}"}
    assert json.loads(meta.to_json()) == {**raw, "schema_version": SCHEMA_VERSION}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"url": "u"}, "no 'key'"),
        ({"key": "1", "width": "wide"}, "width must be a non-negative integer"),
        ({"key": "1", "caption": 5}, "caption must be a string"),
        ({"key": "1", "boxes": [{"category": "dog", "bbox": [0.5, 0, 0.1, 1]}]}, "x1 <= x2"),
    ],
)
def test_sample_json_rejects_wrong_shapes_naming_the_field(bad, message):
    with pytest.raises(ValueError, match=message):
        SampleMeta.from_dict(bad)


@pytest.mark.parametrize(
    "bad, message",
    [
        ([1], "must be an object"),
        ({"key": 5}, "key must be a string"),
        ({"key": "1", "boxes": ["dog"]}, r"boxes\[0\] must be a JSON object"),
        ({"key": "1", "boxes": [{"bbox": [0, 0, 1, 1]}]}, "'category' is missing"),
        ({"key": "1", "conversations": [{"value": "hi"}]}, "'from' is missing"),
        ({"key": "1", "captions": "abc"}, "captions must be a list"),
        ({"key": "1", "clip": {"score": True, "model": "m"}}, "score must be a number"),
        ({"key": "1", "width": 2**63}, "width must be a non-negative integer"),
        ({"key": "1", "caption": "\ud800"}, "not valid Unicode"),
        ({"key": "1", "source": {"n": [[1]]}, "boxes": [{"category": "dog", "bbox": [0, 0, 1, 1]}]}, None),
    ],
)
def test_sample_json_refuses_every_bad_shape_with_value_error(bad, message):
    if message is None:  # a well-formed control: parses
        assert SampleMeta.from_dict(bad).key == "1"
        return
    with pytest.raises(ValueError, match=message):
        SampleMeta.from_dict(bad)


def test_sample_json_nested_beyond_the_stack_is_a_value_error():
    deep = '{"key": "1", "source": {"x": ' + "[" * 100_000 + "]" * 100_000 + "}}"
    with pytest.raises(ValueError, match="nested"):
        SampleMeta.from_json(deep)
    with pytest.raises(ValueError, match="nested"):
        SampleMeta.from_json('{"key": "1", "extra": ' + "[" * 150 + "]" * 150 + "}")


def _random_json(rng: random.Random, depth: int = 0):
    makers = [
        lambda: None,
        lambda: rng.random() < 0.5,
        lambda: rng.choice([0, -1, 7, 2**63, -(2**70)]),
        lambda: rng.choice([0.5, -0.25, 1.5, float("nan"), float("inf")]),
        lambda: rng.choice(["", "a", "\ud800", "<image>", "x" * 600]),
        lambda: "1",
        lambda: [rng.random() for _ in range(4)],
    ]
    if depth < 3:
        makers += [
            lambda: [_random_json(rng, depth + 1) for _ in range(rng.randrange(5))],
            lambda: {
                rng.choice(["key", "from", "value", "bbox", "category", "score", "model", "z"]): _random_json(
                    rng, depth + 1
                )
                for _ in range(rng.randrange(4))
            },
        ]
    return rng.choice(makers)()


def _paths(value, path=()):
    """Every place in a JSON value a fuzzer can overwrite: each dict entry and each list item, nested."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for k, v in items:
        yield path + (k,)
        yield from _paths(v, path + (k,))


def test_fuzzed_sample_json_parses_or_raises_value_error_only():
    """Seeded random JSON values at every field of a full sample: ``SampleMeta`` or ``ValueError``, nothing else,
    and what parses writes back as UTF-8 JSON that parses to the same record."""
    full = json.loads(EXAMPLES[-1].to_json()) | {
        "captions": ["a", "b"],
        "tags": ["t"],
        "path": "/p",
        "source": {"n": [1]},
        "phash": "p",
        "original_width": 3,
    }
    places = list(_paths(full))
    rng, parsed, refused = random.Random(1234), 0, 0
    for trial in range(3000):
        doc = copy.deepcopy(full)
        for _ in range(rng.randrange(1, 4)):
            where = rng.choice(places)
            parent = doc
            try:
                for k in where[:-1]:
                    parent = parent[k]
                if rng.random() < 0.2 and isinstance(parent, dict):
                    parent.pop(where[-1], None)
                else:
                    parent[where[-1]] = _random_json(rng)
            except (KeyError, IndexError, TypeError):  # an earlier mutation replaced the path's parent
                continue
        if trial % 50 == 0:
            doc = _random_json(rng)
        text = json.dumps(doc, ensure_ascii=True, allow_nan=True)
        try:
            meta = SampleMeta.from_json(text)
        except ValueError:
            refused += 1
            continue
        parsed += 1
        assert SampleMeta.from_json(meta.to_json().encode("utf-8")).to_json() == meta.to_json()
    assert parsed > 100 and refused > 1000  # both sides exercised


def test_from_pair_copies_input_fields_and_image_sizes():
    pair, image = EXAMPLES[0], EXAMPLES[2]
    meta = SampleMeta.from_pair(pair, image)
    assert (meta.key, meta.url, meta.caption, meta.boxes, meta.source) == (
        pair.key,
        pair.url,
        pair.caption,
        pair.boxes,
        pair.source,
    )
    assert (meta.width, meta.original_height, meta.sha256) == (256, 768, "ab" * 32)


def test_keys_are_zero_padded_sortable_dot_free_and_parse_back():
    keys = [key_for_row(row, shard_size=100) for row in range(250)]
    assert keys[0] == "000000000" and keys[101] == "000010001" and keys[249] == "000020049"
    assert keys == sorted(keys) and len(set(keys)) == 250 and not any("." in k for k in keys)
    assert [parse_key(k) for k in keys[99:102]] == [(0, 99), (1, 0), (1, 1)]
    assert index_digits(10_000) == 4 and index_digits(10_001) == 5
    assert key_for_row(10_000, shard_size=20_000) == "0000010000"
    with pytest.raises(ValueError):
        make_key(0, 10_000)
    with pytest.raises(ValueError):
        parse_key("00000.001")


def test_shard_stats_must_add_up():
    with pytest.raises(ValueError, match="inputs"):
        ShardStats(shard=0, stage="ingest", inputs=3, written=1, rejected=1, rejected_by_reason={"x": 1})
    with pytest.raises(ValueError, match="by reason"):
        ShardStats(shard=0, stage="ingest", inputs=2, written=1, rejected=1, rejected_by_reason={"x": 2})


def test_box_rejects_unnormalised_or_malformed_boxes():
    with pytest.raises(ValueError):
        Box("dog", [0, 0, 1.5, 1])
    with pytest.raises(ValueError):
        Box("dog", [0, 0, 1])


@pytest.mark.parametrize(
    "turns, problem",
    [
        (CONVERSATION, None),
        (CONVERSATION[:1], "at least one"),
        ([Turn("gpt", "<image>\nhi"), Turn("human", "x")], "expected 'human'"),
        ([Turn("human", "<image>\nhi"), Turn("gpt", "  ")], "empty"),
        ([Turn("human", "hi"), Turn("gpt", "<image> x")], "exactly once"),
        ([Turn("human", "<image><image>hi"), Turn("gpt", "x")], "exactly once"),
    ],
)
def test_conversation_problems(turns, problem):
    problems = conversation_problems(turns)
    if problem is None:
        assert problems == []
    else:
        assert any(problem in p for p in problems), problems


def test_records_are_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        EXAMPLES[0].caption = "changed"


# -- Decision: the one keep-or-drop type ----------------------------------------------------------------------------


def test_a_kept_decision_carries_its_value_and_index_and_has_no_dead_letter_row():
    kept = Decision.keep("pair", clip_score=0.3)
    assert (kept.kept, kept.value, kept.reason, dict(kept.index)) == (True, "pair", None, {"clip_score": 0.3})
    with pytest.raises(ValueError, match="a kept record has no dead-letter row"):
        kept.rejection("filter", "000000001")


def test_a_drop_is_its_dead_letter_row_and_reads_back_from_it():
    drop = Decision.drop("too_small", "32x20 is under 64 pixels", {"width": 32}, clip_score=0.1)
    row = drop.rejection("decode", "000000001", "http://x/a.jpg")
    assert row == Rejection(
        "decode", "too_small", "32x20 is under 64 pixels", "000000001", "http://x/a.jpg", {"width": 32}
    )
    back = Decision.from_rejection(row, clip_score=0.1)
    assert (back.kept, back.reason, back.message, dict(back.detail)) == (
        False,
        "too_small",
        drop.message,
        {"width": 32},
    )
    assert back.index == drop.index


def test_a_drop_needs_a_reason_and_its_message_is_bounded():
    with pytest.raises(ValueError, match="needs a reason"):
        Decision.drop("", "no reason")
    assert len(Decision.drop("decode_error", "x" * 100_000).message) == MESSAGE_CHARS


def test_dropped_is_the_same_decision_raised():
    with pytest.raises(Dropped) as raised:
        raise Dropped("not_an_image", "the bytes are not an image", {"bytes": 12})
    assert str(raised.value) == "the bytes are not an image"
    assert raised.value.decision == Decision.drop("not_an_image", "the bytes are not an image", {"bytes": 12})


def test_every_record_survives_pickle_copy_and_deepcopy_equal_and_smaller_than_field_names_would_make_it():
    import pickle

    from visinstruct.schemas import ImageRef

    pair = ImageTextPair(
        url="http://example.com/a.jpg",
        caption="a dog",
        boxes=[Box("dog", [0.1, 0.2, 0.5, 0.9])],
        conversations=[Turn("human", "<image>\nWhat?"), Turn("gpt", "A dog.")],
        images=[ImageRef(location="a.jpg"), ImageRef(data=b"\xff\xd8")],
        source={"license": "cc-by", "nested": [1, {"a": 2}]},
        key="000000001",
    )
    records = [
        pair,
        IndexRow("000000001", "success", url=pair.url, members=[Member("000000001.jpg", 512, 10)], image_count=1),
        Rejection("download", "http_404", "not found", "000000002", "http://x/y", JsonDict({"attempts": 1})),
        ShardStats(shard=0, stage="ingest", inputs=2, written=1, rejected=1, rejected_by_reason={"http_404": 1}),
        SampleMeta(key="000000001", caption="a dog", clip=ClipScore(0.3, "ViT-B-32", "openai")),
    ]
    for record in records:
        for twin in (pickle.loads(pickle.dumps(record)), copy.copy(record), copy.deepcopy(record)):
            assert twin == record and type(twin) is type(record)
        names = [f.name for f in dataclasses.fields(record)]
        assert not all(name.encode() in pickle.dumps(record) for name in names)  # values only, not field names
