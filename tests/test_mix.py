"""`visinstruct mix`: exact counts and weights from several shard sets, each sample's source in its JSON, every
input row accounted for, the same bytes on a rerun, and mistakes refused in one line."""

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml
from PIL import Image

from visinstruct.cli.main import main
from visinstruct.configs import ConfigError, IngestConfig, MixConfig, MixSourceConfig, from_dict
from visinstruct.pipelines.ingest import run as ingest
from visinstruct.schemas import SampleMeta
from visinstruct.schemas.arrow import JsonDict
from visinstruct.testing import sample_data
from visinstruct.transforms import mix

pytestmark = pytest.mark.timeout(600)
RUNNER = "--runner=FnApiRunner"


def ingest_captioned(samples: list[dict], root: Path, name: str, tiny: int = 0) -> Path:
    """Our ingest over a folder of easy-VQA PNGs with .txt captions (shards of 10 rows), plus ``tiny`` 8x8 images
    the ingest rejects (too_small), so the set has rows an earlier stage rejected."""
    folder = root / f"{name}-images"
    folder.mkdir()
    for s in samples:
        shutil.copy(s["image_path"], folder / f"{s['image_id']:05d}.png")
        (folder / f"{s['image_id']:05d}.txt").write_text(s["caption"])
    for i in range(tiny):
        Image.new("RGB", (8, 8), "red").save(folder / f"tiny{i}.png")
        (folder / f"tiny{i}.txt").write_text("a red square")
    cfg = from_dict(
        IngestConfig,
        {
            "read": {"path": str(folder)},
            "resize": {"image_size": 32},
            "write": {"path": str(root / name), "shard_size": 10},
        },
    )
    report = ingest(cfg, [RUNNER])
    assert report["written"] == len(samples) and report["rejected"] == tiny
    return root / name


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two shard sets of ours: ``shapes`` (24 written of 26 rows, 3 shards) and ``more`` (12 written, 2 shards)."""
    root = tmp_path_factory.mktemp("mix")
    captioned = [s for s in sample_data.easy_vqa_samples("test", 80) if s["caption"]]
    assert len(captioned) >= 36
    return {
        "shapes": ingest_captioned(captioned[:24], root, "shapes", tiny=2),
        "more": ingest_captioned(captioned[24:36], root, "more"),
    }


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def read_samples(folder: Path) -> list[dict]:
    """Every sample of a shard folder as webdataset gives it."""
    tars = sorted(str(p) for p in folder.glob("*.tar"))
    return list(wds.WebDataset(tars, shardshuffle=False))


def index_rows(folder: Path) -> list[dict]:
    return [r for p in sorted(folder.glob("[0-9]*.parquet")) for r in pq.read_table(p).to_pylist()]


def dead_letters(folder: Path) -> list[dict]:
    return [r for p in sorted((folder / "rejected").glob("mix-*.parquet")) for r in pq.read_table(p).to_pylist()]


def smallest_keys(seed: int, name: str, keys: list[str], n: int) -> set[str]:
    """What the mix must choose: the ``n`` keys of smallest hash of (seed, source, key)."""
    return set(sorted(keys, key=lambda k: (mix.sample_hash(seed, name, k), k))[:n])


# ---------------------------------------------------------------------------------------------------------------
# Plain functions


def test_largest_remainder_gives_exact_totals_in_proportion():
    assert mix.largest_remainder([0.5, 0.3, 0.2], 7) == [4, 2, 1]  # 3.5, 2.1, 1.4: the spare unit to the largest .5
    assert mix.largest_remainder([1, 1, 1], 10) == [4, 3, 3]  # equal remainders: the earlier source
    assert mix.largest_remainder([3, 1], 100) == [75, 25]
    for weights in ([0.1, 0.7, 0.2], [1e-9, 1.0], [2, 2, 2, 2, 2, 2, 2]):
        for total in (0, 1, 5, 99, 1001):
            parts = mix.largest_remainder(weights, total)
            assert sum(parts) == total
            assert all(abs(p - w / sum(weights) * total) < 1 for p, w in zip(parts, weights))


def test_counts_are_exact_and_weights_share_what_they_leave():
    cfg = from_dict(
        MixConfig,
        {
            "samples": 10,
            "sources": [
                {"name": "a", "input": "x", "count": 4},
                {"name": "b", "input": "y", "weight": 2},
                {"name": "c", "input": "z", "weight": 1},
            ],
        },
    )
    assert mix.asked_counts(cfg) == {"a": 4, "b": 4, "c": 2}


def test_the_hash_depends_on_seed_source_and_key_only():
    assert mix.sample_hash(0, "a", "000000001") == mix.sample_hash(0, "a", "000000001")
    assert mix.sample_hash(0, "a", "000000001") != mix.sample_hash(1, "a", "000000001")
    assert mix.sample_hash(0, "a", "000000001") != mix.sample_hash(0, "b", "000000001")
    assert mix.sample_hash(0, "a,b", "c") != mix.sample_hash(0, "a", "b,c")  # no two triples share a text


def test_a_chosen_sample_gains_its_source_and_keeps_an_earlier_mix_record():
    cut = (mix.sample_hash(0, "a", "000000001"), "000000001", "00000")
    meta = SampleMeta(key="000000001", caption="a red circle", extra=JsonDict(status="success"))
    kept = mix.mix_decision("a", 0, cut, {"000000001"}, "00000", "000000001", meta)
    assert kept.kept and json.loads(kept.value.to_json())["mix"] == {"source": "a"}
    assert kept.value.extra["status"] == "success" and kept.value.caption == "a red circle"
    again = mix.mix_decision("b", 0, (2**64, "", ""), {"000000001"}, "00000", "000000001", kept.value)
    assert again.value.to_dict()["mix"] == {"source": "b", "earlier": {"source": "a"}}
    for written, cut_ in (({"000000001"}, None), (set(), cut), ({"000000001"}, (cut[0] - 1, "", ""))):
        dropped = mix.mix_decision("a", 0, cut_, written, "00000", "000000001", meta)
        assert dropped.reason == "not_in_mix" and dropped.detail == {"source": "a", "seed": 0}


@pytest.mark.parametrize(
    ("sources", "extra", "message"),
    [
        (
            [{"name": "a", "input": "x", "count": 1}, {"name": "a", "input": "y", "count": 1}],
            {},
            "two sources are named",
        ),
        ([{"name": "a", "input": "x", "count": 1}, {"name": "A", "input": "y", "count": 1}], {}, "also in case"),
        ([{"name": "a", "input": "x", "count": 1, "weight": 1}], {"samples": 5}, "has both 'weight' and 'count'"),
        ([{"name": "a", "input": "x"}], {}, "has neither 'weight' and 'count'"),
        ([{"name": "a", "input": "x", "weight": 1}], {}, "set 'samples'"),
        ([{"name": "a", "input": "x", "count": 3}], {"samples": 3}, "remove 'samples'"),
        ([{"name": "a", "input": "x", "count": -1}], {}, "'count' must be >= 0"),
        ([{"name": "a", "input": "x", "weight": -0.5}], {"samples": 5}, "'weight' must be a number > 0"),
        ([{"name": "a", "input": "x", "weight": 1, "max_samples": -2}], {"samples": 5}, "'max_samples' must be"),
        ([{"name": "a", "input": "x", "count": 4, "max_samples": 2}], {}, "lower the count"),
        ([{"name": "a", "input": "x", "weight": 1}], {"samples": -5}, "'samples' must be > 0"),
        (
            [{"name": "a", "input": "x", "count": 9}, {"name": "b", "input": "y", "weight": 1}],
            {"samples": 5},
            "exceed",
        ),
        ([{"name": "a/b", "input": "x", "count": 1}], {}, "'name' must be"),
        ([], {}, "at least one source"),
    ],
)
def test_a_mix_config_refuses_mistakes(sources, extra, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(MixConfig, {"sources": sources, **extra})


def test_the_choice_does_not_depend_on_how_the_shards_are_named_or_ordered(sources):
    shapes = sources["shapes"]
    spelled = [str(shapes), f"{shapes}/{{00002,00000,00001}}.tar", f"{shapes}/00002.tar::{shapes}/0000[01].tar"]
    plans = [mix.plan_source(from_dict(MixSourceConfig, {"name": "s", "input": s, "count": 7}), 7, 3) for s in spelled]
    assert {p.cut for p in plans} == {plans[0].cut} and plans[0].available == 24 and plans[0].taken == 7


# ---------------------------------------------------------------------------------------------------------------
# The command on a real runner


def test_mix_takes_exact_counts_with_provenance_and_accounts_for_every_row(sources, tmp_path, capsys):
    config = write_config(
        tmp_path / "mix.yaml",
        {
            "seed": 7,
            "sources": [
                {"name": "shapes", "input": str(sources["shapes"]), "count": 9},
                {"name": "more", "input": f"{sources['more']}/*.tar", "count": 5},
            ],
        },
    )
    out = tmp_path / "out"
    assert main(["mix", "--config", str(config), "--out", str(out), RUNNER]) == 0
    printed = capsys.readouterr().out
    assert "mix: 14 samples written of 14 asked (seed 7)" in printed

    for name, n in (("shapes", 9), ("more", 5)):
        inputs = index_rows(sources[name])
        written_in = [r["key"] for r in inputs if r["status"] == "success"]
        samples = read_samples(out / name)
        assert {s["__key__"] for s in samples} == smallest_keys(7, name, written_in, n)
        for s in samples:  # provenance in the JSON; members as they were
            meta = json.loads(s["json"])
            assert meta["mix"] == {"source": name} and meta["key"] == s["__key__"]
            assert s["txt"].decode() == meta["caption"]
        rows = index_rows(out / name)
        assert sorted(r["key"] for r in rows) == sorted(r["key"] for r in inputs)  # one row per input row
        by_status = {r["key"]: r["status"] for r in rows}
        assert sum(v == "success" for v in by_status.values()) == n
        letters = dead_letters(out / name)
        assert {d["key"] for d in letters} == set(written_in) - {s["__key__"] for s in samples}
        assert {d["reason"] for d in letters} == {"not_in_mix"} and all(
            by_status[d["key"]] == "not_in_mix" for d in letters
        )
        carried = [r for r in inputs if r["status"] != "success"]  # earlier drops keep their reason
        assert all(by_status[r["key"]] == r["status"] for r in carried)
        assert len(letters) + n == len(written_in)

    report = json.loads((out / "mix_report.json").read_text())
    assert [
        (s["name"], s["available"], s["asked"], s["taken"], s["written"], s["short"]) for s in report["sources"]
    ] == [
        ("shapes", 24, 9, 9, 9, None),
        ("more", 12, 5, 5, 5, None),
    ]
    run = json.loads((out / "run_report.json").read_text())
    assert run["accounted"] and run["inputs"] == 26 + 12 == run["inputs_before"]
    assert run["rejected_by_reason"] == {"not_in_mix": 24 - 9 + 12 - 5, "too_small": 2}
    # the whole mix reads as one shard set: OUT/*/*.tar
    every = sorted(str(p) for p in out.glob("*/*.tar"))
    assert len(every) == 5 and len(list(wds.WebDataset(every, shardshuffle=False))) == 14


def test_weights_become_exact_counts_capped_and_reported_and_a_rerun_gives_the_same_bytes(sources, tmp_path, capsys):
    data = {
        "samples": 30,
        "seed": 1,
        "sources": [
            {"name": "shapes", "input": str(sources["shapes"]), "weight": 2, "max_samples": 15},
            {"name": "more", "input": str(sources["more"]), "weight": 1},
        ],
    }
    config = write_config(tmp_path / "mix.yaml", data)
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert main(["mix", "--config", str(config), "--out", str(out), RUNNER]) == 0
    printed = capsys.readouterr().out
    assert "(capped at max_samples 15)" in printed and "not enough" not in printed

    report = json.loads((outs[0] / "mix_report.json").read_text())
    rows = [(s["name"], s["available"], s["asked"], s["taken"], s["written"], s["short"]) for s in report["sources"]]
    assert rows == [("shapes", 24, 20, 15, 15, "max_samples"), ("more", 12, 10, 10, 10, None)]
    assert report["asked"] == 30 and report["written"] == 25
    assert {json.loads(s["json"])["mix"]["source"] for s in read_samples(outs[0] / "more")} == {"more"}

    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.suffix in (".tar", ".parquet"))
    assert len(files) == 3 * (3 + 2)  # tar, index and dead letters of every shard
    files.append(Path("mix_report.json"))
    for name in files:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name

    data["sources"][1]["weight"] = 3  # 30 * 3/5 = 18 asked of 12: not enough
    config = write_config(tmp_path / "more.yaml", data)
    assert main(["mix", "--config", str(config), "--out", str(tmp_path / "c"), RUNNER]) == 0
    assert "(not enough: it has 12; no upsampling)" in capsys.readouterr().out
    report = json.loads((tmp_path / "c" / "mix_report.json").read_text())
    assert [(s["asked"], s["taken"], s["short"]) for s in report["sources"]] == [
        (12, 12, None),
        (18, 12, "not_enough"),
    ]


def test_a_mistake_is_one_line_and_exit_status_2(sources, tmp_path, capsys):
    bad = write_config(tmp_path / "bad.yaml", {"sources": [{"name": "a", "input": str(sources["more"]), "weight": 1}]})
    assert main(["mix", "--config", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "set 'samples'" in err and err.startswith("visinstruct mix: error:")

    good = {"sources": [{"name": "more", "input": str(sources["more"]), "count": 2}]}
    config = write_config(tmp_path / "good.yaml", good)
    incomplete = Path(shutil.copytree(sources["more"], tmp_path / "incomplete"))
    (incomplete / "00001_stats.json").unlink()  # as a killed run leaves a shard
    other = tmp_path / "o"
    cases = [
        (["--out", str(sources["more"].parent)], "would rewrite source 'more' while reading it"),  # OUT/more
        (["--out", str(other), "--input", "x"], "mix takes no --input"),
        (["--out", str(other), "--set", f"sources=[{{name: m, input: {tmp_path}/none, count: 1}}]"], "no such"),
        (["--out", str(other), "--set", f"sources=[{{name: m, input: {incomplete}, count: 1}}]"], "is incomplete"),
        (["--set", "seed=-1"], "'seed' must be >= 0"),
        (["--out", str(other), "--nosuch-flag"], "--nosuch-flag"),
    ]
    for extra, message in cases:
        assert main(["mix", "--config", str(config), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not (sources["more"] / "rejected" / "mix-00000.parquet").exists()  # the source is untouched


def test_a_chosen_sample_its_tar_lost_fails_the_run_and_names_the_reason(sources, tmp_path, capsys):
    damaged = Path(shutil.copytree(sources["more"], tmp_path / "damaged"))
    tar = damaged / "00000.tar"
    tar.write_bytes(tar.read_bytes()[:4096])  # cut short in transit: the index still lists its 10 samples
    config = write_config(tmp_path / "mix.yaml", {"sources": [{"name": "d", "input": str(damaged), "count": 11}]})
    assert main(["mix", "--config", str(config), "--out", str(tmp_path / "out"), RUNNER]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "source d wrote " in err[0] and "of the 11 samples chosen (lost: missing_in_tar" in err[0]
    report = json.loads((tmp_path / "out" / "mix_report.json").read_text())["sources"][0]
    assert report["written"] < report["taken"] == 11 and report["lost"]["missing_in_tar"] >= 11 - report["written"]


def test_an_output_holding_another_mix_is_refused(sources, tmp_path, capsys):
    out = tmp_path / "out"
    for name, status in (("first", 0), ("second", 2)):
        config = write_config(
            tmp_path / f"{name}.yaml", {"sources": [{"name": name, "input": str(sources["more"]), "count": 1}]}
        )
        assert main(["mix", "--config", str(config), "--out", str(out), RUNNER]) == status
    err = capsys.readouterr().err.strip()
    assert err.endswith("is not part of this mix (an earlier one?): use an empty output folder")
    assert "first/00000.tar" in err and not (out / "second").exists()
