"""``visinstruct mix``: a new shard set drawn from several of ours, by exact counts or by weights.

Each source is a shard set (a folder, glob or brace pattern, as ``--input`` takes everywhere) with a name, and
either an exact ``count`` or a ``weight``; weights share the mix's ``samples`` (what the counts leave of it) by
largest-remainder rounding, so the total is exact. No source is upsampled: a source asked for more than it has (or
than its ``max_samples``) gives what it has, and the mix report says so.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from visinstruct.configs.loader import opt

# A source's name is the folder its shards are written to and its provenance in every sample: plain and portable.
SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


@dataclass
class MixSourceConfig:
    """One source of a mix: a shard set of ours, its name, and a weight or an exact count."""

    name: str = opt(doc="the source's name: its output folder and each sample's provenance (letters, digits, _ -)")
    input: str = opt(doc="its shards: a folder, a glob or a brace pattern of .tar files (as --input elsewhere)")
    weight: float | None = opt(None, "its share of samples (weights need not sum to 1); or count")
    count: int | None = opt(None, "exactly this many of its written samples; or weight")
    max_samples: int | None = opt(None, "with a weight: take at most this many; null for no cap")

    def __post_init__(self):
        if not SOURCE_NAME.fullmatch(self.name):
            raise ValueError(
                f"'name' must be 1-64 letters, digits, '_' or '-' starting with a letter or digit, got {self.name!r}"
            )
        if (self.weight is None) == (self.count is None):
            both = "both" if self.weight is not None else "neither"
            raise ValueError(f"source {self.name!r} has {both} 'weight' and 'count': give exactly one")
        if self.weight is not None and not 0 < self.weight < math.inf:  # refuses NaN too
            raise ValueError(f"source {self.name!r}: 'weight' must be a number > 0, got {self.weight}")
        if self.count is not None and self.count < 0:
            raise ValueError(f"source {self.name!r}: 'count' must be >= 0, got {self.count}")
        if self.max_samples is not None and self.count is not None:
            raise ValueError(
                f"source {self.name!r}: 'max_samples' caps a weight's share; a count is exact: lower the count instead"
            )
        if self.max_samples is not None and self.max_samples < 0:
            raise ValueError(f"source {self.name!r}: 'max_samples' must be >= 0, got {self.max_samples}")


@dataclass
class MixConfig:
    """``visinstruct mix``: a new shard set holding exactly the samples chosen from several shard sets."""

    sources: list[MixSourceConfig] = opt(
        doc="the shard sets to draw from, each {name, input, weight or count, max_samples}; no source is "
        "upsampled: one asked for more than it has gives what it has (the mix report says so)"
    )
    samples: int | None = opt(
        None, "the mix's total: sources with a count take theirs, weighted ones share the rest; needed with weights"
    )
    seed: int = opt(0, "which samples a source gives: the smallest hashes of (seed, source name, sample key)")
    out: str | None = opt(None, "output folder: one subfolder of shards per source, mix_report.json; or --out")

    def __post_init__(self):
        if not self.sources:
            raise ValueError("'sources' must list at least one source")
        seen: dict[str, str] = {}
        for source in self.sources:
            folded = source.name.lower()  # names become folders: Coco and coco are one folder on macOS
            if folded in seen:
                raise ValueError(f"two sources are named {source.name!r}: names must differ (also in case)")
            seen[folded] = source.name
        if self.seed < 0:
            raise ValueError(f"'seed' must be >= 0, got {self.seed}")
        weighted = [s.name for s in self.sources if s.weight is not None]
        if weighted and self.samples is None:
            raise ValueError(f"source {weighted[0]!r} has a weight: set 'samples', the mix's total, or give counts")
        if self.samples is not None and not weighted:
            raise ValueError("'samples' is what weighted sources share; every source has a count: remove 'samples'")
        if self.samples is not None and self.samples <= 0:
            raise ValueError(f"'samples' must be > 0, got {self.samples}")
        counted = sum(s.count for s in self.sources if s.count is not None)
        if self.samples is not None and counted > self.samples:
            raise ValueError(f"the sources' counts ({counted}) exceed 'samples' ({self.samples}), the mix's total")
