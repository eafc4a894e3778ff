"""Typed configs: one per stage, one per job, one for a whole build. YAML only fills these.

``visinstruct config show <name>`` prints every key with its type, default and description.
Beam's own options (runner, project, workers...) are not here: they pass through to ``PipelineOptions``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Literal

from visinstruct.configs.loader import opt

InputFormat = Literal["auto", "parquet", "csv", "tsv", "jsonl", "txt", "folder", "coco", "llava", "hf"]
ResizeMode = Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"]
ImageFormat = Literal["jpg", "png", "webp"]
# img2dataset's names (OpenCV's): nearest, linear, cubic, area (box averaging) and lanczos4
Interpolation = Literal["nearest", "linear", "cubic", "area", "lanczos4"]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
# What a user_agent_token may hold: printable ASCII without the parentheses that would end its comment.
USER_AGENT_TOKEN = re.compile(r"[\x20-\x27\x2a-\x7e]+")


def _positive(name: str, value: float | None, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise ValueError(f"'{name}' must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _check_color(name: str, value: str) -> None:
    from PIL import ImageColor  # lazy: configs import without the image stack

    try:
        ImageColor.getrgb(value)
    except (ValueError, AttributeError, TypeError):
        raise ValueError(f"'{name}' must be a colour name, #rrggbb or rgb(r, g, b), got {value!r}") from None


@dataclass
class ReadConfig:
    """Where input rows come from (img2dataset's option names where they exist)."""

    path: str = opt(doc="input file, glob or folder; local or any Beam filesystem (gs://...)")
    format: InputFormat = opt(
        "auto",
        "input format; 'auto' picks by extension (a folder Hugging Face datasets' save_to_disk wrote: hf); "
        "hf: a local Hugging Face dataset, a save_to_disk folder or parquet files",
    )
    url_col: str = opt("url", "column holding the image URL (or path); hf reads images from image_col instead")
    caption_col: str | None = opt("caption", "column holding the caption; null for none")
    boxes_col: str | None = opt(None, "column of object boxes: a list (or JSON text) of {category, bbox}")
    tags_col: str | None = opt(None, "column of tags: a list (or JSON text) of strings")
    save_additional_columns: list[str] = opt(factory=list, doc="input columns kept in each sample's 'source'")
    image_root: str | None = opt(
        None, "folder that relative image paths (COCO, LLaVA JSON, hf image paths) are resolved against"
    )
    image_col: str | None = opt(
        None,
        "hf: column holding the image: an Image feature ({bytes, path}), bytes, or a path; null: the one column "
        "with an Image feature, else 'image'",
    )
    conversations_col: str | None = opt(
        None,
        "hf: column of LLaVA-style conversations, a list (or JSON text) of {from, value}; null: 'conversations' "
        "when the input has it",
    )
    split: str | None = opt(
        None, "hf: the split to read from a saved DatasetDict (a folder with dataset_dict.json) holding several"
    )

    HF_ONLY: ClassVar[tuple[str, ...]] = ("image_col", "conversations_col", "split")

    def __post_init__(self):
        if self.format not in ("hf", "auto"):
            given = [k for k in self.HF_ONLY if getattr(self, k) is not None]
            if given:
                raise ValueError(f"'{given[0]}' is read.format hf's; remove it or set format: hf")
        if self.format == "hf" and self.url_col != "url":
            raise ValueError("'url_col': format hf reads each image from its row (image_col), never from a URL")


@dataclass
class DownloadConfig:
    """How images are fetched: concurrency, timeouts, retries, politeness and safety."""

    threads: int = opt(64, "concurrent requests per worker")
    timeout: float = opt(10.0, "seconds per request (connect and each read)")
    retries: int = opt(2, "extra attempts for retryable failures (timeouts, 5xx, 429)")
    backoff: float = opt(0.5, "first retry delay in seconds; doubles each attempt, with jitter")
    max_backoff: float = opt(30.0, "longest delay between attempts, Retry-After included")
    max_redirects: int = opt(5, "redirects followed before giving up")
    max_bytes: int = opt(32 * 1024 * 1024, "largest body accepted, in bytes")
    user_agent: str = opt("visinstruct/0.1 (+https://github.com/visinstruct/visinstruct)", "User-Agent header")
    user_agent_token: str | None = opt(
        None,
        "img2dataset's token (--user_agent_token): appended to the User-Agent as '(compatible; TOKEN)', and "
        "X-Robots-Tag directives addressed to it are honoured too",
    )
    per_host_rps: float | None = opt(
        10.0,
        "requests per second to one host across the whole job (each host's URLs go to a bounded set of fetch "
        "partitions); null for no limit (and no routing: each shard fetched where it is written, the fastest path)",
    )
    fetch_partitions: int = opt(
        64, "with per_host_rps: how many fetch partitions hosts are spread over (the fetch step's parallelism)"
    )
    large_host_urls: int = opt(
        2000,
        "with per_host_rps: a host with more URLs in the job than this is split over ceil(urls / this) fetch "
        "partitions (at most fetch_partitions), each with an equal share of per_host_rps",
    )
    respect_optout: bool = opt(True, "skip images whose X-Robots-Tag opts out (see optout_values)")
    optout_values: list[str] = opt(
        factory=lambda: ["noai", "noimageai", "noindex", "noml"], doc="X-Robots-Tag directives that opt an image out"
    )
    check_robots_txt: bool = opt(
        True,
        "honour each host's robots.txt (one cached request per host: per job with per_host_rps, else per worker; "
        "5xx or no answer: disallow, RFC 9309)",
    )
    allow_loopback: bool = opt(False, "allow 127.0.0.0/8 and ::1 (tests and demos only)")
    allow_private: bool = opt(False, "allow private, link-local and cloud-metadata addresses")
    progress_interval: float = opt(
        30.0, "seconds between progress lines of a downloading shard (rows done, ok, rejected, rate); 0 logs every row"
    )

    def __post_init__(self):
        for name in ("threads", "timeout", "max_bytes", "fetch_partitions", "large_host_urls"):
            _positive(name, getattr(self, name))
        for name in ("retries", "backoff", "max_backoff", "max_redirects", "progress_interval"):
            _positive(name, getattr(self, name), allow_zero=True)
        _positive("per_host_rps", self.per_host_rps)
        if self.user_agent_token is not None and not USER_AGENT_TOKEN.fullmatch(self.user_agent_token):
            raise ValueError(
                f"'user_agent_token' must be printable ASCII without parentheses, got {self.user_agent_token!r}"
            )


@dataclass
class ResizeConfig:
    """Validation and resizing (img2dataset's resizer options)."""

    image_size: int = opt(256, "target size in pixels")
    resize_mode: ResizeMode = opt("border", "no, keep_ratio, keep_ratio_largest, center_crop or border")
    resize_only_if_bigger: bool = opt(False, "never upscale")
    downscale_interpolation: Interpolation = opt(
        "area", "filter when shrinking: nearest, linear, cubic, area or lanczos4 (img2dataset's names and default)"
    )
    upscale_interpolation: Interpolation = opt(
        "lanczos4", "filter when enlarging: nearest, linear, cubic, area or lanczos4 (img2dataset's default)"
    )
    border_color: str = opt(
        "white", "what 'border' pads with: a colour name, #rrggbb or rgb(r, g, b) (img2dataset: white)"
    )
    min_image_size: int = opt(
        32, "reject images whose smaller side is below this (icons, tracking pixels; img2dataset: 0)"
    )
    max_image_area: int | None = opt(None, "reject images with more pixels than this (before resizing)")
    max_aspect_ratio: float | None = opt(
        3.0, "reject images more elongated than this (banners, strips; DataComp's basic filter: 3; img2dataset: none)"
    )
    max_pixels: int = opt(89_478_485, "decompression-bomb guard: refuse to decode more pixels than this")
    encode_format: ImageFormat = opt("jpg", "output image format")
    encode_quality: int = opt(95, "JPEG/WebP quality (PNG: compression level 0-9)")

    def __post_init__(self):
        _positive("image_size", self.image_size)
        _positive("min_image_size", self.min_image_size, allow_zero=True)
        _positive("max_pixels", self.max_pixels)
        if self.max_aspect_ratio is not None and self.max_aspect_ratio < 1:
            raise ValueError(f"'max_aspect_ratio' must be >= 1, got {self.max_aspect_ratio}")
        _check_color("border_color", self.border_color)
        if not 0 <= self.encode_quality <= 100:
            raise ValueError(f"'encode_quality' must be within 0-100, got {self.encode_quality}")


@dataclass
class DedupConfig:
    """Duplicate removal across the whole input."""

    urls: bool = opt(True, "drop repeated URLs before downloading")
    sha256: bool = opt(True, "drop exact duplicate images (one deterministic winner: the smallest key)")
    phash_max_distance: int | None = opt(None, "also drop near-duplicates within this Hamming distance")
    reference_dir: str | None = opt(None, "drop images near-identical to any image here (eval sets)")
    takedown_lists: list[str] = opt(
        factory=list,
        doc="takedown lists (paths or globs): listed URLs are never "
        "downloaded and images with a listed sha256 are dropped, reason 'takedown'; text "
        "files (a URL or sha256 per line) or parquet tables with url/sha256 columns, "
        "such as an earlier dataset's indexes (their rows with status takedown)",
    )

    @property
    def uses_phash(self) -> bool:
        """Whether a step compares images by their looks (near dedup, reference images): else ingest skips the
        perceptual hash."""
        return self.phash_max_distance is not None or bool(self.reference_dir)

    def __post_init__(self):
        if self.phash_max_distance is not None and not 0 <= self.phash_max_distance <= 64:
            raise ValueError(f"'phash_max_distance' must be within 0-64, got {self.phash_max_distance}")


@dataclass
class WriteConfig:
    """The output dataset folder of an ingest: WebDataset tars, parquet indexes, stats (see FORMAT.md)."""

    path: str | None = opt(
        None, "output folder; local or any Beam filesystem (standalone ingest: required, or --out; a build: its out)"
    )
    shard_size: int = opt(10_000, "input rows per shard (img2dataset's number_sample_per_shard)")
    resume: bool = opt(
        True,
        "skip shards whose stats file already exists, except shards whose rows all failed "
        "for a reason a rerun may fix (retryable or caused by the settings, e.g. "
        "blocked_address), and reuse downloads a killed run finished (staged, see FORMAT.md)",
    )
    retry_failed: bool = opt(
        False,
        "in complete shards, download again only the rows that failed with a "
        "retryable error (timeouts, connection errors, 5xx, 429) or one the settings "
        "caused (blocked_address, internal_error...) and rewrite those shards",
    )
    energon: bool = opt(
        False,
        "at the end of a successful run, write Megatron-Energon's metadata (.nv-meta/ and NNNNN.tar.idx) from "
        "the indexes, so energon loads the shards with no `energon prepare` (or later: visinstruct energon DIR)",
    )

    def __post_init__(self):
        _positive("shard_size", self.shard_size)


@dataclass
class OutputConfig:
    """The output folder of a stage that rewrites shards (filter, generate): one output shard per input shard.

    Only the path: the shard size, resuming and retrying belong to ingest, which cuts and downloads the shards, so
    a rewriting stage refuses them rather than ignoring them.
    """

    REFUSED: ClassVar[dict[str, str]] = {
        "shard_size": "filter and generate keep their input's shards; the shard size is ingest's: remove it",
        "resume": "filter and generate rewrite every input shard; resuming is ingest's: remove it",
        "retry_failed": "filter and generate rewrite every input shard; retrying downloads is ingest's: remove it",
    }

    path: str = opt(doc="output folder; local or any Beam filesystem")


@dataclass(kw_only=True)
class ComputeConfig:
    """Where a model runs (the filter's CLIP, the generation LLM, the trainers): one definition of these keys."""

    device: Device = opt(
        "auto", "cuda when available (under torchrun: this process's LOCAL_RANK), else cpu; or force one"
    )
    precision: Precision = opt("auto", "bf16 on CUDA, fp32 on CPU, unless forced (fp16: inference only)")
    threads: int | None = opt(None, "torch CPU threads per process; null lets torch decide")

    def __post_init__(self):
        _positive("threads", self.threads)


@dataclass
class IngestConfig:
    """``visinstruct ingest``: URL lists or annotated datasets to deduplicated, resized shards."""

    read: ReadConfig = opt(doc="input rows")
    write: WriteConfig = opt(factory=WriteConfig, doc="output shards")
    download: DownloadConfig = opt(factory=DownloadConfig, doc="fetching")
    resize: ResizeConfig = opt(factory=ResizeConfig, doc="validation and resizing")
    dedup: DedupConfig = opt(factory=DedupConfig, doc="duplicate removal")


@dataclass
class ClipModelConfig(ComputeConfig):
    """A CLIP-like model for scoring image-text pairs."""

    backend: Literal["open_clip", "transformers"] = opt("open_clip", "model library")
    name: str = opt("ViT-B-32", "open_clip architecture or transformers model id / local path")
    pretrained: str | None = opt(None, "open_clip pretrained tag or checkpoint path")
    min_batch_size: int = opt(1, "smallest batch RunInference forms")
    max_batch_size: int = opt(64, "largest batch RunInference forms")
    config_file: str | None = opt(
        None,
        "open_clip model config JSON to register first, named <name>.json "
        "(custom architectures, e.g. from `visinstruct train-clip`)",
    )
    model_copies: int | None = opt(None, "models per machine, shared across processes (one per GPU on Dataflow)")
    large_model: bool = opt(False, "share one model across all processes of a machine")
    decode_threads: int = opt(4, "threads decoding and preprocessing images ahead of the model")
    accelerator: str | None = opt(
        None, "Beam resource hint for the scoring step only, e.g. 'type:nvidia-l4;count:1;install-nvidia-driver'"
    )

    def __post_init__(self):
        super().__post_init__()
        _positive("min_batch_size", self.min_batch_size)
        _positive("decode_threads", self.decode_threads)
        if self.max_batch_size < self.min_batch_size:
            raise ValueError("'max_batch_size' must be >= 'min_batch_size'")
        if self.backend == "transformers":
            given = [k for k in ("pretrained", "config_file") if getattr(self, k) is not None]
            if given:
                raise ValueError(
                    f"'{given[0]}' is open_clip's: with backend transformers, 'name' names the whole model; "
                    f"remove {' and '.join(given)}"
                )


@dataclass
class FilterConfig:
    """``visinstruct filter``: score pairs with CLIP and keep them by threshold and/or top fraction."""

    model: ClipModelConfig = opt(factory=ClipModelConfig, doc="scoring model")
    threshold: float | None = opt(None, "keep pairs scoring at least this")
    top_fraction: float | None = opt(None, "keep this fraction of best-scoring pairs (global, ties by key)")
    store_embeddings: bool = opt(False, "write float16 image and text embeddings to the parquet index")
    input: str | None = opt(None, "input shards (standalone runs): a folder, glob or brace pattern of tars")
    write: OutputConfig | None = opt(None, "output shards (standalone runs)")

    def __post_init__(self):
        if self.top_fraction is not None and not 0 < self.top_fraction <= 1:
            raise ValueError(f"'top_fraction' must be within (0, 1], got {self.top_fraction}")
