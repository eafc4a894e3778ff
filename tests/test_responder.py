"""The in-memory responder (``visinstruct.testing.responder``) through the real ingest graph on a real Beam runner.

It stands in for the network in the scale simulation (``benchmarks/ingest_scale.py``), so it must answer as the
real fetcher does: every row written in image mode, every row dead-lettered ``blocked_address`` in refuse mode,
and the run's accounting adding up either way.
"""

import dataclasses
import functools
import io

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from visinstruct.configs import DownloadConfig, IngestConfig, from_dict
from visinstruct.pipelines.ingest import Ingest
from visinstruct.pipelines.report import column_values, dead_letter_reasons, summarize
from visinstruct.testing.responder import Responder, image_for
from visinstruct.transforms.fetch import Fetched, Fetcher

pytestmark = pytest.mark.timeout(300)
ROWS = 200


def ingest_with(tmp_path, mode: str, per_host_rps: float | None = None) -> tuple[dict, str]:
    urls = [f"http://img{i % 17}.example{i % 5}.com/p/{i}.jpg" for i in range(ROWS)]
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": urls, "caption": [f"caption {i}" for i in range(ROWS)]}), path)
    out = str(tmp_path / mode)
    cfg = from_dict(
        IngestConfig,
        {
            "read": {"path": str(path)},
            "write": {"path": out, "shard_size": 50},
            "download": {"per_host_rps": per_host_rps, "check_robots_txt": False, "threads": 4},
            "resize": {"image_size": 32, "resize_mode": "center_crop"},
        },
    )
    p = beam.Pipeline(runner="FnApiRunner")
    _ = p | Ingest(cfg, fetcher_factory=functools.partial(Responder, mode=mode))
    result = p.run()
    result.wait_until_finish()
    return summarize(out, stage="ingest", result=result), out


def test_the_responder_answers_with_the_fields_of_the_real_fetchers_value():
    value = Responder(DownloadConfig(), mode="image").fetch("http://a.example/x.jpg").value
    assert [f.name for f in dataclasses.fields(value)] == [f.name for f in dataclasses.fields(Fetched)]
    assert (value.url, value.attempts) == ("http://a.example/x.jpg", 1)


def test_each_url_gets_its_own_decodable_image():
    a, b = image_for("http://a.example/1.jpg"), image_for("http://a.example/2.jpg")
    assert a != b and a == image_for("http://a.example/1.jpg")
    assert Image.open(io.BytesIO(a)).size == (32, 32)


def test_refuse_mode_drops_as_the_real_address_check_does():
    real = Fetcher(DownloadConfig()).fetch("http://10.0.0.1/a.jpg")  # refused before any socket opens
    decision = Responder(DownloadConfig(), mode="refuse").fetch("http://img3.example.com/a.jpg")
    assert (
        (decision.reason, dict(decision.detail))
        == (real.reason, dict(real.detail))
        == ("blocked_address", {"attempts": 1})
    )
    assert decision.message.startswith("img3.example.com resolves to a non-public address")


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="mode"):
        Responder(DownloadConfig(), mode="slow")


def test_image_mode_writes_every_row_with_distinct_images(tmp_path):
    report, out = ingest_with(tmp_path, "image")
    assert (report["shards"], report["inputs"], report["written"], report["rejected"]) == (4, ROWS, ROWS, 0)
    assert report["accounted"]
    digests = column_values(out, "sha256")
    assert len(digests) == ROWS and len(set(digests)) == ROWS


def test_refuse_mode_dead_letters_every_row_and_the_rows_add_up(tmp_path):
    report, out = ingest_with(tmp_path, "refuse")
    assert (report["inputs"], report["written"], report["rejected"]) == (ROWS, 0, ROWS)
    assert report["accounted"]  # rows read = rows in the indexes
    assert report["rejected_by_reason"] == {"blocked_address": ROWS}
    assert dead_letter_reasons(out)["download"] == {"blocked_address": ROWS}


def test_the_routed_path_takes_the_responder_too(tmp_path):
    """With ``per_host_rps`` set, ingest fetches through fetch partitions (each passing its limiter to ``fetch``):
    the responder answers there as on the direct path, with the same images."""
    direct, direct_out = ingest_with(tmp_path / "direct", "image")
    routed, routed_out = ingest_with(tmp_path / "routed", "image", per_host_rps=1000.0)
    assert (routed["inputs"], routed["written"], routed["rejected"]) == (ROWS, ROWS, 0) and routed["accounted"]
    assert sorted(column_values(routed_out, "sha256")) == sorted(column_values(direct_out, "sha256"))


def test_the_responder_has_no_robots_txt_to_ask_or_seed():
    responder = Responder(DownloadConfig(), mode="image")
    try:
        assert responder.robots_record("http://a.example") == ("allow", "", "")
        assert responder.seed_robots({"http://a.example": ("rules", "User-agent: *\nDisallow: /", "")}) == 0
        assert responder.fetch("http://a.example/x.jpg", limiter=object()).kept
    finally:
        responder.close()
