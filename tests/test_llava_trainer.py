"""The LLaVA-style trainer: a tiny model trains on shards our ingest wrote from easy-VQA's LLaVA JSON; the loss
falls only on assistant tokens; stages freeze what they should; a resumed run continues exactly; DDP runs under
torchrun; ``chat`` answers from the checkpoint, which plain transformers loads."""

import json

import pytest
import torch
from PIL import Image

from visinstruct.configs import CONFIG_DIR, ConfigError, IngestConfig, LlavaTrainConfig, from_dict, load
from visinstruct.testing import sample_data
from visinstruct.testing.smollm2 import SMOLLM2_CHAT_TEMPLATE
from visinstruct.testing.tiny_models import tiny_causal_lm, tiny_hf_clip
from visinstruct.testing.trainers import torchrun, train_argv
from visinstruct.trainer import llava_train
from visinstruct.trainer.llava_data import IGNORE_INDEX, ConversationEncoder, encoder_for, resolve_template
from visinstruct.trainer.llava_model import build_llava, byte_level_tokenizer

pytestmark = pytest.mark.timeout(600)
TINY_YAML = CONFIG_DIR / "train" / "llava_tiny.yaml"
QUESTIONS_PER_IMAGE = 3  # keeps conversations near 200 tokens: fast steps on a shared CPU


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Our ingest over LLaVA JSON (read.format llava, read.image_root): 3 training shards of 40, 1 held out."""
    from visinstruct.pipelines.ingest import run as ingest

    root = tmp_path_factory.mktemp("easyvqa-llava")
    for split, limit, shard_size in (("train", 120, 40), ("test", 40, 40)):
        image_root = sample_data.easy_vqa_llava_json(split, limit, root / f"{split}.json", QUESTIONS_PER_IMAGE)
        cfg = from_dict(
            IngestConfig,
            {
                "read": {"path": str(root / f"{split}.json"), "format": "llava", "image_root": image_root},
                "resize": {"image_size": 64},
                "write": {"path": str(root / split), "shard_size": shard_size},
            },
        )
        assert ingest(cfg, ["--runner=FnApiRunner"])["written"] == limit
    return root


def tiny_config(shards, out, *overrides) -> LlavaTrainConfig:
    return load(LlavaTrainConfig, TINY_YAML, [f"data.shards={shards / 'train'}", f"out={out}", *overrides])


SHORT = ["steps=6", "log_every=1", "data.shuffle_buffer=50"]


def logged_losses(out):
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


# ---------------------------------------------------------------------------------------------------------------------
# The headline: `visinstruct train` with the bundled tiny config, then `visinstruct chat`


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    """``visinstruct train --config configs/train/llava_tiny.yaml``: 40 steps of 8 on one CPU thread."""
    from visinstruct.cli.main import main

    out = tmp_path_factory.mktemp("llava-run")
    assert main(train_argv("train", TINY_YAML, out, shards)) == 0
    return out


def test_a_tiny_llava_trains_on_the_cpu_and_its_loss_falls(trained):
    losses = logged_losses(trained)
    assert sorted(losses) == [10, 20, 30, 40]
    assert losses[40] < 0.7 * losses[10]
    held_out = json.loads((trained / "eval.json").read_text())
    assert held_out["samples"] == 40 and held_out["loss"] < losses[10]
    assert json.loads((trained / "model" / "trainer_state.json").read_text()) == {"step": 40}
    assert load(LlavaTrainConfig, trained / "model" / "train_config.yaml").steps == 40  # the config travels along


def test_chat_answers_from_the_checkpoint_as_plain_transformers_does(trained, tmp_path, capsys):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from visinstruct.cli.main import main

    image = sample_data.easy_vqa_samples("test", 1)[0]["image_path"]
    assert (
        main(
            [
                "chat",
                "--checkpoint",
                str(trained),
                "--image",
                image,
                "--max-new-tokens",
                "12",
                "what color is the shape?",
            ]
        )
        == 0
    )
    said = capsys.readouterr().out.strip()
    model = LlavaForConditionalGeneration.from_pretrained(trained / "model")
    processor = AutoProcessor.from_pretrained(trained / "model")
    prompt = "<|im_start|>user\n<image>\nwhat color is the shape?<|im_end|>\n<|im_start|>assistant\n"
    inputs = processor(images=Image.open(image).convert("RGB"), text=prompt, return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 16  # 64 px / 16 px patches, squared
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert said and said == answer


# ---------------------------------------------------------------------------------------------------------------------
# Masking: loss on the assistant's turns only


def encoder(template, system=None, image_seq_length=4):
    tokenizer = byte_level_tokenizer()
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    return ConversationEncoder(
        tokenizer,
        resolve_template(template, tokenizer),
        tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length,
        system=system,
    )


CONVERSATION = [
    {"from": "human", "value": "<image>\nwhat color is the shape?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "is there a circle?"},
    {"from": "gpt", "value": "no"},
]


@pytest.mark.parametrize(
    "template, system, supervised",
    [
        ("chatml", None, ["red<|im_end|>\n", "no<|im_end|>\n"]),
        ("chatml", "Answer in one word.", ["red<|im_end|>\n", "no<|im_end|>\n"]),
        ("vicuna", "A chat.", [" red<|im_end|>", " no<|im_end|>"]),
        (SMOLLM2_CHAT_TEMPLATE, None, ["red<|im_end|>\n", "no<|im_end|>\n"]),  # adds its own system prompt
    ],
)
def test_only_assistant_tokens_carry_loss_token_by_token(template, system, supervised):
    enc = encoder(template, system)
    ids, labels = enc.encode(CONVERSATION)
    tokens = [enc.tokenizer.decode([i]) for i in ids]
    # each token is supervised exactly when it lies in an answer (with its end-of-turn token), labelled with itself
    runs, inside = [], False  # the supervised stretches of text
    for token, label in zip(tokens, labels):
        if label != IGNORE_INDEX and inside:
            runs[-1] += token
        elif label != IGNORE_INDEX:
            runs.append(token)
        inside = label != IGNORE_INDEX
    assert runs == supervised
    assert all(label == i for i, label in zip(ids, labels) if label != IGNORE_INDEX)
    text = "".join(tokens)
    assert text.count("<image>") == 4 and all(
        label == IGNORE_INDEX for t, label in zip(tokens, labels) if t == "<image>"
    )
    assert "what color is the shape?" in text and "is there a circle?" in text  # the human turns are there, unlabelled
    if system:
        assert system in text


def test_a_batch_is_padded_on_the_right_with_no_attention_and_no_loss_on_padding():
    enc = encoder("chatml")
    short = [{"from": "human", "value": "<image>\nshape?"}, {"from": "gpt", "value": "circle"}]
    batch = enc([CONVERSATION, short])
    lengths = [len(enc.encode(c)[0]) for c in (CONVERSATION, short)]
    assert batch["input_ids"].shape == batch["labels"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    padding = batch["attention_mask"] == 0
    assert (batch["input_ids"][padding] == enc.tokenizer.pad_token_id).all()
    assert (batch["labels"][padding] == IGNORE_INDEX).all()


def test_a_template_that_does_not_render_turn_after_turn_is_refused():
    # renders the last message differently from the same message followed by others
    odd = (
        "{% for m in messages %}{% if loop.last %}[{{ m['content'] }}]{% else %}{{ m['content'] }}{% endif %}"
        "{% endfor %}"
    )
    with pytest.raises(ValueError, match="set text.chat_template"):
        encoder(odd).encode(CONVERSATION)


SIGLIP = (
    "model.vision.config={model_type: siglip_vision_model, image_size: 64, patch_size: 16, hidden_size: 32, "
    "intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2}"
)


@pytest.mark.parametrize("tower, strategy", [(None, "default"), (SIGLIP, "full")])
def test_training_ids_are_the_ids_llava_processor_builds_for_inference(shards, tmp_path, tower, strategy):
    cfg = tiny_config(shards, tmp_path, *([tower] if tower else []))
    model, processor = build_llava(cfg.model)
    enc = encoder_for(model, processor, cfg.text)
    ids, _ = enc.encode(CONVERSATION)
    text = enc.render(enc.messages(CONVERSATION))
    inputs = processor(images=Image.new("RGB", (64, 64)), text=text, return_tensors="pt")
    assert ids == inputs["input_ids"][0].tolist()
    # CLIP's CLS token is dropped ("default"); SigLIP has none and keeps every patch ("full"): 16 either way
    assert model.config.vision_feature_select_strategy == strategy
    assert ids.count(model.config.image_token_id) == model.config.image_seq_length == 16
    assert model(**inputs).logits.shape == (1, len(ids), len(processor.tokenizer))


# ---------------------------------------------------------------------------------------------------------------------
# Model: parts by local path, stages, checkpointing


def test_the_vision_tower_and_the_lm_load_from_local_folders(tmp_path):
    clip, _ = tiny_hf_clip(tmp_path / "clip")
    lm, lm_tokenizer = tiny_causal_lm(tmp_path / "lm")
    cfg = from_dict(
        LlavaTrainConfig,
        {
            "out": "x",
            "data": {"shards": "x"},
            "model": {"vision": {"name": str(tmp_path / "clip")}, "lm": {"name": str(tmp_path / "lm")}},
        },
    ).model
    model, processor = build_llava(cfg)
    tower = model.model.vision_tower.state_dict()
    assert all(torch.equal(tower[k], v) for k, v in clip.vision_model.state_dict().items())
    assert all(
        torch.equal(model.model.language_model.state_dict()[k], v)
        for k, v in lm.model.state_dict().items()
        if k != "embed_tokens.weight"
    )
    embeddings = model.get_input_embeddings().weight
    assert embeddings.shape[0] == len(lm_tokenizer) + 1  # one row more: <image>
    assert torch.equal(embeddings[: len(lm_tokenizer)], lm.get_input_embeddings().weight)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id == len(lm_tokenizer)
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"


@pytest.mark.slow
def test_the_real_smollm2_from_its_gguf_file_is_the_lm_of_a_trainable_llava(shards, tmp_path):
    from visinstruct.testing.smollm2 import smollm2_gguf_path
    from visinstruct.trainer.chat import answer, load_checkpoint

    cfg = tiny_config(
        shards,
        tmp_path,
        f"model.lm.name={smollm2_gguf_path()}",
        "model.lm.config=null",
        "model.lm.tokenizer=null",
        "stage=1",
        "steps=2",
        "data.batch_size=2",
        "data.num_workers=0",
    )
    summary = llava_train.train(cfg)
    assert summary["step"] == 2 and summary["loss"] > 0
    model, processor = load_checkpoint(tmp_path)
    assert model.config.text_config.hidden_size == 576 and model.config.text_config.vocab_size == 49153  # + <image>
    ids, labels = encoder_for(model, processor, cfg.text).encode(CONVERSATION)
    supervised = processor.tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])
    assert supervised == "red<|im_end|>\nno<|im_end|>\n"  # SmolLM2's own template; its system prompt is masked
    image = Image.open(sample_data.easy_vqa_samples("test", 1)[0]["image_path"])
    assert any(c.isalpha() for c in answer(model, processor, image, "What is the capital of France?", 8))


@pytest.mark.parametrize(
    "stage, trained_parts",
    [(1, {"multi_modal_projector"}), (2, {"multi_modal_projector", "language_model", "lm_head"})],
)
def test_a_stage_trains_its_parts_and_leaves_the_rest_bit_identical(shards, tmp_path, stage, trained_parts):
    source = "caption" if stage == 1 else "conversation"
    cfg = tiny_config(shards, tmp_path, "steps=3", f"stage={stage}", f"text.source={source}", "optim.warmup_steps=1")
    before = build_llava(cfg.model, cfg.seed)[0].state_dict()  # the same seed gives the run's initial weights
    llava_train.train(cfg)
    after = build_llava(
        from_dict(LlavaTrainConfig, {"out": "x", "data": {"shards": "x"}, "model": {"init_from": str(tmp_path)}}).model
    )[0].state_dict()
    part = lambda key: key.split(".")[1] if key.startswith("model.") else key.split(".")[0]  # model.<part>.*, lm_head
    assert {part(k) for k in before if not torch.equal(before[k], after[k])} == trained_parts


def test_gradient_checkpointing_gives_the_same_gradients(shards, tmp_path):
    cfg = tiny_config(shards, tmp_path)
    batch = {"image": torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))}

    calls = []

    def gradients(checkpointing):
        model, processor = build_llava(cfg.model)
        batch["text"] = encoder_for(model, processor, cfg.text)([CONVERSATION, CONVERSATION[:2]])
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.model.language_model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(checkpointing))
        model.train()
        total, count = llava_train.batch_loss(model, batch, "cpu")
        (total / count).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert calls == [False, True, True]  # checkpointing runs the layer again in the backward pass
    assert plain.keys() == checkpointed.keys() and len(plain) > 20
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)


# ---------------------------------------------------------------------------------------------------------------------
# Resume and DDP


def test_training_resumed_from_a_checkpoint_matches_an_uninterrupted_run(shards, tmp_path):
    overrides = [*SHORT, "data.num_workers=2", "grad_accum=2"]
    whole = llava_train.train(tiny_config(shards, tmp_path / "whole", *overrides))
    assert llava_train.train(tiny_config(shards, tmp_path / "parts", *overrides), stop_at=3)["step"] == 3
    resumed = llava_train.train(tiny_config(shards, tmp_path / "parts", *overrides))
    assert whole["step"] == resumed["step"] == 6
    assert logged_losses(tmp_path / "parts") == logged_losses(tmp_path / "whole")  # bit for bit on the CPU
    a, b = (
        build_llava(
            from_dict(
                LlavaTrainConfig, {"out": "x", "data": {"shards": "x"}, "model": {"init_from": str(tmp_path / run)}}
            ).model
        )[0].state_dict()
        for run in ("whole", "parts")
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_runs_under_torchrun_with_two_gloo_processes(shards, tmp_path):
    sets = [
        f"data.shards={shards / 'train'}",
        f"out={tmp_path / 'out'}",
        "steps=4",
        "log_every=2",
        "data.num_workers=1",
    ]
    proc = torchrun("train", TINY_YAML, sets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("train: step 4,") == 1  # rank 0 prints the summary; both ranks saved state below
    resume = torch.load(tmp_path / "out" / "resume.pt", weights_only=True)
    assert [p["data"]["rank"] for p in resume["processes"]] == [0, 1]
    assert "step 4/4" in proc.stderr and sorted(logged_losses(tmp_path / "out")) == [2, 4]


# ---------------------------------------------------------------------------------------------------------------------
# Configs


def test_configs_name_one_source_per_part():
    base = {"out": "x", "data": {"shards": "x"}}
    with pytest.raises(ConfigError, match="exactly one of 'vision.name'"):
        from_dict(LlavaTrainConfig, {**base, "model": {"lm": {"name": "x"}}})
    with pytest.raises(ConfigError, match="init_from' takes the whole model"):
        from_dict(LlavaTrainConfig, {**base, "model": {"init_from": "run/model", "lm": {"name": "x"}}})
    with pytest.raises(ConfigError, match="needs a 'tokenizer'"):
        from_dict(LlavaTrainConfig, {**base, "model": {"lm": {"config": {"model_type": "llama"}}}})
    for path in sorted((CONFIG_DIR / "train").glob("*.yaml")):  # the bundled configs train offline: from configs,
        model = load(LlavaTrainConfig, path).model  # or (the tower) from our own train-clip run
        assert model.vision.config or model.vision.clip_checkpoint, path.name
        assert model.lm.config and model.lm.tokenizer == "bytes", path.name


def test_a_blend_of_two_shard_sets_trains_without_writing_a_mix(shards, tmp_path):
    blend = f"data.blend=[{{shards: '{shards / 'train'}', weight: 3}}, {{shards: '{shards / 'test'}', weight: 1}}]"
    cfg = load(LlavaTrainConfig, TINY_YAML, [f"out={tmp_path}", "data.shards=null", blend, *SHORT])
    summary = llava_train.train(cfg)
    assert summary["step"] == 6 and (tmp_path / "model" / "config.json").exists()
    assert logged_losses(tmp_path).keys() == set(range(1, 7))
