"""Duplicate removal across the whole input, over small ``(hash, key)`` records: no image bytes move.

The winner of a group of duplicates is always the smallest key, so the result does not depend on the runner,
the bundle order or the number of workers.

- Duplicate URLs are dropped before downloading (:class:`FindDuplicateUrls`, :func:`drop_url_losers`).
- Exact duplicate images share a sha256 (:func:`exact_losers`).
- Near-duplicates share a perceptual hash within a Hamming distance ``d``. By the pigeonhole principle two
  64-bit hashes within distance ``d`` agree exactly on at least one of ``d + 1`` bands, so grouping by
  ``(band, bits)`` finds every candidate pair without comparing all pairs (:func:`band_keys`). A key loses
  when any smaller key lies within ``d`` of it.
- Images near any image of a reference set (evaluation data that must not leak into training) are dropped
  (:func:`reference_hits`).

Rows that come with a conversation (LLaVA JSON, a Hugging Face dataset's conversations) are training samples in
their own right: several may ask about one image (mix665k does for COCO), so they take no part in the URL, exact and
near image dedup; each of their images is still checked against the reference set (:func:`hash_record`). Multi-image
and text-only rows have no single image hash: only the reference check applies to them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import apache_beam as beam

from visinstruct.schemas import Decision, ImageTextPair, IndexRow, JsonDict, Rejection
from visinstruct.transforms.hamming_index import HammingIndex
from visinstruct.transforms.images import hamming

# (key, sha256 or None: no exact dedup, phash or None: no near dedup, the pHashes checked against references)
HashRecord = tuple[str, "str | None", "str | None", tuple[str, ...]]
Loser = tuple[str, Decision]  # (key, its drop: reason, message, detail["duplicate_of"] = winner or reference name)
UrlLoser = tuple[str, str]  # (key, the smallest key with the same URL)
MESSAGES = {
    "duplicate_sha256": "same image bytes as {}",
    "near_duplicate": "near-identical to {}",
    "near_reference": "near-identical to reference image {}",
}


def lost_to(reason: str, winner: str) -> Decision:
    """The drop of a key that lost to ``winner`` (a smaller key, or a reference image's name)."""
    return Decision.drop(reason, MESSAGES[reason].format(winner), {"duplicate_of": winner})


def first_loss(losses: Iterable[Decision]) -> Decision:
    """A key can lose several ways; one is kept, deterministically (the smallest reason, then winner)."""
    return min(losses, key=lambda d: (d.reason, d.detail["duplicate_of"]))


def hash_record(row: IndexRow) -> HashRecord:
    """The dedup record of a written index row (see the module docstring for rows with conversations).

    A build's later stages rewrite the index of a shard ingest finished: a conversation ``generate`` wrote
    (``conversation_kind`` set) does not exempt its row, so a resumed build deduplicates as a fresh one does."""
    phashes = tuple(row.image_phashes) or ((row.phash,) if row.phash else ())
    if row.turns and row.conversation_kind is None:  # a conversation the input came with (not one generated since)
        return row.key, None, None, phashes
    return row.key, row.sha256, row.phash, phashes  # a multi-image or text-only row has neither: no image dedup


def exact_losers(keys: Iterable[str]) -> Iterator[Loser]:
    """Every key but the smallest, as a ``duplicate_sha256`` loser."""
    ordered = sorted(set(keys))
    for key in ordered[1:]:
        yield key, lost_to("duplicate_sha256", ordered[0])


def band_keys(phash: str, distance: int) -> list[tuple[int, int]]:
    """``(band, bits)`` of a 64-bit hash cut into ``distance + 1`` bands."""
    value, bands = int(phash, 16), distance + 1
    edges = [round(i * 64 / bands) for i in range(bands + 1)]
    return [(i, (value >> edges[i]) & ((1 << (edges[i + 1] - edges[i])) - 1)) for i in range(bands)]


def near_losers(members: Iterable[tuple[str, str]], distance: int) -> Iterator[Loser]:
    """Within one band group of ``(key, phash)``: keys with a smaller key within ``distance`` bits.

    The winner is the smallest such key. Keys are compared with the distinct hashes seen so far (each with its
    smallest key), not with every smaller key: a web crawl holds many copies of a few placeholder images, and
    when two of them share a band without being near, every copy of one would be compared with every copy of
    the other (50,000 of each: 2.5e9 comparisons).

    The distinct hashes are kept in a :class:`HammingIndex`, so a band every image shares (a million distinct
    hashes in one group) costs time linear in the group, not quadratic.
    """
    first: dict[int, str] = {}  # phash -> the smallest key with it so far
    index = HammingIndex(distance)
    for key, h in sorted(set(members)):
        value = int(h, 16)
        winners = [first[other] for other in index.near(value)]
        if winners:
            yield key, lost_to("near_duplicate", min(winners))
        if value not in first:
            first[value] = key
            index.add(value)


def reference_names(phashes: Iterable[str], references: list[tuple[str, str]], distance: int) -> list[str]:
    """The sorted names of the references some image of ``phashes`` is near (one per image: its first hit)."""
    return sorted({name for p in phashes if (name := reference_hits(p, references, distance))})


def reference_hits(phash: str, references: list[tuple[str, str]], distance: int) -> str | None:
    """The name of the first reference image within ``distance`` bits of ``phash``, or ``None``."""
    for name, ref in references:
        if hamming(phash, ref) <= distance:
            return name
    return None


def url_id(url: str) -> bytes:
    """What stands for a URL in the URL dedup shuffle: 16 bytes of BLAKE2b, whatever the URL's length (a chance
    collision between two of a billion URLs is about 1e-21)."""
    return hashlib.blake2b(url.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def url_record(row: ImageTextPair | Rejection) -> list[tuple[bytes, str]]:
    """``[(url_id, key)]`` of a row that takes part in URL dedup (a pair fetched by URL that brings no conversation:
    see the module docstring), else ``[]``."""
    if isinstance(row, ImageTextPair) and row.url and not row.conversations:
        return [(url_id(row.url), row.key)]
    return []


def url_losers(keys: Iterable[str]) -> Iterator[UrlLoser]:
    """Within one URL's keys: every key but the smallest, with the smallest (its winner)."""
    ordered = sorted(set(keys))
    for key in ordered[1:]:
        yield key, ordered[0]


def drop_url_losers(rows: Iterable[ImageTextPair | Rejection], losers: dict[str, str]) -> list:
    """``rows`` (one shard's) with each pair that lost to a smaller key of its URL as a ``duplicate_url`` rejection."""
    out = []
    for row in rows:
        winner = losers.get(row.key) if isinstance(row, ImageTextPair) else None
        if winner is None:
            out.append(row)
        else:
            detail = JsonDict({"duplicate_of": winner})
            out.append(Rejection("dedup", "duplicate_url", f"same URL as {winner}", row.key, row.url, detail))
    return out


class FindDuplicateUrls(beam.PTransform):
    """Input rows -> :data:`UrlLoser` ``(key, winner)`` of every pair whose URL a smaller key has too.

    Only ``(url_id, key)`` records are shuffled: the pairs themselves cross one shuffle, the shard grouping, where
    :func:`drop_url_losers` turns the losers into rejections (``pipelines/ingest.py``).
    """

    def expand(self, rows):
        return (
            rows
            | "UrlRecords" >> beam.FlatMap(url_record)  # (url_id, key)
            | "GroupByUrl" >> beam.GroupByKey()  # (url_id, [key])
            | "UrlLosers" >> beam.FlatMap(lambda kv: url_losers(kv[1]))
        )


class FindDuplicateImages(beam.PTransform):
    """:data:`HashRecord` records -> ``Loser`` records (exact, and near when ``distance`` is set)."""

    def __init__(
        self, near_distance: int | None = None, references: list[tuple[str, str]] | None = None, exact: bool = True
    ):
        super().__init__()
        self.near_distance, self.references, self.exact = near_distance, references or [], exact

    def expand(self, hashes):
        outputs = []
        if self.exact:
            outputs.append(
                hashes
                | "KeyBySha256" >> beam.FlatMap(lambda h: [(h[1], h[0])] if h[1] else [])  # (sha256, key)
                | "GroupBySha256" >> beam.GroupByKey()  # (sha256, [key])
                | "ExactLosers" >> beam.FlatMap(lambda kv: exact_losers(kv[1]))
            )
        d = self.near_distance
        if d is not None:
            outputs.append(
                hashes
                | "KeyByBand"
                >> beam.FlatMap(lambda h: [(b, (h[0], h[2])) for b in band_keys(h[2], d)] if h[2] else [])
                | "GroupByBand" >> beam.GroupByKey()  # ((band, bits), [(key, phash)])
                | "NearLosers" >> beam.FlatMap(lambda kv: near_losers(kv[1], d))
            )
        if self.references:
            refs, dist = self.references, d or 0
            outputs.append(
                hashes
                | "NearReference"
                >> beam.FlatMap(
                    lambda h: [(h[0], lost_to("near_reference", n)) for n in reference_names(h[3], refs, dist)[:1]]
                )
            )
        if not outputs:
            return hashes.pipeline | "NoDedup" >> beam.Create([])
        return tuple(outputs) | "AllLosers" >> beam.Flatten() | "OneReasonPerKey" >> beam.CombinePerKey(first_loss)
