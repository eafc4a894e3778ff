"""Config loading: typed, checked once, with messages that name the file and the key."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from visinstruct.configs import (
    CONFIG_DIR,
    CONFIGS,
    BuildConfig,
    ClipModelConfig,
    ClipTrainConfig,
    ComputeConfig,
    ConfigError,
    FilterConfig,
    GenerateConfig,
    IngestConfig,
    LlavaTrainConfig,
    TransformersLLMConfig,
    describe,
    from_dict,
    load,
)

MINIMAL = "read:\n  path: urls.parquet\nwrite:\n  path: out\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_minimal_file_fills_defaults(tmp_path):
    cfg = load(IngestConfig, write(tmp_path, MINIMAL))
    assert cfg.read.path == "urls.parquet" and cfg.write.path == "out"
    assert cfg.download.allow_loopback is False and cfg.download.respect_optout is True
    assert cfg.resize.resize_mode == "border" and cfg.write.shard_size == 10_000


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    path = write(tmp_path, MINIMAL + "download:\n  timout: 3\n")
    with pytest.raises(ConfigError) as err:
        load(IngestConfig, path)
    assert str(err.value) == f"{path}: unknown key 'download.timout' (did you mean 'download.timeout'?)"


def test_unknown_top_level_key_lists_known_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'zzz'; known keys: read, write, download"):
        load(IngestConfig, write(tmp_path, MINIMAL + "zzz: 1\n"))


@pytest.mark.parametrize(
    "extra, message",
    [
        ("download:\n  timeout: fast\n", "'download.timeout' must be a number, got 'fast'"),
        ("download:\n  threads: 2.5\n", "'download.threads' must be an integer, got 2.5"),
        ("download:\n  allow_loopback: 1\n", "'download.allow_loopback' must be true or false, got 1"),
        ("resize:\n  resize_mode: squash\n", "'resize.resize_mode' must be one of 'no', 'keep_ratio'"),
        (
            "read:\n  path: x\n  save_additional_columns: [a, 3]\n",
            r"'read.save_additional_columns\[1\]' must be a string, got 3",
        ),
        ("download:\n  threads: 0\n", "in 'download': 'threads' must be > 0, got 0"),
        (
            "download:\n  user_agent_token: a) evil\n",
            r"in 'download': 'user_agent_token' must be printable ASCII without parentheses, got 'a\) evil'",
        ),
        ("dedup: 3\n", "'dedup' must be a mapping"),
    ],
)
def test_wrong_type_or_value_names_the_key(tmp_path, extra, message):
    text = MINIMAL.replace("read:\n  path: urls.parquet\n", "") if extra.startswith("read:") else MINIMAL
    path = write(tmp_path, text + extra)
    with pytest.raises(ConfigError, match=message) as err:
        load(IngestConfig, path)
    assert str(err.value).startswith(f"{path}: ")


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match="missing required key 'read'"):
        load(IngestConfig, write(tmp_path, "write:\n  path: x\n"))
    with pytest.raises(ConfigError, match="missing required key 'out'"):
        from_dict(BuildConfig, {"ingest": {"read": {"path": "x"}}})


def test_bad_yaml_and_missing_file_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+, column \d+"):
        load(IngestConfig, write(tmp_path, "read:\n  path: [unclosed\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load(IngestConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load(IngestConfig, write(tmp_path, "- a\n- b\n"))


def test_overrides_apply_and_are_checked(tmp_path):
    path = write(tmp_path, MINIMAL)
    cfg = load(IngestConfig, path, ["download.threads=8", "dedup.phash_max_distance=4"])
    assert cfg.download.threads == 8 and cfg.dedup.phash_max_distance == 4
    with pytest.raises(ConfigError, match="must be within 0-64"):
        load(IngestConfig, path, ["dedup.phash_max_distance=99"])


INGEST = {"read": {"path": "x"}, "write": {"shard_size": 8}}


def test_a_build_config_is_the_stage_configs_it_runs():
    cfg = from_dict(BuildConfig, {"out": "y", "ingest": INGEST, "filter": {"threshold": 0.28}})
    assert isinstance(cfg.ingest, IngestConfig) and isinstance(cfg.filter, FilterConfig) and cfg.generate is None
    assert cfg.ingest.write.shard_size == 8 and cfg.ingest.write.path is None  # the build writes to out
    assert cfg.filter.threshold == 0.28 and cfg.filter.model.name == "ViT-B-32"
    with pytest.raises(ConfigError, match=r"in 'filter': 'top_fraction' must be within \(0, 1\]"):
        from_dict(BuildConfig, {"out": "y", "ingest": INGEST, "filter": {"top_fraction": 2}})


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            {"ingest": {**INGEST, "write": {"path": "elsewhere"}}},
            "'ingest.write.path' is the build's 'out' (or --out): remove it",
        ),
        ({"filter": {"write": {"path": "z"}}}, "'filter.write' is set by the build"),
        ({"generate": {"input": "shards/"}}, "'generate.input' is set by the build"),
        (
            {"generate": {"write": {"path": "z", "shard_size": 4}}},
            "'generate.write.shard_size' has no effect here: filter and generate keep their input's shards",
        ),
        ({"download": {"threads": 4}}, "'download' has no effect here: a build's ingest settings go under 'ingest:'"),
        ({"write": {"shard_size": 4}}, "'write' has no effect here: a build writes to 'out' (or --out)"),
    ],
)
def test_a_build_refuses_what_it_would_ignore_or_overwrite(settings, message):
    with pytest.raises(ConfigError) as err:
        from_dict(BuildConfig, {"out": "y", "ingest": INGEST} | settings, "b.yaml")
    assert str(err.value).startswith(f"b.yaml: {message}") and "\n" not in str(err.value)


@pytest.mark.parametrize("key", ["resume", "retry_failed", "shard_size"])
@pytest.mark.parametrize("cls", [FilterConfig, GenerateConfig])
def test_a_rewriting_stage_refuses_ingest_only_write_keys(cls, key):
    """Filter and generate rewrite every input shard as it is: these keys would do nothing there."""
    with pytest.raises(ConfigError, match=rf"^f.yaml: 'write.{key}' has no effect here: .*: remove it$"):
        from_dict(cls, {"write": {"path": "out", key: 1}}, "f.yaml")


def test_device_precision_threads_are_one_definition_shared_by_every_model_config():
    for cls in (ClipModelConfig, TransformersLLMConfig, ClipTrainConfig, LlavaTrainConfig):
        assert issubclass(cls, ComputeConfig)
    cfg = from_dict(GenerateConfig, {"transformers": {"precision": "bf16", "threads": 2}})
    assert cfg.transformers.threads == 2
    with pytest.raises(ConfigError, match="in 'model': 'threads' must be > 0"):
        from_dict(FilterConfig, {"model": {"threads": 0}})
    with pytest.raises(ConfigError, match="fp16 is for inference"):
        from_dict(ClipTrainConfig, {"out": "o", "data": {"shards": "s"}, "precision": "fp16"})


def test_a_backends_own_keys_sit_in_its_section_and_only_the_chosen_backend_has_one():
    cfg = from_dict(GenerateConfig, {"backend": "openai", "openai": {"endpoint": "http://h:8000/v1", "retries": 0}})
    assert (cfg.openai.endpoint, cfg.openai.retries, cfg.openai.concurrency) == ("http://h:8000/v1", 0, 8)
    assert cfg.transformers is None and cfg.vllm is None and cfg.local is None
    local = from_dict(GenerateConfig, {"backend": "vllm"})  # the chosen backend's section: its defaults
    assert local.local is local.vllm and local.vllm.batch_size == 8 and local.openai is None
    assert from_dict(GenerateConfig, {"backend": "caption_only"}).local is None


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"backend": "vllm", "transformers": {"device": "cuda"}}, "'transformers' holds the transformers backend's"),
        ({"openai": {"endpoint": "http://h/v1"}}, "'openai' holds the openai backend's keys and the backend is"),
        ({"backend": "openai", "endpoint": "http://h/v1"}, "'endpoint' has no effect here: only the openai backend"),
        ({"device": "cuda"}, "'device' has no effect here: only the transformers backend uses it: move it to "),
        ({"backend": "openai", "openai": {"concurrency": 0}}, "in 'openai': 'concurrency' must be > 0, got 0"),
        ({"transformers": {"threads": 0}}, "in 'transformers': 'threads' must be > 0, got 0"),
    ],
)
def test_a_backend_key_out_of_its_section_or_a_section_of_another_backend_is_one_line(settings, message):
    with pytest.raises(ConfigError) as err:
        from_dict(GenerateConfig, settings, "g.yaml")
    assert message in str(err.value) and str(err.value).startswith("g.yaml: ") and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "backend, key, advice, fixed",
    [
        ("openai", "endpoint", "only the openai backend uses it: move it to 'generate.openai.endpoint'", None),
        ("openai", "concurrency", "only the openai backend uses it: move it to 'generate.openai.concurrency'", None),
        (
            "openai",
            "precision",
            "only the transformers backend uses it: move it to 'generate.transformers.precision'",
            None,
        ),
        (
            "openai",
            "batch_size",
            "openai batches are 4 x 'generate.openai.concurrency' requests: set that instead",
            {"openai": {"concurrency": 2}},
        ),
        ("openai", "large_model", "the openai backend loads no model in the workers: remove it", {}),
        ("openai", "accelerator", "the openai backend loads no model in the workers (the server has the GPU): ", {}),
        ("caption_only", "large_model", "the caption_only backend runs no model: remove it", {}),
        (
            "vllm",
            "batch_size",
            "the vllm backend's own keys sit in its section: move it to 'generate.vllm.batch_size'",
            {"vllm": {"batch_size": 2}},
        ),
        (
            None,  # the default backend, transformers
            "accelerator",
            "the transformers backend's own keys sit in its section: move it to 'generate.transformers.accelerator'",
            {"transformers": {"accelerator": "type:nvidia-l4"}},
        ),
    ],
)
def test_an_old_flat_generate_key_says_what_to_do_with_the_chosen_backend_in_a_build_too(backend, key, advice, fixed):
    """The advice fits the backend (only its section is accepted), and following it gives a config that loads."""
    chosen = {} if backend is None else {"backend": backend}
    value = "type:nvidia-l4" if key in ("accelerator", "endpoint", "precision") else 2
    with pytest.raises(ConfigError) as err:
        from_dict(BuildConfig, {"out": "o", "input": "s/", "generate": {**chosen, key: value}}, "b.yaml")
    assert str(err.value).startswith(f"b.yaml: 'generate.{key}' has no effect here: {advice}")
    if fixed is not None:
        cfg = from_dict(BuildConfig, {"out": "o", "input": "s/", "generate": {**chosen, **fixed}}, "b.yaml")
        assert cfg.generate.backend == (backend or "transformers")


def test_a_transformers_clip_refuses_open_clip_keys():
    with pytest.raises(ConfigError, match="'pretrained' is open_clip's: .*remove pretrained"):
        from_dict(ClipModelConfig, {"backend": "transformers", "name": "openai/clip", "pretrained": "x.pt"})


def test_every_bundled_yaml_loads_with_its_config_class():
    files = sorted(CONFIG_DIR.rglob("*.yaml"))
    assert files, "no bundled configs"
    for path in files:
        kind = path.parent.name  # configs/<kind>/<name>.yaml
        if kind in CONFIGS:
            load(CONFIGS[kind], path)


def test_every_config_shown_is_a_command_whose_file_it_reads():
    """``config show NAME`` documents what ``visinstruct NAME --config`` reads; a section is shown within its stage."""
    from visinstruct.cli.main import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert set(CONFIGS) <= set(commands) and "write" not in CONFIGS


def test_every_key_is_documented():
    for name, cls in CONFIGS.items():
        for key, _, _, doc in describe(cls):
            assert doc, f"{name}: key '{key}' has no description"


def test_cli_reports_a_bad_config_in_one_line_with_status_2(tmp_path):
    path = write(tmp_path, MINIMAL + "download:\n  timout: 3\n")
    proc = subprocess.run(
        [sys.executable, "-m", "visinstruct.cli.main", "config", "check", "ingest", str(path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"visinstruct config: error: {path}: unknown key 'download.timout' (did you mean 'download.timeout'?)"
    ]


def test_config_md_lists_every_key_as_the_classes_define_it():
    """CONFIG.md is generated (`visinstruct config reference > CONFIG.md`): it must not drift from the classes."""
    from pathlib import Path

    from visinstruct.configs import CONFIGS, describe
    from visinstruct.configs.reference import markdown_reference

    text = (Path(__file__).parents[1] / "CONFIG.md").read_text(encoding="utf-8")
    assert text == markdown_reference(CONFIGS), "CONFIG.md is stale: run `visinstruct config reference > CONFIG.md`"
    commands = {cls: name for name, cls in CONFIGS.items()}
    for name, cls in CONFIGS.items():
        assert f"## {name}\n" in text and all(f"`{key}`" in text for key, *_ in describe(cls, documented=commands))
    assert "| **`ingest`** | section | | ingest a URL list" in text and "`ingest.read.path`" not in text


@pytest.mark.parametrize(
    "command, input_key, out_key",
    [
        ("ingest", "read.path", "write.path"),
        ("filter", "input", "write.path"),
        ("generate", "input", "write.path"),
        ("curate", "input", "write.path"),
        ("build", "input", "out"),
        ("train-clip", "data.shards", "out"),
        ("train", "data.shards", "out"),
    ],
)
def test_input_and_out_mean_the_same_in_every_pipeline_and_training_command(tmp_path, command, input_key, out_key):
    """``--input`` is what a command reads and ``--out`` where it writes; each sets its config's key for that."""
    from visinstruct.cli.jobs import load_run
    from visinstruct.cli.main import build_parser

    settings = {
        "ingest": {"read": {"path": "u"}},
        "filter": {},
        "generate": {},
        "curate": {},
        "build": {"out": "o", "ingest": {"read": {"path": "u"}}, "generate": {"backend": "caption_only"}},
        "train-clip": {"out": "o", "data": {"shards": "s"}},
        "train": {"out": "o", "data": {"shards": "s"}, "model": {"init_from": "m"}},
    }[command]
    path = write(tmp_path, yaml.safe_dump(settings))
    args = build_parser().parse_args([command, "--config", str(path), "--input", "in/{00..01}.tar", "--out", "new"])
    cfg = load_run(CONFIGS[command], args)

    def get(key: str):
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        return value

    assert (get(input_key), get(out_key)) == ("in/{00..01}.tar", "new")  # a brace pattern stays text
    if command == "build":
        assert cfg.ingest is None  # starting from shards replaces the ingest stage
