"""The curation stage's config: caption quality, image safety (NSFW score, faces), semantic dedup and benchmark
decontamination, one section each; a null section does not run."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from visinstruct.configs.loader import opt
from visinstruct.configs.stages import ClipModelConfig, OutputConfig, _positive

CAPTION_RULES = ("filename", "url", "boilerplate", "repeated_tokens")


@dataclass
class TextQualityConfig:
    """Caption quality: mojibake repaired (ftfy), language, length in words, and captions that say nothing."""

    fix_mojibake: bool = opt(True, "repair mojibake with ftfy (the repaired caption is written); false: reject it")
    languages: list[str] | None = opt(
        None, "allowed languages, ISO 639-1 codes (py3langid), e.g. [en]; null: any language"
    )
    language_min_words: int = opt(5, "captions shorter than this are not language-checked (too short to tell)")
    language_min_probability: float = opt(
        0.8, "a caption is dropped for its language only when identified at least this surely (names mislead)"
    )
    max_chars: int = opt(5000, "most characters a caption may have (checked first: no rule reads more)")
    min_words: int = opt(2, "fewest words a caption may have")
    max_words: int = opt(300, "most words a caption may have")
    rules: list[str] = opt(
        factory=lambda: list(CAPTION_RULES),
        doc="content-free caption rules: filename (IMG_1234.jpg), url, boilerplate ('stock photo', "
        "'image may contain'), repeated_tokens",
    )

    def __post_init__(self):
        _positive("min_words", self.min_words, allow_zero=True)
        _positive("max_words", self.max_words)
        _positive("language_min_words", self.language_min_words, allow_zero=True)
        if self.max_words < self.min_words:
            raise ValueError("'max_words' must be >= 'min_words'")
        if not 0 <= self.language_min_probability <= 1:
            raise ValueError(f"'language_min_probability' must be within 0-1, got {self.language_min_probability}")
        unknown = sorted(set(self.rules) - set(CAPTION_RULES))
        if unknown:
            raise ValueError(f"unknown rules {unknown}: choose from {list(CAPTION_RULES)}")
        _positive("max_chars", self.max_chars)
        if self.languages is not None:
            self.languages = [str(code).strip().lower() for code in self.languages]
            if not self.languages or any(not re.fullmatch("[a-z]{2}", code) for code in self.languages):
                raise ValueError(f"'languages' takes ISO 639-1 codes such as [en, de], got {self.languages}")


@dataclass
class SafetyConfig:
    """Image safety: an NSFW score for every image (Yahoo's open_nsfw on onnxruntime) and face boxes (OpenCV)."""

    nsfw_threshold: float | None = opt(
        0.8,
        "drop images whose NSFW score (0-1) reaches this (reason nsfw); 0 drops all, 1 none (scores still "
        "recorded); null: no NSFW model runs",
    )
    faces: bool = opt(True, "detect faces (OpenCV's Haar cascade) and record their boxes in the JSON and index")
    blur_faces: bool = opt(False, "blur the faces found in the written image (faces_blurred in the JSON)")
    face_min_size: float = opt(0.05, "smallest face searched for, as a fraction of the image's shorter side")
    min_batch_size: int = opt(1, "smallest batch RunInference forms for the NSFW model")
    max_batch_size: int = opt(32, "largest batch RunInference forms for the NSFW model")
    threads: int | None = opt(None, "onnxruntime threads per model (null: onnxruntime decides)")
    decode_threads: int = opt(2, "threads decoding images ahead of the NSFW model")
    providers: list[str] | None = opt(
        None, "onnxruntime execution providers, best first (null: CUDA when available, else CPU)"
    )

    def __post_init__(self):
        if self.nsfw_threshold is not None and not 0 <= self.nsfw_threshold <= 1:
            raise ValueError(f"'nsfw_threshold' must be within 0-1, got {self.nsfw_threshold}")
        if not 0 < self.face_min_size <= 1:
            raise ValueError(f"'face_min_size' must be within (0, 1], got {self.face_min_size}")
        if self.blur_faces and not self.faces:
            raise ValueError("'blur_faces' needs 'faces: true' (faces are blurred where they are found)")
        _positive("min_batch_size", self.min_batch_size)
        _positive("threads", self.threads)
        _positive("decode_threads", self.decode_threads)
        if self.max_batch_size < self.min_batch_size:
            raise ValueError("'max_batch_size' must be >= 'min_batch_size'")


EMBEDDINGS = ("open_nsfw", "clip")


@dataclass
class SemDedupConfig:
    """SemDeDup: near-copies (re-encodes, crops, flips, recolours) found by image embeddings, smallest key kept."""

    embedding: Literal["open_nsfw", "clip"] = opt(
        "clip",
        "image embeddings to compare: clip (the model below; in a build, the filter's by default) or open_nsfw "
        "(the safety model's pooled features: no second model runs)",
    )
    model: ClipModelConfig | None = opt(
        None, "the CLIP model for embedding: clip (in a build, null takes the filter's model)"
    )
    threshold: float = opt(0.95, "pairs at least this cosine-similar are duplicates; the smallest key is kept")
    clusters: int = opt(64, "k-means centroids at most, fit on one worker over a sample of the embeddings")
    min_cluster: int = opt(
        50, "sampled embeddings per centroid at least (a small sample gets fewer centroids: clusters hold pairs)"
    )
    sample: int = opt(20000, "embeddings the centroids are fit on (picked by key hash: the same on any runner)")
    max_cluster: int = opt(2000, "largest group compared pair by pair; bigger clusters are split first")
    seed: int = opt(0, "k-means seed")

    def __post_init__(self):
        if not 0 < self.threshold <= 1:
            raise ValueError(f"'threshold' must be within (0, 1], got {self.threshold}")
        for name in ("clusters", "min_cluster", "sample", "max_cluster"):
            _positive(name, getattr(self, name))
        if self.sample < self.clusters:
            raise ValueError("'sample' must be >= 'clusters' (centroids are fit on the sample)")
        if self.embedding == "open_nsfw" and self.model is not None:
            raise ValueError("'model' is the CLIP for embedding: clip; remove it with embedding: open_nsfw")


@dataclass
class BenchmarkConfig:
    """One evaluation set the dataset must not contain: its images, its questions, or both."""

    name: str = opt(doc="the benchmark's name (written in the dead letter's detail)")
    images: str | None = opt(
        None, "its images: a folder, glob or brace pattern of image files or shards, on any Beam filesystem"
    )
    questions: str | None = opt(
        None,
        "its questions: a file or glob (JSON list of strings or of objects with 'question', JSONL, LLaVA JSON, "
        "or text lines), on any Beam filesystem",
    )

    def __post_init__(self):
        if not self.name.strip():
            raise ValueError("'name' must name the benchmark")
        if self.images is None and self.questions is None:
            raise ValueError(f"benchmark {self.name!r} needs 'images', 'questions' or both")


@dataclass
class DecontaminateConfig:
    """Drop rows that overlap an evaluation benchmark (reason benchmark_overlap, the benchmark named)."""

    benchmarks: list[BenchmarkConfig] = opt(doc="the benchmarks to keep out of the dataset")
    ngram: int = opt(13, "words in a shared run that marks a conversation as copied (shorter questions: whole)")
    phash_distance: int = opt(4, "images within this many bits of a benchmark image's pHash overlap it (0-64)")
    embedding_threshold: float | None = opt(
        0.95, "images at least this cosine-similar to a benchmark image overlap it (null: pHash only)"
    )

    def __post_init__(self):
        if not self.benchmarks:
            raise ValueError("'benchmarks' lists at least one benchmark")
        names = [b.name for b in self.benchmarks]
        if len(set(names)) != len(names):
            raise ValueError(f"benchmark names must differ, got {names}")
        if self.ngram < 3:
            raise ValueError(f"'ngram' must be >= 3 (shorter runs are everyday phrases), got {self.ngram}")
        if not 0 <= self.phash_distance <= 64:
            raise ValueError(f"'phash_distance' must be within 0-64, got {self.phash_distance}")
        if self.embedding_threshold is not None and not 0 < self.embedding_threshold <= 1:
            raise ValueError(f"'embedding_threshold' must be within (0, 1], got {self.embedding_threshold}")


@dataclass
class CurateConfig:
    """``visinstruct curate``: drop unusable pairs, each with its reason; a null section does not run."""

    text: TextQualityConfig | None = opt(factory=TextQualityConfig, doc="caption quality; null to skip")
    safety: SafetyConfig | None = opt(factory=SafetyConfig, doc="NSFW score and face boxes; null to skip")
    semdedup: SemDedupConfig | None = opt(None, "semantic dedup over image embeddings; null to skip")
    decontaminate: DecontaminateConfig | None = opt(None, "benchmark decontamination; null to skip")
    input: str | None = opt(None, "input shards (standalone runs): a folder, glob or brace pattern of tars")
    write: OutputConfig | None = opt(None, "output shards (standalone runs)")

    def __post_init__(self):
        if self.safety is None and self.semdedup is not None and self.semdedup.embedding == "open_nsfw":
            raise ValueError(
                "'semdedup.embedding: open_nsfw' uses the safety model's features: give a 'safety' section "
                "(nsfw_threshold: null to embed without dropping)"
            )
        if not any((self.text, self.safety, self.semdedup, self.decontaminate)):
            raise ValueError(
                "curate has nothing to check: give it a 'text', 'safety', 'semdedup' or 'decontaminate' section"
            )
