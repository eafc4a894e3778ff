"""The whole build in one Beam graph, through a loopback server, on several local processes."""

from dataclasses import asdict as to_plain
from dataclasses import replace

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from visinstruct.cli.demo import demo_rows, write_url_list
from visinstruct.cli.report import format_build_report
from visinstruct.cli.validate import validate
from visinstruct.configs import BuildConfig, from_dict
from visinstruct.pipelines.build import run as build
from visinstruct.pipelines.cost import MILLION
from visinstruct.schemas import SampleMeta
from visinstruct.testing.server import ImageServer
from visinstruct.testing.tiny_models import TINY_OPEN_CLIP_NAME

pytestmark = pytest.mark.timeout(600)
MULTI = ["--runner=FnApiRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"]


def build_config(tmp_path, url_list, tiny_checkpoint) -> BuildConfig:
    return from_dict(
        BuildConfig,
        {
            "out": str(tmp_path / "dataset"),
            "ingest": {
                "read": {"path": str(url_list), "boxes_col": "boxes", "save_additional_columns": ["origin"]},
                "download": {
                    "allow_loopback": True,
                    "timeout": 2.0,
                    "retries": 1,
                    "backoff": 0.01,
                    "per_host_rps": None,
                },
                "resize": {"image_size": 64},
                "write": {"shard_size": 16},
            },
            "filter": {
                "model": {
                    "name": TINY_OPEN_CLIP_NAME,
                    "pretrained": str(tiny_checkpoint / "tiny.pt"),
                    "config_file": str(tiny_checkpoint / f"{TINY_OPEN_CLIP_NAME}.json"),
                    "max_batch_size": 16,
                },
                "top_fraction": 0.75,
            },
            "generate": {"backend": "caption_only"},
        },
    )


def test_build_runs_every_stage_and_the_counts_add_up_stage_by_stage(tmp_path, tiny_checkpoint):
    with ImageServer() as srv:
        rows = demo_rows(srv, easy_vqa=16, shapes=8)
        write_url_list(rows, tmp_path / "urls.parquet")
        report = build(build_config(tmp_path, tmp_path / "urls.parquet", tiny_checkpoint), MULTI)
    print(format_build_report(report))
    out = tmp_path / "dataset"
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == ["ingest", "filter", "generate"]
    assert stages["ingest"]["in"] == report["inputs"] == report["rows_read"] == len(rows)
    assert stages["ingest"]["out"] == stages["filter"]["in"] and stages["filter"]["out"] == stages["generate"]["in"]
    assert stages["generate"]["out"] == report["written"] and report["accounted"] and report["stages_add_up"]
    for stage in stages.values():  # every stage reports the work it did, and its rate
        assert stage["busy_seconds"] > 0 and stage["rows_per_busy_second"] > 0
    # ... and what a million pairs would cost at those rates (CPU only here), printed with the assumptions
    cost = report["cost"]
    assert [s["stage"] for s in cost["stages"]] == list(stages) and cost["gpu_hours"] == 0 and cost["dollars"] > 0
    per_million = sum(s["busy_seconds"] for s in stages.values()) * MILLION / len(rows) / 3600 / 0.7
    assert abs(cost["vcpu_hours"] - per_million) < 0.01 * per_million + 0.01
    assert "GPU stages: none" in format_build_report(report)
    assert sum(stages["ingest"]["dropped_by_reason"].values()) == 8  # 7 broken URLs and one repeated
    kept_by_filter = stages["filter"]["out"]
    assert kept_by_filter == -(-3 * stages["filter"]["in"] // 4)  # the top 75%, rounded up
    samples = [
        SampleMeta.from_json(s["json"])
        for s in wds.WebDataset([str(p) for p in sorted(out.glob("*.tar"))], shardshuffle=False)
    ]
    assert len(samples) == report["written"]
    for meta in samples:
        assert meta.clip is not None and meta.generation.kind == "caption_only" and meta.conversations
    index = pq.read_table(sorted(out.glob("0*.parquet"))).to_pylist()
    assert len(index) == len(rows) and sum(r["status"] == "success" for r in index) == len(samples)
    assert report["clip"]["pairs"] == stages["filter"]["in"]
    problems = validate([str(p) for p in sorted(out.glob("*.tar"))])
    assert not problems.problems, problems.problems
    assert not (out / "_staging").exists()


def test_build_from_existing_shards_filters_and_generates_into_a_new_folder(tmp_path, tiny_checkpoint):
    import json

    import yaml

    from visinstruct.cli.main import main
    from visinstruct.pipelines.ingest import run as ingest

    with ImageServer() as srv:
        rows = demo_rows(srv, easy_vqa=12, shapes=6)
        write_url_list(rows, tmp_path / "urls.parquet")
        cfg = build_config(tmp_path, tmp_path / "urls.parquet", tiny_checkpoint)
        ingested = ingest(replace(cfg.ingest, write=replace(cfg.ingest.write, path=str(tmp_path / "ingested"))), MULTI)
    before = {p.name: p.read_bytes() for p in (tmp_path / "ingested").glob("*.tar")}
    settings = {
        "out": "unused",
        "ingest": {"read": {"path": "ignored.parquet"}, "write": {"shard_size": 16}},
        "filter": {"model": to_plain(cfg.filter.model), "threshold": -1.0},
        "generate": {"backend": "caption_only"},
    }
    (tmp_path / "build.yaml").write_text(yaml.safe_dump(settings))
    assert (
        main(
            [
                "build",
                "--config",
                str(tmp_path / "build.yaml"),
                "--input",
                str(tmp_path / "ingested"),
                "--out",
                str(tmp_path / "built"),
                *MULTI,
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "built" / "run_report.json").read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == ["filter", "generate"] and report["accounted"] and report["stages_add_up"]
    assert stages["filter"]["in"] == ingested["written"] == report["rows_read"]  # the samples of the input
    assert report["carried_rejections"] == ingested["rejected"]  # earlier drops stay in the index
    assert report["inputs"] == report["inputs_before"] == len(rows) and report["written"] == ingested["written"]
    assert not validate([str(p) for p in sorted((tmp_path / "built").glob("*.tar"))]).problems
    assert before == {p.name: p.read_bytes() for p in (tmp_path / "ingested").glob("*.tar")}  # input untouched


def test_build_says_in_one_line_what_is_missing(tmp_path, capsys):
    from visinstruct.cli.main import main

    (tmp_path / "neither.yaml").write_text(f"out: {tmp_path / 'out'}\n")
    assert main(["build", "--config", str(tmp_path / "neither.yaml")]) == 2
    assert "give either 'ingest' (ingest a URL list) or 'input'" in capsys.readouterr().err
    assert main(["build", "--config", str(tmp_path / "neither.yaml"), "--input", str(tmp_path)]) == 2
    needs = "starting from existing shards ('input') needs a 'curate', 'filter' or 'generate' stage"
    assert needs in capsys.readouterr().err
    captions = f"out: {tmp_path / 'out'}\ngenerate: {{backend: caption_only}}\n"
    (tmp_path / "captions.yaml").write_text(captions)
    assert main(["build", "--config", str(tmp_path / "captions.yaml"), "--input", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"no such file or folder: {tmp_path / 'nope'}")
