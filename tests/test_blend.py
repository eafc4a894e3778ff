"""Read-time blends (``data.blend``): each sample comes from a source with probability proportional to its weight;
the blend is seeded, resumable exactly, and each batch says which source each sample came from."""

from __future__ import annotations

import collections
import io

import pytest
import webdataset as wds
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from visinstruct.configs.loader import ConfigError, from_dict
from visinstruct.configs.train import ClipTrainConfig, StreamConfig
from visinstruct.schemas.records import ShardStats
from visinstruct.trainer.data import ShardStream, blend_of, stream_sources
from visinstruct.transforms.layout import shard_files, write_stats

SIZES = {"small": [7], "middle": [20, 20], "large": [50, 50, 50]}  # samples per shard of each source


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (2, 2), (10, 20, 30)).save(out, format="PNG")
    return out.getvalue()


def write_source(folder, name: str, shard_sizes: list[int], stats: bool = True, caption: bool = True) -> None:
    """Shards ``00000.tar, ...`` of ``shard_sizes`` samples keyed ``<name>-<shard>-<i>``, with our stats beside."""
    folder.mkdir(parents=True)
    image = png()
    for shard, size in enumerate(shard_sizes):
        tar = str(folder / f"{shard:05d}.tar")
        with wds.TarWriter(tar) as sink:
            for i in range(size):
                sample = {"__key__": f"{name}-{shard}-{i:03d}", "png": image}
                if caption:
                    sample["txt"] = f"caption {i}"
                sink.write(sample)
        if stats:
            write_stats(shard_files(tar).stats, ShardStats(shard, "ingest", size, size, 0))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend")
    for name, shard_sizes in SIZES.items():
        write_source(root / name, name, shard_sizes)
    return root


def config(root, weights: dict[str, float], **settings) -> StreamConfig:
    blend = [{"shards": str(root / name), "weight": weight} for name, weight in weights.items()]
    return from_dict(StreamConfig, {"blend": blend, **settings})


def stream(cfg: StreamConfig, seed: int = 0, batch_size: int = 20, num_workers: int = 0) -> ShardStream:
    return ShardStream(
        stream_sources(cfg),
        batch_size,
        pil_to_tensor,
        caption="txt",
        seed=seed,
        shuffle_buffer=cfg.shuffle_buffer,
        num_workers=num_workers,
        rank=0,
        world_size=1,
    )


def source_of(key: str, root) -> str:
    return str(root / key.split("-")[0])


# ---------------------------------------------------------------------------------------------------------------------
# Shares


def test_each_source_gives_its_weighted_share_of_10000_samples(sources):
    weights = {"small": 1.0, "middle": 3.0, "large": 6.0}  # need not sum to 1
    s = stream(config(sources, weights, shuffle_buffer=50, blend_epoch_samples=2500), batch_size=100)
    try:
        batches = [next(s) for _ in range(100)]
    finally:
        s.close()
    drawn = [name for batch in batches for name in batch["source"]]
    assert len(drawn) == 10_000
    shares = collections.Counter(drawn)
    for name, weight in weights.items():
        assert abs(shares[str(sources / name)] / 10_000 - weight / 10) <= 0.02, (name, shares)
    # each sample's "source" names the shard set its key comes from; the small source repeats its 7 samples
    assert all(source_of(k, sources) == src for b in batches for k, src in zip(b["key"], b["source"], strict=True))
    small = [k for b in batches for k in b["key"] if k.startswith("small-")]
    assert set(small) == {f"small-0-{i:03d}" for i in range(7)} and len(small) > 7


def test_a_source_of_weight_zero_share_never_appears_and_one_source_gives_all(sources):
    s = stream(config(sources, {"middle": 2.5}, blend_epoch_samples=200))
    try:
        batch = next(s)
    finally:
        s.close()
    assert set(batch["source"]) == {str(sources / "middle")}
    assert all(k.startswith("middle-") for k in batch["key"])


# ---------------------------------------------------------------------------------------------------------------------
# Seeds and resume


def keys_and_sources(s: ShardStream, n: int) -> list[tuple[list[str], list[str]]]:
    return [(b["key"], b["source"]) for b in (next(s) for _ in range(n))]


def test_the_same_seed_gives_the_same_blend_and_another_seed_another(sources):
    cfg = config(sources, {"small": 1, "middle": 1, "large": 1}, shuffle_buffer=30, blend_epoch_samples=300)
    runs = {}
    for name, seed in (("first", 5), ("again", 5), ("other", 6)):
        s = stream(cfg, seed=seed)
        try:
            runs[name] = keys_and_sources(s, 8)
        finally:
            s.close()
    assert runs["first"] == runs["again"]
    assert [k for k, _ in runs["first"]] != [k for k, _ in runs["other"]]
    assert [src for _, src in runs["first"]] != [src for _, src in runs["other"]]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_resumed_blend_delivers_the_batches_an_uninterrupted_one_does(sources, num_workers):
    # 400 samples an epoch: 20 batches of 20 a process, so 30 batches cross an epoch
    cfg = config(sources, {"small": 1, "middle": 2, "large": 3}, shuffle_buffer=40, blend_epoch_samples=400)
    streams = []

    def new():
        streams.append(stream(cfg, seed=3, num_workers=num_workers))
        return streams[-1]

    try:
        whole = keys_and_sources(new(), 30)
        first = new()
        for _ in range(13):  # odd: with two workers the next batch comes from the second one
            next(first)
        resumed = new()
        resumed.load_state_dict(first.state_dict())
        assert keys_and_sources(resumed, 17) == whole[13:]
    finally:
        for s in streams:
            s.close()


def test_a_blended_epoch_is_a_fixed_number_of_samples_per_worker(sources):
    """97 samples an epoch with batches of 20: 4 complete batches, then the next epoch starts."""
    s = stream(config(sources, {"small": 1, "large": 1}, blend_epoch_samples=97))
    try:
        for _ in range(4):
            next(s)
        assert s.state_dict()["position"] == {0: [0, 4]}
        next(s)
        assert s.state_dict()["position"] == {0: [1, 1]}
    finally:
        s.close()


# ---------------------------------------------------------------------------------------------------------------------
# The epoch's size, and mistakes


def test_the_epoch_defaults_to_the_written_samples_of_every_source(sources):
    blend = stream_sources(config(sources, {"small": 1, "middle": 1, "large": 1}))
    assert blend.epoch_samples == 7 + 2 * 20 + 3 * 50
    assert [len(s.urls) for s in blend.sources] == [1, 2, 3]


def test_shards_without_stats_need_blend_epoch_samples(sources, tmp_path):
    write_source(tmp_path / "bare", "bare", [5], stats=False)
    with pytest.raises(ValueError, match="set data.blend_epoch_samples"):
        blend_of([(str(sources / "small"), 1.0), (str(tmp_path / "bare"), 1.0)])
    assert blend_of([(str(tmp_path / "bare"), 1.0)], epoch_samples=40).epoch_samples == 40


def test_a_source_matching_no_shards_is_a_clear_error(sources, tmp_path):
    (tmp_path / "empty").mkdir()
    for spec, why in (("nope/*.tar", "nothing matches nope/*.tar"), (str(tmp_path / "empty"), "no shards")):
        blend = [{"shards": str(sources / "small"), "weight": 1}, {"shards": spec, "weight": 2}]
        with pytest.raises(FileNotFoundError) as error:
            stream_sources(from_dict(StreamConfig, {"blend": blend}))
        assert str(error.value).startswith("blend source 1: ") and why in str(error.value), str(error.value)


def test_a_source_with_no_usable_sample_is_a_clear_error_not_an_endless_wait(tmp_path):
    write_source(tmp_path / "mute", "mute", [3], caption=False)  # no captions: nothing usable
    s = stream(from_dict(StreamConfig, {"blend": [{"shards": str(tmp_path / "mute"), "weight": 1}]}), batch_size=2)
    try:
        with pytest.raises(ValueError, match=r"blend source .*mute: no usable sample .* in 110 shard draws"):
            next(s)
    finally:
        s.close()


@pytest.mark.parametrize(
    "data, message",
    [
        (
            {"shards": "a", "blend": [{"shards": "b", "weight": 1}]},
            "give either 'shards' (one shard set) or 'blend' (a list of {shards, weight}), not both",
        ),
        ({}, "give either 'shards' (one shard set) or 'blend' (a list of {shards, weight}), got neither"),
        ({"blend": [{"shards": "b", "weight": 0}]}, "in 'data.blend[0]': 'weight' must be a number > 0, got 0.0"),
        ({"blend": [{"shards": "b", "weight": -2}]}, "in 'data.blend[0]': 'weight' must be a number > 0, got -2.0"),
        ({"blend": []}, "'blend' needs at least one source ({shards, weight})"),
        ({"shards": "a", "blend_epoch_samples": 10}, "'blend_epoch_samples' has no effect without 'blend'"),
        (
            {"blend": [{"shards": "b", "weight": 1}], "blend_epoch_samples": 0},
            "'blend_epoch_samples' must be > 0, got 0",
        ),
    ],
)
def test_a_mistaken_blend_is_one_config_error(data, message):
    with pytest.raises(ConfigError) as error:
        from_dict(ClipTrainConfig, {"out": "o", "data": data}, "train.yaml")
    assert str(error.value).startswith("train.yaml: ") and str(error.value).endswith(message)
    assert "\n" not in str(error.value)


def test_an_epoch_shorter_than_a_batch_per_worker_is_refused_before_any_worker_starts(sources):
    cfg = config(sources, {"small": 1.0}, blend_epoch_samples=30)
    with pytest.raises(ConfigError, match="less than one batch of 20"):
        stream(cfg, num_workers=2)  # 30 samples over 2 workers: 15 each, under a batch
