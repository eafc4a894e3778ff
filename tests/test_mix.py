"""`visinstruct mix`: exact counts and weights from several sources (our shards, img2dataset's, a LLaVA JSON mix
ingests first), keys unique across the whole mix with each sample's source and source key in its JSON, copies
only for a source that asks for them, every input row accounted for, the same bytes on a rerun, and mistakes
refused in one line."""

import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml
from PIL import Image
from test_shard_compat import write_img2dataset_shards  # img2dataset 1.47.0's layout, as test_shard_compat has it

from visinstruct.cli.main import main
from visinstruct.configs import ConfigError, IngestConfig, MixConfig, MixSourceConfig, from_dict
from visinstruct.pipelines.ingest import run as ingest
from visinstruct.schemas import SampleMeta
from visinstruct.schemas.arrow import JsonDict
from visinstruct.schemas.keys import parse_key
from visinstruct.testing import sample_data
from visinstruct.transforms import mix
from visinstruct.transforms.layout import image_members

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


def source_keys(samples: list[dict]) -> list[str]:
    """The source key of each written sample, from its JSON's mix record."""
    return [json.loads(s["json"])["mix"]["key"] for s in samples]


def assert_one_dataset(out: Path, tmp_path: Path, capsys) -> None:
    """The whole mix reads as one shard set: validate finds no problem (no key twice) and export writes it."""
    every = f"{out}/*/*.tar"
    assert main(["validate", every]) == 0, capsys.readouterr().out
    assert "no problems" in capsys.readouterr().out
    llava = tmp_path / f"{out.name}-llava"
    assert main(["export", every, "--out", str(llava), "--format", "llava", "--caption-only"]) == 0
    capsys.readouterr()
    entries = json.loads((llava / "llava.json").read_text())
    samples = list(wds.WebDataset(sorted(str(p) for p in out.glob("*/*.tar")), shardshuffle=False))
    assert len(entries) == len(samples) and len({s["__key__"] for s in samples}) == len(samples)


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


def test_a_chosen_sample_gains_its_source_and_source_key_and_keeps_an_earlier_mix_record():
    cut = (mix.sample_hash(0, "a", "000000001"), "000000001", "00000")
    meta = SampleMeta(key="000000001", caption="a red circle", extra=JsonDict(status="success"))
    kept = mix.mix_decision("a", 0, cut, {"000000001"}, "00000", "000000001", meta)
    assert kept.kept and json.loads(kept.value.to_json())["mix"] == {"source": "a", "key": "000000001"}
    assert kept.value.extra["status"] == "success" and kept.value.caption == "a red circle"
    again = mix.mix_decision("b", 0, (2**64, "", ""), {"000000001"}, "00000", "000000001", kept.value)
    assert again.value.to_dict()["mix"] == {
        "source": "b",
        "key": "000000001",
        "earlier": {"source": "a", "key": "000000001"},
    }
    for written, cut_ in (({"000000001"}, None), (set(), cut), ({"000000001"}, (cut[0] - 1, "", ""))):
        dropped = mix.mix_decision("a", 0, cut_, written, "00000", "000000001", meta)
        assert dropped.reason == "not_in_mix" and dropped.detail == {"source": "a", "seed": 0}
    # after a whole pass (a repeating source asked for more than it has) every written sample is taken
    assert mix.mix_decision("a", 0, None, {"000000001"}, "00000", "000000001", meta, passes=1).kept


def test_a_copy_is_its_own_sample_under_its_own_key_numbered_when_its_source_repeats():
    meta = SampleMeta(key="000000001", extra=JsonDict(mix={"source": "a", "key": "000000001", "earlier": {}}))
    copy = mix.copy_meta(meta, "000070011", 2, repeat=True)
    assert copy.key == "000070011"
    assert list(copy.to_dict()["mix"].items()) == [("source", "a"), ("key", "000000001"), ("copy", 2), ("earlier", {})]
    assert mix.copy_meta(meta, "000070011", 0, repeat=False).to_dict()["mix"] == meta.extra["mix"]


def test_keys_follow_the_rows_then_the_copies_in_copy_then_row_order(sources):
    source = {"name": "more", "input": str(sources["more"]), "count": 30, "repeat": True}
    plan = mix.plan_source(from_dict(MixSourceConfig, source), 30, 3, first_shard=7)
    rekey = mix.MixRekey(plan, plan.shards[0], 7, 4)  # its first shard, numbered 7 in the mix
    _, rows = mix.shard_keys(plan.shards[0])
    assert [rekey.keys(k)[0] for k in rows] == [f"00007{i:04d}" for i in range(len(rows))]  # a row each, in order
    times = {k: len(rekey.keys(k)) for k in rows}  # 30 of 12: two passes, a third copy for 6
    second = [rekey.keys(k)[1] for k in rows if times[k] > 1]
    third = [rekey.keys(k)[2] for k in rows if times[k] > 2]
    assert second + third == [f"00007{i:04d}" for i in range(len(rows), len(rows) + len(second) + len(third))]
    assert plan.slots[0] == sum(times.values())  # the plan knew how many keys the shard needs


def test_a_source_seed_wins_over_the_mix_seed(sources):
    def plan(mix_seed, source_seed):
        source = {"name": "s", "input": str(sources["more"]), "count": 4, "seed": source_seed}
        return mix.plan_source(from_dict(MixSourceConfig, source), 4, mix_seed)

    assert plan(0, 5).cut == plan(5, None).cut and plan(0, 5).seed == 5
    assert plan(0, 5).cut != plan(0, None).cut


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
        ([{"name": "a", "count": 1}], {}, "has neither 'input' and 'ingest'"),
        ([{"name": "a", "input": "x", "count": 1, "ingest": {"read": {"path": "y"}}}], {}, "has both 'input'"),
        ([{"name": "a", "count": 1, "ingest": {"read": {"path": "y"}, "write": {"path": "z"}}}], {}, "set by mix"),
        ([{"name": "a", "count": 1, "ingest": {"read": {"path": "y", "fromat": "llava"}}}], {}, "did you mean"),
        ([{"name": "a", "input": "x", "count": 1, "seed": -3}], {}, "'seed' must be >= 0"),
        ([{"name": "a", "count": 1, "ingest": {"read": {"path": "y"}, "write": {"energon": True}}}], {}, "no effect"),
        ([{"name": "a", "input": "x", "count": 1, "repeats": True}], {}, "did you mean 'sources\\[0\\].repeat'"),
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


def test_mix_takes_exact_counts_under_keys_unique_across_the_mix_and_accounts_for_every_row(sources, tmp_path, capsys):
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

    # shard numbers run on across sources: shapes' three shards are 0-2, more's two are 3-4
    for name, n, numbers in (("shapes", 9, [0, 1, 2]), ("more", 5, [3, 4])):
        assert sorted(int(p.stem) for p in (out / name).glob("*.tar")) == numbers
        inputs = index_rows(sources[name])
        written_in = [r["key"] for r in inputs if r["status"] == "success"]
        samples = read_samples(out / name)
        assert set(source_keys(samples)) == smallest_keys(7, name, written_in, n)
        for s in samples:  # provenance and the new key in the JSON; members as they were
            meta = json.loads(s["json"])
            assert meta["mix"] == {"source": name, "key": meta["mix"]["key"]} and meta["key"] == s["__key__"]
            assert parse_key(s["__key__"])[0] in numbers and s["txt"].decode() == meta["caption"]
        rows = index_rows(out / name)
        assert len(rows) == len(inputs) and all(parse_key(r["key"])[0] in numbers for r in rows)  # a row per input
        written = {r["key"]: r for r in rows if r["status"] == "success"}
        assert written.keys() == {s["__key__"] for s in samples} and {r["mix_source"] for r in written.values()} == {
            name
        }
        letters = dead_letters(out / name)  # under the source's keys, which name the samples left out
        assert {d["key"] for d in letters} == set(written_in) - set(source_keys(samples))
        assert {d["reason"] for d in letters} == {"not_in_mix"} and len(letters) + n == len(written_in)
        statuses = Counter(r["status"] for r in rows)  # earlier drops keep their reason
        assert statuses == Counter(r["status"] for r in inputs if r["status"] != "success") + Counter(
            {"success": n, "not_in_mix": len(letters)}
        )

    report = json.loads((out / "mix_report.json").read_text())
    assert [
        (s["name"], s["first_shard"], s["available"], s["asked"], s["taken"], s["copies"], s["written"], s["short"])
        for s in report["sources"]
    ] == [
        ("shapes", 0, 24, 9, 9, 0, 9, None),
        ("more", 3, 12, 5, 5, 0, 5, None),
    ]
    run = json.loads((out / "run_report.json").read_text())
    assert run["accounted"] and run["inputs"] == 26 + 12 == run["inputs_before"]
    assert run["rejected_by_reason"] == {"not_in_mix": 24 - 9 + 12 - 5, "too_small": 2}
    assert_one_dataset(out, tmp_path, capsys)  # both sources held key 000000000; the mix holds each key once


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
    assert "(not enough: it has 12; repeat: true to give copies)" in capsys.readouterr().out
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
        (
            [
                "--out",
                str(other),
                "--set",
                f"sources=[{{name: m, ingest: {{read: {{path: {tmp_path}/no.json}}}}, count: 1}}]",
            ],
            "source 'm': ingest: ",
        ),
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


def test_a_repeating_source_gives_whole_passes_and_a_seeded_partial_pass_each_copy_a_sample(sources, tmp_path, capsys):
    data = {"seed": 3, "sources": [{"name": "more", "input": str(sources["more"]), "count": 30, "repeat": True}]}
    out = tmp_path / "out"
    assert main(["mix", "--config", str(write_config(tmp_path / "mix.yaml", data)), "--out", str(out), RUNNER]) == 0
    assert "(18 copies: repeat)" in capsys.readouterr().out

    written_in = [r["key"] for r in index_rows(sources["more"]) if r["status"] == "success"]
    samples = read_samples(out / "more")
    times = Counter(source_keys(samples))  # 30 of 12: two whole passes, and the 6 smallest hashes once more
    assert len(samples) == 30 and times.keys() == set(written_in)
    assert {k for k, n in times.items() if n == 3} == smallest_keys(3, "more", written_in, 6)
    assert set(times.values()) == {2, 3}
    for key in written_in:  # copies 0, 1 (and 2) of each, each under a key of its own
        copies = [json.loads(s["json"])["mix"] for s in samples if json.loads(s["json"])["mix"]["key"] == key]
        assert sorted(c["copy"] for c in copies) == list(range(times[key]))
    assert len({s["__key__"] for s in samples}) == 30
    for s in samples:  # every member of a copy is its own: same bytes, new key
        assert s["jpg"] and json.loads(s["json"])["key"] == s["__key__"]

    row = json.loads((out / "mix_report.json").read_text())["sources"][0]
    assert (row["available"], row["asked"], row["taken"], row["copies"], row["written"], row["short"]) == (
        12,
        30,
        30,
        18,
        30,
        None,
    )
    run = json.loads((out / "run_report.json").read_text())
    assert run["accounted"] and run["inputs"] == 12 + 18 == run["inputs_before"] and run["copies"] == 18
    assert_one_dataset(out, tmp_path, capsys)


def test_img2dataset_output_is_a_source_as_it_is(sources, tmp_path, capsys):
    i2d = write_img2dataset_shards(tmp_path / "i2d")  # 5 written of 7 rows, keys of 6 digits
    data = {
        "sources": [
            {"name": "web", "input": str(i2d), "count": 4},
            {"name": "more", "input": str(sources["more"]), "count": 2},
        ]
    }
    out = tmp_path / "out"
    assert main(["mix", "--config", str(write_config(tmp_path / "mix.yaml", data)), "--out", str(out), RUNNER]) == 0
    capsys.readouterr()
    web = read_samples(out / "web")
    assert set(source_keys(web)) == smallest_keys(0, "web", ["000000", "000003", "000002", "000001", "000010"], 4)
    for s in web:  # img2dataset's own fields are kept
        meta = json.loads(s["json"])
        assert meta["status"] == "success" and meta["exif"] == "{}" and meta["mix"]["source"] == "web"
    statuses = Counter(r["status"] for r in index_rows(out / "web"))
    assert statuses == {"success": 4, "not_in_mix": 1, "failed_to_download": 1, "failed_to_resize": 1}
    for row in index_rows(out / "web"):  # rows rejected before the mix, under new keys, still trace to their source
        if row["status"].startswith("failed_"):
            assert row["mix_source"] == "web" and row["error_message"].startswith("source key 0000")
    assert json.loads((out / "run_report.json").read_text())["accounted"]
    assert_one_dataset(out, tmp_path, capsys)


def test_a_llava_json_is_ingested_first_then_drawn_from_and_a_rerun_gives_the_same_bytes(sources, tmp_path, capsys):
    path, root, rows = sample_data.llava_mix_dataset(tmp_path / "llava")  # 12 rows: 1, 2 and 3 images, text-only
    data = {
        "seed": 2,
        "sources": [
            {
                "name": "llava",
                "ingest": {
                    "read": {"path": str(path), "format": "llava", "image_root": str(root)},
                    "write": {"shard_size": 5},
                    "resize": {"image_size": 64, "resize_mode": "border", "encode_format": "jpg"},
                },
                "count": 20,
                "repeat": True,
            },
            {"name": "more", "input": str(sources["more"]), "count": 3},
        ],
    }
    config = write_config(tmp_path / "mix.yaml", data)
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert main(["mix", "--config", str(config), "--out", str(out), RUNNER]) == 0
    assert f"llava: ingested 12 rows of {path} into _ingest/llava/: 12 samples, 0 rejected" in capsys.readouterr().out

    ingested = outs[0] / "_ingest" / "llava"  # an ingest like any other, its report kept
    assert json.loads((ingested / "run_report.json").read_text())["written"] == 12
    row = json.loads((outs[0] / "mix_report.json").read_text())["sources"][0]
    assert row["input"] == str(path) and row["ingest"] == {
        "folder": "_ingest/llava",
        "inputs": 12,
        "written": 12,
        "rejected": 0,
    }
    assert (row["available"], row["taken"], row["copies"], row["written"]) == (12, 20, 8, 20)
    samples = read_samples(outs[0] / "llava")
    by_images = Counter(len(image_members(s)) for s in samples)
    assert set(by_images) == {0, 1, 2, 3}  # text-only, single and multi-image samples all drawn
    for s in samples:  # every image member of a multi-image sample is renamed with it: KEY.0.jpg, KEY.1.jpg...
        meta = json.loads(s["json"])
        assert meta["key"] == s["__key__"] and len(image_members(s)) == meta.get("image_count", 1)
        assert meta["conversations"] and meta["mix"]["source"] == "llava"
    assert_one_dataset(outs[0], tmp_path, capsys)

    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.suffix in (".tar", ".parquet"))
    files.append(Path("mix_report.json"))
    for name in files:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name

    shards = {p: p.stat().st_ino for p in ingested.glob("*.tar")}  # a rerun into the same folder: ingest resumes
    assert main(["mix", "--config", str(config), "--out", str(outs[0]), RUNNER]) == 0
    capsys.readouterr()
    assert {p: p.stat().st_ino for p in ingested.glob("*.tar")} == shards  # its shards were not written again
    assert (outs[0] / "mix_report.json").read_bytes() == (outs[1] / "mix_report.json").read_bytes()


def test_a_hugging_face_dataset_is_ingested_first_then_drawn_from(sources, tmp_path, capsys):
    hf = tmp_path / "hf"  # our `more` shards as a save_to_disk folder: 12 rows with their image bytes
    assert main(["export", str(sources["more"]), "--format", "hf", "--out", str(hf)]) == 0
    data = {"sources": [{"name": "hub", "ingest": {"read": {"path": str(hf), "format": "hf"}}, "count": 7}]}
    out = tmp_path / "out"
    assert main(["mix", "--config", str(write_config(tmp_path / "mix.yaml", data)), "--out", str(out), RUNNER]) == 0
    capsys.readouterr()
    ingested = [r["key"] for r in index_rows(out / "_ingest" / "hub") if r["status"] == "success"]
    samples = read_samples(out / "hub")
    assert len(ingested) == 12 and set(source_keys(samples)) == smallest_keys(0, "hub", ingested, 7)
    assert {s["txt"].decode() for s in samples} <= {r["caption"] for r in index_rows(sources["more"])}
    assert_one_dataset(out, tmp_path, capsys)
