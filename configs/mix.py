"""``visinstruct mix``: a new shard set drawn from several sources, by exact counts or by weights.

Each source has a name and either shards (``input``: a folder, glob or brace pattern, ours or img2dataset's, as
``--input`` takes everywhere) or an ``ingest`` section (LLaVA JSON, a Hugging Face dataset, any input ingest
reads: mix ingests it first), and either an exact ``count`` or a ``weight``; weights share the mix's ``samples``
(what the counts leave of it) by largest-remainder rounding, so the total is exact. A source asked for more than it
has (or than its ``max_samples``) gives what it has, unless it opts in to ``repeat``: then it gives whole passes
over its samples plus a seeded partial pass. The mix report says which.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from visinstruct.configs.loader import opt
from visinstruct.configs.stages import IngestConfig

# A source's name is the folder its shards are written to and its provenance in every sample: plain and portable.
SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


@dataclass
class MixSourceConfig:
    """One source of a mix: shards (or an input mix ingests first), its name, and a weight or an exact count."""

    name: str = opt(doc="the source's name: its output folder and each sample's provenance (letters, digits, _ -)")
    input: str | None = opt(
        None, "its shards (ours or img2dataset's): a folder, a glob or a brace pattern of .tar files; or ingest"
    )
    ingest: IngestConfig | None = opt(
        None,
        "or an input ingest reads (read.format llava, hf, ...; every ingest key but write.path): ingested first "
        "into OUT/_ingest/<name>/ (resumable), then drawn from",
    )
    weight: float | None = opt(None, "its share of samples (weights need not sum to 1); or count")
    count: int | None = opt(None, "exactly this many of its written samples; or weight")
    max_samples: int | None = opt(None, "with a weight: take at most this many; null for no cap")
    repeat: bool = opt(
        False,
        "asked for more than it has: give whole passes plus a seeded partial pass, each copy a sample of its own "
        "(false: give what it has)",
    )
    seed: int | None = opt(None, "the seed of this source's draw; null: the mix's seed")

    def __post_init__(self):
        if not SOURCE_NAME.fullmatch(self.name):
            raise ValueError(
                f"'name' must be 1-64 letters, digits, '_' or '-' starting with a letter or digit, got {self.name!r}"
            )
        if (self.input is None) == (self.ingest is None):
            both = "both" if self.input is not None else "neither"
            raise ValueError(f"source {self.name!r} has {both} 'input' and 'ingest': give exactly one")
        if self.ingest is not None and self.ingest.write.path is not None:
            raise ValueError(
                f"source {self.name!r}: 'ingest.write.path' is set by mix (OUT/_ingest/{self.name}/): remove it"
            )
        if self.ingest is not None and getattr(self.ingest.write, "energon", False):
            raise ValueError(
                f"source {self.name!r}: 'ingest.write.energon' has no effect here (the ingested shards are the mix's "
                "input, not a dataset to load): remove it"
            )
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"source {self.name!r}: 'seed' must be >= 0, got {self.seed}")
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
        doc="the sources to draw from, each {name, input or ingest, weight or count, max_samples, repeat, seed}; "
        "one asked for more than it has gives what it has unless it has repeat: true (the mix report says so)"
    )
    samples: int | None = opt(
        None, "the mix's total: sources with a count take theirs, weighted ones share the rest; needed with weights"
    )
    seed: int = opt(
        0, "which samples a source gives: the smallest hashes of (seed, source name, sample key); a source's seed wins"
    )
    out: str | None = opt(
        None,
        "output folder: one subfolder of shards per source (shard numbers and keys unique across the mix), "
        "mix_report.json; or --out",
    )
    energon: bool = opt(
        False,
        "at the end, write Megatron-Energon's metadata for each source's folder and OUT/energon.yaml, a metadataset "
        "blending them by the samples each gave (energon then reads the mix with no `energon prepare`)",
    )

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
