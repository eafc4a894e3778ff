"""`make demo` stays true: the demo runs every step end to end on bundled data, and its counts add up."""

import json
import re

import pyarrow.parquet as pq
import pytest

from visinstruct.cli.demo import BROKEN, EVAL_SAMPLES, start_over, wrong_caption
from visinstruct.cli.main import main
from visinstruct.cli.validate import validate
from visinstruct.transforms.llm import CONFIG_REASONS, RETRYABLE_REASONS

# Why generation drops a sample: the reply checks (conversations.py), the vision checks (llm.py), planning and
# writing (generate_stages.py, plans.py), and the backend's failures.
GENERATION_REASONS = {
    *("unparseable", "refusal", "mentions_context", "duplicate_question", "repetitive", "unknown_object"),
    *("bad_length", "bad_format", "bad_characters", "empty_completion", "invalid_request"),
    *("truncated_reply", "low_grounding", "copies_caption", "recaption_rejected"),
    *("no_caption", "bad_metadata", "no_image", "not_generated", "internal_error"),
    *RETRYABLE_REASONS,
    *CONFIG_REASONS,
}


def test_a_wrong_caption_names_a_colour_the_image_does_not_have():
    assert wrong_caption("a blue circle") == "a gray circle"
    assert wrong_caption("a red square and a green circle") == "a yellow square and a green circle"
    with pytest.raises(ValueError, match="no colour"):
        wrong_caption("a circle")


def test_a_rerun_starts_over_and_removes_only_what_the_demo_wrote(tmp_path):
    for folder in ("clip", "dataset", "llava", "llm_cache", "grounded"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x").write_text("earlier run")
    (tmp_path / "demo_report.json").write_text("{}")
    (tmp_path / "my_notes.txt").write_text("the user's")
    assert start_over(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_notes.txt"]
    assert not start_over(tmp_path)


def assert_hf_round_trip(out):
    """The demo's dataset exported as a Hugging Face dataset, read by `datasets`, and ingested back: every written
    sample, its image bytes unchanged (sha256) and its conversation equal, nothing rejected."""
    import hashlib

    import datasets
    import webdataset as wds

    from visinstruct.configs import IngestConfig, from_dict
    from visinstruct.pipelines.ingest import run as ingest
    from visinstruct.transforms.layout import image_member

    tars = sorted(str(p) for p in (out / "dataset").glob("*.tar"))
    written = {s["__key__"]: s for s in wds.WebDataset(tars, shardshuffle=False)}
    assert main(["export", str(out / "dataset"), "--format", "hf", "--out", str(out / "hf")]) == 0
    loaded = datasets.load_from_disk(str(out / "hf")).cast_column("image", datasets.Image(decode=False))
    assert sorted(loaded["key"]) == sorted(written)
    for row in loaded:
        member = written[row["key"]]
        assert (
            hashlib.sha256(row["image"]["bytes"]).hexdigest()
            == hashlib.sha256(member[image_member(member)]).hexdigest()
        )
    cfg = from_dict(
        IngestConfig,
        {
            "read": {"path": str(out / "hf"), "format": "hf", "save_additional_columns": ["key"]},
            "resize": {"resize_mode": "no"},
            "write": {"path": str(out / "hf_back")},
        },
    )
    report = ingest(cfg, ["--runner=FnApiRunner"])
    assert (report["written"], report["rejected"]) == (len(written), 0)
    back = sorted(str(p) for p in (out / "hf_back").glob("*.tar"))
    for sample in wds.WebDataset(back, shardshuffle=False):
        meta = json.loads(sample["json"])
        member = written[meta["source"]["key"]]
        assert meta["sha256"] == hashlib.sha256(member[image_member(member)]).hexdigest()
        assert meta.get("conversations") == json.loads(member["json"]).get("conversations")


def assert_energon_iterates(out):
    """Megatron-Energon's own loader, on CPU, reads the demo's dataset from the metadata we write (no `energon
    prepare`): one epoch yields every written sample once, with its conversation."""
    import webdataset as wds
    from megatron.energon import WorkerConfig, get_loader, get_train_dataset

    tars = sorted(str(p) for p in (out / "dataset").glob("*.tar"))
    written = {s["__key__"]: json.loads(s["json"]) for s in wds.WebDataset(tars, shardshuffle=False)}
    assert main(["energon", str(out / "dataset")]) == 0
    dataset = get_train_dataset(
        str(out / "dataset"),
        worker_config=WorkerConfig(rank=0, world_size=1, num_workers=0),
        batch_size=None,
        shuffle_buffer_size=None,
        max_samples_per_sequence=None,
    )
    samples = iter(get_loader(dataset))
    epoch = [next(samples) for _ in range(len(written))]
    assert sorted(s.__key__ for s in epoch) == sorted(written)
    for sample in epoch:
        assert sample.texts == written[sample.__key__]["conversations"] and len(sample.images) == 1


def assert_answers_are_plain_transformers(out, records):
    """A handful of eval's answers on the demo's checkpoint, recomputed: the held-out image read from its tar, the
    prompt written out in the checkpoint's ChatML, greedy decoding with plain transformers, the score by hand."""
    import io

    import webdataset as wds
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from visinstruct.trainer.vqa_metrics import normalize_answer
    from visinstruct.transforms.layout import image_member

    model = LlavaForConditionalGeneration.from_pretrained(out / "llava" / "model").eval()
    processor = AutoProcessor.from_pretrained(out / "llava" / "model")
    wanted = {r["image"].split("/", 1)[1]: r for r in records}
    tars = sorted(str(p) for p in (out / "clip_data" / "eval").glob("*.tar"))
    checked = 0
    for sample in wds.DataPipeline(wds.SimpleShardList(tars), wds.tarfile_to_samples()):
        record = wanted.get(sample["__key__"])
        if record is None:
            continue
        image = Image.open(io.BytesIO(sample[image_member(sample)])).convert("RGB")
        prompt = "<|im_start|>user\n<image>\nDescribe the image briefly.<|im_end|>\n<|im_start|>assistant\n"
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
        said = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        caption = sample["txt"].decode().strip()
        assert record["answers"]["image"] == said and record["references"] == [caption]
        assert record["scores"]["image"]["exact"] == float(normalize_answer(said) == normalize_answer(caption))
        checked += 1
    assert checked == len(records)


@pytest.mark.timeout(1200)  # SmolLM2 on a busy 2-core machine can take minutes
def test_demo_runs_every_step_and_accounts_for_every_url(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--runner=FnApiRunner"]) == 0  # what `make demo` runs
    printed = capsys.readouterr().out
    reports = json.loads((tmp_path / "demo_report.json").read_text())
    urls = pq.read_table(tmp_path / "urls.parquet").to_pylist()

    # the CLIP trained on the spot tells held-out captions from shuffled ones, and picked the filter's threshold
    clip = reports["train_clip"]
    assert clip["matching_auc"] >= 0.9 and clip["threshold_balanced_accuracy"] >= 0.85
    assert reports["clip_data_train"]["accounted"] and reports["clip_data_train"]["written"] > 1000

    build = reports["build"]
    stages = {s["stage"]: s for s in build["stages"]}
    assert list(stages) == ["ingest", "curate", "filter", "generate"]
    assert build["accounted"] and build["stages_add_up"] and build["rows_read"] == build["inputs"] == len(urls)
    assert stages["ingest"]["in"] == len(urls)
    assert sum(stages["ingest"]["dropped_by_reason"].values()) == len(BROKEN) + 1  # and one repeated URL
    assert stages["ingest"]["out"] == stages["curate"]["in"] and stages["curate"]["out"] == stages["filter"]["in"]
    assert stages["filter"]["out"] == stages["generate"]["in"]
    assert build["nsfw"]["count"] == stages["curate"]["in"] and build["faces_blurred"] >= 1  # the astronaut's
    assert stages["generate"]["out"] == build["written"] and build["written"] + build["rejected"] == len(urls)
    assert set(stages["filter"]["dropped_by_reason"]) == {"clip_below_threshold"}
    by_origin = build["kept_by_origin"]
    assert by_origin["wrong_caption"]["urls"] >= 8 and by_origin["wrong_caption"]["kept"] == 0  # every one dropped
    for origin in ("easy_vqa", "shapes"):  # and the matching pairs it knows mostly kept
        assert by_origin[origin]["kept"] >= 0.8 * by_origin[origin]["urls"], by_origin
    assert by_origin["broken"]["kept"] == 0 and by_origin["duplicate_url"]["kept"] == 0
    assert build["backend_calls"] >= 1 and build["completion_tokens_spent"] > 0  # SmolLM2 answered some
    assert all(s["busy_seconds"] > 0 for s in stages.values())

    dataset = sorted(str(p) for p in (tmp_path / "dataset").glob("*.tar"))
    assert not validate(dataset).problems
    assert_hf_round_trip(tmp_path)
    assert_energon_iterates(tmp_path)
    assert "estimate for 1,000,000 input pairs" in printed and build["cost"]["vcpu_hours"] > 0
    assert reports["train"]["last_loss"] < reports["train"]["first_loss"]
    # the loop closed: the LLaVA's frozen tower is the CLIP of step 2 (64 px, 8 px patches: 64 patch tokens and the
    # class token); asked to describe held-out images neither model trained on, it does far better with the image
    llava = json.loads((tmp_path / "llava" / "model" / "config.json").read_text())
    assert llava["image_seq_length"] == 65 and llava["vision_feature_layer"] == -1
    evaluated = reports["eval"]
    assert evaluated["data"] == str(tmp_path / "clip_data" / "eval") and evaluated["skipped"] == {}
    assert evaluated["samples"] == evaluated["images"] == evaluated["questions"] == EVAL_SAMPLES
    assert list(evaluated["conditions"]) == ["image", "blank", "shuffled", "none"]
    assert evaluated["image_minus"]["blank"]["all"]["mean"] > 0.1, evaluated["image_minus"]["blank"]
    answers = [json.loads(line) for line in (tmp_path / "eval" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == evaluated["questions"]
    assert_answers_are_plain_transformers(tmp_path, answers[:4])
    assert "image - blank" in printed and "majority answer" in printed
    assert (tmp_path / "gallery.html").stat().st_size > 10_000 and (tmp_path / "gallery.png").exists()
    # it ends with where everything is and the build's table
    assert "everything is in" in printed and printed.rstrip().endswith("run_report.json")
    assert "kept by origin" in printed

    # step 5: the tiny LLaVA as the vision model on the first shard; its replies may all be rejected, but every
    # sample that reached it is written or dead-lettered by generation with a reason generation gives
    grounded = reports["grounded"]
    assert (tmp_path / "grounded").is_dir() and grounded["shards"] == 1
    assert grounded["accounted"] and grounded["inputs"] == grounded["written"] + grounded["rejected"]
    assert grounded["samples_in"] == grounded["written"] + sum(grounded["generate_rejected"].values()) > 0
    assert grounded["backend_calls"] == 2 * grounded["samples_in"]  # both image kinds asked for every sample
    assert grounded["image_tokens_spent"] > 0 and grounded["parts_rejected"]
    letters = pq.read_table(tmp_path / "grounded" / "rejected" / "generate-00000.parquet").to_pylist()
    assert len(letters) == sum(grounded["generate_rejected"].values())
    assert {r["stage"] for r in letters} <= {"generate"}
    assert {r["reason"] for r in letters} <= GENERATION_REASONS, grounded["generate_rejected"]
    assert set(grounded["parts_rejected"]) <= GENERATION_REASONS
    line = f"{grounded['samples_in']} samples in, {grounded['written']} written, {len(letters)} rejected"
    assert line in printed and re.search(r"\d+ image tokens spent", printed)
