"""What a newcomer's mistakes and failed runs look like: one line naming the problem and what to change.

Common mistakes (a missing input, an unknown model, a wrong tag, a missing checkpoint, a hub model offline, an
option nobody knows) are refused before anything runs: exit status 2, one line on stderr, no traceback. A run that
wrote nothing, or whose rows do not add up, exits 1 with its top reasons and a hint per reason. Real commands
throughout: the console module in a subprocess or ``main(argv)``, real Beam runs, real loopback servers.
"""

import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from visinstruct.cli.main import main
from visinstruct.testing.server import ImageServer, encode_test_image

pytestmark = pytest.mark.timeout(300)
RUNNER = "--runner=FnApiRunner"
REPO = Path(__file__).resolve().parents[1]


def visinstruct(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real command in a fresh interpreter (as a user runs it), offline like the rest of the suite."""
    environ = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "visinstruct.cli.main", *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=240,
    )


def one_line(stderr: str) -> str:
    """The single line a refused command prints; fails on a traceback or on several lines."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def write_yaml(path: Path, settings: dict) -> str:
    path.write_text(yaml.safe_dump(settings))
    return str(path)


def some_shard(folder: Path) -> str:
    """An existing .tar for commands that read shards (the refusals here come before it is opened)."""
    folder.mkdir(exist_ok=True)
    with tarfile.open(folder / "00000.tar", "w"):
        pass
    return str(folder)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_on_a_shard(command: str, config: str, tmp_path: Path) -> int:
    """``visinstruct COMMAND --config CONFIG`` on an empty shard in ``tmp_path/in``, writing to ``tmp_path/out``."""
    return main(
        [command, "--config", config, "--input", some_shard(tmp_path / "in"), "--out", str(tmp_path / "out"), RUNNER]
    )


def unreachable_llm() -> dict:
    """A generate config whose OpenAI-protocol server is down (nothing listens on its port), asked once."""
    openai = {"endpoint": f"http://127.0.0.1:{closed_port()}/v1", "retries": 0, "timeout": 5.0}
    return {"backend": "openai", "model": "m", "retry_new_seed": False, "openai": openai}


# -- class 4: common mistakes are one line and exit 2 ---------------------------------------------------------------


def test_a_missing_relative_input_names_the_file_and_the_folder_it_was_resolved_against(tmp_path):
    config = write_yaml(
        tmp_path / "ingest.yaml", {"read": {"path": "data/urls.parquet"}, "write": {"path": str(tmp_path / "out")}}
    )
    proc = visinstruct("ingest", "--config", config, RUNNER, cwd=tmp_path)
    assert proc.returncode == 2
    assert one_line(proc.stderr) == (
        f"visinstruct ingest: error: read.path: no such file or folder: data/urls.parquet (relative to {tmp_path})"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "model, expected",
    [
        ({"name": "ViT-B-33"}, "model.name: open_clip knows no model 'ViT-B-33' (did you mean 'ViT-B-32'?"),
        (
            {"name": "ViT-B-32", "pretrained": "laion9b_wrong"},
            "model.pretrained: 'laion9b_wrong' is not a pretrained tag of ViT-B-32 (open_clip has: ",
        ),
        (
            {"name": "ViT-B-32", "pretrained": "runs/clip/model.pt"},
            "model.pretrained: no checkpoint file runs/clip/model.pt (relative to ",
        ),
        (
            {"backend": "transformers", "name": "openai/clip-vit-base-patch32"},
            "model.name: model 'openai/clip-vit-base-patch32' is not in the local cache and HF_HUB_OFFLINE is set",
        ),
    ],
)
def test_a_model_that_cannot_load_is_refused_before_the_run(tmp_path, capsys, monkeypatch, model, expected):
    monkeypatch.chdir(tmp_path)
    config = write_yaml(tmp_path / "filter.yaml", {"model": model, "threshold": 0.2})
    assert run_on_a_shard("filter", config, tmp_path) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("visinstruct filter: error: ") and expected in line, line


def test_the_bundled_filter_example_offline_says_its_weights_are_not_cached(tmp_path, capsys):
    assert run_on_a_shard("filter", str(REPO / "configs/filter/example.yaml"), tmp_path) == 2
    line = one_line(capsys.readouterr().err)
    assert "model.pretrained: the weights of ViT-B-32 laion2b_s34b_b79k" in line
    assert "not in the local cache and HF_HUB_OFFLINE is set" in line
    # Dataflow workers load the model from caches of their own: this machine's cache is no reason to refuse.
    assert main(["config", "check", str(REPO / "configs/build/dataflow.yaml"), "--remote"]) == 0
    assert main(["config", "check", str(REPO / "configs/build/dataflow.yaml")]) == 2


def test_generate_with_the_default_config_offline_says_the_model_is_not_cached(tmp_path, capsys):
    config = write_yaml(tmp_path / "generate.yaml", {})
    assert run_on_a_shard("generate", config, tmp_path) == 2
    assert one_line(capsys.readouterr().err) == (
        "visinstruct generate: error: model: model 'HuggingFaceTB/SmolLM2-135M-Instruct' is not in the local cache "
        "and HF_HUB_OFFLINE is set: download it where the hub is reachable (`hf download "
        "HuggingFaceTB/SmolLM2-135M-Instruct`) or name a local folder"
    )


def test_config_check_runs_the_same_checks_without_running_anything(tmp_path, capsys):
    good = write_yaml(tmp_path / "good.yaml", {"read": {"path": str(tmp_path)}, "write": {"path": "out"}})
    assert main(["config", "check", "ingest", good]) == 0
    assert capsys.readouterr().out.strip() == f"{good}: ok (IngestConfig)"
    assert main(["config", "check", good]) == 0  # the kind: the narrowest config the file loads as
    assert capsys.readouterr().out.strip() == f"{good}: ok (IngestConfig)"
    bad = write_yaml(
        tmp_path / "bad.yaml",
        {
            "out": "o",
            "ingest": {"read": {"path": str(tmp_path / "urls.csv")}},
            "filter": {"model": {"name": "ViT-B-33"}},
            "generate": {},
        },
    )
    assert main(["config", "check", bad]) == 2  # the kind, build, is the only one that loads
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        f"visinstruct config: error: {bad}: ingest.read.path: no such file or folder: {tmp_path / 'urls.csv'}"
    )
    assert "filter.model.name: open_clip knows no model 'ViT-B-33'" in err[1]
    assert "generate.model: model 'HuggingFaceTB/SmolLM2-135M-Instruct' is not in the local cache" in err[2]
    assert len(err) == 3 and not (tmp_path / "o").exists()
    (tmp_path / "urls.csv").write_text("image,text\nhttp://127.0.0.1/a.jpg,a cat\n")
    assert main(["config", "check", "build", bad]) == 2  # the reader's column check, before any run
    assert capsys.readouterr().err.splitlines()[0] == (
        f"visinstruct config: error: {bad}: ingest.read.url_col: column 'url' not in urls.csv (columns: image, text)"
    )


def test_an_unexpected_exception_is_one_line_and_the_traceback_is_one_flag_away(tmp_path, capsys, monkeypatch):
    import visinstruct.pipelines.ingest as ingest

    def planted_bug(cfg, beam_args):
        return {}["no such key"]

    monkeypatch.setattr(ingest, "run", planted_bug)
    config = write_yaml(tmp_path / "ingest.yaml", {"read": {"path": str(tmp_path)}, "write": {"path": "out"}})
    assert main(["ingest", "--config", config]) == 1
    assert one_line(capsys.readouterr().err) == (
        "visinstruct ingest: internal error: KeyError: 'no such key' (run with -v for the traceback)"
    )
    assert main(["-v", "ingest", "--config", config]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and 'return {}["no such key"]' in err and "internal error: KeyError" in err


# -- class 11: options nobody knows are refused ---------------------------------------------------------------------


def test_an_img2dataset_option_we_do_not_honour_is_refused_saying_so(tmp_path):
    config = write_yaml(
        tmp_path / "ingest.yaml", {"read": {"path": str(tmp_path)}, "write": {"path": str(tmp_path / "out")}}
    )
    proc = visinstruct("ingest", "--config", config, "--processes_count", "16", RUNNER, cwd=tmp_path)
    assert proc.returncode == 2
    assert one_line(proc.stderr) == (
        "visinstruct ingest: error: --processes_count is img2dataset's and visinstruct does not honour it: "
        "Beam runs the workers: --direct_num_workers N locally, --max_num_workers N on Dataflow"
    )
    assert not (tmp_path / "out").exists()


def test_ingest_needs_no_yaml_and_takes_img2dataset_option_names(tmp_path, capsys):
    """``visinstruct ingest --url-list ... --out ...``, img2dataset's spelling of each option mapped to our key."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (96, 64), (80 * i, 120, 200)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a picture number {i}")
    argv = ["-q", "ingest", "--url_list", str(images), "--output_folder", str(tmp_path / "shards")]
    argv += ["--image_size", "32", "--resize_mode", "center_crop", "--number_sample_per_shard", "2", RUNNER]
    assert main(argv) == 0
    report = json.loads((tmp_path / "shards" / "run_report.json").read_text())
    assert report["written"] == 3 and report["shards"] == 2  # two rows per shard
    with tarfile.open(sorted((tmp_path / "shards").glob("*.tar"))[0]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        assert Image.open(tar.extractfile(member)).size == (32, 32)  # resized as --image_size asked
    capsys.readouterr()
    assert main(["ingest", "--out", str(tmp_path / "x")]) == 2
    assert one_line(capsys.readouterr().err) == (
        "visinstruct ingest: error: needs an input: --input (or --url-list) FILE, or a --config file with read.path"
    )


def test_a_build_key_that_would_be_ignored_is_refused_in_one_line(tmp_path, capsys):
    config = write_yaml(
        tmp_path / "build.yaml",
        {
            "out": str(tmp_path / "built"),
            "input": str(tmp_path),
            "generate": {"backend": "caption_only", "write": {"path": str(tmp_path / "gen"), "resume": False}},
        },
    )
    assert main(["build", "--config", config, RUNNER]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"visinstruct build: error: {config}: 'generate.write.resume' has no effect here: filter and generate "
        "rewrite every input shard; resuming is ingest's: remove it"
    )
    assert not (tmp_path / "built").exists()


def test_export_writes_to_out_and_says_so_when_given_the_old_positional_folder(tmp_path, capsys):
    shards = some_shard(tmp_path / "in")
    assert main(["export", shards, str(tmp_path / "llava")]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"visinstruct export: error: the output folder is --out now: visinstruct export {shards} --out "
        f"{tmp_path / 'llava'}"
    )


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["filter", "--output_folder=x"],
            "unknown option --output_folder: neither visinstruct filter nor Beam knows it; did you mean --out x?",
        ),
        (["build", "--thread_count", "16"], "did you mean --set ingest.download.threads=16?"),
        (["build", "--image_size", "224"], "did you mean --set ingest.resize.image_size=224?"),
        (["build", "--output_folder", "x"], "did you mean --out x?"),
        (["ingest", "--runer=FnApiRunner"], "did you mean --runner?"),
        (["ingest", "-v"], "-v goes before the command: visinstruct -v ingest ..."),
    ],
)
def test_unknown_options_say_what_was_meant(tmp_path, capsys, argv, expected):
    config = write_yaml(
        tmp_path / "c.yaml",
        {"read": {"path": str(tmp_path)}, "write": {"path": "out"}, "input": str(tmp_path), "threshold": 0.3},
    )
    assert main([argv[0], "--config", config, *argv[1:]]) == 2
    assert expected in one_line(capsys.readouterr().err)


def test_every_option_beam_declares_passes_and_only_the_rest_is_unknown():
    from visinstruct.pipelines.options import unknown_options

    beam = [
        "--runner",
        "FnApiRunner",
        "--direct_num_workers=2",
        "--direct_running_mode",
        "multi_threading",
        "--project=p",
        "--region",
        "europe-west4",
        "--experiments=a",
        "--experiments",
        "b",
        "--save_main_session",
        "--dataflow_service_options=worker_accelerator=type:nvidia-l4",
        "--setup_file=./setup.py",
    ]
    assert unknown_options(beam) == []
    assert unknown_options(beam + ["--output_folder", "x", "--url_list=u"]) == ["--output_folder", "x", "--url_list=u"]


# -- class 3: a run that wrote nothing exits 1 with its reasons and what to change ---------------------------------


def test_an_ingest_whose_every_url_is_refused_exits_1_naming_the_key_that_allows_it(tmp_path, capsys):
    with ImageServer() as srv:
        urls = [srv.add_image(f"/{i}.jpg", encode_test_image("jpeg", (40, 30))) for i in range(3)]
        pq.write_table(pa.table({"url": urls, "caption": ["a picture"] * 3}), tmp_path / "urls.parquet")
        config = write_yaml(
            tmp_path / "ingest.yaml",
            {
                "read": {"path": str(tmp_path / "urls.parquet")},
                "write": {"path": str(tmp_path / "out")},
                "download": {"retries": 0},
            },
        )  # allow_loopback: false
        assert main(["-q", "ingest", "--config", config, RUNNER]) == 1
    captured = capsys.readouterr()
    assert "ingest: 3 rows in 1 shards -> 0 written, 3 rejected" in captured.out  # the report still prints
    line = one_line(captured.err)
    assert line.startswith(
        "visinstruct ingest: failed: no sample written: all 3 rows rejected - top reasons: blocked_address 3 ("
    )
    assert "download.allow_loopback: true" in line


def ingested_shards(tmp_path: Path) -> str:
    """Three captioned images ingested from a folder: input shards for generate (no server needed)."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (48, 40), (80 * i, 120, 200)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a blue picture number {i}")
    config = write_yaml(
        tmp_path / "ingest.yaml", {"read": {"path": str(images)}, "write": {"path": str(tmp_path / "shards")}}
    )
    assert main(["-q", "ingest", "--config", config, RUNNER]) == 0
    return str(tmp_path / "shards")


def test_generate_against_a_server_that_is_down_exits_1_pointing_at_the_endpoint(tmp_path, capsys):
    shards = ingested_shards(tmp_path)
    config = write_yaml(tmp_path / "generate.yaml", unreachable_llm())
    capsys.readouterr()
    assert main(["-q", "generate", "--config", config, "--input", shards, "--out", str(tmp_path / "out"), RUNNER]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith(
        "visinstruct generate: failed: no sample written: all 3 rows rejected - top reasons: "
        "connection_error 3 (the LLM server did not answer: check openai.endpoint and that the server "
        "is up)"
    ), line


def test_a_filter_that_keeps_nothing_exits_1_saying_to_lower_the_threshold(tmp_path, capsys, tiny_checkpoint):
    from visinstruct.testing.tiny_models import TINY_OPEN_CLIP_NAME

    shards = ingested_shards(tmp_path)
    config = write_yaml(
        tmp_path / "filter.yaml",
        {
            "model": {
                "name": TINY_OPEN_CLIP_NAME,
                "pretrained": str(tiny_checkpoint / "tiny.pt"),
                "config_file": str(tiny_checkpoint / f"{TINY_OPEN_CLIP_NAME}.json"),
            },
            "threshold": 1.5,
        },
    )  # above any cosine similarity
    capsys.readouterr()
    assert main(["-q", "filter", "--config", config, "--input", shards, "--out", str(tmp_path / "out"), RUNNER]) == 1
    assert one_line(capsys.readouterr().err) == (
        "visinstruct filter: failed: no sample written: all 3 rows rejected - top reasons: clip_below_threshold 3 "
        "(every pair scored under threshold: lower it (see `visinstruct filter --dry-run`) or use top_fraction)"
    )


def test_a_build_that_keeps_nothing_names_the_stage_section_in_its_hint(tmp_path, capsys):
    shards = ingested_shards(tmp_path)
    config = write_yaml(
        tmp_path / "build.yaml", {"out": str(tmp_path / "built"), "input": shards, "generate": unreachable_llm()}
    )
    capsys.readouterr()
    assert main(["-q", "build", "--config", config, RUNNER]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("visinstruct build: failed: no sample written")
    assert "connection_error 3 (the LLM server did not answer: check generate.openai.endpoint" in line
    assert json.loads((tmp_path / "built" / "run_report.json").read_text())["written"] == 0


def test_failure_summary_flags_rows_that_do_not_add_up_even_when_some_were_written():
    from visinstruct.pipelines.report import failure_summary

    fine = {"inputs": 4, "written": 3, "rejected": 1, "rejected_by_reason": {"http_404": 1}, "accounted": True}
    assert failure_summary(fine, "ingest") is None
    lost = fine | {"rows_read": 6, "accounted": False}
    assert failure_summary(lost, "ingest") == (
        "rows do not add up (6 in, 3 written + 1 rejected; see "
        "run_report.json) - top reasons: http_404 1 (the URLs no longer exist)"
    )
    dropped = {"inputs": 2, "written": 0, "rejected": 2, "rejected_by_reason": {"clip_below_threshold": 2}}
    assert "lower it (see `visinstruct filter --dry-run`) or use top_fraction" in failure_summary(dropped, "filter")


@pytest.mark.parametrize(
    "load, expected",
    [
        (lambda: __import__("open_clip").create_model("ViT-B-33"), "Model config for 'ViT-B-33' not found"),
        (
            lambda: __import__("open_clip").create_model("ViT-B-32", pretrained="nope"),
            "Pretrained value 'nope' is not a known tag or valid file path",
        ),
        (
            lambda: __import__("transformers").AutoTokenizer.from_pretrained("no-such-org/no-such-model"),
            "couldn't find them in the cached files",
        ),
    ],
)
def test_what_model_loaders_raise_for_a_wrong_name_becomes_one_line(load, expected):
    """The second line of defence, for what the checks cannot see: the loaders' own errors, mapped at the command."""
    from visinstruct.cli.checks import expected_errors
    from visinstruct.cli.errors import UserError

    with pytest.raises(UserError) as raised, expected_errors():
        load()
    assert expected in str(raised.value) and "\n" not in str(raised.value)


def test_only_local_runners_count_as_this_machine():
    from visinstruct.pipelines.options import is_local

    assert is_local([]) and is_local(["--runner", "FnApiRunner"]) and is_local(["--runner=DirectRunner"])
    assert not is_local(["--runner=DataflowRunner"]) and not is_local(["--runner", "FlinkRunner"])


@pytest.mark.parametrize("host", ["down", "unresolvable"])
def test_generate_whose_llm_answered_nothing_fails_though_its_caption_only_share_was_written(tmp_path, capsys, host):
    shards = ingested_shards(tmp_path)
    settings = unreachable_llm() | {"llm_fraction": 0.5}
    if host == "unresolvable":  # a mistyped endpoint host is the server unreachable, not a run that looks fine
        settings["openai"]["endpoint"] = "http://nonexistent-host.invalid:1/v1"
    config = write_yaml(tmp_path / "generate.yaml", settings)
    capsys.readouterr()
    assert main(["-q", "generate", "--config", config, "--input", shards, "--out", str(tmp_path / "out"), RUNNER]) == 1
    report = json.loads((tmp_path / "out" / "run_report.json").read_text())
    sent = report["rejected_by_reason"]["connection_error"]
    assert report["written"] == 3 - sent > 0  # the caption-only share
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"visinstruct generate: failed: the LLM answered none of the {sent} samples sent"), line


def test_an_openai_generation_without_an_endpoint_is_refused_naming_the_key_in_its_section(tmp_path):
    config = write_yaml(tmp_path / "generate.yaml", {"backend": "openai", "model": "m"})
    proc = visinstruct("config", "check", "generate", config, cwd=tmp_path)
    assert proc.returncode == 2
    assert one_line(proc.stderr) == (
        f"visinstruct config: error: {config}: openai.endpoint: backend openai needs the server's base URL, "
        "e.g. http://127.0.0.1:8000/v1"
    )


def test_a_caption_only_generation_over_rows_ingest_rejected_is_no_failure():
    from visinstruct.pipelines.report import failure_summary

    carried = {
        "stage": "generate",
        "inputs": 3,
        "written": 2,
        "rejected": 1,
        "rejected_by_reason": {"http_404": 1},
        "accounted": True,
        "backend_calls": 0,
        "completion_tokens": 0,
    }
    assert failure_summary(carried, "generate") is None
    asked = carried | {"backend_calls": 1, "rejected_by_reason": {"http_404": 1, "connection_error": 1}}
    assert failure_summary(asked, "generate").startswith("the LLM answered none of the 2 samples sent")
