"""Find the 64-bit hashes within a Hamming distance of a query among many, in time linear in their number.

Near-duplicate dedup groups perceptual hashes by band (pigeonhole: two hashes within ``d`` bits share one of
``d + 1`` bands exactly), then compares the hashes of a group with each other. A group is small on real photos,
but a band that every image shares (flat placeholders, a crawl of one site's thumbnails) makes one group of
everything, and comparing each hash with all earlier ones is quadratic: 10^12 comparisons for a million images.

:class:`HammingIndex` is multi-index hashing (Norouzi et al., "Fast Search in Hamming Space with Multi-Index
Hashing", CVPR 2012): the 64 bits are cut into ``m`` substrings and each substring is a dict key. Two hashes
within ``d`` bits agree within ``d // m`` bits on at least one substring (otherwise they would differ in more
than ``d``), so a query looks up, in each substring's dict, every value within ``d // m`` bits of its own
substring, and checks only the hashes found there. ``m`` is chosen for the index's size so that buckets stay
small (substrings of about log2(n) bits); below a few hundred hashes a plain scan is cheaper and is used. The
index is rebuilt when it doubles, so adding costs amortized constant time, and a query costs about the same
whatever the number of hashes: linear in total.
"""

from __future__ import annotations

import itertools
import math

BITS = 64
SCAN_BELOW = 256  # hashes under which a plain scan costs less than the lookups


def _masks(width: int, radius: int) -> list[int]:
    """Every ``width``-bit value with at most ``radius`` bits set (the flips a query tries on one substring)."""
    masks = [0]
    for r in range(1, radius + 1):
        for bits in itertools.combinations(range(width), r):
            masks.append(sum(1 << b for b in bits))
    return masks


def _plan(n: int, distance: int, bits: list[int]) -> list[list[int]] | None:
    """The cheapest split of bit positions ``bits`` into substrings for ``n`` hashes, or ``None`` when a plain scan
    is cheaper.

    Cost of one query with ``m`` substrings of width ``s`` searched within ``r = distance // m`` bits: the
    lookups (``m`` times the number of flips) plus the hashes they find (``n / 2**s`` per lookup).
    """
    best, best_cost = None, float(n)
    for m in range(1, min(distance + 1, len(bits)) + 1):
        width, radius = len(bits) // m, distance // m
        lookups = m * sum(math.comb(width + 1, i) for i in range(radius + 1))  # widths are s or s + 1
        cost = lookups * (1 + n / 2**width)
        if cost < best_cost:
            best, best_cost = m, cost
    if best is None:
        return None
    edges = [round(i * len(bits) / best) for i in range(best + 1)]
    return [bits[edges[i] : edges[i + 1]] for i in range(best)]


def _runs(positions: list[int]) -> list[tuple[int, int, int]]:
    """Ascending bit positions as ``(shift, mask, offset)`` runs: a substring's value is the sum of
    ``((value >> shift) & mask) << offset`` over its runs."""
    runs, offset, i = [], 0, 0
    while i < len(positions):
        j = i
        while j + 1 < len(positions) and positions[j + 1] == positions[j] + 1:
            j += 1
        width = j - i + 1
        runs.append((positions[i], (1 << width) - 1, offset))
        offset, i = offset + width, j + 1
    return runs


class HammingIndex:
    """A growing set of 64-bit hashes (ints) answering "which are within ``distance`` bits of this one?".

    ``checked`` counts the hashes compared bit by bit so far: what tests measure linearity by.
    """

    def __init__(self, distance: int):
        if not 0 <= distance <= BITS:
            raise ValueError(f"distance must be within 0-{BITS}, got {distance}")
        self.distance = distance
        self.hashes: list[int] = []
        self.checked = 0
        self._parts: list[list[tuple[int, int, int]]] = []  # each substring's runs (see _runs)
        self._masks: list[list[int]] = []
        self._tables: list[dict[int, list[int]]] = []
        self._built_at = 0

    def __len__(self) -> int:
        return len(self.hashes)

    def add(self, value: int) -> None:
        self.hashes.append(value)
        if len(self.hashes) >= max(SCAN_BELOW, 2 * self._built_at):
            self._build()
        elif self._tables:
            self._insert(value)

    def near(self, value: int) -> list[int]:
        """The stored hashes within ``distance`` bits of ``value`` (each once, in no particular order)."""
        if not self._tables:
            candidates = self.hashes
        else:
            found: set[int] = set()
            for runs, masks, table in zip(self._parts, self._masks, self._tables):
                sub = _substring(value, runs)
                for mask in masks:
                    bucket = table.get(sub ^ mask)
                    if bucket:
                        found.update(bucket)
            candidates = found
        self.checked += len(candidates)
        d = self.distance
        return [h for h in candidates if (h ^ value).bit_count() <= d]

    def _build(self) -> None:
        """Index the hashes on the bits where they differ: bits every stored hash shares (the band a dedup group
        is made of, or more) would put everything in one bucket. Leaving bits out never misses a hash: two hashes
        within ``distance`` bits are within it on any subset of the bits too."""
        self._built_at = len(self.hashes)
        common_ones, any_ones = -1, 0
        for value in self.hashes:
            common_ones &= value
            any_ones |= value
        varying = [b for b in range(BITS) if (common_ones ^ any_ones) >> b & 1]
        plan = _plan(len(self.hashes), self.distance, varying)
        self._tables = []
        if plan is None:
            return
        self._parts = [_runs(bits) for bits in plan]
        self._masks = [_masks(len(bits), self.distance // len(plan)) for bits in plan]
        self._tables = [{} for _ in plan]
        for value in self.hashes:
            self._insert(value)

    def _insert(self, value: int) -> None:
        for runs, table in zip(self._parts, self._tables):
            table.setdefault(_substring(value, runs), []).append(value)


def _substring(value: int, runs: list[tuple[int, int, int]]) -> int:
    return sum(((value >> shift) & mask) << offset for shift, mask, offset in runs)
