"""`make demo` stays true: the demo runs end to end on bundled data and its counts add up."""

import json

import pyarrow.parquet as pq
import pytest

from visinstruct.cli.main import main
from visinstruct.pipelines.demo import BROKEN, WRONG_CAPTIONS


@pytest.mark.timeout(1200)  # SmolLM2 on a busy 2-core machine can take minutes
def test_demo_runs_end_to_end_and_accounts_for_every_url(tmp_path):
    assert main(["demo", "--out", str(tmp_path), "--runner=FnApiRunner"]) == 0  # what `make demo` runs
    reports = json.loads((tmp_path / "demo_report.json").read_text())
    ingest = reports["ingest"]
    urls = pq.read_table(tmp_path / "urls.parquet").to_pylist()
    assert ingest["accounted"] and ingest["inputs"] == len(urls)
    assert ingest["rejected"] == len(BROKEN) + 1  # every broken URL, and the repeated one
    assert ingest["written"] == len(urls) - len(BROKEN) - 1
    origins = {r["origin"] for r in urls}
    assert {"easy_vqa", "shapes", "photo", "wrong_caption", "broken"} <= origins
    assert sum(r["origin"] == "wrong_caption" for r in urls) == WRONG_CAPTIONS
    generated = reports["generate"]
    # the index keeps every input row: ingest's drops are carried, generation's are added
    assert generated["accounted"] and generated["inputs"] == generated["inputs_before"] == ingest["inputs"]
    assert generated["written"] + generated["rejected"] == ingest["inputs"]
    assert generated["written"] <= ingest["written"] and generated["rejected"] >= ingest["rejected"]
    assert generated["backend_calls"] >= 1 and generated["completion_tokens"] > 0  # SmolLM2 answered some
    assert (tmp_path / "gallery.html").stat().st_size > 10_000 and (tmp_path / "gallery.png").exists()
