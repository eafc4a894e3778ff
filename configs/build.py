"""The whole build's config, and the registry of every job's config by command name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from visinstruct.configs.curate import CurateConfig
from visinstruct.configs.generate import GenerateConfig
from visinstruct.configs.loader import opt
from visinstruct.configs.stages import FilterConfig, IngestConfig

INGEST_SECTIONS = ("read", "download", "resize", "dedup")


@dataclass
class BuildConfig:
    """``visinstruct build``: the stage configs it runs, composed in one Beam graph. A null stage is skipped.

    Each section is that stage's own config; the build wires them (ingest or ``input`` -> filter -> generate, each
    rewriting the previous stage's shards in place, all in ``out``), so a section refuses the keys the build sets.
    """

    out: str = opt(doc="output folder: the dataset (FORMAT.md) and its run report; or --out")
    ingest: IngestConfig | None = opt(None, "ingest a URL list (an ingest config, without write.path); or input")
    input: str | None = opt(
        None,
        "existing shards to start from instead of ingesting (a folder, glob or brace pattern of .tar files; ours "
        "or img2dataset's); needs ingest: null",
    )
    curate: CurateConfig | None = opt(
        None, "curation before the filter (a curate config, without input and write); null to skip"
    )
    filter: FilterConfig | None = opt(None, "CLIP filtering (a filter config, without input and write); null to skip")
    generate: GenerateConfig | None = opt(
        None, "conversation generation (a generate config, without input and write); null to skip"
    )

    REFUSED: ClassVar[dict[str, str]] = {
        **{k: f"a build's ingest settings go under 'ingest:': move it to 'ingest.{k}'" for k in INGEST_SECTIONS},
        "write": "a build writes to 'out' (or --out); move shard_size, resume and retry_failed to 'ingest.write'",
    }

    def __post_init__(self):
        if (self.ingest is None) == (self.input is None):
            raise ValueError("give either 'ingest' (ingest a URL list) or 'input' (start from existing shards)")
        if self.ingest is None and self.curate is None and self.filter is None and self.generate is None:
            raise ValueError("starting from existing shards ('input') needs a 'curate', 'filter' or 'generate' stage")
        semdedup = self.curate.semdedup if self.curate else None
        if semdedup and semdedup.embedding == "clip" and semdedup.model is None and self.filter is None:
            raise ValueError(
                "'curate.semdedup' embeds with the filter's CLIP, and this build has no filter: set "
                "'curate.semdedup.model' or 'curate.semdedup.embedding: open_nsfw'"
            )
        if self.ingest is not None and self.ingest.write.path is not None:
            raise ValueError("'ingest.write.path' is the build's 'out' (or --out): remove it")
        for name in ("curate", "filter", "generate"):
            stage = getattr(self, name)
            for key in ("input", "write"):
                if stage is not None and getattr(stage, key) is not None:
                    raise ValueError(
                        f"'{name}.{key}' is set by the build (each stage rewrites the previous stage's shards in "
                        f"'out'): remove it; the build reads 'ingest' or 'input' and writes 'out' (or --out)"
                    )


CONFIGS = {
    "ingest": IngestConfig,
    "filter": FilterConfig,
    "generate": GenerateConfig,
    "build": BuildConfig,
}
