"""Typed configs (dataclasses filled from YAML) and the YAML files that ship with visinstruct.

Load one with ``load(IngestConfig, "configs/ingest/demo.yaml", overrides=["download.threads=8"])``.
"""

from pathlib import Path

from visinstruct.configs.build import CONFIGS, BuildConfig
from visinstruct.configs.curate import (
    CAPTION_RULES,
    BenchmarkConfig,
    CurateConfig,
    DecontaminateConfig,
    SafetyConfig,
    SemDedupConfig,
    TextQualityConfig,
)
from visinstruct.configs.eval import EvalConfig, ZeroShotConfig
from visinstruct.configs.generate import (
    GenerateConfig,
    GroundingConfig,
    ImageConfig,
    LocalLLMConfig,
    OpenAIConfig,
    TransformersLLMConfig,
    VllmConfig,
)
from visinstruct.configs.loader import ConfigError, apply_overrides, describe, from_dict, load, opt
from visinstruct.configs.mix import MixConfig, MixSourceConfig
from visinstruct.configs.stages import (
    ClipModelConfig,
    ComputeConfig,
    DedupConfig,
    DownloadConfig,
    FilterConfig,
    IngestConfig,
    OutputConfig,
    ReadConfig,
    ResizeConfig,
    WriteConfig,
)
from visinstruct.configs.train import (
    ClipArchConfig,
    ClipEvalConfig,
    ClipTrainConfig,
    LockConfig,
    OptimConfig,
    StreamConfig,
)
from visinstruct.configs.train_llava import (
    LanguageModelConfig,
    LlavaEvalConfig,
    LlavaModelConfig,
    LlavaTrainConfig,
    TextConfig,
    VisionTowerConfig,
)

# build.py holds the pipelines' registry; the trainers' and curate's configs join it here (they import stages.py).
CONFIGS["train-clip"] = ClipTrainConfig
CONFIGS["train"] = LlavaTrainConfig
CONFIGS["curate"] = CurateConfig
CONFIGS["eval"] = EvalConfig
CONFIGS["mix"] = MixConfig

CONFIG_DIR = Path(__file__).parent  # the bundled YAML files live beside this module

__all__ = [
    "CAPTION_RULES",
    "CONFIGS",
    "BenchmarkConfig",
    "DecontaminateConfig",
    "SafetyConfig",
    "SemDedupConfig",
    "CONFIG_DIR",
    "BuildConfig",
    "ClipArchConfig",
    "ClipEvalConfig",
    "ClipModelConfig",
    "ClipTrainConfig",
    "ComputeConfig",
    "ConfigError",
    "CurateConfig",
    "EvalConfig",
    "DedupConfig",
    "DownloadConfig",
    "FilterConfig",
    "GenerateConfig",
    "GroundingConfig",
    "ImageConfig",
    "IngestConfig",
    "LanguageModelConfig",
    "LlavaEvalConfig",
    "LlavaModelConfig",
    "LlavaTrainConfig",
    "LocalLLMConfig",
    "LockConfig",
    "MixConfig",
    "MixSourceConfig",
    "OpenAIConfig",
    "OptimConfig",
    "OutputConfig",
    "ReadConfig",
    "ResizeConfig",
    "StreamConfig",
    "TextConfig",
    "TextQualityConfig",
    "TransformersLLMConfig",
    "VllmConfig",
    "VisionTowerConfig",
    "WriteConfig",
    "ZeroShotConfig",
    "apply_overrides",
    "describe",
    "from_dict",
    "load",
    "opt",
]
