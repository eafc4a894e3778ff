"""Curation, text quality: every caption is kept (mojibake repaired in its JSON and its ``.txt``) or dropped with its
reason, the rows add up, and the output validates; the command runs without a config file."""

import glob
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from visinstruct.cli.main import main
from visinstruct.configs import CurateConfig, IngestConfig, from_dict
from visinstruct.pipelines import curate
from visinstruct.pipelines.ingest import run as ingest
from visinstruct.schemas import Decision, SampleMeta
from visinstruct.testing.sample_data import shapes_samples, write_images
from visinstruct.transforms.curate_stages import caption_decision
from visinstruct.transforms.layout import rejected_pattern, rejected_shard, resolve_shards

pytestmark = pytest.mark.timeout(300)
RUNNER = ["--runner=DirectRunner"]
GOOD = "A brown dog runs across a green field"
MOJIBAKE = "two people sitting at a table outside the cafÃ©"  # UTF-8 read as Latin-1 once
REPAIRED = "two people sitting at a table outside the café"
# caption -> the reason it is dropped for with languages [en]
DROPPED = {
    "IMG_1234.jpg": "filename_caption",
    "dog": "too_few_words",
    "https://example.com/photos/1234": "url_caption",
    "Un chat noir dort sur le canapé du salon": "wrong_language",
}
CAPTIONS = [GOOD, MOJIBAKE, *DROPPED]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Two ingested shards (six pictures of shapes from a folder, one caption each from a sibling ``.txt``)."""
    root = tmp_path_factory.mktemp("curate")
    names = [f"{i:02d}" for i in range(len(CAPTIONS))]
    write_images(shapes_samples(len(CAPTIONS), seed=3, size=(64, 64)), root / "folder", "png", names)
    for name, caption in zip(names, CAPTIONS):
        (root / "folder" / f"{name}.txt").write_text(caption, encoding="utf-8")
    cfg = {"read": {"path": str(root / "folder"), "format": "folder"}, "write": {"path": str(root / "in")}}
    cfg["write"]["shard_size"] = 4
    assert ingest(from_dict(IngestConfig, cfg), RUNNER)["written"] == len(CAPTIONS)
    return root / "in"


def captions_by_key(folder: Path) -> dict[str, str]:
    return {s["__key__"]: SampleMeta.from_json(s["json"]).caption for s in read(folder)}


def read(folder: Path) -> list[dict]:
    return list(wds.WebDataset(resolve_shards(str(folder)), shardshuffle=False))


def dead_letters(out: Path, stage: str) -> dict[str, dict]:
    paths = sorted(glob.glob(rejected_pattern(str(out))))
    rows = [r for p in paths if rejected_shard(p)[0] == stage for r in pq.read_table(p).to_pylist()]
    return {r["key"]: r for r in rows}


@pytest.fixture(scope="module")
def curated(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("curated")
    cfg = from_dict(CurateConfig, {"text": {"languages": ["en"]}, "write": {"path": str(out)}})
    report = curate.run(cfg, resolve_shards(str(shards)), RUNNER)
    return out, report


def test_each_unusable_caption_is_dropped_with_its_reason(shards, curated):
    out, _ = curated
    keys = {caption: key for key, caption in captions_by_key(shards).items()}
    letters = dead_letters(out, "curate")
    assert {key: row["reason"] for key, row in letters.items()} == {keys[c]: r for c, r in DROPPED.items()}
    assert all(row["stage"] == "curate" and row["message"] for row in letters.values())


def test_mojibake_is_repaired_in_the_json_and_the_txt_member_and_a_good_caption_is_untouched(shards, curated):
    out, report = curated
    keys = {caption: key for key, caption in captions_by_key(shards).items()}
    written = {s["__key__"]: s for s in read(out)}
    assert set(written) == {keys[GOOD], keys[MOJIBAKE]}
    fixed = written[keys[MOJIBAKE]]
    assert SampleMeta.from_json(fixed["json"]).caption == REPAIRED and fixed["txt"].decode("utf-8") == REPAIRED
    good = written[keys[GOOD]]
    assert SampleMeta.from_json(good["json"]).caption == GOOD and good["txt"].decode("utf-8") == GOOD
    assert report["fixed_mojibake"] == 1


def test_the_report_accounts_for_every_row_and_the_output_validates(curated, capsys):
    out, report = curated
    assert report["stage"] == "curate" and report["accounted"] is True
    assert report["written"] + report["rejected"] == report["inputs"] == len(CAPTIONS) == report["inputs_before"]
    assert report["rejected_by_reason"] == {reason: 1 for reason in sorted(DROPPED.values())}
    assert main(["validate", str(out)]) == 0


def test_a_caption_kept_as_it_is_leaves_the_members_untouched():
    meta = SampleMeta(key="000000001", caption=GOOD)
    assert caption_decision(meta, Decision.keep(GOOD)) == (Decision.keep(), False)
    assert caption_decision(meta, Decision.keep("fixed")) == (Decision.keep(replace(meta, caption="fixed")), True)
    dropped, _ = caption_decision(meta, Decision.drop("too_few_words", "1 word", {"words": 1}))
    assert (dropped.reason, dropped.message, dict(dropped.detail)) == ("too_few_words", "1 word", {"words": 1})


def test_the_command_runs_without_a_config_file_and_refuses_a_bad_key_in_one_line(shards, tmp_path, capsys):
    args = ["curate", "--input", str(shards), "--out", str(tmp_path / "cli"), *RUNNER]
    assert main([*args, "--set", "text.languages=[en]"]) == 0
    assert "curate: 6 rows in 2 shards -> 2 written, 4 rejected" in capsys.readouterr().out
    assert main([*args, "--set", "text.langauges=[en]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("visinstruct curate: error: ") and "text.langauges" in err[0]


def test_a_build_curates_before_the_next_stage_and_counts_add_up_stage_by_stage(shards, tmp_path):
    from visinstruct.configs import BuildConfig
    from visinstruct.pipelines import build

    cfg = from_dict(
        BuildConfig,
        {
            "out": str(tmp_path / "out"),
            "input": str(shards),
            "curate": {"text": {"languages": ["en"]}},
            "generate": {"backend": "caption_only"},
        },
    )
    report = build.run(cfg, RUNNER, inputs=resolve_shards(str(shards)))
    assert report["stages_add_up"] and report["accounted"]
    curate_stage, generate_stage = report["stages"]
    assert (curate_stage["stage"], curate_stage["in"], curate_stage["out"]) == ("curate", len(CAPTIONS), 2)
    assert curate_stage["dropped_by_reason"] == {reason: 1 for reason in DROPPED.values()}
    assert (generate_stage["stage"], generate_stage["in"], generate_stage["out"]) == ("generate", 2, 2)
    assert sorted(captions_by_key(tmp_path / "out").values()) == sorted([GOOD, REPAIRED])
    assert report["fixed_mojibake"] == 1


def test_a_build_checks_generated_questions_against_the_benchmarks_after_generate(shards, tmp_path):
    from visinstruct.configs import BuildConfig
    from visinstruct.pipelines import build
    from visinstruct.transforms.prompts import load_templates

    asked = load_templates().brief_questions
    benchmark = tmp_path / "questions.txt"
    benchmark.write_text("\n".join(asked[:6]) + "\n")  # half of caption-only's instructions are "benchmark" ones
    curate_cfg = {"text": None, "safety": None, "decontaminate": {"benchmarks": [{"name": "bench"}]}}
    curate_cfg["decontaminate"]["benchmarks"][0]["questions"] = str(benchmark)
    settings = {"out": str(tmp_path / "out"), "input": str(shards), "curate": curate_cfg}
    cfg = from_dict(BuildConfig, settings | {"generate": {"backend": "caption_only"}})
    report = build.run(cfg, RUNNER, inputs=resolve_shards(str(shards)))
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == ["curate", "generate", "decontam"] and report["stages_add_up"] and report["accounted"]
    dropped = stages["decontam"]["dropped_by_reason"]
    assert set(dropped) == {"benchmark_overlap"} and 0 < dropped["benchmark_overlap"] < len(CAPTIONS)
    kept = [SampleMeta.from_json(s["json"]).conversations[0].value for s in read(tmp_path / "out")]
    assert kept and all(question.split("\n", 1)[1] in asked[6:] for question in kept)
    letters = dead_letters(tmp_path / "out", "decontam")
    assert len(letters) == dropped["benchmark_overlap"] and all(r["stage"] == "decontam" for r in letters.values())
