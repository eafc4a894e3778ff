"""Config loading: typed, checked once, with messages that name the file and the key."""

import subprocess
import sys
from pathlib import Path

import pytest

from visinstruct.configs import (
    CONFIG_DIR,
    CONFIGS,
    BuildConfig,
    ConfigError,
    IngestConfig,
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
    with pytest.raises(ConfigError, match="missing required key 'write'"):
        load(IngestConfig, write(tmp_path, "read:\n  path: x\n"))


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


def test_optional_stage_sections_in_build_config():
    cfg = from_dict(BuildConfig, {"read": {"path": "x"}, "write": {"path": "y"}, "filter": {"threshold": 0.28}})
    assert cfg.filter.threshold == 0.28 and cfg.filter.model.name == "ViT-B-32" and cfg.generate is None
    with pytest.raises(ConfigError, match=r"top_fraction' must be within \(0, 1\]"):
        from_dict(BuildConfig, {"read": {"path": "x"}, "write": {"path": "y"}, "filter": {"top_fraction": 2}})


def test_every_bundled_yaml_loads_with_its_config_class():
    files = sorted(CONFIG_DIR.rglob("*.yaml"))
    assert files, "no bundled configs"
    for path in files:
        kind = path.parent.name  # configs/<kind>/<name>.yaml
        if kind in CONFIGS:
            load(CONFIGS[kind], path)


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
    for name, cls in CONFIGS.items():
        assert f"## {name}\n" in text and all(f"`{key}`" in text for key, *_ in describe(cls))
