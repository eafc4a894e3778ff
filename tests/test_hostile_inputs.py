"""Hostile URL lists: every row ends written or with a reason, through the reader, the fetcher and a whole ingest.

One list holds what a scraped URL list really contains, and what an attacker would put in one: empty cells,
non-http schemes, IDN hosts, 10 KB URLs, NUL bytes, bytes that are not UTF-8, 1 MB fields, and every form of a
private address that a URL can hide (decimal, octal and hex IPv4, trailing dots, IPv6 carrying IPv4, a redirect
to the metadata server). Nothing raises; the counts add up.
"""

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from visinstruct.configs import DownloadConfig, IngestConfig, ReadConfig, from_dict
from visinstruct.pipelines.ingest import run
from visinstruct.schemas import Decision, ImageTextPair
from visinstruct.testing.server import ImageServer, encode_test_image
from visinstruct.transforms.fetch import Fetcher
from visinstruct.transforms.read import plan_units, read_unit

pytestmark = pytest.mark.timeout(300)

SSRF_HOSTS = [  # each reaches a private or metadata address, however it is spelled
    "169.254.169.254",
    "0xa9fea9fe",
    "2852039166",
    "0251.0376.0251.0376",
    "169.254.169.254.",
    "10.1",
    "[::ffff:169.254.169.254]",
    "[::a9fe:a9fe]",
    "[::ffff:0:a00:1]",
    "[64:ff9b::a9fe:a9fe]",
    "[64:ff9b:1::a00:1]",
    "[2002:a9fe:a9fe::1]",
    "[2001:0:4136:e378:8000:63bf:f5ff:fffe]",
    "[fd00:ec2::254]",
    "[fe80::1]",
    "[::]",
    "0.0.0.0",
    "100.100.100.200",
]


@pytest.fixture(scope="module")
def server():
    with ImageServer() as srv:
        for i in range(3):
            srv.add_image(f"/ok{i}.png", encode_test_image("png", (60 + 10 * i, 50)))
        yield srv


def hostile_rows(server) -> list[tuple[bytes, bytes, str, str]]:
    """``(url cell, caption cell, stage, reason)``: the reason each row must end with (``success`` if written)."""
    rows = [
        (server.url("/ok0.png").encode(), b"a fine row", "", "success"),
        (b"", b"empty url", "read", "missing_url"),
        (b"   ", b"blank url", "read", "missing_url"),
        (b"http://x/nul\x00.jpg", b"nul in the url", "read", "bad_url"),
        (b"http://x/caf\xe9.jpg", b"latin-1 byte in the url", "read", "bad_encoding"),
        (b"http://x/" + b"a" * 10_000 + b".jpg", b"a 10 KB url", "read", "field_too_long"),
        (server.url("/ok1.png").encode(), b"x" * 1_000_000, "read", "field_too_long"),
        (server.url("/ok1.png").encode() + b"?nul", b"nul \x00 in the caption", "read", "bad_caption"),
        (server.url("/ok1.png").encode() + b"?latin", b"caf\xe9", "read", "bad_encoding"),
    ]
    for scheme_url in (
        b"file:///etc/passwd",
        b"ftp://example.com/a.jpg",
        b"javascript:alert(1)",
        b"data:image/png;base64,iVBORw0KGgo=",
        b"gopher://127.0.0.1:70/_x",
        b"not a url",
    ):
        rows.append((scheme_url, b"not http", "download", "invalid_url"))
    rows += [
        ("http://bücher.invalid/a.jpg".encode(), b"an IDN host nobody serves", "download", "dns_error"),
        ("http://ⓛⓞⓒⓐⓛⓗⓞⓢⓣ/a.jpg".encode(), b"not a valid IDNA name", "download", "invalid_url"),
    ]
    rows += [
        (f"http://{host}/latest/meta-data".encode(), host.encode(), "download", "blocked_address")
        for host in SSRF_HOSTS
    ]
    redirect = server.fault_url("redirect_to", url="http://169.254.169.254/latest/meta-data")
    rows += [
        (redirect.encode(), b"a redirect to the metadata server", "download", "blocked_address"),
        (server.url("/ok2.png").encode(), b"the last row is fine too", "", "success"),
    ]
    return rows


def write_list(path: Path, rows) -> str:
    path.write_bytes(b"url\tcaption\n" + b"".join(url + b"\t" + caption + b"\n" for url, caption, _, _ in rows))
    return str(path)


def test_the_reader_gives_every_hostile_row_a_pair_or_a_reason(server, tmp_path):
    rows = hostile_rows(server)
    cfg = ReadConfig(path=write_list(tmp_path / "urls.tsv", rows))
    got = [row for fmt, paths in plan_units(cfg) for row in read_unit(fmt, paths, cfg)]
    assert [g.reason if isinstance(g, Decision) else "pair" for g in got] == [
        reason if stage == "read" else "pair" for _, _, stage, reason in rows
    ]
    for bad in (g for g in got if isinstance(g, Decision)):
        raw, url = bad.detail["raw"], bad.index.get("url") or ""
        assert len(raw) <= 500 and len(url) <= 500
        (raw + bad.message + url).encode("utf-8")  # dead letters are valid UTF-8


def test_the_fetcher_gives_every_hostile_url_a_reason(server, tmp_path):
    rows = hostile_rows(server)
    cfg = ReadConfig(path=write_list(tmp_path / "urls.tsv", rows))
    pairs = [g for fmt, paths in plan_units(cfg) for g in read_unit(fmt, paths, cfg) if isinstance(g, ImageTextPair)]
    fetcher = Fetcher(DownloadConfig(allow_loopback=True, timeout=2.0, retries=0, per_host_rps=None, threads=8))
    try:
        results = fetcher.map(fetcher.fetch, [p.url for p in pairs])
    finally:
        fetcher.close()
    expected = [reason for _, _, stage, reason in rows if stage != "read"]
    assert [r.reason or "success" for r in results] == expected, [r.message for r in results]
    assert server.hits("/latest/meta-data") == 0


def test_a_whole_ingest_writes_or_dead_letters_every_hostile_row_and_the_counts_add_up(server, tmp_path):
    rows = hostile_rows(server)
    cfg = from_dict(
        IngestConfig,
        {
            "read": {"path": write_list(tmp_path / "urls.tsv", rows)},
            "write": {"path": str(tmp_path / "out"), "shard_size": 8},
            "download": {"allow_loopback": True, "timeout": 2.0, "retries": 0, "per_host_rps": None, "threads": 8},
            "resize": {"image_size": 32, "resize_mode": "center_crop", "encode_format": "png"},
        },
    )
    report = run(cfg, ["--runner=FnApiRunner"])
    assert report["inputs"] == report["rows_read"] == len(rows) and report["accounted"]
    assert report["written"] == 2 and report["written"] + report["rejected"] == len(rows)
    index = pq.read_table(sorted((tmp_path / "out").glob("*.parquet"))).to_pylist()
    assert [r["status"] for r in sorted(index, key=lambda r: r["key"])] == [reason for _, _, _, reason in rows]
    rejected = pq.read_table(tmp_path / "out" / "rejected").to_pylist()
    by_key = {r["key"]: (r["stage"], r["reason"]) for r in rejected}
    assert sorted(by_key.values()) == sorted((stage, reason) for _, _, stage, reason in rows if stage)
    assert all(r["message"] for r in rejected)


def test_near_dedup_of_many_copies_of_a_few_placeholders_is_fast_and_keeps_the_smallest_key():
    import random

    from visinstruct.transforms.dedup import near_losers

    def brute_force(members, distance):  # the definition: a key loses to the smallest key within distance
        ordered = sorted(set(members))
        for i, (key, h) in enumerate(ordered):
            winners = [other for other, oh in ordered[:i] if bin(int(h, 16) ^ int(oh, 16)).count("1") <= distance]
            if winners:
                yield key, "near_duplicate", winners[0]

    rng = random.Random(13)
    bases = [rng.getrandbits(64) for _ in range(5)]
    members = [
        (f"{i:09d}", f"{bases[rng.randrange(5)] ^ (1 << rng.randrange(64)) * rng.randrange(2):016x}")
        for i in range(400)
    ]
    rng.shuffle(members)
    found = [(key, loss.reason, loss.detail["duplicate_of"]) for key, loss in near_losers(members, 3)]
    assert found == list(brute_force(members, 3))
    # Two placeholders a crawl serves thousands of times, sharing a band but 10 bits apart: comparing each copy
    # of the second with every smaller key would take 2.5e9 comparisons.
    first, second = f"{bases[0]:016x}", f"{bases[0] ^ (0x3FF << 40):016x}"
    copies = [(f"{i:09d}", first if i < 50_000 else second) for i in range(100_000)]
    losers = list(near_losers(copies, 4))
    assert len(losers) == 99_998
    assert {loss.detail["duplicate_of"] for _, loss in losers} == {"000000000", "000050000"}


def test_near_dedup_of_a_band_every_image_shares_is_linear_and_exact():
    import random

    from visinstruct.transforms.dedup import near_losers
    from visinstruct.transforms.hamming_index import HammingIndex

    rng = random.Random(7)
    shared = 0xABC << 52  # the top 12 bits (a whole band at distance 4) the same in every hash
    hashes = [shared | rng.getrandbits(52) for _ in range(2_000)]
    hashes += [h ^ (1 << rng.randrange(52)) ^ (1 << rng.randrange(52)) for h in hashes[:300]]  # near copies
    members = [(f"{i:09d}", f"{h:016x}") for i, h in enumerate(hashes)]
    brute = {}
    for i, (key, h) in enumerate(members):
        near = [k for k, oh in members[:i] if (int(h, 16) ^ int(oh, 16)).bit_count() <= 4]
        if near:
            brute[key] = min(near)
    found = {key: loss.detail["duplicate_of"] for key, loss in near_losers(members, 4)}
    assert found == brute and len(found) >= 300

    def checked(n: int) -> int:
        index = HammingIndex(4)
        for _ in range(n):
            value = shared | rng.getrandbits(52)
            index.near(value)
            index.add(value)
        return index.checked

    small, large = checked(20_000), checked(80_000)
    assert large < 4 * small * 1.5  # 4x the hashes, about 4x the comparisons (a scan would make it 16x)
    assert large < 80_000 * 50  # tens of comparisons per hash, not tens of thousands


def test_the_hamming_index_finds_exactly_what_a_scan_finds_at_every_distance():
    import random

    from visinstruct.transforms.hamming_index import HammingIndex

    rng = random.Random(3)
    for distance in (0, 1, 4, 8, 16):
        index, stored = HammingIndex(distance), []
        for _ in range(1_500):
            base = rng.choice(stored) if stored and rng.random() < 0.5 else rng.getrandbits(64)
            value = base ^ sum(1 << rng.randrange(64) for _ in range(rng.randrange(distance + 2)))
            assert sorted(index.near(value)) == sorted(h for h in stored if (h ^ value).bit_count() <= distance)
            if value not in stored:
                index.add(value)
                stored.append(value)
