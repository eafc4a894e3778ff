"""`visinstruct eval`: a checkpoint asked held-out questions with its image and under each ablation; the numbers it
reports are the numbers a direct computation with plain transformers (or open_clip) gives; bad data is counted,
never fatal; the scoring follows VQA's and SQuAD's definitions."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from visinstruct.configs import CONFIG_DIR, IngestConfig, from_dict
from visinstruct.testing import sample_data
from visinstruct.testing.trainers import train_argv
from visinstruct.trainer import eval_questions
from visinstruct.trainer.vqa_metrics import (
    answer_type,
    exact_match,
    headline,
    majority_answers,
    mean_interval,
    normalize_answer,
    paired_difference,
    token_f1,
)

pytestmark = pytest.mark.timeout(600)
TINY_YAML = CONFIG_DIR / "train" / "llava_tiny.yaml"


# ---------------------------------------------------------------------------------------------------------------------
# Scoring


@pytest.mark.parametrize(
    "answer, normalised",
    [
        ("Two.", "2"),
        ("A red circle!", "red circle"),
        ("The  answer is 3.5", "answer is 3.5"),
        ("1,000 people", "1000 people"),
        ("don't", "dont"),
        ("Yes", "yes"),
    ],
)
def test_answers_normalise_as_vqa_compares_them(answer, normalised):
    assert normalize_answer(answer) == normalised


def test_exact_match_is_vqa_accuracy():
    assert exact_match("Red.", ["red"]) == 1.0
    assert exact_match("round", ["circle", "round", "ring"]) == 1.0  # acceptable alternatives: any will do
    annotators = ["red"] * 2 + ["dark red"] * 8  # VQA's ten annotators: leave each out, min(1, agreeing / 3), mean
    assert exact_match("red", annotators) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)  # 0.6
    assert exact_match("dark red", annotators) == 1.0
    assert exact_match("green", annotators) == 0.0


def test_a_type_is_judged_by_token_f1_when_most_of_its_answers_are_free_form():
    detail = [["a red circle on a white page"], ["two blue squares side by side"], ["red"]]
    assert headline(detail) == "f1" and headline([["red"], ["blue"]]) == "exact"
    assert headline(detail, "exact") == "exact"


def test_token_f1_is_squads_best_over_references():
    # "a red circle on white" vs "the red circle": tokens [red, circle, on, white] vs [red, circle]: P 2/4, R 2/2
    assert token_f1("a red circle on white", ["the red circle"]) == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert token_f1("a red circle on white", ["green", "red circle on white"]) == 1.0
    assert token_f1("", [""]) == 1.0 and token_f1("", ["red"]) == 0.0


@pytest.mark.parametrize(
    "references, kind",
    [
        (["Yes"], "yes/no"),
        (["two"], "number"),
        (["red circle"], "other"),
        (["a red circle on a white page"], "free-form"),
    ],
)
def test_a_questions_type_is_vqas_answer_type(references, kind):
    assert answer_type(references) == kind


def test_intervals_are_seeded_bootstrap_percentiles_around_the_mean():
    scores = [1.0] * 30 + [0.0] * 10
    first, again = mean_interval(scores, seed=3), mean_interval(scores, seed=3)
    assert first == again and first["mean"] == 0.75 and first["n"] == 40
    assert first["low"] < 0.75 < first["high"] and first["high"] - first["low"] < 0.4
    assert mean_interval([1.0] * 5) == {"mean": 1.0, "low": 1.0, "high": 1.0, "n": 5}
    same = paired_difference(scores, scores)
    assert (same["mean"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    assert paired_difference([1.0, 1.0], [0.0, 1.0])["mean"] == 0.5


def test_the_majority_answer_of_a_type_breaks_ties_by_the_answer_not_the_order():
    pairs = [("yes/no", ["no"]), ("yes/no", ["Yes"]), ("color", ["red"]), ("color", ["blue"]), ("color", ["red"])]
    assert majority_answers(pairs) == majority_answers(pairs[::-1]) == {"yes/no": "no", "color": "red"}
    assert majority_answers([("color", ["blue"] + ["red"] * 9)]) == {"color": "red"}  # the annotators' consensus


def test_intervals_resample_images_so_correlated_questions_do_not_narrow_them():
    # ten questions per image, all right or all wrong together: twenty images, not two hundred independent answers
    scores = [float(i % 2) for i in range(20) for _ in range(10)]
    images = [f"img{i}" for i in range(20) for _ in range(10)]
    per_question, per_image = mean_interval(scores), mean_interval(scores, clusters=images)
    assert per_question["mean"] == per_image["mean"] == 0.5
    assert per_image["high"] - per_image["low"] > 2 * (per_question["high"] - per_question["low"])


# ---------------------------------------------------------------------------------------------------------------------
# Questions: from conversations and question files, every skip counted


def test_every_assistant_turn_is_a_question_with_the_turns_before_it_as_context():
    turns = [
        {"from": "human", "value": "<image>\nwhat shape?"},
        {"from": "gpt", "value": "circle"},
        {"from": "human", "value": "what colour?"},
        {"from": "gpt", "value": "red"},
    ]
    first, second = eval_questions.conversation_questions("s1", "img", turns)
    assert (first.text, first.references, first.context, first.type) == (
        "<image>\nwhat shape?",
        ("circle",),
        (),
        "other",
    )
    assert second.text == "what colour?" and second.references == ("red",)
    assert [m["content"] for m in second.context] == ["<image>\nwhat shape?", "circle"]
    assert second.messages()[-1] == {"role": "user", "content": "what colour?"}


def test_a_question_file_keeps_what_it_can_and_counts_every_entry_it_cannot(tmp_path):
    sample = sample_data.easy_vqa_samples("test", 1)[0]
    shutil.copy(sample["image_path"], tmp_path / "shape.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    entries = [
        {"question_id": 7, "image": "shape.png", "text": "what shape?", "answer": "circle", "category": "shape"},
        {"image": "shape.png", "question": "is it red?", "answers": [{"answer": "yes"}] * 3},
        {"image": "missing.png", "text": "what?", "answer": "x"},
        {"image": "broken.png", "text": "what?", "answer": "x"},
        {"image": "shape.png", "text": "no answer given"},
    ]
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in entries) + "\n{not json\n")
    found = eval_questions.from_file(str(path), None, "Describe.")
    assert [(q.id, q.type, q.references) for q in found.items] == [
        ("7", "shape", ("circle",)),
        ("1", "yes/no", ("yes",) * 3),
    ]
    assert found.samples == 6 and {q.image for q in found.items} == {"shape.png"}  # one image, kept once
    assert dict(found.skipped) == {"image_missing": 1, "decode_error": 1, "no_reference": 1, "malformed_entry": 1}
    assert found.samples == len({q.id for q in found.items}) + sum(found.skipped.values())


def test_shuffled_images_stand_in_for_another_image_once_each():
    keys = [f"k{i}" for i in range(9)]
    mapping = eval_questions.shuffled_images(keys + keys[:3], seed=1)
    assert sorted(mapping) == sorted(mapping.values()) == keys
    assert all(mapping[k] != k for k in keys)
    assert mapping == eval_questions.shuffled_images(keys, seed=1)
    assert eval_questions.shuffled_images(["only"]) == {}


# ---------------------------------------------------------------------------------------------------------------------
# End to end: a tiny LLaVA trained on easy-VQA shards, evaluated, and checked against plain transformers


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """easy-VQA through our ingest (120 training images, 3 questions each; 8 held out with 2), and
    `visinstruct train --config configs/train/llava_tiny.yaml` on it: 40 steps of 8 on one thread."""
    from visinstruct.cli.main import main
    from visinstruct.pipelines.ingest import run as ingest

    root = tmp_path_factory.mktemp("eval")
    for split, limit, per_image in (("train", 120, 3), ("test", 8, 2)):
        image_root = sample_data.easy_vqa_llava_json(split, limit, root / f"{split}.json", per_image)
        cfg = from_dict(
            IngestConfig,
            {
                "read": {"path": str(root / f"{split}.json"), "format": "llava", "image_root": image_root},
                "resize": {"image_size": 64},
                "write": {"path": str(root / split), "shard_size": 120},
            },
        )
        assert ingest(cfg, ["--runner=FnApiRunner"])["written"] == limit
    assert main(train_argv("train", TINY_YAML, root / "run", root)) == 0
    return root


@pytest.fixture(scope="module")
def evaluated(trained):
    from visinstruct.cli.main import main

    out = trained / "eval"
    argv = ["eval", "--checkpoint", str(trained / "run"), "--input", str(trained / "test"), "--out", str(out)]
    assert main([*argv, "--set", "batch_size=5", "--set", "max_new_tokens=8"]) == 0
    records = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    return json.loads((out / "eval.json").read_text()), records


def direct_answer(model, processor, image, turns, max_new_tokens=8):
    """Greedy decoding with plain transformers, the prompt written out by hand in the checkpoint's ChatML."""
    prompt = "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in turns) + "<|im_start|>assistant\n"
    inputs = (
        processor(images=image, text=prompt, return_tensors="pt")
        if image
        else processor(text=prompt, return_tensors="pt")
    )
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_eval_asks_every_held_out_question_under_every_condition(evaluated):
    report, records = evaluated
    assert report["kind"] == "vlm" and report["samples"] == 8 and report["images"] == 8
    assert report["questions"] == len(records) == 16 and report["skipped"] == {}
    assert sum(report["types"].values()) == 16
    assert list(report["conditions"]) == ["image", "blank", "shuffled", "none"]
    assert set(report["image_minus"]) == {"blank", "shuffled", "none"}
    assert all(set(r["answers"]) == set(report["conditions"]) for r in records)
    assert all(r["shuffled_image"] != r["image"] for r in records)


def test_eval_numbers_are_the_means_of_its_per_question_scores(evaluated):
    report, records = evaluated
    for condition, per in report["conditions"].items():
        for group, stats in per.items():
            members = [r for r in records if group == "all" or r["type"] == group]
            for metric in ("exact", "f1"):
                mean = np.mean([r["scores"][condition][metric] for r in members])
                assert stats[metric]["mean"] == pytest.approx(mean) and stats[metric]["n"] == len(members)
                assert stats[metric]["low"] <= stats[metric]["mean"] <= stats[metric]["high"]
        diff = report["image_minus"].get(condition, {}).get("all")
        if diff is not None:
            image_all = report["conditions"]["image"]["all"]["score"]["mean"]
            assert diff["mean"] == pytest.approx(image_all - per["all"]["score"]["mean"])


def test_eval_answers_are_what_plain_transformers_answers_for_a_handful(trained, evaluated):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    _, records = evaluated
    model = LlavaForConditionalGeneration.from_pretrained(trained / "run" / "model").eval()
    processor = AutoProcessor.from_pretrained(trained / "run" / "model")
    samples = sample_data.easy_vqa_samples("test", 8)
    for record in records[:4]:  # two images, two questions each: the second one with the first as context
        sample = samples[int(record["id"].split("/")[1].split("-")[0])]
        image = Image.open(sample["image_path"]).convert("RGB")
        question, reference, _ = sample["questions"][int(record["id"].rsplit("-", 1)[1])]
        assert record["question"].replace("<image>\n", "") == question and record["references"] == [reference]
        context = (
            []
            if record["context_turns"] == 0
            else [("user", "<image>\n" + sample["questions"][0][0]), ("assistant", sample["questions"][0][1])]
        )
        first = "<image>\n" if not context else ""
        turns = [*context, ("user", first + question)]
        with torch.inference_mode():
            with_image = direct_answer(model, processor, image, turns)
            blank = direct_answer(model, processor, Image.new("RGB", image.size, "white"), turns)
            none = direct_answer(model, processor, None, [(r, t.replace("<image>\n", "")) for r, t in turns])
        assert record["answers"] == {**record["answers"], "image": with_image, "blank": blank, "none": none}
        assert record["scores"]["image"] == {
            "exact": exact_match(with_image, [reference]),
            "f1": token_f1(with_image, [reference]),
        }


def test_eval_writes_a_page_of_its_errors_with_their_images(trained, evaluated):
    report, records = evaluated
    page = (trained / "eval" / "errors.html").read_text()
    wrong = [r for r in records if r["scores"]["image"][report["headline"][r["type"]]] < 1]
    assert page.count("<figure>") == min(len(wrong), 48) and page.count('src="data:image/jpeg;base64,') == page.count(
        "<figure>"
    )
    assert "Content-Security-Policy" in page


def test_an_evaluation_with_nothing_to_ask_fails_in_one_line(tmp_path, capsys):
    from visinstruct.cli.main import main

    path = tmp_path / "questions.json"
    path.write_text(json.dumps([{"image": "gone.png", "text": "what?", "answer": "x"}]))
    assert main(["eval", "--checkpoint", str(tmp_path), "--questions", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no question to ask" in err and "image_missing 1" in err
    assert main(["eval", "--checkpoint", str(tmp_path)]) == 2
    assert "exactly one of 'input'" in capsys.readouterr().err


def test_the_summary_reports_each_condition_by_type_and_what_the_image_adds():
    from visinstruct.configs import EvalConfig
    from visinstruct.trainer.eval_questions import Question
    from visinstruct.trainer.vqa_eval import summarize

    questions = [
        Question(str(i), "img", (), "q", (ref,), kind)
        for i, (ref, kind) in enumerate([("yes", "yes/no"), ("no", "yes/no"), ("yes", "yes/no"), ("red", "color")])
    ]
    scores = {
        "image": [
            {"exact": 1.0, "f1": 1.0},
            {"exact": 1.0, "f1": 1.0},
            {"exact": 0.0, "f1": 0.0},
            {"exact": 1.0, "f1": 1.0},
        ],
        "blank": [
            {"exact": 1.0, "f1": 1.0},
            {"exact": 0.0, "f1": 0.0},
            {"exact": 0.0, "f1": 0.5},
            {"exact": 0.0, "f1": 0.0},
        ],
    }
    cfg = EvalConfig(checkpoint="c", input="i")
    summary = summarize(questions, scores, cfg)
    assert summary["headline"] == {"color": "exact", "yes/no": "exact"}
    assert summary["conditions"]["image"]["yes/no"]["score"]["mean"] == pytest.approx(2 / 3)
    assert summary["conditions"]["blank"]["all"]["f1"]["mean"] == pytest.approx(1.5 / 4)
    assert summary["image_minus"]["blank"]["all"]["mean"] == pytest.approx(3 / 4 - 1 / 4)
    assert summary["image_minus"]["blank"]["color"] == {"mean": 1.0, "low": 1.0, "high": 1.0, "n": 1}
    assert summary["majority"]["answers"] == {"yes/no": "yes", "color": "red"}
    assert summary["majority"]["yes/no"] == pytest.approx(2 / 3) and summary["majority"]["all"] == 0.75


HUB_STYLE_CHATML = (  # how the hub's LLaVA templates pick the image items: selectattr('type', 'equalto', 'image')
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}<image>\n{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}{{ item['text'] }}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TYPED_CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% else %}{{ item['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_checkpoint_whose_template_takes_typed_content_gets_the_same_prompt(trained):
    from transformers import AutoProcessor

    from visinstruct.trainer.chat import prompt_text

    processor = AutoProcessor.from_pretrained(trained / "run" / "model")
    conversation = [
        {"role": "user", "content": "<image>\nwhat shape?"},
        {"role": "assistant", "content": "circle"},
        {"role": "user", "content": "what colour?"},
    ]
    ours = prompt_text(processor, conversation)
    assert ours.count("<image>") == 1 and ours.endswith("what colour?<|im_end|>\n<|im_start|>assistant\n")
    for template in (TYPED_CHATML, HUB_STYLE_CHATML):  # as the hub's processors do: content as typed items
        processor.chat_template = template
        assert prompt_text(processor, conversation) == ours
    assert prompt_text(processor, "what shape?") == prompt_text(processor, "<image>\nwhat shape?")
    assert "<image>" not in prompt_text(processor, conversation, image=False)


@pytest.fixture(scope="module")
def caption_shards(tmp_path_factory):
    """40 captioned easy-VQA test images ("a blue circle") ingested from a folder of PNGs and .txt captions."""
    from visinstruct.pipelines.ingest import run as ingest

    root = tmp_path_factory.mktemp("clip-eval")
    samples = [s for s in sample_data.easy_vqa_samples("test", 60) if s["caption"]][:40]
    sample_data.write_caption_folder(samples, root)
    cfg = from_dict(IngestConfig, {"read": {"path": str(root)}, "write": {"path": str(root / "shards")}})
    assert ingest(cfg, ["--runner=FnApiRunner"])["written"] == len(samples) == 40
    return root / "shards", samples


def test_a_clip_checkpoint_gets_retrieval_and_zero_shot_as_open_clip_computes_them(caption_shards, tmp_path):
    from visinstruct.cli.main import main
    from visinstruct.testing.tiny_models import TINY_OPEN_CLIP_CONFIG, TINY_OPEN_CLIP_NAME, tiny_open_clip
    from visinstruct.trainer.clip_eval import PROMPT_TEMPLATES

    shards, samples = caption_shards
    model, preprocess, tokenizer = tiny_open_clip(seed=5)
    run = tmp_path / "clip"
    run.mkdir()
    torch.save(
        {
            "state_dict": model.state_dict(),
            "step": 1,
            "model_name": TINY_OPEN_CLIP_NAME,
            "model_config": TINY_OPEN_CLIP_CONFIG,
        },
        run / "model.pt",
    )
    shapes = ["circle", "rectangle", "triangle"]
    argv = ["eval", "--checkpoint", str(run), "--input", str(shards), "--out", str(tmp_path / "out")]
    assert main([*argv, "--set", f"zero_shot.classes={{shape: [{', '.join(shapes)}], colour: [red, blue]}}"]) == 0
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert report["kind"] == "clip" and report["retrieval"]["samples"] == 40

    # the same numbers by hand: open_clip's embeddings, prompt-ensembled class embeddings, argmax
    import io

    import webdataset as wds

    pixels, captions = [], []
    for sample in wds.DataPipeline(
        wds.SimpleShardList(sorted(map(str, shards.glob("*.tar")))), wds.tarfile_to_samples()
    ):
        member = next(k for k in ("jpg", "png", "webp") if k in sample)
        pixels.append(preprocess(Image.open(io.BytesIO(sample[member])).convert("RGB")))
        captions.append(sample["txt"].decode())
    with torch.no_grad():
        embedded = model.encode_image(torch.stack(pixels), normalize=True).numpy()
        prompts = model.encode_text(tokenizer([t.format(s) for s in shapes for t in PROMPT_TEMPLATES]), normalize=True)
    classes = prompts.reshape(len(shapes), len(PROMPT_TEMPLATES), -1).mean(dim=1)
    classes = (classes / classes.norm(dim=1, keepdim=True)).numpy()
    truth = [shapes.index(c.split()[-1]) for c in captions]
    predicted = np.argmax(embedded @ classes.T, axis=1)
    assert report["zero_shot"]["shape"]["accuracy"] == pytest.approx(float(np.mean(predicted == truth)))
    assert report["zero_shot"]["shape"]["samples"] == 40 and report["zero_shot"]["shape"]["unlabelled"] == 0
    named = sum(c.split()[1] in ("red", "blue") for c in captions)
    assert (
        report["zero_shot"]["colour"]["samples"] == named and report["zero_shot"]["colour"]["unlabelled"] == 40 - named
    )


def write_tar(path, samples):
    """A webdataset tar of ``(key, png bytes, caption)`` samples."""
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as tar:
        for key, png, caption in samples:
            tar.write({"__key__": key, "png": png, "txt": caption})


def png(colour):
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, "PNG")
    return buffer.getvalue()


def test_shards_of_two_folders_with_the_same_names_keep_their_own_images(tmp_path):
    write_tar(tmp_path / "a" / "00000.tar", [("000000000", png("red"), "a red square")])
    write_tar(tmp_path / "b" / "00000.tar", [("000000000", png("blue"), "a blue square")])
    urls = [str(tmp_path / "a" / "00000.tar"), str(tmp_path / "b" / "00000.tar")]
    found = eval_questions.from_shards(urls, "auto", "Describe.")
    assert len(found.items) == len(found.images) == 2
    for question in found.items:
        colour = question.references[0].split()[1]
        assert found.image(question.image).getpixel((0, 0)) == Image.new("RGB", (1, 1), colour).getpixel((0, 0))


def test_a_damaged_shard_is_counted_and_the_others_are_read(tmp_path):
    write_tar(tmp_path / "00000.tar", [(f"00000000{i}", png("red"), "a red square") for i in range(3)])
    write_tar(tmp_path / "00001.tar", [(f"00001000{i}", png("blue"), "a blue square") for i in range(3)])
    data = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(data[:700] + b"\xff" * 600)  # the second shard's tar is broken mid-way
    found = eval_questions.from_shards([str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")], "auto", "D.")
    assert found.skipped["unreadable_shard"] >= 1
    assert [q.references[0] for q in found.items][:3] == ["a red square"] * 3


@pytest.mark.parametrize(
    "content, message",
    [
        (b'[{"image": "a.png", "text": "what?", "answer": "x"},', "not valid JSON"),
        (b'{\n "questions": [{"image_id": 1, "question": "what?"}]\n}\n', "one JSON object"),
        ("[]".encode() + "caf\xe9".encode("latin-1"), "not UTF-8"),
    ],
)
def test_a_question_file_that_is_not_questions_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "questions.json"
    path.write_bytes(content)
    with pytest.raises(eval_questions.EvalDataError, match=message):
        eval_questions.from_file(str(path), None, "Describe.")


def test_a_question_too_long_for_the_model_is_counted_and_the_rest_are_asked(trained, tmp_path):
    from visinstruct.cli.main import main

    sample = sample_data.easy_vqa_samples("test", 1)[0]
    question, answer, kind = sample["questions"][0]
    entries = [
        {"image": sample["image_path"], "text": question, "answer": answer, "category": kind},
        {"image": sample["image_path"], "text": "why? " * 200, "answer": answer, "category": kind},  # 1,000 bytes
    ]
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in entries))
    argv = ["eval", "--checkpoint", str(trained / "run"), "--questions", str(path), "--out", str(tmp_path / "out")]
    assert main([*argv, "--set", "ablations=[blank]", "--set", "max_new_tokens=4"]) == 0
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert report["unaskable"] == {"too_long": 1} and report["questions"] == 1
    assert list(report["conditions"]) == ["image", "blank"]
